"""`coel plan`: plan (or re-plan) a deployment and print it as tables + write it as JSON."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from coel_model.errors import ConfigError

MB = 1 << 20


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="plan bits, expert placement and token compression for a topology")
    p.add_argument("--topology", default="edge-star-5",
                   help="bundled topology name or YAML path (or a cluster .json); default edge-star-5")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory (its profile.json is used when present)")
    src.add_argument("--model-config", help="model config without weights: name in controller/configs "
                                            "(deepseek-v3, mixtral-8x7b, qwen3-30b-a3b) or a path")
    p.add_argument("--profile", help="coel-profile JSON (default: MODEL/profile.json, else synthetic)")
    p.add_argument("--strategy", default="coel", help="coel | uniform | pipeline | offload | random")
    p.add_argument("--objective", default="latency", choices=("latency", "quality"),
                   help="coel: lowest predicted latency (default; per-token for the workload mix, TTFT next) or "
                        "best quality, in both cases subject to memory, the quality floor and the SLOs")
    p.add_argument("--slo-ms", type=float, help="per-output-token SLO (ms) for every request class")
    p.add_argument("--ttft-slo-ms", type=float, help="time-to-first-token SLO (ms) for every request class")
    p.add_argument("--max-loss", type=float, help="quality floor: largest predicted loss increase (nats/token)")
    p.add_argument("--entry", help="one request class entering at this server (instead of the topology's clients)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random strategy and synthetic profiles")
    p.add_argument("--skew", type=float, help="Zipf skew of a synthetic profile (default: from the config)")
    p.add_argument("--memory-scale", default="1",
                   help="multiply every server's memory budget: a number, or 'auto' (enough for the model at "
                        "about 4 bits; for the big configs on the small bundled topologies)")
    p.add_argument("--headroom", type=float, default=0.08, help="memory fraction kept free per server")
    p.add_argument("--compression-costs", help="JSON list of measured compression costs "
                                               "(nodes.compression.measure_compression_cost rows)")
    p.add_argument("--current", help="current plan JSON: re-plan incrementally from it")
    p.add_argument("--drop-server", action="append", default=[], help="plan as if this server were lost "
                                                                       "(repeatable)")
    p.add_argument("--json-out", help="write the plan here")
    p.add_argument("--json", action="store_true", help="print the plan JSON instead of tables")
    p.set_defaults(func=cmd_plan)

    # the running controller: registration, probes, deploy, monitor, re-deploy
    from controller.service import add_controller_args, cmd_controller
    p = sub.add_parser("controller", help="run the controller of a deployment (contract: docs/protocol.md)")
    add_controller_args(p)
    p.set_defaults(func=cmd_controller)


def _load_cluster(arg: str):
    from controller.cluster import cluster_from_dict, cluster_from_topology
    from coel_model.config import read_json
    path = Path(arg)
    if path.suffix == ".json":
        doc = read_json(path, "cluster file not found")
        return cluster_from_dict(doc, str(path)), doc
    from topologies import load_topology
    topo = load_topology(arg)
    return cluster_from_topology(topo), topo


def _load_profile(args):
    from coel_model.profile_format import load_profile
    from controller.profile import load_model_spec, synthetic_profile
    notes = []
    if args.model_config:
        spec = load_model_spec(args.model_config)
        if args.profile:
            return load_profile(args.profile), notes
        skew = spec.skew if args.skew is None else args.skew
        notes.append(f"{spec.name}: no weights, synthetic profile (Zipf skew {skew}, seed {spec.seed})")
        return synthetic_profile(spec.cfg, seed=spec.seed, skew=skew, backbone_params=spec.backbone_params,
                  source=f"{spec.name} (synthetic)"), notes
    model = Path(args.model)
    prof_path = Path(args.profile) if args.profile else model / "profile.json"
    if prof_path.exists():
        return load_profile(prof_path), notes
    if args.profile:
        raise ConfigError(f"{prof_path}: profile not found")
    from coel_model.checkpoint import load_config
    cfg = load_config(model)
    skew = 1.0 if args.skew is None else args.skew
    notes.append(f"{model}: no profile.json, synthetic statistics (Zipf skew {skew}); run `coel profile` "
                 f"for measured ones")
    return synthetic_profile(cfg, seed=args.seed, skew=skew, source=f"{model} (synthetic)"), notes


def build_inputs(args):
    """(profile, cluster, requirements, options, costs, notes) from the command line."""
    from controller.negotiation import DEFAULT_COSTS, costs_from_measurements
    from controller.plan import PlanOptions, Requirements, requirements_from_topology, single_class
    profile, notes = _load_profile(args)
    cluster, topo = _load_cluster(args.topology)
    if args.memory_scale != "1":
        from controller.cluster import auto_memory_scale, scale_memory
        if args.memory_scale == "auto":
            factor = auto_memory_scale(cluster, profile.backbone_bytes,
                                       float(profile.nbytes[:, :, profile.bit_index(4)].sum())
                                       if 4 in profile.bits else float(profile.nbytes[:, :, -1].sum()))
        else:
            try:
                factor = float(args.memory_scale)
            except ValueError:
                raise ConfigError(f"--memory-scale must be a number or 'auto' (got {args.memory_scale!r})") from None
        cluster = scale_memory(cluster, factor)
        notes.append(f"server memory budgets scaled x{factor:,.1f} (--memory-scale {args.memory_scale})")
    for s in args.drop_server:
        cluster = cluster.without_server(s)
        notes.append(f"server {s} dropped (--drop-server)")
    if args.entry:
        reqs = single_class(args.entry)
    elif isinstance(topo, dict) and "requirements" in topo:
        reqs = Requirements.from_dict(topo["requirements"], args.topology)
    else:
        reqs = requirements_from_topology(topo)
    reqs = reqs.with_slo(args.slo_ms, args.ttft_slo_ms, args.max_loss)
    costs = DEFAULT_COSTS
    if args.compression_costs:
        try:
            costs = costs_from_measurements(json.loads(Path(args.compression_costs).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"{args.compression_costs}: not found") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{args.compression_costs}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    opts = PlanOptions(seed=args.seed, headroom_frac=args.headroom, objective=args.objective)
    return profile, cluster, reqs, opts, costs, notes


def cmd_plan(args) -> int:
    from controller.plan import Plan
    from controller.planner import bytes_loaded, diff, plan, replan
    profile, cluster, reqs, opts, costs, notes = build_inputs(args)
    current = Plan.load(args.current) if args.current else None
    from coel_model.errors import InfeasibleError
    try:
        if current is not None:
            result = replan(current, profile, cluster, reqs, opts, costs)
        else:
            result = plan(profile, cluster, reqs, args.strategy, None, opts, costs)
    except InfeasibleError as exc:
        if args.model_config and args.memory_scale == "1":
            raise InfeasibleError(f"{exc} (the bundled topologies are sized for the tiny model; "
                                  f"--memory-scale auto scales every server's budget for big models)") from None
        raise
    doc = result.to_dict()
    if notes:
        doc["reasons"] = notes + doc["reasons"]
    if current is not None:
        acts = diff(current, result)
        doc["actions"] = [a.to_dict() for a in acts]
        doc["bytes_loaded"] = bytes_loaded(acts, profile)
    text = json.dumps(doc, indent=1, allow_nan=False)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    if args.json:
        print(text)
    else:
        print_summary(doc, result, cluster)
        if args.json_out:
            print(f"plan written to {args.json_out}")
    return 0


def print_summary(doc: dict, result, cluster) -> None:
    from rich.console import Console
    from rich.table import Table
    con = Console()
    ov = doc["predicted"]["_overall"]
    con.print(f"[bold]strategy[/bold] {result.strategy}  [bold]mode[/bold] {result.mode}  "
              f"[bold]avg bits[/bold] {ov['avg_bits']}  [bold]expert bytes[/bold] {ov['expert_bytes'] / MB:,.1f} MB  "
              f"[bold]predicted loss[/bold] {ov['quality_loss_nats']} nats")
    t = Table(title="request classes")
    for col in ("class", "entry", "coordinator", "ms/token", "SLO", "TTFT ms", "SLO", "loss nats", "ok"):
        t.add_column(col)
    for name, p in sorted(doc["predicted"].items()):
        if name.startswith("_"):
            continue
        t.add_row(name, p["entry"], p["coordinator"], f"{p['token_ms']:.2f}", str(p["token_slo_ms"]),
                  f"{p['ttft_ms']:.1f}", str(p["ttft_slo_ms"]), f"{p['quality_loss_nats']:.4f}",
                  "yes" if p["meets_slo"] and p["meets_quality"] else "NO")
    con.print(t)
    t = Table(title="servers")
    for col in ("server", "memory used", "budget", "experts", "avg bits", "backbone", "busy"):
        t.add_column(col)
    util = doc["predicted"].get("_utilization", {})
    mem = result.memory_map()
    counts: dict[str, list[int]] = {}
    for l, row in enumerate(result.placement):
        for e, reps in enumerate(row):
            for s in reps:
                counts.setdefault(s, []).append(result.bits[l][e])
    bb = {st.server for _, sts in result.backbone for st in sts}
    for s in cluster.servers:
        c = counts.get(s.name, [])
        t.add_row(s.name, f"{mem.get(s.name, 0) / MB:,.2f} MB", f"{s.memory_bytes / MB:,.2f} MB", str(len(c)),
                  f"{sum(c) / len(c):.2f}" if c else "-", "yes" if s.name in bb else "",
                  f"{util[s.name]:.0%}" if s.name in util else "")
    con.print(t)
    if doc["compression"]:
        con.print("compression: " + ", ".join(f"{k}={v['name']}" for k, v in sorted(doc["compression"].items())))
    con.print("[bold]reasons[/bold]")
    for r in doc["reasons"]:
        con.print(f"  - {r}")
    if "actions" in doc:
        kinds: dict[str, int] = {}
        for a in doc["actions"]:
            kinds[a["kind"]] = kinds.get(a["kind"], 0) + 1
        con.print(f"actions: {kinds or 'none'}; bytes to load {doc['bytes_loaded'] / MB:,.1f} MB")
