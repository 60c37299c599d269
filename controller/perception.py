"""Perceived server figures (nodes/perception.py reports) -> the planner's Server fields.

Pure. An agent's report gives the expert-call line (fixed ms + bytes / speed, fitted over the
batch-1 rows of every bit width), the message round trip and the on-demand load line; an entry's
report adds the backbone (layer decode ms, prefill ms per token and layer, head ms). Servers
without a backbone measurement (no entry there) get the measured entries' median scaled by their
nominal speed ratio. Every server's fields stay None (the nominal model) when nothing was reported.
"""
from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from controller.cluster import Cluster

MIN_BYTES_PER_S = 1e8  # a fit steeper than this is noise (a 2-core machine reads >= 0.1 GB/s)
# A server limited to c < 1 cores runs sustained work c**-CPU_SHARE_EXPONENT slower than the CPU time
# its perception measured (nodes/perception.py measures thread CPU time, so throttling during the
# measurement does not count). Calibrated on `coel compare` runs: benchmarks/compare_report.py,
# docs/bench/compare.md.
CPU_SHARE_EXPONENT = 1.0


def expert_line(rows: list[dict[str, Any]]) -> tuple[float, float] | None:
    """(fixed ms, bytes per second) of batch-1 expert calls: least squares over the widths."""
    pts = [(float(r["nbytes"]), float(r["ms"])) for r in rows if r.get("batch") == 1 and r.get("ms", 0) > 0]
    if len(pts) < 2:
        return None
    x = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    slope, icpt = np.polyfit(x, y, 1) if np.ptp(x) > 0 else (0.0, float(y.mean()))
    slope = max(float(slope), 1e3 / 1e12)  # ms per byte; never faster than 1 TB/s
    icpt = max(float(icpt), 0.0)
    return icpt, max(1e3 / slope, MIN_BYTES_PER_S)


def server_fields(agent: dict[str, Any] | None, entry: dict[str, Any] | None) -> dict[str, Any]:
    """Server field values from one server's agent and entry reports (either may be missing)."""
    out: dict[str, Any] = {}
    msgs = [float(r["msg_rtt_ms"]) for r in (agent, entry) if r and r.get("msg_rtt_ms")]
    if msgs:
        out["msg_ms"] = max(msgs)  # the slower end of the pair of processes on this server
    if agent:
        line = expert_line((agent.get("expert") or {}).get("rows") or [])
        if line is not None:
            out["call_ms"], out["bytes_per_s"] = line
        st = agent.get("storage") or {}
        if "ms_fixed" in st:
            out["storage_ms"] = float(st["ms_fixed"])
            per_mb = float(st.get("ms_per_mb") or 0.0)
            out["storage_bytes_per_s"] = 1e6 / (per_mb / 1e3) if per_mb > 0 else 1e12
    bb = (entry or {}).get("backbone") or {}
    if bb.get("layer_decode_ms") is not None:
        out["layer_decode_ms"] = float(bb["layer_decode_ms"])
        out["prefill_token_layer_ms"] = float(bb.get("prefill_token_layer_ms") or 0.0)
        out["head_ms"] = float(bb.get("head_ms") or 0.0)
        if bb.get("layer_scatter_ms") is not None:  # the coordinator's own CPU per layer for its calls
            out["layer_decode_ms"] += float(bb["layer_scatter_ms"])
    # the measurements are short bursts that fit in the CFS quota period, so they show unthrottled
    # speed; under sustained load the server's processes get cgroup_cpu_cores of a CPU
    cores = min([c for c in (float((r.get("limits") or {}).get("cgroup_cpu_cores") or 0) for r in (agent, entry) if r)
                 if c > 0] or [0.0])
    if 0 < cores < 1:
        slow = cores ** -CPU_SHARE_EXPONENT
        for k in ("msg_ms", "call_ms", "storage_ms", "layer_decode_ms", "prefill_token_layer_ms", "head_ms"):
            if k in out:
                out[k] = out[k] * slow
        if "bytes_per_s" in out:
            out["bytes_per_s"] = out["bytes_per_s"] / slow
        out["cpu_cores"] = cores
    return out


def apply_perception(cluster: Cluster, agents: dict[str, dict], entries: dict[str, dict]) -> tuple[Cluster, list[str]]:
    """The cluster with every reporting server's perceived fields; returns notes with the numbers."""
    cl, notes = cluster, []
    nominal = {s.name: s.bytes_per_s for s in cluster.servers}
    fields = {name: server_fields(agents.get(name), entries.get(name)) for name in cl.index}
    measured = [(n, f) for n, f in fields.items() if "layer_decode_ms" in f]
    for name, f in fields.items():
        if not f:
            continue
        if "layer_decode_ms" not in f and measured:  # no entry here: scale the entries' median by speed
            ratio = statistics.median(nominal[n] for n, _ in measured) / nominal[name]
            for k in ("layer_decode_ms", "prefill_token_layer_ms", "head_ms"):
                f[k] = statistics.median(g[k] for _, g in measured) * ratio
        cl = cl.with_server(name, **f)
        notes.append(f"perceived {name}: " + ", ".join(
            f"{k} {v / 1e9:.3g} GB/s" if k.endswith("bytes_per_s") else f"{k} {v:.3g}" for k, v in sorted(f.items())))
    return cl, notes
