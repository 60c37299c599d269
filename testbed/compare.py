"""`coel compare SCENARIO --strategies coel,uniform,...`: the same scenario (same seeded traffic,
same fault schedule) run once per strategy and repeat through testbed/runner.py, side by side.

Folder  <out>/<YYYYmmdd-HHMMSS>-compare-<scenario>/:
  runs/<run folder per strategy and repeat>   (testbed/runner.py + testbed/report.py, unchanged)
  compare.json    per strategy: TTFT and TPOT p50/p95 by phase, lost, bytes on the wire, memory
                  per server (used / budget as the agents report it at the end, and as planned),
                  predicted TPOT (the deployed plan's cost model, rate-weighted over the classes)
                  and the measured quality of the deployed widths (held-out perplexity and top-1
                  agreement with the fp32 model)
  compare.txt     the table printed at the end
  tpot_cdf.png, latency_over_time.png, predicted_vs_measured.png
Repeats: every figure is the median over the repeats; each run's own figures are kept under "runs".
"""
from __future__ import annotations

import csv
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from coel_model.errors import ConfigError
from testbed.report import percentile

PHASES = ("before", "during", "after")
QUALITY_TOKENS = 8192  # held-out tokens for the deployed widths' perplexity


def parse_strategies(text: str) -> list[str]:
    from controller.planner import strategy_names
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ConfigError("--strategies lists no strategy")
    bad = [s for s in names if s not in strategy_names()]
    if bad:
        raise ConfigError(f"--strategies: unknown {bad}; valid strategies: {strategy_names()}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--strategies names a strategy twice: {names}")
    return names


def predicted_tpot_ms(plan: dict[str, Any], requirements: dict[str, Any] | None = None) -> float | None:
    """The plan's per-token prediction weighted like the measured p50 (over requests: by the
    classes' arrival rates, from the controller's requirements)."""
    pred = plan.get("predicted") or {}
    classes = {k: v for k, v in pred.items() if not k.startswith("_")}
    rates = {c["name"]: float(c.get("rate_rps", 1.0)) for c in (requirements or {}).get("classes", [])}
    if not classes:
        return None
    w = {k: rates.get(k, 1.0) for k in classes}
    tot = sum(w.values()) or 1.0
    return sum(w[k] * float(v["token_ms"]) for k, v in classes.items()) / tot


def memory_per_server(meta: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], float | None]:
    """Agents' accounted bytes vs their budgets at the end of the run, and the plan's bytes."""
    agents = ((meta.get("final_status") or {}).get("agents")) or {}
    planned = ((meta.get("initial_plan") or {}).get("memory_bytes")) or {}
    out, ratios = {}, []
    for name in sorted(set(agents) | set(planned)):
        a = agents.get(name) or {}
        used, budget = a.get("memory_used_bytes"), a.get("memory_budget_bytes")
        ratio = used / budget if used is not None and budget else None
        if ratio is not None:
            ratios.append(ratio)
        out[name] = {"used_bytes": used, "budget_bytes": budget, "ratio": None if ratio is None else round(ratio, 4),
                     "planned_bytes": planned.get(name)}
    return out, (round(max(ratios), 4) if ratios else None)


def class_tpot(run_dir: Path) -> dict[str, dict[str, float | None]]:
    """Per request class (the client group, as the planner names classes) and phase: TPOT p50
    from the run's summary.csv."""
    rows: dict[tuple[str, str], list[float]] = {}
    path = run_dir / "summary.csv"
    if not path.exists():
        return {}
    with open(path) as fh:
        for r in csv.DictReader(fh):
            if r["ok"] == "1" and r["tpot_ms"] not in ("", "None"):
                rows.setdefault((r["client"], r["phase"]), []).append(float(r["tpot_ms"]))
    out: dict[str, dict[str, float | None]] = {}
    for (cls, ph), xs in rows.items():
        out.setdefault(cls, {})[ph] = percentile(xs, 50)
    return out


_QUALITY_CACHE: dict[tuple, dict[str, float]] = {}


def widths_quality(model_dir: str, bits: list[list[int]], group_size: int = 64, method: str = "rtn",
                   max_tokens: int = QUALITY_TOKENS) -> dict[str, float]:
    """Held-out perplexity and top-1 agreement with the fp32 model of the model with every
    expert at the plan's width, quantized as the deployer quantizes shards (group_size, method)."""
    key = (str(model_dir), tuple(tuple(r) for r in bits), group_size, method, max_tokens)
    if key in _QUALITY_CACHE:
        return _QUALITY_CACHE[key]
    import torch

    from coel_model import quant
    from coel_model.checkpoint import load_model
    from coel_model.evaluate import eval_token_ids, evaluate_model, find_tokenizer
    ref = load_model(model_dir)
    model = load_model(model_dir)
    with torch.no_grad():
        for l, row in enumerate(bits):
            for e, b in enumerate(row):
                ex = model.expert(l, e)
                if b >= 16:  # fp16 shards: weights rounded to half, computed in fp32
                    for lin in (ex.w_gate, ex.w_up, ex.w_down):
                        lin.weight.data = lin.weight.data.half().float()
                else:
                    model.set_expert(l, e, quant.quantize_expert(ex, quant.QuantSpec(bits=b, group_size=group_size,
                                                                                    method=method)))
    ids = eval_token_ids(find_tokenizer(model_dir), "heldout", max_tokens)
    base = evaluate_model(ref, ids)
    res = evaluate_model(model, ids, reference=ref)
    out = {"perplexity": round(res.perplexity, 4), "fp32_perplexity": round(base.perplexity, 4),
           "perplexity_increase_pct": round(100 * (res.perplexity / base.perplexity - 1), 3),
           "top1_agreement": round(res.top1_agreement, 4), "eval_tokens": res.tokens}
    _QUALITY_CACHE[key] = out
    return out


def weighted_class_p50(class_ms: dict[str, dict[str, float | None]], requirements: dict[str, Any] | None,
                       phase: str = "before") -> float | None:
    """The classes' measured TPOT p50 in `phase`, weighted by arrival rate like predicted_tpot_ms."""
    rates = {c["name"]: float(c.get("rate_rps", 1.0)) for c in (requirements or {}).get("classes", [])}
    pts = [(rates.get(k, 1.0), v.get(phase)) for k, v in class_ms.items() if v.get(phase) is not None]
    tot = sum(w for w, _ in pts)
    return sum(w * x for w, x in pts) / tot if tot > 0 else None


def run_figures(run_dir: Path, summary: dict[str, Any] | None, meta: dict[str, Any]) -> dict[str, Any]:
    """One run's figures for compare.json."""
    s = summary or {}
    reqs = (meta.get("final_status") or {}).get("requirements")
    cls = class_tpot(run_dir)
    phases = s.get("phases") or {}
    plan = meta.get("initial_plan") or {}
    mem, ratio = memory_per_server(meta)
    ov = (plan.get("predicted") or {}).get("_overall") or {}
    return {
        "run_dir": str(run_dir), "outcome": meta.get("outcome"), "error": meta.get("error"),
        "mode": plan.get("mode"), "avg_bits": ov.get("avg_bits"),
        "tpot_ms": {ph: phases[ph]["tpot_ms"] for ph in PHASES if ph in phases} | {"all": s.get("tpot_ms")},
        "ttft_ms": {ph: phases[ph]["ttft_ms"] for ph in PHASES if ph in phases} | {"all": s.get("ttft_ms")},
        "requests": s.get("requests"), "lost": s.get("lost_requests"),
        "bytes_on_wire": s.get("bytes_on_wire"), "bytes_controller_links": s.get("bytes_controller_links"),
        "memory_per_server": mem, "max_memory_ratio": ratio,
        "predicted_tpot_ms": _r(predicted_tpot_ms(plan, reqs)),
        "measured_class_tpot_ms": _r(weighted_class_p50(cls, reqs)), "predicted_ttft_ms": ov.get("ttft_ms_max"),
        "predicted_loss_nats": ov.get("quality_loss_nats"),
        "class_tpot_ms": cls,
        "predicted_class_tpot_ms": {k: v.get("token_ms") for k, v in (plan.get("predicted") or {}).items()
                                    if not k.startswith("_")},
        "redeployments": len(s.get("redeployments") or []),
    }


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def _median(xs: list[Any]) -> Any:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over repeats of every number a strategy's runs share."""
    first = runs[0]
    out: dict[str, Any] = {"repeats": len(runs), "mode": first["mode"], "avg_bits": first["avg_bits"]}
    for key in ("tpot_ms", "ttft_ms"):
        out[key] = {ph: {q: _r(_median([(r[key].get(ph) or {}).get(q) for r in runs]))
                         for q in ("p50", "p95")} for ph in list(PHASES) + ["all"]
                    if any(ph in r[key] for r in runs)}
    for key in ("lost", "requests", "bytes_on_wire", "max_memory_ratio", "predicted_tpot_ms", "measured_class_tpot_ms",
                "predicted_ttft_ms",
                "predicted_loss_nats", "redeployments"):
        out[key] = _median([r[key] for r in runs])
    out["memory_per_server"] = first["memory_per_server"]
    out["class_tpot_ms"] = first["class_tpot_ms"]
    out["predicted_class_tpot_ms"] = first["predicted_class_tpot_ms"]
    before = out["tpot_ms"].get("before", out["tpot_ms"].get("all", {})).get("p50")
    pred = out["predicted_tpot_ms"]
    out["predicted_over_measured"] = _r(pred / before, 3) if pred and before else None
    per_class = out["measured_class_tpot_ms"]  # the same classes' weighting on both sides
    out["predicted_over_measured_classes"] = _r(pred / per_class, 3) if pred and per_class else None
    out["runs"] = runs
    return out


def compare_table(doc: dict[str, Any]) -> str:
    def f(x: Any, nd: int = 1) -> str:
        return "-" if x is None else f"{x:.{nd}f}"

    hdr = (f"{'strategy':<9} {'mode':<9} {'bits':>5} {'TPOT p50 b/d/a (ms)':>21} {'p95 all':>8} {'TTFT p50':>9} "
           f"{'lost':>4} {'wire MB':>8} {'mem max':>7} {'pred TPOT':>9} {'meas cls':>8} {'pred/meas':>9} {'ppl':>7} "
           f"{'top1':>6}")
    lines = [f"coel compare {doc['scenario']}: {doc['repeats']} repeat(s), emulation {doc.get('emulation_mode')}", hdr]
    for name, s in doc["strategies"].items():
        t = s["tpot_ms"]
        tp = "/".join(f((t.get(ph) or {}).get("p50")) for ph in PHASES)
        q = s.get("quality") or {}
        lines.append(f"{name:<9} {s.get('mode') or '-':<9} {f(s.get('avg_bits'), 2):>5} {tp:>21} "
                     f"{f((t.get('all') or {}).get('p95')):>8} {f((s['ttft_ms'].get('all') or {}).get('p50')):>9} "
                     f"{f(s.get('lost'), 0):>4} {f((s.get('bytes_on_wire') or 0) / 1e6):>8} "
                     f"{f(s.get('max_memory_ratio'), 2):>7} {f(s.get('predicted_tpot_ms')):>9} "
                     f"{f(s.get('measured_class_tpot_ms')):>8} "
                     f"{f(s.get('predicted_over_measured_classes'), 2):>9} {f(q.get('perplexity'), 3):>7} "
                     f"{f(q.get('top1_agreement'), 3):>6}")
    lines.append("TPOT p50 b/d/a: before/during/after the first fault (all requests); pred TPOT: the plan's "
                 "per-class prediction weighted by arrival rate; meas cls: the classes' measured before-phase p50 "
                 "weighted the same way; pred/meas: their ratio; ppl/top1: the deployed widths on held-out text vs "
                 "fp32")
    return "\n".join(lines)


def plot_compare(doc: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths: list[Path] = []
    names = list(doc["strategies"])
    colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}

    def per_request(name: str) -> list[tuple[float, str, float]]:
        out = []
        for r in doc["strategies"][name]["runs"]:
            p = Path(r["run_dir"]) / "summary.csv"
            if p.exists():
                with open(p) as fh:
                    out += [(float(x["t_submit_s"]), x["phase"], float(x["tpot_ms"])) for x in csv.DictReader(fh)
                            if x["ok"] == "1" and x["tpot_ms"] not in ("", "None")]
        return out

    data = {n: per_request(n) for n in names}
    phases = [ph for ph in PHASES if any(ph == p for rows in data.values() for _, p, _ in rows)]
    fig, axes = plt.subplots(1, max(len(phases), 1), figsize=(4.2 * max(len(phases), 1), 3.8), squeeze=False)
    for ax, ph in zip(axes[0], phases):
        for n in names:
            xs = sorted(v for _, p, v in data[n] if p == ph)
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", color=colors[n],
                        label=f"{n} (n={len(xs)})")
        ax.set_title(f"{ph}")
        ax.set_xlabel("per-token latency (ms)")
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{doc['scenario']}: per-token latency by strategy")
    fig.tight_layout()
    paths.append(folder / "tpot_cdf.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    for n in names:
        pts = [(t, v) for t, _, v in data[n]]
        if pts:
            ax.scatter(*zip(*pts), s=10, color=colors[n], label=n)
    for ev in doc.get("faults") or []:
        ax.axvline(ev["t_s"], color="red", ls="--", lw=1)
        ax.annotate(str(ev.get("kind")), (ev["t_s"], 1), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=7)
    ax.set_xlabel("time since traffic start (s)")
    ax.set_ylabel("per-token latency (ms)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{doc['scenario']}: per-token latency over time (dashed: injected faults)")
    fig.tight_layout()
    paths.append(folder / "latency_over_time.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4.5))
    hi = 1.0
    for n in names:
        s = doc["strategies"][n]
        pred_c = s.get("predicted_class_tpot_ms") or {}
        meas_c = s.get("class_tpot_ms") or {}
        pts = [(meas_c[k].get("before"), v) for k, v in pred_c.items()
               if k in meas_c and meas_c[k].get("before") is not None and v is not None]
        if pts:  # one point per request class, before the fault
            ax.scatter([m for m, _ in pts], [p for _, p in pts], color=colors[n], s=30, label=n)
            hi = max([hi] + [max(m, p) for m, p in pts])
    ax.plot([0, hi * 1.1], [0, hi * 1.1], color="gray", lw=1)
    ax.fill_between([0, hi * 1.1], [0, hi * 1.1 * 0.75], [0, hi * 1.1 * 1.25], color="gray", alpha=0.15,
                    label="+-25 %")
    ax.set_xlabel("measured TPOT p50 per request class, before the fault (ms)")
    ax.set_ylabel("predicted TPOT (ms)")
    ax.set_title(f"{doc['scenario']}: predicted vs measured")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(folder / "predicted_vs_measured.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def run_compare(scenario: str, strategies: list[str], repeats: int, opt: Any, out_dir: Path,
                stream: Any = None, quality: bool = True) -> dict[str, Any]:
    """Runs every (repeat, strategy) in order with the same scenario; writes the folder."""
    from testbed.runner import resolve_scenario, run_scenario
    from testbed.scenario import load_scenario
    stream = stream or sys.stderr
    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1 (got {repeats})")
    sc = load_scenario(scenario)
    resolve_scenario(sc, opt)  # bad overrides fail before any run starts
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = Path(out_dir) / f"{stamp}-compare-{sc.name}"
    i = 1
    while folder.exists():
        i += 1
        folder = Path(out_dir) / f"{stamp}-compare-{sc.name}.{i}"
    (folder / "runs").mkdir(parents=True)
    total = repeats * len(strategies)
    per: dict[str, list[dict[str, Any]]] = {s: [] for s in strategies}
    faults: list[dict[str, Any]] = []
    emulation = None
    t_start = time.monotonic()
    k = 0
    for rep in range(repeats):
        for strat in strategies:
            k += 1
            print(f"[compare {k}/{total}] {sc.name}: strategy {strat}, repeat {rep + 1}/{repeats} "
                  f"({time.monotonic() - t_start:.0f} s so far)", file=stream, flush=True)
            res = run_scenario(sc, replace(opt, out_dir=folder / "runs", strategy=strat), stream=stream)
            meta = dict(res.meta)
            meta.setdefault("outcome", res.outcome)
            meta["outcome"], meta["error"] = res.outcome, res.error
            fig = run_figures(res.run_dir, res.summary, meta)
            if res.summary:
                faults = faults or [f for f in res.summary.get("faults", []) if f.get("ok", True)]
                emulation = emulation or res.summary.get("emulation_mode")
            per[strat].append(fig)
            t = (fig["tpot_ms"].get("before") or fig["tpot_ms"].get("all") or {}).get("p50")
            print(f"[compare {k}/{total}] {strat}: {res.outcome}, TPOT p50 before {t if t is None else round(t, 1)} "
                  f"ms (predicted {fig['predicted_tpot_ms']}), lost {fig['lost']}, run {res.run_dir.name}",
                  file=stream, flush=True)
    doc: dict[str, Any] = {"format": "coel-compare", "version": 1, "scenario": sc.name, "seed": sc.seed,
                           "repeats": repeats, "strategies": {}, "faults": faults, "emulation_mode": emulation,
                           "started": stamp, "elapsed_s": round(time.monotonic() - t_start, 1)}
    for strat, runs in per.items():
        doc["strategies"][strat] = aggregate(runs)
        if quality:
            plan = None
            for r in runs:
                meta_p = Path(r["run_dir"]) / "meta.json"
                if meta_p.exists():
                    plan = (json.loads(meta_p.read_text()).get("initial_plan")) or plan
            if plan and plan.get("bits"):
                print(f"[compare] measuring the quality of {strat}'s widths", file=stream, flush=True)
                from testbed.runner import project_path
                doc["strategies"][strat]["quality"] = widths_quality(str(project_path(sc.model if opt.model is None
                                                                                      else opt.model)), plan["bits"])
    (folder / "compare.json").write_text(json.dumps(doc, indent=1, allow_nan=False, default=_json_default) + "\n")
    table = compare_table(doc)
    (folder / "compare.txt").write_text(table + "\n")
    plot_compare(doc, folder)
    doc["folder"] = str(folder)
    doc["table"] = table
    return doc


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)
