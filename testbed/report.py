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

DISRUPTIVE = {"link_down", "bw", "delay", "loss", "server_crash", "cpu_squeeze", "mem_squeeze", "cpu_hog"}
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
               window: int = 3, horizon_ns: int | None = None) -> float | None:
    """Seconds from the event until per-token latency is back: requests finishing after the
    event, in finishing order, are scanned until the first full rolling window (median of
    `window`) within RECOVERY_TOLERANCE x the pre-event p50; the answer is when the last request
    above the limit before that point finished (0.0 = no visible disruption). A lost request
    counts as infinitely slow. Requests finishing after `horizon_ns` (the next fault) are not
    looked at. None = no baseline, or not back by the horizon."""
    if baseline_p50_ms is None:
        return None
    limit = RECOVERY_TOLERANCE * baseline_p50_ms
    after = sorted((r for r in reqs if r["t1_ns"] >= event_ns and (horizon_ns is None or r["t1_ns"] < horizon_ns)
                    and (not r["attrs"].get("ok") or r["attrs"].get("tpot_ms") is not None)),
                   key=lambda r: r["t1_ns"])
    if not after:
        return None  # nothing finished between the event and the horizon: cannot tell
    vals = [r["attrs"]["tpot_ms"] if r["attrs"].get("ok") else math.inf for r in after]
    need = min(window, len(after))
    for i in range(need - 1, len(after)):
        if percentile(vals[i - need + 1:i + 1], 50) <= limit:
            bad = [k for k in range(i + 1) if vals[k] > limit]
            return 0.0 if not bad else max(0.0, (after[bad[-1]]["t1_ns"] - event_ns) / 1e9)
    return None


def time_origin(trace: Trace) -> int:
    """Times in summary.json count from the clients' launch (the runner's traffic_start event,
    which the scenario's at_s also counts from), else from the first record."""
    return next((e["t_ns"] for e in trace.events if e["event"] == "traffic_start"), trace.t0_ns)


CONTROLLER_REACTIONS = ("agent_lost", "entry_lost", "link_degraded", "link_recovered", "agent_rejoined",
                        "entry_rejoined", "overload")
LOST_VERDICTS = ("agent_lost", "entry_lost")
BACK_VERDICTS = ("agent_rejoined", "entry_rejoined")
STAYED_BACK_S = 10.0  # a server is "back" when it stayed back this long
ISOLATION_GRACE_S = 2.0  # a lost verdict within this long after an isolation ended still has that cause


def fault_targets(attrs: dict[str, Any]) -> set[str]:
    """Names a controller event may mention when it reacts to this fault."""
    out = set()
    if attrs.get("server"):
        out.add(str(attrs["server"]))
    link = attrs.get("link")
    if isinstance(link, (list, tuple)):
        out.update(str(x) for x in link)
    elif isinstance(link, str):
        out.update(link.split("-"))
    return out


def _mentions(e: dict[str, Any], targets: set[str]) -> bool:
    a = e.get("attrs", {})
    if a.get("server") in targets or a.get("name") in targets:
        return True
    text = " ".join(str(x) for x in (a.get("reasons") or [])) + " " + str(a.get("reason", ""))
    return any(f"{t}:" in text or f"agent {t} " in text or f"server {t} " in text or f"link {t}-" in text
               or f"-{t}:" in text for t in targets)


def fault_responses(trace: Trace, reqs: list[dict[str, Any]], window_s: float = 20.0) -> list[dict[str, Any]]:
    """For each injected fault, how the system answered it, measured from the outside:
    detect_s (fault -> first controller reaction naming the fault's server or link), the
    re-deployment that followed (trigger, replan_s, migrate_s, bytes_moved, actions), requests
    lost while it lasted, and recovery_s (fault -> per-token latency back within 20% of the p50
    of the requests submitted before the fault). The controller is never told of the fault; the
    matching happens here, after the run."""
    faults = [e for e in fault_events(trace) if e["attrs"].get("ok", True)]
    ctl_events = [e for e in trace.events if e["event"] in CONTROLLER_REACTIONS + ("redeployment", "replan")]
    traffic0 = next((e["t_ns"] for e in trace.events if e["event"] == "traffic_start"), None)
    out = []
    for i, f in enumerate(faults):
        a = f["attrs"]
        t = f["t_ns"]
        nxt = faults[i + 1]["t_ns"] if i + 1 < len(faults) else None
        end = t + int(window_s * 1e9)
        if nxt is not None:
            end = min(end, nxt)
        targets = fault_targets(a)
        react = [e for e in ctl_events if t <= e["t_ns"] < end and e["event"] in CONTROLLER_REACTIONS]
        named = [e for e in react if _mentions(e, targets)]
        # a reaction naming the fault's server or link end; else (a router-router link, an SLO
        # change) the first reaction at all, flagged as unnamed
        first = named[0] if named else (react[0] if react else None)
        if first is None and a.get("kind") == "slo":
            first = next((e for e in ctl_events if t <= e["t_ns"] < end), None)
        rd = [e for e in ctl_events if e["event"] == "redeployment" and t <= e["t_ns"] < end]
        rd_named = [e for e in rd if _mentions(e, targets) or (a.get("kind") == "slo" and
                                                                e["attrs"].get("trigger") == "slo_change")]
        red = (rd_named or rd or [None])[0]
        before = [r for r in reqs if r["t0_ns"] < t and (traffic0 is None or r["t0_ns"] >= traffic0)
                  and (i == 0 or r["t0_ns"] >= faults[i - 1]["t_ns"])]
        base = latency_stats(before)["tpot_ms"]["p50"]
        lost = [r for r in reqs if not r["attrs"].get("ok") and r["t1_ns"] >= t and (nxt is None or r["t0_ns"] < nxt)]
        rec = {"kind": a.get("kind"), "target": "-".join(a["link"]) if isinstance(a.get("link"), list)
               else a.get("server") or a.get("slo_class"), "t_s": round((t - time_origin(trace)) / 1e9, 3),
               "detect_s": None if first is None else round((first["t_ns"] - t) / 1e9, 3),
               "detected_by": None if first is None else first["event"] + ("" if named else " (unnamed)"),
               "redeployed": red is not None, "baseline_tpot_p50_ms": base,
               "recovery_s": recovery_s(reqs, t, base, horizon_ns=nxt), "lost_requests": len(lost)}
        if red is not None:
            ra = red["attrs"]
            rec.update(trigger=ra.get("trigger"), redeploy_at_s=round((red["t_ns"] - t) / 1e9, 3),
                       replan_s=ra.get("replan_s"), migrate_s=ra.get("migrate_s"),
                       bytes_moved=ra.get("bytes_moved"), actions=ra.get("actions"),
                       action_kinds=ra.get("action_kinds"))
        out.append(rec)
    return out


def isolation_intervals(faults: list[dict[str, Any]], topo: Any, end_ns: int) -> dict[str, list[list[int]]]:
    """Per server, the [start, end] times (ns) during which the injected faults cut it off from the
    controller: its process crashed, or no path of up links joins them (link_down ... link_up).
    Pure: `faults` are the runner's fault events, `topo` the run's topology."""
    from topologies.paths import shortest_paths_from
    ctl = topo.controller.name
    down: set[frozenset] = {frozenset((ln.a, ln.b)) for ln in topo.links if not ln.up}
    crashed: set[str] = set()
    out: dict[str, list[list[int]]] = {}
    cut: set[str] = set()

    def recompute(t: int) -> None:
        nonlocal cut
        t2 = topo
        for ln in topo.links:
            if frozenset((ln.a, ln.b)) in down:
                t2 = t2.with_link(ln.a, ln.b, up=False)
            elif not ln.up:
                t2 = t2.with_link(ln.a, ln.b, up=True)
        reach = shortest_paths_from(t2, ctl)
        now = {s.name for s in topo.servers if s.name not in reach or s.name in crashed}
        for s in now - cut:
            out.setdefault(s, []).append([t, end_ns])
        for s in cut - now:
            out[s][-1][1] = t
        cut = now

    for f in sorted(faults, key=lambda e: e["t_ns"]):
        a, t = f["attrs"], f["t_ns"]
        link = a.get("link")
        key = frozenset(link.split("-") if isinstance(link, str) else link) if link else None
        if a.get("kind") == "link_down" and key:
            down.add(key)
        elif a.get("kind") in ("link_up", "restore") and key:
            down.discard(key)
        elif a.get("kind") == "server_crash" and a.get("server") and a.get("process") in (None, "all", "agent"):
            crashed.add(a["server"])
        elif a.get("kind") == "server_restart" and a.get("server"):
            crashed.discard(a["server"])
        else:
            continue
        recompute(t)
    return out


def liveness_audit(trace: Trace, topo: Any, t0_ns: int) -> dict[str, Any]:
    """Every lost/rejoined verdict of the controller checked against what the testbed injected:
    spurious = a lost verdict for a server no injected fault cut off (at the time, or within
    ISOLATION_GRACE_S after); flaps = a lost verdict after that server's rejoin with no new
    isolation in between (lost/rejoined cycles); back_s per isolation = its end -> the rejoin
    verdict, counted only when the server then stayed back STAYED_BACK_S (else None)."""
    faults = [e for e in fault_events(trace) if e["attrs"].get("ok", True)]
    end_ns = max([e["t_ns"] for e in trace.events] or [t0_ns])
    iso = isolation_intervals(faults, topo, end_ns) if topo is not None else {}
    verdicts = sorted((e for e in trace.events if e["event"] in LOST_VERDICTS + BACK_VERDICTS),
                      key=lambda e: e["t_ns"])
    grace = int(ISOLATION_GRACE_S * 1e9)
    spurious, flaps, lost_list = [], [], []
    last_back: dict[str, int] = {}
    for e in verdicts:
        name, t = e["attrs"].get("name"), e["t_ns"]
        if e["event"] in BACK_VERDICTS:
            last_back[name] = t
            continue
        spans = iso.get(name, [])
        caused = any(a <= t <= b + grace for a, b in spans)
        rec = {"t_s": round((t - t0_ns) / 1e9, 3), "server": name, "event": e["event"], "caused": caused}
        lost_list.append(rec)
        if not caused:
            spurious.append(rec)
        if name in last_back and not any(last_back[name] < a <= t for a, _ in spans):
            flaps.append(rec)
    backs = []
    for name, spans in sorted(iso.items()):
        for a, b in spans:
            if b >= end_ns:
                continue  # still cut off when the run ended
            rj = next((e for e in verdicts if e["event"] in BACK_VERDICTS and e["attrs"].get("name") == name
                       and e["t_ns"] >= b), None)
            relapse = rj is not None and any(e["event"] in LOST_VERDICTS and e["attrs"].get("name") == name
                                             and rj["t_ns"] < e["t_ns"] <= rj["t_ns"] + int(STAYED_BACK_S * 1e9)
                                             for e in verdicts)
            stayed = rj is not None and not relapse and rj["t_ns"] + int(STAYED_BACK_S * 1e9) <= end_ns
            backs.append({"server": name, "isolated_t_s": round((a - t0_ns) / 1e9, 3),
                          "restored_t_s": round((b - t0_ns) / 1e9, 3),
                          "back_s": round((rj["t_ns"] - b) / 1e9, 3) if stayed else None,
                          "stayed_back": stayed})
    return {"spurious_detections": len(spurious), "flaps": len(flaps), "lost_verdicts": lost_list,
            "spurious": spurious, "flap_list": flaps, "back": backs}


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
    responses = fault_responses(trace, reqs)
    t0 = time_origin(trace)
    faults = [e for e in fault_events(trace) if e["attrs"].get("ok", True)]
    redeploys = []
    for e in trace.events:
        if e["event"] != "redeployment":
            continue
        a = dict(e["attrs"])
        ev_ns = a.get("event_ns")
        # the fault this re-deployment answers: the latest injected one before its detection
        det = a.get("detected_ns") or e["t_ns"]
        cause = max((i for i, f in enumerate(faults) if f["t_ns"] <= det), default=None)
        if cause is not None:
            resp = responses[cause]
            a["fault"] = f"{resp['kind']} {resp['target']}"
            a["fault_t_s"] = resp["t_s"]
            a["detect_s_controller"] = a.get("detect_s")
            a["detect_s"] = round((det - faults[cause]["t_ns"]) / 1e9, 3)
            if ev_ns is None and a.get("recovery_s") is None:
                a["recovery_s"] = resp["recovery_s"]
        if ev_ns is not None and a.get("recovery_s") is None:
            a["recovery_s"] = recovery_s(reqs, int(ev_ns), before_p50)
        a["t_s"] = round((e["t_ns"] - t0) / 1e9, 3)
        redeploys.append({k: a.get(k) for k in ("t_s", "trigger", "fault", "fault_t_s", "detect_s",
                                                "detect_s_controller", "replan_s", "migrate_s", "bytes_moved",
                                                "recovery_s", "actions", "action_kinds", "reasons")})
    per_link = link_bytes(trace)
    audit = liveness_audit(trace, _run_topology(meta), t0)
    # the controller's own links carry probes, heartbeats and shard loads, not tokens
    ctl_hosts = {e["host"] for e in trace.events if e["event"] in ("controller_start", "serving")}
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
        "bytes_controller_links": sum(v for k, v in per_link.items() if set(k.split("-")) & ctl_hosts),
        "bytes_per_link": per_link,
        "faults": [{"t_s": (e["t_ns"] - t0) / 1e9, **e["attrs"]} for e in fault_events(trace)],
        "redeployments": redeploys,
        "fault_responses": responses,
        "spurious_detections": audit["spurious_detections"],
        "flaps": audit["flaps"],
        "liveness": audit,
        "replayed_requests": [{"t_s": round((sp["t0_ns"] - t0) / 1e9, 3), "entry": sp["host"],
                               "replays": sp["attrs"]["replays"], "ok": sp["attrs"].get("ok"),
                               "new_tokens": sp["attrs"].get("new_tokens")}
                              for sp in trace.spans if sp["span"] == "serve" and sp["attrs"].get("replays")],
        "memory_check": memory_check(meta),
    }


def memory_check(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per server: the bytes its agent accounted at the end (experts + backbone slice) against the
    final plan's memory_bytes for it and the agent's budget (issue 14: nobody holds beyond plan)."""
    agents = (meta.get("final_status") or {}).get("agents") or {}
    planned = ((meta.get("final_plan") or {}).get("memory_bytes")) or {}
    out = {}
    for srv, a in sorted(agents.items()):
        used = a.get("memory_used_bytes")
        if used is None or not a.get("alive", True):
            continue  # a lost server's last heartbeat is stale
        plan_b = planned.get(srv, 0)
        out[srv] = {"accounted_bytes": used, "plan_bytes": plan_b, "budget_bytes": a.get("memory_budget_bytes"),
                    "within_plan": used <= plan_b}
    return out


def _run_topology(meta: dict[str, Any]) -> Any:
    """The run's topology (for the liveness audit), None when the run folder does not name one."""
    src = meta.get("topology_source") or meta.get("topology")
    if not src:
        return None
    from topologies import load_topology
    try:
        return load_topology(src)
    except Exception:  # a moved or edited topology file: the audit then knows no isolation (all lost = spurious)
        return None


def write_csv(trace: Trace, path: Path) -> None:
    ph = phases_of(trace)
    t0 = time_origin(trace)
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

    t0 = time_origin(trace)
    reqs = trace.requests()
    ph = phases_of(trace)
    paths = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        paths.append(out_dir / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

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
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7, loc="upper left")
    axes[1].set_xlabel("time since traffic start (s)")
    fig.suptitle("End-to-end latency over time (dashed: injected faults, dotted: re-deployments)")
    save(fig, "latency_over_time.png")

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
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("Latency CDF by phase")
    save(fig, "latency_cdf.png")

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
    ax.set_xlabel("time since traffic start (s)")
    ax.set_ylabel("cumulative MB carried")
    ax.set_title("Bytes per link")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7, ncol=2)
    save(fig, "bytes_per_link.png")
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
    ctl_b = summary.get("bytes_controller_links") or 0
    lines.append(f"bytes on the wire: {summary['bytes_on_wire'] / 1e6:.2f} MB over "
                 f"{len(summary['bytes_per_link'])} links (of which {ctl_b / 1e6:.2f} MB on the controller's "
                 "links: probes, heartbeats, shard loads)")
    rds = summary.get("redeployments", [])
    moved = sum(r.get("bytes_moved") or 0 for r in rds)
    lines.append(f"re-deployments: {len(rds)} ({moved / 1e6:.2f} MB of shards moved)")
    for r in rds:
        if r.get("fault") is None and summary.get("fault_responses"):
            continue  # start-up and noise re-plans are in summary.json; the table shows the faults'
        lines.append(f"  re-deployment: trigger={r['trigger']} fault={r.get('fault')} detect={_fmt2(r['detect_s'])}s "
                     f"replan={_fmt2(r['replan_s'])}s moved={r['bytes_moved']}B recovery={_fmt2(r['recovery_s'])}s")
    if "spurious_detections" in summary:
        backs = ", ".join(f"{b['server']} back {_fmt2(b['back_s'])}s after restore"
                          + ("" if b["stayed_back"] else " (did not stay back 10 s)")
                          for b in summary.get("liveness", {}).get("back", []))
        lines.append(f"liveness: {len(summary['liveness']['lost_verdicts'])} lost verdicts, "
                     f"{summary['spurious_detections']} spurious, {summary['flaps']} flaps"
                     + (f"; {backs}" if backs else ""))
    if summary.get("replayed_requests"):
        rep = summary["replayed_requests"]
        lines.append(f"replayed requests (a lost pipeline stage, re-prefilled on the new plan): {len(rep)}, "
                     f"{sum(1 for r in rep if r['ok'])} finished")
    for f in summary.get("fault_responses", []):
        how = f" ({f.get('trigger')}, {f.get('bytes_moved')} B moved)" if f["redeployed"] else ""
        lines.append(f"fault {f['kind']} {f['target']} at {f['t_s']:.1f}s: detected {_fmt2(f['detect_s'])}s "
                     f"({f['detected_by'] or 'never'}), re-deployed {'yes' if f['redeployed'] else 'no'}{how}, "
                     f"recovery {_fmt2(f['recovery_s'])}s, lost {f['lost_requests']}")
    return "\n".join(lines)


def _fmt2(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"
