"""Predicted per-token latency of every planning strategy on the bundled topologies, for the
bundled tiny model (its measured profile when present) and the three real-scale configs
(synthetic profiles, server memory scaled with --memory-scale auto so the model fits).

    python benchmarks/strategies.py [--json] [--json-out FILE] [--topologies a,b] [--models x,y]

Everything here is the planner's cost model (docs/planner.md), not a measurement of a run.
SLOs and request classes come from each topology's clients.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coel_model.config import MoEConfig  # noqa: E402
from coel_model.errors import InfeasibleError  # noqa: E402
from controller.cluster import auto_memory_scale, cluster_from_topology, scale_memory  # noqa: E402
from controller.plan import requirements_from_topology  # noqa: E402
from controller.planner import plan, strategy_names  # noqa: E402
from coel_model.profile_format import load_profile  # noqa: E402
from controller.profile import load_model_spec, synthetic_profile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The bundled model's shape by convention (models/tiny-moe), used only when it is not there yet.
TINY_FALLBACK = MoEConfig(vocab_size=2048, d_model=224, n_layers=4, n_heads=4, n_kv_heads=4, n_experts=8,
                          top_k=2, expert_hidden=448)


def load_models(names: list[str]):
    out = []
    for name in names:
        if name == "tiny-moe":
            prof_path = ROOT / "models" / "tiny-moe" / "profile.json"
            if prof_path.exists():
                out.append(("tiny-moe", load_profile(prof_path), "measured profile"))
            else:
                out.append(("tiny-moe", synthetic_profile(TINY_FALLBACK, seed=0, skew=1.0), "synthetic (no profile yet)"))
        else:
            spec = load_model_spec(name)
            out.append((spec.name, spec.profile(), "synthetic"))
    return out


def run(topologies: list[str], models: list[str], seed: int, max_loss: float) -> list[dict]:
    from topologies import load_topology
    rows = []
    inputs = {}  # per topology, read once: (cluster, requirements, request-class weights)
    for tname in topologies:
        topo = load_topology(tname)
        reqs = requirements_from_topology(topo).with_slo(max_loss_nats=max_loss)
        inputs[tname] = (cluster_from_topology(topo), reqs, reqs.weights())
    for mname, prof, kind in load_models(models):
        for tname in topologies:
            cl, reqs, w = inputs[tname]
            four = float(prof.nbytes[:, :, prof.bit_index(4)].sum()) if 4 in prof.bits else float(prof.nbytes.sum())
            scale = auto_memory_scale(cl, prof.backbone_bytes, four)  # never below 1
            cl = scale_memory(cl, scale)
            for strat in strategy_names():
                t0 = time.perf_counter()
                try:
                    p = plan(prof, cl, reqs, strat)
                except InfeasibleError as exc:
                    rows.append({"model": mname, "profile": kind, "topology": tname, "memory_scale": round(scale, 2),
                                 "strategy": strat, "error": str(exc)})
                    continue
                dt = time.perf_counter() - t0
                pr = p.predicted_map()
                ov = pr.pop("_overall")
                pr = {k: v for k, v in pr.items() if not k.startswith("_")}  # classes only
                rows.append({
                    "model": mname, "profile": kind, "topology": tname, "memory_scale": round(scale, 2),
                    "strategy": strat, "mode": p.mode,
                    "token_ms_weighted": round(sum(w[c] * v["token_ms"] for c, v in pr.items()), 3),
                    "token_ms_max": ov["token_ms_max"], "ttft_ms_max": ov["ttft_ms_max"],
                    "quality_loss_nats": ov["quality_loss_nats"], "avg_bits": ov["avg_bits"],
                    "meets_slo": ov["meets_slo"], "meets_quality": ov["meets_quality"], "plan_s": round(dt, 3),
                    "max_utilization": ov.get("max_utilization"),
                    "servers_used": len(p.servers_used()),
                })
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topologies", default="single-server,edge-star-5,edge-cloud-3tier,metro-ring-8")
    ap.add_argument("--models", default="tiny-moe,mixtral-8x7b,qwen3-30b-a3b,deepseek-v3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-loss", type=float, default=0.06,
                    help="quality floor (nats) for every class; 0.06 ~ +6%% perplexity, llama.cpp Q3_K_M level")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    rows = run(args.topologies.split(","), args.models.split(","), args.seed, args.max_loss)
    text = json.dumps(rows, indent=1)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    if args.json:
        print(text)
        return 0
    from rich.console import Console
    from rich.table import Table
    strategies = strategy_names()
    t = Table(title="predicted ms/token (weighted over request classes) | predicted loss nats | avg bits")
    t.add_column("model")
    t.add_column("topology (mem x)")
    for s in strategies:
        t.add_column(s)
    keys = []
    for r in rows:
        k = (r["model"], r["topology"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        cells = []
        scale = None
        for s in strategies:
            r = next(x for x in rows if (x["model"], x["topology"]) == k and x["strategy"] == s)
            scale = r["memory_scale"]
            if "error" in r:
                cells.append("infeasible")
            else:
                mark = ("" if r["meets_slo"] else "*") + ("" if r["meets_quality"] else "!")
                cells.append(f"{r['token_ms_weighted']:.1f}{mark} | {r['quality_loss_nats']:.3f} | {r['avg_bits']:.1f}")
        t.add_row(k[0], f"{k[1]} (x{scale:g})", *cells)
    con = Console(width=200)
    con.print(t)
    con.print(f"* = misses an SLO of the topology's clients; ! = predicted loss above the floor {args.max_loss} nats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
