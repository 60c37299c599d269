"""`coel` commands of the testbed room: clean, topo show/validate, net up, run, demo, inject, report.

Each command has its own `_register_<name>(sub)` function listed in REGISTRARS; add a command
by writing one more registrar and appending it (run/demo/inject/report call testbed/runner.py).
"""
from __future__ import annotations

import argparse
import sys
import time


# ---- coel clean ------------------------------------------------------------------------------
def _register_clean(sub) -> None:
    p = sub.add_parser("clean", help="remove leftovers of testbed networks (like mn -c, but ours)",
                       description="Kill processes in leftover testbed hosts, delete their "
                       "interfaces, bridges, cgroups and state files. Networks whose owner process "
                       "is alive are left alone unless --all.")
    p.add_argument("--all", action="store_true", help="also clean networks whose owner is alive")
    p.add_argument("--prefix", action="append", default=None,
                   help="clean only this network prefix (repeatable; see /run/coel/nets)")
    p.add_argument("--mn", action="store_true",
                   help="also run Mininet's own cleanup (mn -c): affects ALL Mininet networks")
    p.set_defaults(func=_cmd_clean)


def _cmd_clean(args) -> int:
    import os
    from coel_model.errors import InfeasibleError
    from testbed.cleanup import clean
    if os.geteuid() != 0:
        raise InfeasibleError("coel clean needs root (it deletes interfaces and cgroups)")
    report = clean(all_networks=args.all, prefixes=args.prefix, mininet_too=args.mn)
    print(report.summary())
    return 0


# ---- coel topo show / validate ---------------------------------------------------------------
def _register_topo(sub) -> None:
    p = sub.add_parser("topo", help="show or validate topology files (no root needed)")
    tsub = p.add_subparsers(dest="topo_command", metavar="ACTION")
    tsub.required = True
    s = tsub.add_parser("show", help="print a topology: servers, clients, links, paths")
    s.add_argument("topology", nargs="?", default=None,
                   help="bundled name or YAML path (default: edge-star-5)")
    s.add_argument("--paths", action="store_true", help="also print client -> entry paths and "
                   "server-to-server one-way delays")
    s.set_defaults(func=_cmd_topo_show)
    v = tsub.add_parser("validate", help="validate topology files; exit 2 on the first error")
    v.add_argument("files", nargs="*", help="YAML paths or bundled names (default: all bundled)")
    v.set_defaults(func=_cmd_topo_validate)
    ls = tsub.add_parser("list", help="list bundled topologies")
    ls.set_defaults(func=_cmd_topo_list)


def _cmd_topo_list(args) -> int:
    from topologies import bundled_topologies, load_topology
    for name in bundled_topologies():
        t = load_topology(name)
        print(f"{name:<18} {len(t.servers)} servers, {len(t.clients)} clients, "
              f"{len(t.links)} links  {t.description}")
    return 0


def _cmd_topo_show(args) -> int:
    from topologies import DEFAULT_TOPOLOGY, load_topology
    from topologies.paths import (bottleneck_bw_mbit, path_delay_ms, path_jitter_ms,
                                  shortest_path)
    t = load_topology(args.topology or DEFAULT_TOPOLOGY)
    print(f"topology {t.name} ({t.source}): {t.description}")
    print(f"agent_overhead_mb={t.agent_overhead_mb:g} convergence_ms={t.convergence_ms:g}")
    print("servers:")
    for s in t.servers:
        print(f"  {s.name:<8} site={s.site or '-':<8} memory_mb={s.memory_mb:<6g} "
              f"cpu_share={s.cpu_share:<5g} class={s.compute_class} "
              f"(cgroup {t.cgroup_memory_mb(s.name):g} MiB)")
    print(f"total shard memory: {sum(s.memory_mb for s in t.servers):g} MiB")
    print(f"controller: {t.controller.name}")
    if t.clients:
        print("clients:")
        for c in t.clients:
            w = c.workload
            print(f"  {c.name:<8} entry={c.entry:<6} rate_rps={w.rate_rps:g} "
                  f"prompt={w.prompt_tokens} new={w.max_new_tokens} slo_ttft_ms={w.slo_ttft_ms:g} "
                  f"slo_tpot_ms={w.slo_tpot_ms:g} class={w.slo_class}")
    if t.routers:
        print("routers: " + " ".join(r.name for r in t.routers))
    if t.switches:
        print("switches: " + " ".join(s.name for s in t.switches))
    print("links:")
    for l in t.links:
        bw = "unlimited" if l.bw_mbit is None else f"{l.bw_mbit:g}Mbit"
        extra = "".join([f" jitter={l.jitter_ms:g}ms" if l.jitter_ms else "",
                         f" loss={l.loss_pct:g}%" if l.loss_pct else "",
                         f" queue={l.queue_pkts}" if l.queue_pkts else "",
                         "" if l.up else " DOWN"])
        print(f"  {l.a:>8} -- {l.b:<8} {bw:>10} delay={l.delay_ms:g}ms{extra}")
    if args.paths:
        print("paths (one way):")
        pairs = [(c.name, c.entry) for c in t.clients]
        names = [s.name for s in t.servers]
        pairs += [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
        for a, b in pairs:
            p = shortest_path(t, a, b)
            if p is None:
                print(f"  {a} -> {b}: unreachable")
                continue
            bw = bottleneck_bw_mbit(t, p)
            print(f"  {a} -> {b}: {path_delay_ms(t, p):g} ms (jitter {path_jitter_ms(t, p):.3g}), "
                  f"bottleneck {'unlimited' if bw is None else f'{bw:g} Mbit/s'}: {' > '.join(p)}")
    return 0


def _cmd_topo_validate(args) -> int:
    from topologies import bundled_topologies, load_topology
    targets = args.files or bundled_topologies()
    for f in targets:
        t = load_topology(f)  # ConfigError -> "coel topo: error: FILE:LINE: field: ..." exit 2
        print(f"ok  {t.source}: {t.name}, {len(t.servers)} servers, {len(t.links)} links")
    return 0


# ---- coel net up -----------------------------------------------------------------------------
def _register_net(sub) -> None:
    p = sub.add_parser("net", help="bring a topology's emulated network up for interactive use")
    nsub = p.add_subparsers(dest="net_command", metavar="ACTION")
    nsub.required = True
    up = nsub.add_parser("up", help="build the network in Mininet, then wait (Ctrl-C tears it down)")
    up.add_argument("topology", nargs="?", default=None,
                    help="bundled name or YAML path (default: edge-star-5)")
    up.add_argument("--mode", default="auto", help="link emulation: auto, netem or emulated")
    up.add_argument("--run-dir", default=None, help="folder for linkemu/*.json (default: a temp dir)")
    up.add_argument("--cli", action="store_true", help="open the Mininet CLI (node names are "
                    "the mininet= names printed)")
    up.add_argument("--duration-s", type=float, default=None,
                    help="tear down after this many seconds (default: wait for Ctrl-C)")
    up.set_defaults(func=_cmd_net_up)


def _cmd_net_up(args) -> int:
    from testbed.netbuild import TestbedNet
    from topologies import DEFAULT_TOPOLOGY, load_topology
    topo = load_topology(args.topology or DEFAULT_TOPOLOGY)
    with TestbedNet(topo, args.run_dir, mode=args.mode) as net:
        print("\n".join(net.describe()), flush=True)
        if args.cli:
            from mininet.cli import CLI
            CLI(net.net)
        elif args.duration_s is not None:
            time.sleep(args.duration_s)
        else:
            print("network is up; Ctrl-C to tear it down", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    print("network stopped and cleaned up", file=sys.stderr)
    return 0


# ---- coel run / demo / inject / report (testbed/runner.py) ------------------------------------
def _add_run_options(p) -> None:
    p.add_argument("--static", action="store_true", default=None,
                   help="keep the initial plan (no re-deployment), to compare with adaptive")
    p.add_argument("--duration-s", type=float, default=None, help="traffic duration (overrides the scenario)")
    p.add_argument("--drain-s", type=float, default=None, help="wait at most this long for requests in flight")
    p.add_argument("--out", default="runs", help="parent folder of run folders (default: runs/)")
    p.add_argument("--emulation", choices=("auto", "netem", "emulated"), default=None,
                   help="link emulation mode (default: the scenario's, normally auto)")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the scenario's)")
    p.add_argument("--profile", default=None, help="coel-profile JSON (default: MODEL/profile.json)")
    p.add_argument("--strategy", default=None, help="planner strategy (default: the scenario's)")
    p.add_argument("--serving-timeout-s", type=float, default=300.0,
                   help="give up if the controller is not serving after this long")
    p.add_argument("--no-compression", action="store_true", help="fp32 passthrough on every link")


def _add_cluster_option(p) -> None:
    p.add_argument("--cluster", default=None, help="cluster.yaml: build the topology across these machines "
                   "(Mininet Cluster Edition over SSH; see docs/running.md)")


def _register_run(sub) -> None:
    p = sub.add_parser("run", help="run a scenario in Mininet: deploy, traffic, faults, report",
                       description="Build the scenario's topology in Mininet, start the controller, agents, "
                       "entries and clients in their hosts, inject the scenario's events at their times, "
                       "then tear everything down and write the report. The last line printed is the run "
                       "folder.")
    p.add_argument("scenario", help="bundled scenario name (testbed/scenarios) or a YAML path")
    _add_run_options(p)
    _add_cluster_option(p)
    p.set_defaults(func=_cmd_run)


def _register_demo(sub) -> None:
    p = sub.add_parser("demo", help="coel run demo: edge-star-5, the bundled model, traffic, a link "
                       "failure mid-run (a few minutes)")
    _add_run_options(p)
    _add_cluster_option(p)
    p.set_defaults(func=_cmd_run, scenario="demo")


def _run_options(args):
    from pathlib import Path
    from testbed.runner import RunOptions
    return RunOptions(out_dir=Path(args.out), static=args.static, duration_s=args.duration_s,
                      drain_s=args.drain_s, emulation=args.emulation, model=args.model, profile=args.profile,
                      strategy=args.strategy, serving_timeout_s=args.serving_timeout_s,
                      no_compression=args.no_compression, cluster=getattr(args, "cluster", None))


def _cmd_run(args) -> int:
    from testbed.report import summary_table
    from testbed.runner import run_scenario
    from testbed.scenario import load_scenario
    sc = load_scenario(args.scenario)
    res = run_scenario(sc, _run_options(args))
    if res.summary is not None:
        print(summary_table(res.summary))
    if res.outcome != "completed" or res.error:
        print(f"run {res.outcome}{': ' + res.error if res.error else ''}", file=sys.stderr)
    print(res.run_dir, flush=True)
    return 0 if res.outcome == "completed" and not res.error else 1


def _register_deploy(sub) -> None:
    p = sub.add_parser("deploy", help="run the controller, agents, entries and clients on real hosts over SSH",
                       description="No Mininet: start every process of the runtime contract over SSH at the "
                       "addresses of an inventory file (testbed/inventory.py), with CURVE keys made for the run, "
                       "cgroup limits where root, the scenario's events, and the same run folder and report as "
                       "`coel run`. --dry-run prints what would run where and starts nothing.")
    p.add_argument("inventory", help="inventory YAML (hosts: address, user, key, roles, limits, root)")
    p.add_argument("--scenario", default=None, help="scenario YAML for duration, workload and events "
                   "(its topology is replaced by the inventory's)")
    p.add_argument("--dry-run", action="store_true", help="print what would run where; start nothing")
    _add_run_options(p)
    p.set_defaults(func=_cmd_deploy)


def _cmd_deploy(args) -> int:
    from coel_model.errors import ConfigError
    from testbed.deploy import deploy_scenario
    from testbed.inventory import load_inventory
    from testbed.report import summary_table
    from testbed.scenario import load_scenario
    if not args.model:
        raise ConfigError("coel deploy needs --model DIR (the checkpoint folder, present at the same "
                          "path on every host, or inside the checkout)")
    inv = load_inventory(args.inventory)
    sc = load_scenario(args.scenario) if args.scenario else None
    res = deploy_scenario(inv, args.model, sc, _run_options(args), dry_run=args.dry_run)
    if isinstance(res, str):
        print(res)
        return 0
    if res.summary is not None:
        print(summary_table(res.summary))
    if res.outcome != "completed" or res.error:
        print(f"deploy {res.outcome}{': ' + res.error if res.error else ''}", file=sys.stderr)
    print(res.run_dir, flush=True)
    return 0 if res.outcome == "completed" and not res.error else 1


_INJECT_VALUES = ("bw_mbit", "delay_ms", "jitter_ms", "loss_pct", "cpu_share", "memory_mb", "slo_ttft_ms",
                  "slo_tpot_ms", "cores", "duration_s")  # numeric event fields, given as --bw-mbit etc.


def _register_inject(sub) -> None:
    p = sub.add_parser("inject", help="inject a fault into a running `coel run`",
                       description="Examples: coel inject RUN link_down e2 hub | coel inject RUN bw e5 hub "
                       "--bw-mbit 20 | coel inject RUN server_crash e2 | coel inject RUN slo interactive "
                       "--slo-tpot-ms 200 | coel inject RUN cpu_hog machine --cores 2 --duration-s 30")
    p.add_argument("run_dir", help="folder of a run in progress")
    p.add_argument("kind", help="link_down, link_up, bw, delay, loss, restore, server_crash, server_restart, "
                   "cpu_squeeze, mem_squeeze, cpu_hog, slo")
    p.add_argument("target", nargs="+", help="A B (a link), SERVER, or SLO_CLASS (cpu_hog: SERVER or 'machine')")
    for k in _INJECT_VALUES:
        p.add_argument("--" + k.replace("_", "-"), type=float, default=None)
    p.add_argument("--process", choices=("all", "agent", "entry"), default=None,
                   help="server_crash: kill only this process of the server (default: agent and entry)")
    p.add_argument("--wait-s", type=float, default=10.0, help="how long to wait for the runner's answer")
    p.set_defaults(func=_cmd_inject)


def _cmd_inject(args) -> int:
    from coel_model.errors import ConfigError
    from testbed.runner import send_inject
    from testbed.scenario import EVENT_FIELDS
    if args.kind not in EVENT_FIELDS:
        raise ConfigError(f"unknown fault kind {args.kind!r} (known: {', '.join(EVENT_FIELDS)})")
    req, _ = EVENT_FIELDS[args.kind]
    ev: dict = {"kind": args.kind}
    if "link" in req:
        if len(args.target) != 2:
            raise ConfigError(f"{args.kind} needs a link: two node names, got {args.target}")
        ev["link"] = list(args.target)
    else:
        if len(args.target) != 1:
            raise ConfigError(f"{args.kind} needs one name, got {args.target}")
        if args.kind == "cpu_hog":
            if args.target[0] != "machine":
                ev["server"] = args.target[0]
        else:
            ev["server" if "server" in req else "slo_class"] = args.target[0]
    for k in _INJECT_VALUES:
        v = getattr(args, k)
        if v is not None:
            ev[k] = v
    if args.process is not None:
        ev["process"] = args.process
    r = send_inject(args.run_dir, ev, wait_s=args.wait_s)
    if r.get("ok"):
        print(f"injected {args.kind} {' '.join(args.target)} ({r['attrs'].get('apply_ms')} ms)")
        return 0
    print(f"coel inject: error: {r.get('error')}", file=sys.stderr)
    return 2


def _register_report(sub) -> None:
    p = sub.add_parser("report", help="rebuild a run folder's summary, CSV, Chrome trace and plots")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print summary.json instead of the table")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    import json
    from pathlib import Path
    from coel_model.errors import ConfigError
    from testbed.report import build_report, summary_table
    run = Path(args.run_dir)
    if not run.is_dir():
        raise ConfigError(f"{run}: no such run folder")
    summary = build_report(run)
    print(json.dumps(summary, indent=2) if args.json else summary_table(summary))
    print(run)
    return 0


def _register_compare(sub) -> None:
    p = sub.add_parser("compare", help="run one scenario per strategy (same traffic and faults), side by side",
                       description="Runs SCENARIO once per strategy and repeat in Mininet with the same seeded "
                       "traffic and fault schedule (each run is a normal `coel run` folder), then writes "
                       "compare.json, compare.txt and plots (testbed/compare.py). The last line printed is "
                       "the compare folder.")
    p.add_argument("scenario", help="bundled scenario name (testbed/scenarios) or a YAML path")
    p.add_argument("--strategies", default="coel,uniform,pipeline,offload,random",
                   help="comma-separated planner strategies (default: all)")
    p.add_argument("--repeats", type=int, default=1, help="runs per strategy (figures are medians)")
    p.add_argument("--no-quality", action="store_true",
                   help="skip measuring the deployed widths' held-out perplexity and top-1 agreement")
    _add_run_options(p)
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args) -> int:
    from dataclasses import replace
    from pathlib import Path
    from testbed.compare import parse_strategies, run_compare
    from testbed.netbuild import check_can_build
    strategies = parse_strategies(args.strategies)
    check_can_build()
    opt = replace(_run_options(args), strategy=None)
    doc = run_compare(args.scenario, strategies, args.repeats, opt, Path(args.out), quality=not args.no_quality)
    print(doc["table"])
    print(doc["folder"], flush=True)
    failed = [s for s, v in doc["strategies"].items() if any(r["outcome"] != "completed" for r in v["runs"])]
    if failed:
        print(f"coel compare: runs not completed for {failed} (see their run folders)", file=sys.stderr)
    return 1 if failed else 0


def _register_forward(sub) -> None:
    p = sub.add_parser("forward", help="reach a running `coel run`'s HTTP API and /metrics from this machine",
                       description="Relays 127.0.0.1:BASE (the controller's /metrics) and BASE+1... (each entry's "
                       "OpenAI-compatible API and /metrics) into the run's Mininet hosts, and writes "
                       "RUN/prometheus.yml for them (docs/http-api.md).")
    p.add_argument("run_dir", help="folder of a run in progress")
    p.add_argument("--base-port", type=int, default=8000, help="local port of the controller; entries follow")
    p.add_argument("--bind", default="127.0.0.1", help="local address to listen on")
    p.set_defaults(func=_cmd_forward)


def _cmd_forward(args) -> int:
    from testbed.forward import forward_run
    return forward_run(args.run_dir, args.base_port, args.bind)


REGISTRARS = [_register_clean, _register_topo, _register_net, _register_run, _register_demo, _register_inject,
              _register_report, _register_deploy, _register_compare, _register_forward]


def register(sub: argparse._SubParsersAction) -> None:
    for reg in REGISTRARS:
        reg(sub)
