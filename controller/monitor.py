"""Observation -> triggers: what the controller concludes from heartbeats, probes and resource
reports. Everything here is pure (no sockets, no clocks: times are passed in), so every
threshold is unit-tested; controller/service.py runs the thin loop around it.

The controller is never told what the testbed injected. It sees:
  * heartbeats: who is alive is decided by controller.liveness (suspicion, direct and indirect
    probes, adaptive per-peer deadlines), not here;
  * probes (controller -> agent, every probe_interval_s): a small PROBE gives the RTT and a
    quick PROBE with a small payload (quick_probe_bytes, echoed) a rough goodput, compared only
    with its own baseline (small payloads partly slip through the shaper in one burst, so their
    absolute rate is meaningless, but a bandwidth drop still slows them several-fold). Only when
    the quick sample is suspect (quick_suspect), or the link is degraded, does a full goodput
    PROBE follow at once (probe_bytes; the quick one drained the shaper's burst, so this one
    is timed at the real rate: a packet-train estimate), whose goodput feeds the verdicts. A full sample that looks changed (probe_suspect) makes the prober
    re-probe that agent after probe_recheck_s instead of probe_interval_s, so the confirmation
    costs ~0.2 s, not another interval. CPU contention
    on a shared machine only ever makes a probe look WORSE (later, slower), so a link is called
    bandwidth-degraded only when even the best of the last `probe_confirm` samples is below
    bw_drop_ratio x baseline (two probes ~0.05-0.2 s apart both 3x slow: a lone late probe is
    not enough), delay-degraded when the best of the last `probe_window` RTTs is beyond the
    threshold (rtt_rise_ratio x baseline and rtt_rise_min_ms more), and recovered only when even
    the worst of the last `probe_window` samples is back; the baseline (median of the first
    samples) then moves to the new level, so one change triggers once;
  * resource reports in the heartbeats (agent cpu_percent vs its share) = overloaded server.
`observed_cluster` turns the observations into the planner's cluster: lost servers removed,
each server's access link scaled by its measured goodput ratio and delayed by its RTT rise.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable

from coel_model.errors import ConfigError
from controller.cluster import Cluster


@dataclass(frozen=True)
class MonitorConfig:
    probe_interval_s: float = 0.5  # one RTT + goodput probe per agent per interval
    probe_bytes: int = 32 * 1024  # full goodput probe payload (echoed back: 2x on the wire). It follows the
    #                               quick probe at once, which has drained the shaper's burst, so it is timed
    #                               at the link's real rate although it is small
    probe_transfer_ms: float = 0.0  # > 0: size full payloads to last this long at the last measured rate ...
    probe_min_bytes: int = 16 * 1024  # ... within these bounds
    probe_max_bytes: int = 256 * 1024
    quick_probe_bytes: int = 48 * 1024  # the every-interval payload; a full probe follows only when it is suspect
    degraded_probe_ms: float = 20.0  # on a degraded link, payloads shrink to last about this long at its rate ...
    degraded_probe_min_bytes: int = 4 * 1024  # ... but not below this (a 48 KiB probe every 0.5 s alone would
    #                                           saturate a link collapsed to 1 Mbit/s and starve its heartbeats)
    quick_suspect_ratio: float = 0.5  # quick goodput below this x its own baseline = suspect (run a full probe)
    probe_timeout_s: float = 1.0
    probe_window: int = 3  # recent samples for delay changes and recoveries: the best/worst must be beyond
    probe_confirm: int = 2  # consecutive low-goodput samples that declare a bandwidth drop
    probe_recheck_s: float = 0.05  # a suspect agent is probed again after this, not after probe_interval_s
    baseline_probes: int = 5  # samples that define "normal" (median), taken back to back at start
    # Thresholds: CPU contention on the shared 2-core machine was seen to halve probe goodput and
    # double probe RTT (+8 ms) for seconds at a time (edge-star-5 demo, 3 entries + 5 agents), so a
    # "change" must be larger than that: a 10x bandwidth drop or a +10 ms delay still is.
    bw_drop_ratio: float = 0.3  # goodput below this x baseline = bandwidth drop
    rtt_rise_ratio: float = 2.5  # RTT above this x baseline = delay rise ...
    rtt_rise_min_ms: float = 5.0  # ... and at least this many ms above it (loopback noise)
    delay_confirm_s: float = 1.0  # ... for at least this long: a busy agent answers late for a few hundred ms
    #                               (the re-probes 0.05 s apart all fell into one such burst: a false "delay")
    goodput_cap_factor: float = 1.5  # measurements above this x the path's nominal rate are artifacts
    min_transfer_ms: float = 1.0  # goodput probes faster than this are clamped (sub-ms scheduling noise
    #                               on fast links is not a "drop"; with 32 KiB this caps at ~524 Mbit/s)
    overload_cpu_frac: float = 0.95  # agent cpu use >= this x its cpu share ...
    overload_beats: int = 15  # ... for this many consecutive heartbeats = overloaded

    def __post_init__(self) -> None:
        if self.probe_interval_s <= 0 or self.probe_timeout_s <= 0:
            raise ConfigError("monitor: probe_interval_s and probe_timeout_s must be > 0")
        if not 0 < self.bw_drop_ratio < 1 or self.rtt_rise_ratio <= 1:
            raise ConfigError(f"monitor: need 0 < bw_drop_ratio < 1 (got {self.bw_drop_ratio}) and "
                              f"rtt_rise_ratio > 1 (got {self.rtt_rise_ratio})")
        if self.probe_window < 1 or self.baseline_probes < 1 or self.probe_bytes < 1024:
            raise ConfigError("monitor: probe_window >= 1, baseline_probes >= 1, probe_bytes >= 1024 required")
        if not 0 < self.quick_suspect_ratio < 1 or self.quick_probe_bytes < 1024:
            raise ConfigError(f"monitor: need 0 < quick_suspect_ratio < 1 (got {self.quick_suspect_ratio}) and "
                              f"quick_probe_bytes >= 1024 (got {self.quick_probe_bytes})")
        if not 1 <= self.probe_confirm or self.probe_recheck_s <= 0 or self.probe_transfer_ms < 0:
            raise ConfigError(f"monitor: need probe_confirm >= 1 (got {self.probe_confirm}), probe_recheck_s > 0 "
                              f"(got {self.probe_recheck_s}) and probe_transfer_ms >= 0 (got {self.probe_transfer_ms})")

    @property
    def history_len(self) -> int:
        """How many recent probe samples (RTT, goodput, quick goodput) a ProbeState keeps."""
        return max(self.probe_window, self.baseline_probes) * 4


@dataclass(frozen=True)
class Trigger:
    """A reason to re-plan. kind: agent_lost | agent_rejoined | bw | delay (a link's measured
    bandwidth or delay changed: degraded or recovered) | overload | resource_change | slo_change |
    scheduled | forced."""
    kind: str
    detected_ns: int
    reason: str
    server: str | None = None
    detect_s: float | None = None  # time since the last good observation, when known


@dataclass
class ProbeState:
    """Probe history of one agent (mutable record; the decisions on it are pure functions)."""
    rtt_ms: list[float] = field(default_factory=list)
    rtt_t_ns: list[int] = field(default_factory=list)  # when each rtt_ms sample was taken
    goodput_mbit: list[float] = field(default_factory=list)
    quick_mbit: list[float] = field(default_factory=list)  # quick-probe goodput (relative use only)
    base_quick_mbit: float | None = None
    initial_rtt_ms: float | None = None
    initial_goodput_mbit: float | None = None
    base_rtt_ms: float | None = None
    base_goodput_mbit: float | None = None
    last_ok_ns: int = 0
    degraded: bool = False


def goodput_mbit(rtt_small_ms: float, rtt_big_ms: float, payload_bytes: int, min_transfer_ms: float) -> float:
    """Goodput of a probe that carried payload_bytes each way: 2 x payload over the extra time."""
    extra_ms = max(rtt_big_ms - rtt_small_ms, min_transfer_ms)
    return 2 * payload_bytes * 8 / (extra_ms / 1e3) / 1e6


def train_goodput_mbit(first_bytes: int, dispersion_ms: float, min_transfer_ms: float) -> float:
    """Goodput from a packet pair (a payload message, then a tiny one, sent back to back): the
    tiny one reaches the agent once the bottleneck has drained the payload, so their arrival
    dispersion at the agent (its own clock, taken before any emulated delay) is first_bytes at
    the bottleneck rate. Unlike an RTT, this is not hidden by a path delay longer than the
    transfer, nor by a shaper that lets one large segment through on credit (issue 12: a 10x
    drop read as no change at all)."""
    return first_bytes * 8 / (max(dispersion_ms, min_transfer_ms) / 1e3) / 1e6


def degraded_cap_bytes(st: ProbeState | None, nbytes: int, cfg: MonitorConfig) -> int:
    """nbytes, or less on a link known degraded: ~degraded_probe_ms at its current (degraded)
    baseline rate, at least degraded_probe_min_bytes. Probes must not eat a collapsed link."""
    if st is None or not st.degraded or not st.base_goodput_mbit:
        return nbytes
    fit = int(st.base_goodput_mbit * 1e6 / 8 * cfg.degraded_probe_ms / 1e3)
    return max(min(cfg.degraded_probe_min_bytes, nbytes), min(nbytes, fit))


def quick_payload_bytes(st: ProbeState | None, cfg: MonitorConfig) -> int:
    """The every-interval quick probe's payload: quick_probe_bytes, less on a degraded link."""
    return degraded_cap_bytes(st, cfg.quick_probe_bytes, cfg)


def probe_payload_bytes(st: ProbeState | None, nominal_mbit: float | None, cfg: MonitorConfig) -> int:
    """Goodput payload for the next probe: probe_bytes when probe_transfer_ms is 0 (the default;
    less on a degraded link, degraded_cap_bytes); else ~probe_transfer_ms at the best recent rate
    (else the nominal path rate, else probe_bytes), clamped to [probe_min_bytes, probe_max_bytes]."""
    if cfg.probe_transfer_ms <= 0:
        return degraded_cap_bytes(st, cfg.probe_bytes, cfg)
    rate = max(st.goodput_mbit[-cfg.probe_window:]) if st is not None and st.goodput_mbit else nominal_mbit
    if not rate or not math.isfinite(rate):
        return cfg.probe_bytes
    nb = int(rate * 1e6 / 8 * cfg.probe_transfer_ms / 1e3)
    return max(cfg.probe_min_bytes, min(cfg.probe_max_bytes, nb))


def probe_suspect(st: ProbeState | None, rtt_ms: float, gp_mbit: float, cfg: MonitorConfig) -> bool:
    """Whether a fresh sample departs from the baseline beyond a threshold (low goodput, or an
    RTT rise), so the agent should be re-probed soon to confirm or clear it. No baseline yet:
    False. Cheap insurance: one extra probe per suspicion, none while nothing changes."""
    if st is None or st.base_rtt_ms is None or st.base_goodput_mbit is None:
        return False
    if gp_mbit < cfg.bw_drop_ratio * st.base_goodput_mbit or gp_mbit * cfg.bw_drop_ratio > st.base_goodput_mbit:
        return True
    return (rtt_ms > cfg.rtt_rise_ratio * st.base_rtt_ms and rtt_ms - st.base_rtt_ms >= cfg.rtt_rise_min_ms) or \
        (st.base_rtt_ms > cfg.rtt_rise_ratio * rtt_ms and st.base_rtt_ms - rtt_ms >= cfg.rtt_rise_min_ms)


def add_quick(st: ProbeState, rtt_ms: float, quick_mbit: float, now_ns: int, cfg: MonitorConfig,
              full: bool) -> None:
    """Record a quick sample (its RTT joins the RTT series unless a full probe of the same round
    records it); the first baseline_probes quick samples define the quick baseline (median)."""
    keep = cfg.history_len
    st.quick_mbit = (st.quick_mbit + [quick_mbit])[-keep:]
    if st.base_quick_mbit is None and len(st.quick_mbit) >= cfg.baseline_probes:
        st.base_quick_mbit = statistics.median(st.quick_mbit[-cfg.baseline_probes:])
    if not full:
        st.rtt_ms = (st.rtt_ms + [rtt_ms])[-keep:]
        st.rtt_t_ns = (st.rtt_t_ns + [now_ns])[-keep:]
        st.last_ok_ns = now_ns


def quick_suspect(st: ProbeState | None, rtt_ms: float, quick_mbit: float, cfg: MonitorConfig) -> bool:
    """Whether a quick sample warrants a full goodput probe now: no baselines yet, the link is
    degraded (a recovery needs full samples), the quick goodput fell below quick_suspect_ratio x
    the median of its recent samples, or the RTT moved beyond the delay thresholds."""
    if st is None or st.base_rtt_ms is None or st.base_quick_mbit is None or st.degraded:
        return True
    # rolling reference: the median of the recent quick samples (start-up samples taken under CPU load
    # read low, and a slow drift is not an event), so one sudden fall stands out against it
    ref = statistics.median(st.quick_mbit[-2 * cfg.baseline_probes:])
    if quick_mbit < cfg.quick_suspect_ratio * ref:
        return True
    return probe_suspect(st, rtt_ms, st.base_goodput_mbit or 0.0, cfg)


def add_probe(st: ProbeState, rtt_ms: float, gp_mbit: float, now_ns: int, cfg: MonitorConfig) -> None:
    """Record one probe; the first baseline_probes samples define the baseline."""
    st.rtt_ms = (st.rtt_ms + [rtt_ms])[-cfg.history_len:]
    st.rtt_t_ns = (st.rtt_t_ns + [now_ns])[-cfg.history_len:]
    st.goodput_mbit = (st.goodput_mbit + [gp_mbit])[-cfg.history_len:]
    st.last_ok_ns = now_ns
    if st.base_rtt_ms is None and len(st.rtt_ms) >= cfg.baseline_probes:
        st.base_rtt_ms = statistics.median(st.rtt_ms[-cfg.baseline_probes:])
        st.base_goodput_mbit = statistics.median(st.goodput_mbit[-cfg.baseline_probes:])
        st.initial_rtt_ms, st.initial_goodput_mbit = st.base_rtt_ms, st.base_goodput_mbit


def probe_verdict(st: ProbeState, cfg: MonitorConfig) -> tuple[str, str] | None:
    """('link_degraded' | 'link_recovered', reason) when the recent window departs from the
    baseline beyond the thresholds, else None. Noise only makes probes look worse, so degraded
    needs the BEST sample beyond the threshold and recovered needs the WORST sample back. Pure:
    does not re-base (see rebase)."""
    ch = probe_change(st, cfg)
    return None if ch is None else (ch[0], ch[2])


def probe_change(st: ProbeState, cfg: MonitorConfig) -> tuple[str, str, str] | None:
    """probe_verdict plus what changed: (event, "bw" | "delay", reason); the re-deployment
    record's trigger is "bw" or "delay" (a link change re-negotiates compression)."""
    if st.base_rtt_ms is None:
        return None
    b_rtt, b_gp = st.base_rtt_ms, st.base_goodput_mbit
    nc = cfg.probe_confirm
    if len(st.goodput_mbit) >= nc and max(st.goodput_mbit[-nc:]) < cfg.bw_drop_ratio * b_gp:
        best = max(st.goodput_mbit[-nc:])
        return "link_degraded", "bw", (f"goodput <= {best:.1f} Mbit/s in the last {nc} probes < {cfg.bw_drop_ratio} x "
                                       f"baseline {b_gp:.1f} Mbit/s")
    if len(st.rtt_ms) < cfg.probe_window:
        return None
    rtts, gps = st.rtt_ms[-cfg.probe_window:], st.goodput_mbit[-cfg.probe_window:]
    n = cfg.probe_window
    high = cfg.rtt_rise_ratio * b_rtt
    span_s = high_for_s(st, high, b_rtt + cfg.rtt_rise_min_ms)
    if min(rtts) > high and min(rtts) - b_rtt >= cfg.rtt_rise_min_ms and span_s >= cfg.delay_confirm_s:
        return "link_degraded", "delay", (f"RTT >= {min(rtts):.2f} ms in the last {n} probes > {cfg.rtt_rise_ratio} x "
                                          f"baseline {b_rtt:.2f} ms for {span_s:.2f} s")
    if min(gps) * cfg.bw_drop_ratio > b_gp:
        return "link_recovered", "bw", (f"goodput >= {min(gps):.1f} Mbit/s in the last {n} probes > baseline "
                                  f"{b_gp:.1f} Mbit/s / {cfg.bw_drop_ratio}")
    if b_rtt > cfg.rtt_rise_ratio * max(rtts) and b_rtt - max(rtts) >= cfg.rtt_rise_min_ms:
        return "link_recovered", "delay", (f"RTT <= {max(rtts):.2f} ms in the last {n} probes < baseline {b_rtt:.2f} ms "
                                  f"/ {cfg.rtt_rise_ratio}")
    return None


def high_for_s(st: ProbeState, above_ms: float, at_least_ms: float) -> float:
    """How long (s) the RTT samples have stayed above both thresholds: from the earliest sample of
    the unbroken run of high samples that ends with the latest one, to the latest one."""
    if not st.rtt_ms or len(st.rtt_t_ns) != len(st.rtt_ms):
        return 0.0
    k = len(st.rtt_ms)
    while k > 0 and st.rtt_ms[k - 1] > above_ms and st.rtt_ms[k - 1] >= at_least_ms:
        k -= 1
    if k == len(st.rtt_ms):
        return 0.0
    return (st.rtt_t_ns[-1] - st.rtt_t_ns[k]) / 1e9


def rebase(st: ProbeState, cfg: MonitorConfig, n_samples: int | None = None) -> None:
    """After a trigger, the new level is the baseline (so one change triggers once): the best of
    the samples that made the verdict (max goodput, min RTT), the robust estimate under
    one-sided noise. n_samples: how many made it (default probe_window; probe_confirm for a
    bandwidth drop, see verdict_samples), so a pre-drop sample never becomes the new level."""
    n = n_samples or cfg.probe_window
    st.base_rtt_ms = min(st.rtt_ms[-n:])
    st.base_goodput_mbit = max(st.goodput_mbit[-n:])
    st.degraded = (st.base_goodput_mbit < cfg.bw_drop_ratio * (st.initial_goodput_mbit or math.inf)
                   or st.base_rtt_ms > cfg.rtt_rise_ratio * (st.initial_rtt_ms or 0.0))


def verdict_samples(event: str, what: str, cfg: MonitorConfig) -> int:
    """How many recent samples a probe_change verdict rests on (for rebase)."""
    return cfg.probe_confirm if (event, what) == ("link_degraded", "bw") else cfg.probe_window


def overloaded(cpu_history: list[float], cpu_share_cores: float, cfg: MonitorConfig) -> bool:
    """The last overload_beats cpu_percent reports all at >= overload_cpu_frac x the share."""
    if len(cpu_history) < cfg.overload_beats or cpu_share_cores <= 0:
        return False
    limit = 100.0 * cpu_share_cores * cfg.overload_cpu_frac
    return all(c >= limit for c in cpu_history[-cfg.overload_beats:])


@dataclass(frozen=True)
class ServerObservation:
    alive: bool = True
    bw_ratio: float = 1.0  # current goodput / initial goodput (<= 1 means slower)
    extra_delay_ms: float = 0.0  # one-way delay added since the start (RTT rise / 2)
    load: float = 0.0  # fraction of the server's CPU taken by others / overload
    memory_bytes: int | None = None  # shard budget left by a squeezed memory cgroup (None = as planned)


def resource_observation(stats: dict[str, Any], memory_mb: float, cpu_share: float, n_cpus: int,
                         agent_overhead_mb: float) -> tuple[int | None, float]:
    """(memory_bytes, load) implied by an agent's reported cgroup limits: the shard budget is
    the memory limit minus the agent's own overhead (topology convention: limit = memory_mb +
    agent_overhead_mb), never above memory_mb; load = share of the planned CPU the quota took
    away. (None, 0.0) when the limits are absent or at least as planned."""
    mem = None
    lim = stats.get("cgroup_memory_limit_bytes")
    if isinstance(lim, (int, float)) and lim > 0:
        budget = int(lim - agent_overhead_mb * (1 << 20))
        planned = int(memory_mb * (1 << 20))
        if budget < planned - 2 * 4096:  # the kernel rounds limits to pages: that is not a squeeze
            mem = max(budget, 0)
    load = 0.0
    cores = stats.get("cgroup_cpu_cores")
    nominal = cpu_share * n_cpus
    if isinstance(cores, (int, float)) and cores > 0 and nominal > 0 and cores < nominal:
        load = min(0.95, 1.0 - cores / nominal)
    return mem, round(load, 3)


def observation_of(st: ProbeState | None, alive: bool, load: float = 0.0,
                   memory_bytes: int | None = None) -> ServerObservation:
    if st is None or st.base_rtt_ms is None or st.initial_goodput_mbit is None:
        return ServerObservation(alive=alive, load=load, memory_bytes=memory_bytes)
    ratio = min(1.0, st.base_goodput_mbit / st.initial_goodput_mbit) if st.degraded else 1.0
    extra = max(0.0, (st.base_rtt_ms - st.initial_rtt_ms) / 2) if st.degraded else 0.0
    return ServerObservation(alive, ratio, extra, load, memory_bytes)


def access_link(cluster: Cluster, server: str, towards: str | None) -> tuple[str, str] | None:
    """The first link on the route from `server` towards `towards` (the controller), else the
    server's only link; None when it cannot tell."""
    links = [ln for ln in cluster.links if server in (ln.a, ln.b)]
    if len(links) == 1:
        return links[0].a, links[0].b
    if towards is not None:
        import networkx as nx
        g = nx.Graph()
        for ln in cluster.links:
            if ln.up:
                g.add_edge(ln.a, ln.b, w=ln.latency_ms)
        try:
            path = nx.shortest_path(g, server, towards, weight="w")
        except (nx.NetworkXNoPath, nx.NodeNotFound):
            return None
        if len(path) >= 2:
            return path[0], path[1]
    return None


def observed_cluster(base: Cluster, observations: dict[str, ServerObservation],
                     controller: str | None = None) -> tuple[Cluster, list[str]]:
    """The planner's cluster as observed: lost servers removed, degraded access links scaled.
    Returns (cluster, notes naming each change and its numbers)."""
    cl, notes = base, []
    for name in sorted(observations):
        ob = observations[name]
        if name not in cl.index:
            continue
        if not ob.alive:
            cl = cl.without_server(name)
            notes.append(f"server {name} lost (no heartbeat)")
            continue
        if ob.bw_ratio < 1.0 or ob.extra_delay_ms > 0.0:
            link = access_link(base, name, controller)
            if link is not None:
                cur = next(ln for ln in cl.links if ln.key == tuple(sorted(link)))
                bw = max(cur.bw_mbit * ob.bw_ratio, 1e-3)
                lat = cur.latency_ms + ob.extra_delay_ms
                cl = cl.with_link(*link, bw_mbit=bw, latency_ms=lat)
                notes.append(f"link {link[0]}-{link[1]}: {cur.bw_mbit:g} -> {bw:.3g} Mbit/s, "
                             f"{cur.latency_ms:g} -> {lat:.3g} ms (measured from {name})")
        if ob.load > 0.0:
            cl = cl.with_server(name, load=min(max(ob.load, 0.0), 0.95))
            notes.append(f"server {name} load {ob.load:.2f}")
        if ob.memory_bytes is not None:
            before = cl.server(name).memory_bytes
            cl = cl.with_server(name, memory_bytes=int(ob.memory_bytes))
            notes.append(f"server {name} memory {before / (1 << 20):.2f} -> {ob.memory_bytes / (1 << 20):.2f} MiB "
                         f"(cgroup limit)")
    return cl, notes


def merge_triggers(triggers: Iterable[Trigger]) -> tuple[str, list[str], int, float | None]:
    """Several pending triggers handled by one re-plan: (kind of the first, all reasons,
    earliest detection time, its detect_s)."""
    ts = sorted(triggers, key=lambda t: t.detected_ns)
    if not ts:
        raise ValueError("no triggers")
    return ts[0].kind, [f"{t.kind}: {t.reason}" for t in ts], ts[0].detected_ns, ts[0].detect_s


def plan_summary(plan: Any) -> dict[str, Any]:
    """Small JSON view of a Plan for STATUS."""
    if plan is None:
        return {}
    pred = plan.predicted_map().get("_overall", {})
    per_server: dict[str, int] = {}
    for row in plan.placement:
        for reps in row:
            for s in reps:
                per_server[s] = per_server.get(s, 0) + 1
    return {"strategy": plan.strategy, "mode": plan.mode, "experts_per_server": per_server,
            "memory_bytes": plan.memory_map(), "compression": {k: v.get("name") for k, v in
                                                              plan.compression_map().items()},
            "avg_bits": pred.get("avg_bits"), "token_ms_max": pred.get("token_ms_max"),
            "meets_slo": pred.get("meets_slo")}


def prefer_full_plan(incremental: dict[str, Any], full: dict[str, Any], moved_bytes: int, budget_bytes: float,
                     min_gain: float = 0.2) -> tuple[bool, str]:
    """Whether to adopt a full re-plan instead of the incremental one (both "_overall" predictions):
    only when it meets the SLO and quality wherever the incremental one does, predicts at least
    `min_gain` lower per-token latency (Petals rebalances below 0.75 of optimal throughput), and
    moves at most `budget_bytes`. Returns (decision, reason with the numbers)."""
    t_inc, t_full = float(incremental.get("token_ms_max", math.inf)), float(full.get("token_ms_max", math.inf))
    budget = "unbounded" if math.isinf(budget_bytes) else str(int(budget_bytes))
    for key in ("meets_slo", "meets_quality"):
        if incremental.get(key) and not full.get(key):
            return False, f"full re-plan rejected: it would not meet {key[6:]}"
    if not t_full <= (1.0 - min_gain) * t_inc:
        return False, (f"full re-plan not worth it: {t_full:.3f} vs {t_inc:.3f} ms/token predicted "
                       f"(needs {min_gain:.0%} less)")
    if moved_bytes > budget_bytes:
        return False, (f"full re-plan rejected: it moves {moved_bytes} bytes > budget {budget} "
                       f"for {t_full:.3f} vs {t_inc:.3f} ms/token")
    return True, (f"full re-plan adopted: {t_full:.3f} vs {t_inc:.3f} ms/token predicted, moving {moved_bytes} bytes "
                  f"(budget {budget})")

