"""Who is alive: conviction on evidence, never on one late heartbeat. Pure (times are passed in).

The controller used to call a peer lost after liveness x period of heartbeat silence; a starved
process, a saturated link or the controller's own late loop all looked like that, and a peer that
came back was believed at once and lost again 0.8 s later (issue 12). Here, per peer:

  alive --silence past its adaptive deadline--> suspect
  suspect --heartbeat, or any probe answered--> alive (refuted; answered-but-silent is a slow link,
                                                 a link/bandwidth matter, not a lost server)
  suspect --direct probe AND the indirect probes (through other agents) all failed--> lost
  lost --heard again--> probation --heard on time for rejoin_stable_s--> alive ("rejoined")
  probation --silent again--> lost (no new verdict: it never was declared back, so no flap)

  * adaptive deadline (phi accrual, Hayashibara et al.; Akka/Cassandra): the silence at which
    phi = -log10(P(a gap this long)) under a normal fit of the peer's own recent gaps reaches
    phi_suspect, kept between floor_periods x its agreed period and max_suspect_s;
  * indirect probes (SWIM, Das et al.; hashicorp/memberlist): the controller probes the suspect
    itself and asks `indirect_probes` other agents to probe it; one answer refutes;
  * self-awareness (Lifeguard): when the controller's own loop ran late (measured), every deadline
    is stretched by up to max_self_factor instead of convicting others of its own slowness.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from coel_model.errors import ConfigError

ALIVE, SUSPECT, LOST, PROBATION = "alive", "suspect", "lost", "probation"


@dataclass(frozen=True)
class LivenessConfig:
    default_period_s: float = 0.2  # a peer that did not state its heartbeat period in REGISTER
    phi_suspect: float = 8.0  # Akka's default threshold
    min_std_frac: float = 0.25  # the gap std-dev used is at least this x the period (few samples, no jitter seen)
    floor_periods: float = 2.0  # never suspect before this many periods of silence
    max_suspect_s: float = 0.5  # ... and always by this much silence (x self factor): detection <= 1 s
    probe_timeout_s: float = 0.3  # direct and indirect probe timeout (x self factor)
    indirect_probes: int = 2  # other agents asked to probe a suspect
    rejoin_stable_s: float = 0.6  # a peer heard again is back after this long heard on time ...
    rejoin_max_gap_periods: float = 2.5  # ... with no gap longer than this many periods
    gap_history: int = 32  # recent inter-arrival gaps kept per peer (across re-registrations)
    lag_tolerance_s: float = 0.05  # own loop lateness below this is normal scheduling noise
    max_self_factor: float = 8.0  # Lifeguard's cap on stretching deadlines

    def __post_init__(self) -> None:
        if self.default_period_s <= 0 or self.phi_suspect <= 0 or self.floor_periods < 1:
            raise ConfigError("liveness: need default_period_s > 0, phi_suspect > 0, floor_periods >= 1")
        if self.max_suspect_s <= 0 or self.probe_timeout_s <= 0 or self.indirect_probes < 0:
            raise ConfigError("liveness: need max_suspect_s > 0, probe_timeout_s > 0, indirect_probes >= 0")
        if self.rejoin_stable_s < 0 or self.max_self_factor < 1 or self.gap_history < 3:
            raise ConfigError("liveness: need rejoin_stable_s >= 0, max_self_factor >= 1, gap_history >= 3")


@dataclass
class PeerLiveness:
    """One peer's liveness record (mutable; the decisions on it are the functions below). It
    survives re-registrations, so a peer that comes back keeps its agreed period and gap history."""
    period_s: float
    last_heard_ns: int = 0
    gaps_s: list[float] = field(default_factory=list)
    state: str = ALIVE
    since_ns: int = 0  # when the current state began
    heard_again_ns: int = 0  # probation: when the peer was first heard after being lost
    max_gap_since_heard_s: float = 0.0  # probation: the longest gap since then
    probes_expected: int = 0  # suspect: probe answers awaited (direct + indirect)
    probe_timeout_s: float = 0.0  # suspect: the timeout its probes were sent with (0: not sent yet)
    probes_failed: int = 0
    probe_reached_by: str = ""  # suspect: who reached it (refutation)
    suspicion: int = 0  # id of the current suspicion (probe answers of an older one are ignored)
    new_process: bool = False  # re-registered with another pid since it was last declared back
    lost_count: int = 0
    rejoin_count: int = 0


def new_peer(period_s: float | None, now_ns: int, cfg: LivenessConfig) -> PeerLiveness:
    p = period_s if period_s and period_s > 0 else cfg.default_period_s
    return PeerLiveness(period_s=p, last_heard_ns=now_ns, since_ns=now_ns)


def heard(pl: PeerLiveness, now_ns: int, cfg: LivenessConfig) -> str | None:
    """A heartbeat (or REGISTER) arrived. Returns "refuted" (a suspect spoke), "heard_again" (a
    lost peer spoke: probation starts) or None. Only gaps of a peer believed alive feed the
    adaptive deadline: an outage is not a sample of its normal pace."""
    gap_s = (now_ns - pl.last_heard_ns) / 1e9 if pl.last_heard_ns else 0.0
    out = None
    if pl.state == ALIVE and pl.last_heard_ns:
        pl.gaps_s = (pl.gaps_s + [gap_s])[-cfg.gap_history:]
    elif pl.state == SUSPECT:
        pl.state, pl.since_ns, out = ALIVE, now_ns, "refuted"
    elif pl.state == LOST:
        pl.state, pl.since_ns, pl.heard_again_ns, pl.max_gap_since_heard_s = PROBATION, now_ns, now_ns, 0.0
        out = "heard_again"
    elif pl.state == PROBATION:
        pl.max_gap_since_heard_s = max(pl.max_gap_since_heard_s, gap_s)
    pl.last_heard_ns = now_ns
    return out


def phi(silence_s: float, gaps_s: list[float], period_s: float, cfg: LivenessConfig) -> float:
    """-log10 of the probability that a gap lasts at least silence_s, under a normal fit of the
    recent gaps (the agreed period and min_std_frac x period until 3 gaps are known)."""
    if len(gaps_s) >= 3:
        mean = statistics.fmean(gaps_s)
        std = max(statistics.pstdev(gaps_s), cfg.min_std_frac * period_s)
    else:
        mean, std = period_s, cfg.min_std_frac * period_s
    z = (silence_s - mean) / std
    p_later = 0.5 * math.erfc(z / math.sqrt(2))
    return -math.log10(max(p_later, 1e-300))


def suspect_after_s(pl: PeerLiveness, cfg: LivenessConfig, self_factor: float = 1.0) -> float:
    """Silence that makes this peer suspect: where phi reaches phi_suspect, between floor_periods x
    its period and max_suspect_s, all stretched by the controller's self factor."""
    if len(pl.gaps_s) >= 3:
        mean = statistics.fmean(pl.gaps_s)
        std = max(statistics.pstdev(pl.gaps_s), cfg.min_std_frac * pl.period_s)
    else:
        mean, std = pl.period_s, cfg.min_std_frac * pl.period_s
    # phi(t) = phi_suspect  <=>  P(gap >= t) = 10^-phi  <=>  t = mean + z * std
    z = _z_for_tail(10.0 ** -cfg.phi_suspect)
    t = mean + z * std
    t = min(max(t, cfg.floor_periods * pl.period_s), max(cfg.max_suspect_s, cfg.floor_periods * pl.period_s))
    return t * self_factor


def _z_for_tail(p: float) -> float:
    """z with P(N(0,1) >= z) = p (bisection on erfc: no scipy in the controller's hot loop)."""
    lo, hi = -10.0, 40.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(mid / math.sqrt(2)) > p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def check_silence(pl: PeerLiveness, now_ns: int, cfg: LivenessConfig, self_factor: float = 1.0) -> str | None:
    """"suspect" when an alive peer has been silent past its deadline (the caller then probes it
    directly and through indirect_probes other agents and reports with probe_result), "lost" when
    a peer on probation fell silent again (back to lost: no new verdict), else None."""
    silence_s = (now_ns - pl.last_heard_ns) / 1e9
    limit = suspect_after_s(pl, cfg, self_factor)
    if pl.state == ALIVE and silence_s > limit:
        pl.state, pl.since_ns = SUSPECT, now_ns
        pl.probes_expected, pl.probes_failed, pl.probe_reached_by = 0, 0, ""
        pl.suspicion += 1
        return "suspect"
    if pl.state == PROBATION and silence_s > max(limit, cfg.rejoin_max_gap_periods * pl.period_s):
        pl.state, pl.since_ns = LOST, now_ns
        return "lost"
    return None


def probe_timeout_s(cfg: LivenessConfig, self_factor: float = 1.0, recent_rtt_ms: list[float] | None = None) -> float:
    """Timeout for the probes of a suspect: probe_timeout_s x self factor, but at least 3x the
    worst RTT recently measured to it (a path slowed to seconds still answers: slow is not lost),
    at most MAX_PROBE_TIMEOUT_S."""
    t = cfg.probe_timeout_s * self_factor
    if recent_rtt_ms:
        t = max(t, 3.0 * max(recent_rtt_ms) / 1e3)
    return min(t, MAX_PROBE_TIMEOUT_S)


MAX_PROBE_TIMEOUT_S = 5.0


def expect_probes(pl: PeerLiveness, n: int, timeout_s: float) -> None:
    """The caller sent n probes (1 direct + the indirect ones it could ask for) with this timeout."""
    pl.probes_expected, pl.probe_timeout_s = n, timeout_s


def probe_result(pl: PeerLiveness, reached: bool, via: str, suspicion: int) -> str | None:
    """One probe's outcome for suspicion number `suspicion`: "refuted" when it answered (alive,
    only its heartbeats are not getting through: slow, not lost), else None (conclude decides).
    Answers to an earlier suspicion, or for a peer no longer suspect, change nothing."""
    if pl.state != SUSPECT or suspicion != pl.suspicion:
        return None
    if reached:
        pl.state, pl.probe_reached_by = ALIVE, via
        return "refuted"
    pl.probes_failed += 1
    return None


def conclude(pl: PeerLiveness, now_ns: int, cfg: LivenessConfig, self_factor: float = 1.0) -> str | None:
    """"lost" for a suspect once every probe failed, or once the probe window (the probes' timeout,
    else probe_timeout_s x self factor, plus one period for the answers to travel) passed with none
    answering; else None."""
    if pl.state != SUSPECT:
        return None
    all_failed = pl.probes_expected > 0 and pl.probes_failed >= pl.probes_expected
    window_s = max(pl.probe_timeout_s, cfg.probe_timeout_s * self_factor) + pl.period_s
    if all_failed or (now_ns - pl.since_ns) / 1e9 > window_s:
        pl.state, pl.since_ns = LOST, now_ns
        pl.lost_count += 1
        return "lost"
    return None


def check_back(pl: PeerLiveness, now_ns: int, cfg: LivenessConfig) -> bool:
    """True (once) when a peer on probation has been heard on time for rejoin_stable_s: it is back."""
    if pl.state != PROBATION:
        return False
    stable_ns = round(max(cfg.rejoin_stable_s, 3 * pl.period_s) * 1e9, -3)  # to the us: 3 x 0.2 is 0.6000...01
    if now_ns - pl.heard_again_ns >= stable_ns and \
            pl.max_gap_since_heard_s <= cfg.rejoin_max_gap_periods * pl.period_s:
        pl.state, pl.since_ns = ALIVE, now_ns
        pl.rejoin_count += 1
        return True
    if pl.max_gap_since_heard_s > cfg.rejoin_max_gap_periods * pl.period_s:  # irregular: start over
        pl.heard_again_ns, pl.max_gap_since_heard_s = pl.last_heard_ns, 0.0
    return False


def self_factor(recent_lags_s: list[float], period_s: float, cfg: LivenessConfig) -> float:
    """Lifeguard-style stretch of every deadline: 1 while the controller's own loop runs on time;
    1 + (worst recent lateness / period) when it ran late, capped at max_self_factor."""
    lag = max(recent_lags_s, default=0.0)
    if lag <= cfg.lag_tolerance_s:
        return 1.0
    return min(cfg.max_self_factor, 1.0 + lag / period_s)


def pick_helpers(suspect: str, candidates: list[str], n: int, seed: int = 0) -> list[str]:
    """Up to n other agents to ask for an indirect probe (deterministic rotation by seed)."""
    others = sorted(c for c in candidates if c != suspect)
    if not others or n <= 0:
        return []
    k = seed % len(others)
    return (others[k:] + others[:k])[:n]
