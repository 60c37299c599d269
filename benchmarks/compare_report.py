"""Tables for docs/bench/compare.md from `coel compare` folders: measured figures per scenario and
strategy, and per request class the measured before-fault TPOT p50 against the prediction the
deployed plan carried and against the *current* cost model re-run on the same plan with the same
perceived server figures (read from the controller's trace), so a cost-model fix can be checked on
runs already made.

    python benchmarks/compare_report.py COMPARE_DIR [COMPARE_DIR ...] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PERCEIVED = re.compile(r'perceived (\w+): ([^"]*)"')
SCALED = ("msg_ms", "call_ms", "storage_ms", "layer_decode_ms", "prefill_token_layer_ms", "head_ms")


def perceived_fields(run: Path, exponent_logged: float) -> dict[str, dict[str, float]]:
    """Server fields as the controller logged them (first plan), turned back into burst figures
    times cores**-CPU_SHARE_EXPONENT of the current model (the log used `exponent_logged`)."""
    from controller.perception import CPU_SHARE_EXPONENT
    from topologies import load_topology
    meta = json.loads((run / "meta.json").read_text())
    topo = load_topology(meta["topology_source"])
    cores = {s.name: min(1.0, 2 * s.cpu_share) for s in topo.servers}  # cgroup cores on the 2-core host
    out: dict[str, dict[str, float]] = {}
    for f in (run / "raw").glob("*controller.jsonl"):
        for line in open(f):
            for m in PERCEIVED.finditer(line):
                d = {}
                for kv in m.group(2).split(", "):
                    k, v = kv.split(" ", 1)
                    d[k] = float(v.replace(" GB/s", "")) * (1e9 if k.endswith("bytes_per_s") else 1)
                c = cores.get(m.group(1), 1.0)
                adj = c ** (exponent_logged - CPU_SHARE_EXPONENT) if c < 1 else 1.0
                for k in SCALED:
                    if k in d:
                        d[k] *= adj
                if "bytes_per_s" in d:
                    d["bytes_per_s"] /= adj
                if c < 1:
                    d["cpu_cores"] = c
                out[m.group(1)] = d
            if out:
                return out
    return out


def repredict(run: Path, exponent_logged: float) -> dict[str, float]:
    from controller.cluster import cluster_from_topology
    from controller.costmodel import evaluate, layout_from_plan
    from controller.plan import Plan, PlanOptions, requirements_from_topology
    from coel_model.profile_format import load_profile
    from topologies import load_topology
    meta = json.loads((run / "meta.json").read_text())
    topo = load_topology(meta["topology_source"])
    cl = cluster_from_topology(topo)
    for name, f in perceived_fields(run, exponent_logged).items():
        cl = cl.with_server(name, **f)
    prof = load_profile(meta["profile"] or Path(meta["model"]) / "profile.json")
    plan = Plan.from_dict(meta["initial_plan"])
    lay, _ = layout_from_plan(plan, prof, cl)
    return {p.name: p.token_ms for p in evaluate(prof, cl, requirements_from_topology(topo), lay, PlanOptions())}


def measured_classes(run: Path) -> dict[str, float]:
    rows: dict[str, list[float]] = {}
    with open(run / "summary.csv") as fh:
        for r in csv.DictReader(fh):
            if r["ok"] == "1" and r["phase"] == "before" and r["tpot_ms"] not in ("", "None"):
                rows.setdefault(r["client"], []).append(float(r["tpot_ms"]))
    return {k: statistics.median(v) for k, v in rows.items()}


def report(folder: Path, exponent_logged: float) -> dict:
    doc = json.loads((folder / "compare.json").read_text())
    out = {"scenario": doc["scenario"], "folder": str(folder), "strategies": {}}
    for name, s in doc["strategies"].items():
        run = Path(s["runs"][0]["run_dir"])
        meas = measured_classes(run)
        rates = {c: 1.0 for c in meas}
        try:
            st = json.loads((run / "meta.json").read_text()).get("final_status") or {}
            rates.update({c["name"]: float(c["rate_rps"]) for c in st.get("requirements", {}).get("classes", [])})
        except (OSError, KeyError, ValueError):
            pass
        now = repredict(run, exponent_logged)
        w = sum(rates[c] for c in meas)
        meas_w = sum(rates[c] * meas[c] for c in meas) / w
        now_w = sum(rates[c] * now[c] for c in meas if c in now) / w
        q = s.get("quality") or {}
        out["strategies"][name] = {
            "mode": s.get("mode"), "avg_bits": s.get("avg_bits"),
            "tpot_p50": {ph: (s["tpot_ms"].get(ph) or {}).get("p50") for ph in ("before", "during", "after")},
            "tpot_p95_all": (s["tpot_ms"].get("all") or {}).get("p95"),
            "ttft_p50_all": (s["ttft_ms"].get("all") or {}).get("p50"), "lost": s.get("lost"),
            "wire_mb": (s.get("bytes_on_wire") or 0) / 1e6, "max_memory_ratio": s.get("max_memory_ratio"),
            "ppl_increase_pct": q.get("perplexity_increase_pct"), "top1": q.get("top1_agreement"),
            "predicted_at_run": s.get("predicted_tpot_ms"), "measured_classes": meas_w,
            "predicted_now": now_w, "now_over_measured": now_w / meas_w,
            "class_measured": meas, "class_predicted_now": now,
        }
    return out


def markdown(rep: dict) -> str:
    f = lambda x, nd=1: "-" if x is None else f"{x:.{nd}f}"  # noqa: E731
    lines = [f"#### {rep['scenario']}", "",
             "| strategy | mode | avg bits | TPOT p50 before / during / after (ms) | TPOT p95 | TTFT p50 | lost | wire MB "
             "| mem used/budget max | ppl +% | top1 | predicted at run | measured (classes) | predicted now | now / measured |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in rep["strategies"].items():
        t = s["tpot_p50"]
        lines.append(f"| {name} | {s['mode']} | {f(s['avg_bits'], 2)} | {f(t['before'])} / {f(t['during'])} / "
                     f"{f(t['after'])} | {f(s['tpot_p95_all'])} | {f(s['ttft_p50_all'])} | {s['lost']} | "
                     f"{f(s['wire_mb'])} | {f(s['max_memory_ratio'], 2)} | {f(s['ppl_increase_pct'], 3)} | "
                     f"{f(s['top1'], 3)} | {f(s['predicted_at_run'])} | {f(s['measured_classes'])} | "
                     f"{f(s['predicted_now'])} | {f(s['now_over_measured'], 2)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--exponent-logged", type=float, default=1.0,
                    help="CPU_SHARE_EXPONENT in force when the runs were made (their logged fields)")
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    reps = [report(Path(f), args.exponent_logged) for f in args.folders]
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(reps, indent=1) + "\n")
    print("\n\n".join(markdown(r) for r in reps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
