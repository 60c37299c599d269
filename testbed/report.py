"""Run reports: summary.json, summary.csv, trace.json (Chrome/Perfetto) and PNG plots, all rebuilt
from the run folder's raw JSONL traces (`coel report RUN_DIR`).

Phases: a request belongs to the phase in which it was submitted. "before" ends at the first
disruptive event (link down, bandwidth drop, crash, squeeze); "during" lasts until the first event
that restores it (link up, restart, restore), "after" is the rest. Runs with no fault have one phase.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.traces import Trace, merge, to_chrome, write_jsonl

DISRUPTIVE = {"link_down", "bw", "delay", "loss", "server_crash", "cpu_squeeze", "mem_squeeze"}
RESTORING = {"link_up", "server_restart", "restore"}
RECOVERY_TOLERANCE = 1.2  # per-token latency back within 20% of the pre-event p50


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Phases:
    disrupt_ns: int | None  # first disruptive event
    restore_ns: int | None  # first restoring event after it

    def of(self, t_ns: int) -> str:
        if self.disrupt_ns is None or t_ns < self.disrupt_ns:
            return "before"
        if self.restore_ns is None or t_ns < self.restore_ns:
            return "during"
        return "after"


def fault_events(trace: Trace) -> list[dict[str, Any]]:
    """Events injected by the testbed (the controller never sees these records)."""
    return [e for e in trace.events if e["event"] == "fault"]


def phases_of(trace: Trace) -> Phases:
    faults = fault_events(trace)
    disrupt = next((e["t_ns"] for e in faults if e["attrs"].get("kind") in DISRUPTIVE), None)
    restore = None
    if disrupt is not None:
        restore = next((e["t_ns"] for e in faults
                        if e["t_ns"] > disrupt and e["attrs"].get("kind") in RESTORING), None)
    return Phases(disrupt, restore)


def latency_stats(reqs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in reqs if r["attrs"].get("ok")]
    ttft = [r["attrs"]["ttft_ms"] for r in ok if r["attrs"].get("ttft_ms") is not None]
    tpot = [r["attrs"]["tpot_ms"] for r in ok if r["attrs"].get("tpot_ms") is not None]
    return {"requests": len(reqs), "ok": len(ok), "lost": len(reqs) - len(ok),
            "ttft_ms": {"p50": percentile(ttft, 50), "p95": percentile(ttft, 95)},
            "tpot_ms": {"p50": percentile(tpot, 50), "p95": percentile(tpot, 95)}}


def recovery_s(reqs: list[dict[str, Any]], event_ns: int, baseline_p50_ms: float | None,
               window: int = 3) -> float | None:
    """Seconds from the event until the rolling median per-token latency of requests that finish
    after it is back within RECOVERY_TOLERANCE x the pre-event p50; None if it never is."""
    if baseline_p50_ms is None:
        return None
    after = sorted((r for r in reqs if r["attrs"].get("ok") and r["t1_ns"] >= event_ns
                    and r["attrs"].get("tpot_ms") is not None), key=lambda r: r["t1_ns"])
    for i in range(len(after)):
        win = [r["attrs"]["tpot_ms"] for r in after[max(0, i - window + 1):i + 1]]
        if len(win) == min(window, len(after)) and percentile(win, 50) <= RECOVERY_TOLERANCE * baseline_p50_ms:
            first = after[max(0, i - window + 1)]
            return max(0.0, (first["t0_ns"] - event_ns) / 1e9) if first["t0_ns"] > event_ns else \
                max(0.0, (first["t1_ns"] - event_ns) / 1e9)
    return None


def link_bytes(trace: Trace) -> dict[str, float]:
    """Bytes carried per link over the run, from the `link_bytes:<link>` interface counters."""
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for c in trace.counters:
        if not c["counter"].startswith("link_bytes:"):
            continue
        name = c["counter"].split(":", 1)[1]
        first.setdefault(name, c["value"])
        last[name] = c["value"]
    return {k: last[k] - first[k] for k in sorted(last)}


def summarize(trace: Trace, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    meta = meta or {}
    reqs = trace.requests()
    ph = phases_of(trace)
    by_phase: dict[str, list[dict[str, Any]]] = {}
    for r in reqs:
        by_phase.setdefault(ph.of(r["t0_ns"]), []).append(r)
    overall = latency_stats(reqs)
    before_p50 = latency_stats(by_phase.get("before", []))["tpot_ms"]["p50"]
    redeploys = []
    for e in trace.events:
        if e["event"] != "redeployment":
            continue
        a = dict(e["attrs"])
        ev_ns = a.get("event_ns")
        if ev_ns is not None and a.get("recovery_s") is None:
            a["recovery_s"] = recovery_s(reqs, int(ev_ns), before_p50)
        redeploys.append({k: a.get(k) for k in ("trigger", "detect_s", "replan_s", "bytes_moved",
                                                "recovery_s", "actions", "reasons", "migrate_s")})
    per_link = link_bytes(trace)
    t0 = trace.t0_ns
    return {
        "scenario": meta.get("scenario"),
        "emulation_mode": meta.get("emulation_mode"),
        "strategy": meta.get("strategy"),
        "static": meta.get("static"),
        "requests": overall["requests"],
        "lost_requests": overall["lost"],
        "ok_requests": overall["ok"],
        "ttft_ms": overall["ttft_ms"],
        "tpot_ms": overall["tpot_ms"],
        "phases": {k: latency_stats(v) for k, v in sorted(by_phase.items(),
                                                        key=lambda kv: ["before", "during", "after"].index(kv[0]))},
        "bytes_on_wire": sum(per_link.values()),
        "bytes_per_link": per_link,
        "faults": [{"t_s": (e["t_ns"] - t0) / 1e9, **e["attrs"]} for e in fault_events(trace)],
        "redeployments": redeploys,
    }


def write_csv(trace: Trace, path: Path) -> None:
    ph = phases_of(trace)
    t0 = trace.t0_ns
    cols = ["trace_id", "client", "class", "t_submit_s", "phase", "ok", "ttft_ms", "tpot_ms",
            "prompt_tokens", "new_tokens", "error"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in trace.requests():
            a = r["attrs"]
            w.writerow([r["trace_id"], r["host"], a.get("class", ""), f"{(r['t0_ns'] - t0) / 1e9:.3f}",
                        ph.of(r["t0_ns"]), int(bool(a.get("ok"))), a.get("ttft_ms"), a.get("tpot_ms"),
                        a.get("prompt_tokens"), a.get("new_tokens"), a.get("error", "")])


def plot_all(trace: Trace, out_dir: Path) -> list[Path]:
    """latency_over_time.png, latency_cdf.png, bytes_per_link.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = trace.t0_ns
    reqs = trace.requests()
    ph = phases_of(trace)
    paths = []
    colors = {"before": "tab:blue", "during": "tab:red", "after": "tab:green"}

    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for key, ax, label in (("ttft_ms", axes[0], "TTFT (ms)"), ("tpot_ms", axes[1], "per-token latency (ms)")):
        for phase in ("before", "during", "after"):
            pts = [((r["t0_ns"] - t0) / 1e9, r["attrs"][key]) for r in reqs
                   if r["attrs"].get("ok") and r["attrs"].get(key) is not None and ph.of(r["t0_ns"]) == phase]
            if pts:
                ax.scatter(*zip(*pts), s=12, color=colors[phase], label=phase)
        lost = [(r["t0_ns"] - t0) / 1e9 for r in reqs if not r["attrs"].get("ok")]
        if lost:
            ax.scatter(lost, [0] * len(lost), marker="x", color="black", label="lost")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for e in trace.events:
        if e["event"] in ("fault", "redeployment"):
            x = (e["t_ns"] - t0) / 1e9
            style = dict(color="red", ls="--") if e["event"] == "fault" else dict(color="purple", ls=":")
            for ax in axes:
                ax.axvline(x, **style, lw=1)
            name = e["attrs"].get("kind") or e["attrs"].get("trigger") or e["event"]
            axes[0].annotate(str(name), (x, 1), xycoords=("data", "axes fraction"), rotation=90,
                             va="top", ha="right", fontsize=7)
    axes[0].legend(fontsize=7, loc="upper left")
    axes[1].set_xlabel("time since start (s)")
    fig.suptitle("End-to-end latency over time (dashed: injected faults, dotted: re-deployments)")
    fig.tight_layout()
    p = out_dir / "latency_over_time.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax, label in (("ttft_ms", axes[0], "TTFT (ms)"), ("tpot_ms", axes[1], "per-token latency (ms)")):
        for phase in ("before", "during", "after"):
            xs = sorted(r["attrs"][key] for r in reqs if r["attrs"].get("ok")
                        and r["attrs"].get(key) is not None and ph.of(r["t0_ns"]) == phase)
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post",
                        color=colors[phase], label=f"{phase} (n={len(xs)})")
        ax.set_xlabel(label)
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Latency CDF by phase")
    fig.tight_layout()
    p = out_dir / "latency_cdf.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(9, 4))
    series: dict[str, list[tuple[float, float]]] = {}
    for c in trace.counters:
        if c["counter"].startswith("link_bytes:"):
            series.setdefault(c["counter"].split(":", 1)[1], []).append(((c["t_ns"] - t0) / 1e9, c["value"]))
    for name, pts in sorted(series.items()):
        base = pts[0][1]
        ax.plot([t for t, _ in pts], [(v - base) / 1e6 for _, v in pts], label=name)
    for e in fault_events(trace):
        ax.axvline((e["t_ns"] - t0) / 1e9, color="red", ls="--", lw=1)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("cumulative MB carried")
    ax.set_title("Bytes per link")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    p = out_dir / "bytes_per_link.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def build_report(run_dir: str | Path) -> dict[str, Any]:
    """(Re)build every derived file of a run folder from its raw traces."""
    run = Path(run_dir)
    raw = sorted((run / "raw").glob("*.jsonl"))
    if not raw:
        from coel_model.errors import ConfigError
        raise ConfigError(f"{run}: no raw traces (expected {run / 'raw'}/*.jsonl)")
    trace = merge(raw)
    meta_path = run / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    write_jsonl(trace, run / "spans.jsonl")
    (run / "trace.json").write_text(json.dumps(to_chrome(trace)))
    write_csv(trace, run / "summary.csv")
    summary = summarize(trace, meta)
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_all(trace, run)
    return summary


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def summary_table(summary: dict[str, Any]) -> str:
    """Plain-text table printed at the end of every run."""
    lines = [f"scenario {summary.get('scenario')}  emulation mode: {summary.get('emulation_mode')}  "
             f"strategy: {summary.get('strategy')}{' (static)' if summary.get('static') else ''}",
             f"{'phase':<8} {'reqs':>5} {'lost':>5} {'TTFT p50':>9} {'TTFT p95':>9} {'tok p50':>8} {'tok p95':>8}  (ms)"]
    for name, st in list(summary["phases"].items()) + [("all", {
            "requests": summary["requests"], "lost": summary["lost_requests"],
            "ttft_ms": summary["ttft_ms"], "tpot_ms": summary["tpot_ms"]})]:
        lines.append(f"{name:<8} {st['requests']:>5} {st['lost']:>5} {_fmt(st['ttft_ms']['p50']):>9} "
                     f"{_fmt(st['ttft_ms']['p95']):>9} {_fmt(st['tpot_ms']['p50']):>8} {_fmt(st['tpot_ms']['p95']):>8}")
    lines.append(f"bytes on the wire: {summary['bytes_on_wire'] / 1e6:.2f} MB over "
                 f"{len(summary['bytes_per_link'])} links")
    for r in summary.get("redeployments", []):
        lines.append(f"re-deployment: trigger={r['trigger']} detect={_fmt(r['detect_s'])}s "
                     f"replan={_fmt(r['replan_s'])}s moved={r['bytes_moved']}B recovery={_fmt(r['recovery_s'])}s")
    return "\n".join(lines)
