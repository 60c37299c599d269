"""Dynamic re-deployment in Mininet (root): detect, re-plan, migrate and recover, per event.

For each topology (edge-star-5, metro-ring-8) and each event (a link failure isolating a
server, a 10x bandwidth drop on a server's link, a server crash), one `coel run` of a scenario
with that single event: the controller is never told what was injected. From the run's report
(testbed/report.py fault_responses, measured from the outside):
  detect_s    fault -> first controller reaction naming the server/link (goal <= 1 s)
  replan_s    the planner's time for the re-plan that followed
  bytes_moved shard bytes loaded onto servers by the migration
  recovery_s  fault -> per-token latency back within 20% of its pre-event p50 (goal <= 5 s)
  lost        requests lost after the fault (goal 0)
Targets come from the CoEL plan (`choose_targets`): the non-entry server holding the most
experts, or, when the plan is intra-server, the fallbacks described there; `held` says how many
experts the initial plan gave the target.

    sudo .venv/bin/python benchmarks/redeploy.py [--model DIR] [--json-out FILE | --json]
        [--duration-s 30] [--topologies edge-star-5,metro-ring-8] [--events link,bw,crash]
    sudo .venv/bin/python benchmarks/redeploy.py --static-vs-adaptive [--plot FILE]
        (the same failure schedule with `--static` and adaptive: docs/evaluation.md)
    sudo .venv/bin/python benchmarks/redeploy.py --static-vs-adaptive --scenario demo [--plot FILE]
        (a bundled scenario with its own schedule, static then adaptive, with a per-phase table)
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from testbed.runner import RunOptions, make_random_model, run_scenario  # noqa: E402
from testbed.scenario import parse_scenario  # noqa: E402
from topologies import load_topology  # noqa: E402

EVENTS = ("link", "bw", "crash")
TIGHT_TOPOLOGY = REPO / "testbed" / "scenarios" / "topologies" / "tight-star-4.yaml"


def offline_plan(topo, model: str) -> dict:
    """The CoEL plan the controller will most likely make (from the topology's nominal links; the
    live one uses measured RTT/goodput): used only to pick which server or link to fail."""
    from coel_model.checkpoint import load_config
    from controller.cluster import cluster_from_topology
    from controller.plan import PlanOptions, requirements_from_topology
    from controller.planner import plan
    from coel_model.profile_format import load_profile
    from controller.profile import synthetic_profile
    cfg = load_config(model)
    prof_path = Path(model) / "profile.json"
    prof = load_profile(prof_path) if prof_path.exists() else \
        synthetic_profile(cfg, backbone_params=cfg.param_counts().get("backbone"), source="bench")
    entries = sorted({c.entry for c in topo.clients})
    p = plan(prof, cluster_from_topology(topo), requirements_from_topology(topo, default_entry=entries[0]),
             "coel", None, PlanOptions())
    return p.to_dict()


def choose_targets(topo, plan: dict) -> dict[str, dict]:
    """Per event kind, the scenario event fields and why this target.

    Prefer a server that holds experts and is no client's entry (its loss must be absorbed by
    re-deployment). If the plan keeps every expert on entry servers (CoEL picks intra-server when
    the quantized model fits one server), crash only such a server's agent (its entry fails over
    to replicas), and fail the ring link / degrade the holder link an expert-less entry uses."""
    from topologies.paths import shortest_path
    count: dict[str, int] = {}
    for row in plan["placement"]:
        for reps in row:
            for s in reps:
                count[s] = count.get(s, 0) + 1
    entries = {c.entry for c in topo.clients}
    servers = {s.name for s in topo.servers}
    holders = sorted(count, key=lambda s: (-count[s], s))
    remote = [s for s in holders if s not in entries]
    access = lambda s: [s, topo.links_of(s)[0].other(s)]  # noqa: E731
    bw_of = lambda l: topo.link(*l).bw_mbit or 1000.0  # noqa: E731
    out: dict[str, dict] = {}
    if remote:
        s = remote[0]
        out["crash"] = {"kind": "server_crash", "server": s, "why": f"{s} holds {count[s]} experts, no entry"}
        out["link"] = {"kind": "link_down", "link": access(s), "why": f"isolates {s} ({count[s]} experts)"}
        out["bw"] = {"kind": "bw", "link": access(s), "bw_mbit": bw_of(access(s)) / 10,
                     "why": f"10x drop on the link of {s} ({count[s]} experts)"}
        return out
    s = holders[0]
    out["crash"] = {"kind": "server_crash", "server": s, "process": "agent",
                    "why": f"every holder is an entry: crash the agent of {s} ({count[s]} experts); its entry stays"}
    bare = sorted(e for e in entries if e not in count)
    if bare:
        e = bare[0]
        near = min(holders, key=lambda h: len(shortest_path(topo, e, h) or []))
        path = shortest_path(topo, e, near)
        mid = next(([a, b] for a, b in zip(path, path[1:]) if a not in servers and b not in servers), None)
        if mid is not None:
            out["link"] = {"kind": "link_down", "link": mid,
                           "why": f"the link {mid[0]}-{mid[1]} on entry {e}'s path to holder {near}"}
        out["bw"] = {"kind": "bw", "link": access(near), "bw_mbit": bw_of(access(near)) / 10,
                     "why": f"10x drop on holder {near}'s link, used by expert-less entry {e}"}
    nonentry = sorted((x for x in topo.servers if x.name not in entries), key=lambda x: (-x.memory_mb, x.name))
    if "link" not in out and nonentry:
        x = nonentry[0].name
        out["link"] = {"kind": "link_down", "link": access(x),
                       "why": f"isolates {x}, which holds no expert in this plan (expected: no effect)"}
    if "bw" not in out:
        out["bw"] = {"kind": "bw", "link": access(s), "bw_mbit": bw_of(access(s)) / 10,
                     "why": f"10x drop on the link of entry {s} (client traffic only)"}
    return out


def scenario_yaml(topo_name: str, model: str, target: dict, duration_s: float, at_s: float, static: bool,
                  name: str) -> str:
    ev = {k: v for k, v in target.items() if k != "why"}
    ev["at_s"] = at_s
    return (f"name: {name}\ntopology: {topo_name}\nmodel: {model}\nduration_s: {duration_s}\ndrain_s: 30\n"
            f"seed: 7\nstatic: {'true' if static else 'false'}\nevents:\n  - {json.dumps(ev)}\n")


def one(topo_name: str, model: str, event: str, duration_s: float, at_s: float, out: Path,
        static: bool = False) -> dict:
    if event not in EVENTS:
        raise SystemExit(f"unknown event {event!r} (valid: {', '.join(EVENTS)})")
    topo = load_topology(topo_name)
    target = choose_targets(topo, offline_plan(topo, model))[event]
    sc = parse_scenario(scenario_yaml(topo_name, model, target, duration_s, at_s, static,
                                      f"bench-{Path(topo_name).stem}-{event}"), "bench")
    log = io.StringIO()
    t0 = time.monotonic()
    res = run_scenario(sc, RunOptions(out_dir=out, live_progress=False), stream=log)
    wall = time.monotonic() - t0
    row = {"topology": Path(topo_name).stem if topo_name.endswith(".yaml") else topo_name, "event": event, "static": static, "run_dir": str(res.run_dir),
           "outcome": res.outcome, "error": res.error, "wall_s": round(wall, 1)}
    s = res.summary or {}
    plan = res.meta.get("initial_plan") or {}
    names = [target["server"]] if "server" in target else target["link"]
    row["target"] = "-".join(names) + (f" ({target['process']})" if target.get("process") else "")
    row["why"] = target["why"]
    row["held"] = sum(n in reps for n in names for row_ in plan.get("placement", []) for reps in row_)
    row["plan_mode"] = plan.get("mode")
    resp = next(iter(s.get("fault_responses") or []), {})
    for k in ("detect_s", "detected_by", "redeployed", "trigger", "replan_s", "migrate_s", "bytes_moved",
              "recovery_s", "baseline_tpot_p50_ms"):
        row[k] = resp.get(k)
    row["lost"] = s.get("lost_requests")
    row["requests"] = s.get("requests")
    _fill_outcome(row, s)
    return row


def _fill_outcome(row: dict, s: dict) -> None:
    """Per-phase latency/loss and the wire totals of one run's summary.json."""
    row["phases"] = {p: {"tpot_p50": v["tpot_ms"]["p50"], "tpot_p95": v["tpot_ms"]["p95"],
                         "ttft_p50": v["ttft_ms"]["p50"], "ttft_p95": v["ttft_ms"]["p95"],
                         "lost": v["lost"], "requests": v["requests"]}
                     for p, v in (s.get("phases") or {}).items()}
    row["emulation_mode"] = s.get("emulation_mode")
    row["bytes_on_wire"] = s.get("bytes_on_wire")


def one_scenario(name: str, out: Path, static: bool, model: str | None = None) -> dict:
    """One run of a bundled scenario (e.g. demo: its own failure schedule), static or adaptive."""
    from testbed.scenario import load_scenario
    sc = load_scenario(name)
    log = io.StringIO()
    t0 = time.monotonic()
    res = run_scenario(sc, RunOptions(out_dir=out, static=static, model=model, live_progress=False), stream=log)
    s = res.summary or {}
    plan = res.meta.get("initial_plan") or {}
    resps = s.get("fault_responses") or []
    first = next(iter(resps), {})
    row = {"topology": sc.topology, "scenario": name, "event": first.get("kind"), "target": first.get("target"),
           "static": static, "run_dir": str(res.run_dir), "outcome": res.outcome, "error": res.error,
           "wall_s": round(time.monotonic() - t0, 1), "plan_mode": plan.get("mode"),
           "lost": s.get("lost_requests"), "requests": s.get("requests"), "fault_responses": resps,
           "redeployments": s.get("redeployments") or []}
    for k in ("detect_s", "detected_by", "redeployed", "trigger", "replan_s", "migrate_s", "recovery_s"):
        row[k] = first.get(k)
    moved = [r.get("bytes_moved") for r in row["redeployments"] if r.get("bytes_moved") is not None]
    row["bytes_moved"] = sum(moved) if moved else None
    row["redeployed"] = bool(row["redeployments"]) or bool(first.get("redeployed"))
    _fill_outcome(row, s)
    return row


def phase_table(rows: list[dict]) -> str:
    """Requests, lost, TTFT and per-token p50/p95 per phase (before / during / after the faults)."""
    head = (f"{'mode':<9} {'phase':<7} {'reqs':>4} {'lost':>4} {'TTFT p50':>9} {'TTFT p95':>9} "
            f"{'tok p50':>8} {'tok p95':>8}")
    out = [head, "-" * len(head)]
    for r in rows:
        for ph, v in r["phases"].items():
            out.append(f"{'static' if r['static'] else 'adaptive':<9} {ph:<7} {_f(v['requests']):>4} "
                       f"{_f(v['lost']):>4} {_f(v['ttft_p50'], 0):>9} {_f(v.get('ttft_p95'), 0):>9} "
                       f"{_f(v['tpot_p50'], 1):>8} {_f(v['tpot_p95'], 1):>8}")
    return "\n".join(out)


def _f(x, nd=2) -> str:
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def table(rows: list[dict]) -> str:
    head = (f"{'topology':<13} {'event':<6} {'target':<16} {'held':>4} {'detect_s':>8} {'by':<14} {'redeploy':>8} "
            f"{'replan_s':>8} {'moved_kB':>8} {'recov_s':>7} {'lost':>4} {'reqs':>4}")
    out = [head, "-" * len(head)]
    for r in rows:
        moved = None if r.get("bytes_moved") is None else r["bytes_moved"] / 1e3
        out.append(f"{r['topology']:<13} {r['event']:<6} {r['target'][:16]:<16} {r['held']:>4} {_f(r['detect_s']):>8} "
                   f"{str(r['detected_by'] or '-')[:14]:<14} {('yes' if r['redeployed'] else 'no'):>8} "
                   f"{_f(r['replan_s'], 3):>8} {_f(moved, 0):>8} {_f(r['recovery_s']):>7} {_f(r['lost']):>4} "
                   f"{_f(r['requests']):>4}")
    return "\n".join(out)


def compare_table(rows: list[dict]) -> str:
    head = (f"{'mode':<9} {'reqs':>4} {'lost':>4} | {'before tok p50/p95':>18} | {'after-fault tok p50/p95':>23} | "
            f"{'TTFT p50 before/after':>21} | {'redeploy':>8} {'moved_kB':>8}")
    out = [head, "-" * len(head)]
    for r in rows:
        b, d = r["phases"].get("before", {}), r["phases"].get("during", {})
        moved = None if r.get("bytes_moved") is None else r["bytes_moved"] / 1e3
        out.append(f"{'static' if r['static'] else 'adaptive':<9} {_f(r['requests']):>4} {_f(r['lost']):>4} | "
                   f"{_f(b.get('tpot_p50'), 1):>8} / {_f(b.get('tpot_p95'), 1):>7} | "
                   f"{_f(d.get('tpot_p50'), 1):>11} / {_f(d.get('tpot_p95'), 1):>9} | "
                   f"{_f(b.get('ttft_p50'), 0):>9} / {_f(d.get('ttft_p50'), 0):>9} | "
                   f"{('yes' if r['redeployed'] else 'no'):>8} {_f(moved, 0):>8}")
    return "\n".join(out)


def plot_compare(rows: list[dict], path: Path) -> None:
    """Per-token latency and TTFT of every request over time, one row per run, faults marked: a
    static plan can keep per-token latency while requests stall for seconds before their first
    token, so both are shown."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from testbed.traces import merge
    fig, axes = plt.subplots(len(rows), 2, figsize=(12, 3.2 * len(rows)), sharex=True, squeeze=False)
    for (ax, ax_t), r in zip(axes, rows):
        run = Path(r["run_dir"])
        tr = merge(sorted((run / "raw").glob("*.jsonl")))
        start = next((e["t_ns"] for e in tr.events if e["event"] == "traffic_start"), tr.t0_ns)
        reqs = tr.requests()
        done = [q for q in reqs if q["attrs"].get("ok")]
        lost = [(q["t0_ns"] - start) / 1e9 for q in reqs if not q["attrs"].get("ok")]
        for a, key, unit in ((ax, "tpot_ms", "per-token latency (ms)"), (ax_t, "ttft_ms", "TTFT (ms, log)")):
            pts = [((q["t0_ns"] - start) / 1e9, q["attrs"][key]) for q in done if q["attrs"].get(key) is not None]
            if pts:
                a.scatter(*zip(*pts), s=12, label=f"ok ({len(pts)})")
            floor = 0 if key == "tpot_ms" else 50
            if lost:
                a.scatter(lost, [floor] * len(lost), marker="x", color="black", s=30, label=f"lost ({len(lost)})")
            for e in tr.events:
                if e["event"] == "fault":
                    a.axvline((e["t_ns"] - start) / 1e9, color="red", ls="--", lw=1)
                elif e["event"] == "redeployment" and e["t_ns"] > start:
                    a.axvline((e["t_ns"] - start) / 1e9, color="purple", ls=":", lw=1)
            a.set_ylabel(unit)
            a.grid(alpha=0.3)
            a.legend(fontsize=7, loc="upper left")
        ax.set_ylim(bottom=-2)
        ax_t.set_yscale("log")
        what = r.get("scenario") or f"{r['event']} of {r['target']}"
        ax.set_title(f"{'static (--static)' if r['static'] else 'adaptive (CoEL re-deployment)'}: "
                     f"{r['topology']}, {what}", fontsize=9)
    for a in axes[-1]:
        a.set_xlabel("request submit time since traffic start (s)")
    fig.suptitle("x: lost request; red dashed: fault; purple dotted: re-deployment", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint (default models/tiny-moe, else a random "
                    "stand-in made in /tmp)")
    ap.add_argument("--topologies", default=None, help="comma-separated (default edge-star-5,metro-ring-8; "
                    "with --static-vs-adaptive: testbed/scenarios/topologies/tight-star-4.yaml)")
    ap.add_argument("--events", default=",".join(EVENTS))
    ap.add_argument("--duration-s", type=float, default=30.0)
    ap.add_argument("--at-s", type=float, default=10.0, help="when the event happens")
    ap.add_argument("--out", default="/tmp/coel-bench-runs", help="parent of the run folders")
    ap.add_argument("--static-vs-adaptive", action="store_true",
                    help="run one schedule (--topologies' first, --events' first) static and adaptive")
    ap.add_argument("--scenario", default=None, help="with --static-vs-adaptive: run this bundled scenario "
                    "(e.g. demo, with its own failure schedule) instead of a one-event scenario")
    ap.add_argument("--plot", default=None, help="with --static-vs-adaptive: write the comparison plot here")
    ap.add_argument("--replot", default=None, help="redraw --plot from this --json-out file (no runs)")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.replot:
        plot_compare(json.loads(Path(a.replot).read_text())["rows"], Path(a.plot or "static_vs_adaptive.png"))
        return 0
    model = a.model
    if a.static_vs_adaptive and a.scenario:
        rows = []
        for static in (True, False):
            rows.append(one_scenario(a.scenario, Path(a.out), static, a.model))
            print(f"{'static' if static else 'adaptive'}: {rows[-1]['outcome']} {rows[-1]['run_dir']}",
                  file=sys.stderr, flush=True)
        if a.plot:
            plot_compare(rows, Path(a.plot))
        doc = {"scenario": a.scenario, "model": a.model, "rows": rows}
        print(json.dumps(doc, indent=2) if a.json else compare_table(rows) + "\n\n" + phase_table(rows))
        if a.json_out:
            Path(a.json_out).write_text(json.dumps(doc, indent=2) + "\n")
        return 0
    if a.static_vs_adaptive and a.topologies is None:
        # the tight topology, whose budgets force an inter-server plan, with the tests' small model
        a.topologies = str(TIGHT_TOPOLOGY)
        if model is None:
            model = str(make_random_model(Path("/tmp/coel-bench-model-small"), d_model=64, n_layers=2,
                                          expert_hidden=256, vocab_size=256, seed=5))
    if model is None:
        model = str(REPO / "models" / "tiny-moe")
        if not (Path(model) / "config.json").exists():
            model = str(make_random_model(Path("/tmp/coel-bench-model"), d_model=192, n_layers=4,
                                          expert_hidden=384, vocab_size=2048))
            print(f"models/tiny-moe not found: using a random stand-in {model}", file=sys.stderr)
    out = Path(a.out)
    topos = [t for t in (a.topologies or "edge-star-5,metro-ring-8").split(",") if t]
    events = [e for e in a.events.split(",") if e]
    rows = []
    if a.static_vs_adaptive:
        for static in (True, False):
            rows.append(one(topos[0], model, events[0], a.duration_s, a.at_s, out, static=static))
            print(f"{'static' if static else 'adaptive'}: {rows[-1]['run_dir']}", file=sys.stderr, flush=True)
        text = compare_table(rows)
        if a.plot:
            plot_compare(rows, Path(a.plot))
    else:
        for t in topos:
            for e in events:
                rows.append(one(t, model, e, a.duration_s, a.at_s, out))
                print(f"{t} {e}: {rows[-1]['outcome']} {rows[-1]['run_dir']}", file=sys.stderr, flush=True)
        text = table(rows)
    doc = {"model": model, "duration_s": a.duration_s, "at_s": a.at_s, "rows": rows}
    if a.json:
        print(json.dumps(doc, indent=2))
    else:
        print(text)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
