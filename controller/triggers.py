"""One step of the controller's monitoring: this tick's observations -> events and triggers.
Pure (no sockets, no clocks; times are passed in); controller/service.py logs the events and
hands the triggers to the re-planner. Liveness verdicts come from controller.detector.

  probe_step      a probe sample of one agent -> link_degraded/link_recovered (trigger bw|delay),
                  unless the same change shows on most other agents at once: CPU contention on the
                  shared machine (or the controller's own side) slows every probe together, while a
                  link change shows on the agents behind that link only (the false "delay"
                  re-deployment of issue 12, seen when traffic started on a loaded machine)
  overload_step   agents whose reported CPU stays at their share -> overload
  resource_step   cgroup limits that changed under an agent -> resource_change
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from controller import monitor as M

MIN_WITNESSES = 2  # other agents with a baseline needed to call a change common to all


@dataclass(frozen=True)
class StepEvent:
    kind: str
    attrs: dict[str, Any]


def common_change(what: str, name: str, states: dict[str, M.ProbeState], cfg: M.MonitorConfig) -> str | None:
    """Why a `what` ("bw" | "delay") change seen on `name` is common to most other agents (a
    reason naming the median ratio), else None. delay: the median over the others of (best recent
    RTT / baseline) is at least halfway to rtt_rise_ratio; bw: the median of (latest quick goodput
    / quick baseline) is below quick_suspect_ratio."""
    others = [st for n, st in states.items() if n != name and st.base_rtt_ms and st.rtt_ms]
    if what == "delay":
        ratios = [min(st.rtt_ms[-cfg.probe_window:]) / st.base_rtt_ms for st in others]
        limit = 1.0 + (cfg.rtt_rise_ratio - 1.0) / 2
        if len(ratios) >= MIN_WITNESSES and statistics.median(ratios) >= limit:
            return (f"RTT of {len(ratios)} other agents also at {statistics.median(ratios):.2f}x their baseline "
                    f"(median; >= {limit:.2f}): contention, not this link")
    else:
        ratios = [st.quick_mbit[-1] / st.base_quick_mbit for st in others if st.base_quick_mbit and st.quick_mbit]
        if len(ratios) >= MIN_WITNESSES and statistics.median(ratios) < cfg.quick_suspect_ratio:
            return (f"goodput of {len(ratios)} other agents also at {statistics.median(ratios):.2f}x their baseline "
                    f"(median; < {cfg.quick_suspect_ratio}): contention, not this link")
    return None


def probe_step(name: str, st: M.ProbeState, states: dict[str, M.ProbeState], t_ns: int,
               cfg: M.MonitorConfig) -> tuple[StepEvent | None, M.Trigger | None]:
    """After a sample was added to `st`: (event, trigger) for a link verdict (st re-based), or
    (link_change_discounted event, None) when the change is common to the other agents (st not
    re-based: the verdict stands if the others recover and this one does not), or (None, None)."""
    v = M.probe_change(st, cfg)
    if v is None:
        return None, None
    kind, what, why = v
    if kind == "link_degraded":
        common = common_change(what, name, states, cfg)
        if common is not None:
            return StepEvent("link_change_discounted", {"server": name, "change": what, "seen": why,
                                                        "reason": common}), None
    M.rebase(st, cfg, M.verdict_samples(kind, what, cfg))
    return (StepEvent(kind, {"server": name, "change": what, "reason": why}),
            M.Trigger(what, t_ns, f"{name}: {kind.replace('_', ' ')}: {why}", name))


def overload_step(cpu_hist: dict[str, list[float]], overloaded: set[str], cores_of: dict[str, float],
                  now_ns: int, cfg: M.MonitorConfig) -> tuple[set[str], list[M.Trigger]]:
    """(new overloaded set, triggers for agents that just became overloaded). An agent leaves the
    set once its last report is below half its share. cpu_hist: live agents' recent cpu_percent."""
    out, triggers = set(overloaded), []
    for name in sorted(cpu_hist):
        hist, share = cpu_hist[name], cores_of.get(name, 0.0)
        over = M.overloaded(hist, share, cfg)
        if over and name not in out:
            out.add(name)
            triggers.append(M.Trigger("overload", now_ns, f"agent {name} cpu at >= {cfg.overload_cpu_frac} x "
                                                          f"its share ({share:.2f} cores)", name))
        elif not over and name in out and hist and hist[-1] < 50.0 * share:
            out.discard(name)
    return out, triggers


def resource_step(resources: dict[str, tuple[int | None, float]], planned: dict[str, tuple[int | None, float]],
                  now_ns: int) -> tuple[dict[str, tuple[int | None, float]], list[StepEvent], list[M.Trigger]]:
    """Cgroup limits vs what the plan assumed: (new planned, resource_change events, triggers) for
    a memory change beyond 5% or a load change beyond 0.1."""
    new, events, triggers = dict(planned), [], []
    for name, (mem, load) in sorted(resources.items()):
        old_mem, old_load = planned.get(name, (None, 0.0))
        mem_changed = mem != old_mem and (mem is None or old_mem is None or abs(mem - old_mem) > 0.05 * max(old_mem, 1))
        if mem_changed or abs(load - old_load) > 0.1:
            new[name] = (mem, load)
            events.append(StepEvent("resource_change", {"server": name, "memory_bytes": mem, "load": load,
                                                        "previous_memory_bytes": old_mem,
                                                        "previous_load": old_load}))
            triggers.append(M.Trigger("resource_change", now_ns, f"agent {name}: shard memory "
                                      f"{'as planned' if mem is None else f'{mem / (1 << 20):.2f} MiB'}, "
                                      f"cpu load {load:.2f} (cgroup limits)", name))
    return new, events, triggers


def choose_full_plan(kind: str, incremental: dict[str, Any], full: dict[str, Any], moved_bytes: int,
                     budget_bytes: float, overflow: dict[str, tuple[int, int]]) -> tuple[bool, str]:
    """The re-deployment choice: adopt a full re-plan instead of the incremental one? (decision,
    reason). Links, load or SLO changed: the incremental plan keeps every expert where it is, a
    full plan may serve much better; adopt it only when clearly worth it (monitor.prefer_full_plan),
    with no budget when a missed SLO can be met, and never when make-before-break would overflow a
    server (`overflow`: server -> (bytes needed, capacity))."""
    slo_missed = kind == "slo_change" and not incremental.get("meets_slo", True)
    gain = 0.0 if slo_missed else 0.2
    if slo_missed and full.get("meets_slo"):
        budget_bytes = float("inf")  # a missed SLO justifies a full re-deployment
    ok, why = M.prefer_full_plan(incremental, full, moved_bytes, budget_bytes, gain)
    if ok and overflow:
        return False, ("full re-plan rejected: make-before-break does not fit on "
                       + ", ".join(f"{s} ({n} > {c} bytes)" for s, (n, c) in sorted(overflow.items())))
    return ok, why
