"""Planner at real scale: DeepSeek-V3 (58 MoE layers x 256 experts, synthetic skewed profile) on
64 heterogeneous edge servers. Full CoEL plan time; then one server is lost (the one holding the
most expert bytes, not a coordinator) and the incremental re-plan's time and bytes moved.

    python benchmarks/planner_scale.py [--json] [--json-out FILE] [--servers 64] [--repeat 3]

Goals (issue 5): full plan <= 5 s on this 2-core machine; re-plan <= 1 s moving <= 2x the
bytes the lost server held.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controller.cluster import synthetic_cluster  # noqa: E402
from controller.plan import PlanOptions, single_class  # noqa: E402
from controller.planner import bytes_loaded, diff, plan, replan, server_bytes  # noqa: E402
from controller.profile import load_model_spec  # noqa: E402


def run(n_servers: int, seed: int, repeat: int, config: str, headroom: float = 0.08,
        objective: str = "quality") -> dict:
    spec = load_model_spec(config)
    t0 = time.perf_counter()
    prof = spec.profile()
    profile_s = time.perf_counter() - t0
    need = prof.backbone_bytes + float(prof.nbytes[:, :, prof.bit_index(3)].sum())
    cl = synthetic_cluster(n_servers, 1.4 * need, seed=seed, entry_memory_bytes=1.1 * prof.backbone_bytes)
    reqs = single_class(cl.servers[0].name, token_slo_ms=1e9)
    opts = PlanOptions(headroom_frac=headroom, objective=objective)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        p = plan(prof, cl, reqs, "coel", options=opts)
        times.append(time.perf_counter() - t0)
    coord = p.backbone_map()[reqs.classes[0].entry][0].server
    lost = max((s.name for s in cl.servers if s.name != coord), key=lambda n: (server_bytes(p, prof, n), n))
    lost_bytes = server_bytes(p, prof, lost)
    after = cl.without_server(lost)
    rtimes = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        p2 = replan(p, prof, after, reqs, opts)
        rtimes.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    acts = diff(p, p2)
    diff_s = time.perf_counter() - t0
    moved = bytes_loaded(acts, prof)
    ov, ov2 = p.predicted_map()["_overall"], p2.predicted_map()["_overall"]
    return {
        "model": spec.name, "objective": objective, "headroom_frac": headroom, "layers": prof.n_layers, "experts_per_layer": prof.n_experts, "servers": n_servers,
        "cluster_memory_gb": round(sum(s.memory_bytes for s in cl.servers) / 1e9, 1),
        "synthetic_profile_s": round(profile_s, 3),
        "full_plan_s": round(min(times), 3), "full_plan_s_runs": [round(t, 3) for t in times],
        "mode": p.mode, "avg_bits": ov["avg_bits"], "servers_with_experts": sum(
            1 for s in cl.servers if server_bytes(p, prof, s.name) > 0),
        "token_ms": ov["token_ms_max"], "lost_server": lost, "lost_server_bytes": lost_bytes,
        "replan_s": round(min(rtimes), 3), "replan_s_runs": [round(t, 3) for t in rtimes],
        "diff_s": round(diff_s, 4), "replan_bytes_moved": moved,
        "moved_over_lost": round(moved / lost_bytes, 3) if lost_bytes else None,
        "actions": len(acts), "token_ms_after": ov2["token_ms_max"], "avg_bits_after": ov2["avg_bits"],
        "replan_reasons": [r for r in p2.reasons if "re-homed" in r or "room" in r or "narrowed" in r
                           or "dropped" in r],
        "goals": {"full_plan_s<=5": min(times) <= 5.0, "replan_s<=1": min(rtimes) <= 1.0,
                  "moved<=2x_lost": moved <= 2 * lost_bytes},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement (the minimum is reported)")
    ap.add_argument("--config", default="deepseek-v3", help="controller/configs name")
    ap.add_argument("--headroom", type=float, default=0.08,
                    help="memory fraction each server keeps free for re-homing (0: re-plan must make room)")
    ap.add_argument("--objective", default="quality", choices=("latency", "quality"),
                    help="CoEL's objective (default quality: its inter-server plan is what the incremental "
                         "re-plan is measured on; the latency objective may choose a pipeline, re-planned in full)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--json-out", help="also write the JSON here")
    args = ap.parse_args(argv)
    res = run(args.servers, args.seed, args.repeat, args.config, args.headroom, args.objective)
    text = json.dumps(res, indent=1)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    if args.json:
        print(text)
        return 0
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"{res['model']}: {res['layers']} x {res['experts_per_layer']} experts on {res['servers']} servers")
    t.add_column("metric")
    t.add_column("value")
    t.add_column("goal")
    t.add_row("full_plan_s", str(res["full_plan_s"]), "<= 5")
    t.add_row("replan_s", str(res["replan_s"]), "<= 1")
    t.add_row("lost_server_bytes", f"{res['lost_server_bytes'] / 1e9:.2f} GB", "")
    t.add_row("replan_bytes_moved", f"{res['replan_bytes_moved'] / 1e9:.2f} GB", "<= 2x lost")
    t.add_row("moved / lost", str(res["moved_over_lost"]), "<= 2")
    t.add_row("avg bits / servers used", f"{res['avg_bits']} / {res['servers_with_experts']}", "")
    t.add_row("predicted ms/token before / after", f"{res['token_ms']:.1f} / {res['token_ms_after']:.1f}", "")
    Console().print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
