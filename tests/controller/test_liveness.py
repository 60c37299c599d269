"""Runtime tier 1 (pure): the failure detector's policy (controller.liveness): suspicion, indirect
probes, adaptive (phi-accrual) deadlines, self-awareness and rejoin hysteresis."""
from __future__ import annotations

import pytest

from controller import liveness as L
from coel_model.errors import ConfigError

pytestmark = pytest.mark.unit
S = 1_000_000_000
CFG = L.LivenessConfig()


def _beating(period_s=0.2, n=20, jitter=()):
    """A peer heard every period_s (plus the given jitter, cycled) n times; returns (record, now_ns)."""
    pl = L.new_peer(period_s, 0, CFG)
    t = 0
    for i in range(n):
        t += int((period_s + (jitter[i % len(jitter)] if jitter else 0.0)) * S)
        L.heard(pl, t, CFG)
    return pl, t


def test_silence_makes_a_peer_suspect_not_lost():
    pl, t = _beating()
    assert L.check_silence(pl, t + int(0.3 * S), CFG) is None  # 1.5 periods: nothing
    assert L.check_silence(pl, t + int(0.55 * S), CFG) == "suspect"
    assert pl.state == L.SUSPECT
    assert L.conclude(pl, t + int(0.6 * S), CFG) is None  # probes not answered yet, window open


def test_a_heartbeat_refutes_a_suspicion_and_the_gap_is_not_learned():
    pl, t = _beating()
    L.check_silence(pl, t + int(0.6 * S), CFG)
    n_gaps = len(pl.gaps_s)
    assert L.heard(pl, t + int(0.65 * S), CFG) == "refuted"
    assert pl.state == L.ALIVE and len(pl.gaps_s) == n_gaps


def test_indirect_probe_answer_refutes_and_only_all_failures_convict():
    pl, t = _beating()
    L.check_silence(pl, t + int(0.6 * S), CFG)
    L.expect_probes(pl, 3, 0.3)
    assert L.probe_result(pl, False, "controller", pl.suspicion) is None
    assert L.conclude(pl, t + int(0.7 * S), CFG) is None  # 1 of 3 failed: wait
    assert L.probe_result(pl, True, "e3", pl.suspicion) == "refuted"  # e3 reached it: slow, not lost
    assert pl.state == L.ALIVE and pl.probe_reached_by == "e3"
    # a new suspicion: all three fail -> lost at once, before the window closes
    L.check_silence(pl, t + int(1.5 * S), CFG)
    L.expect_probes(pl, 3, 0.3)
    for via in ("controller", "e3", "e4"):
        L.probe_result(pl, False, via, pl.suspicion)
    assert L.conclude(pl, t + int(1.6 * S), CFG) == "lost" and pl.lost_count == 1


def test_an_answer_to_an_older_suspicion_changes_nothing():
    pl, t = _beating()
    L.check_silence(pl, t + int(0.6 * S), CFG)
    old = pl.suspicion
    L.heard(pl, t + int(0.7 * S), CFG)
    L.check_silence(pl, t + int(1.4 * S), CFG)
    assert L.probe_result(pl, True, "controller", old) is None and pl.state == L.SUSPECT


def test_no_answer_within_the_probe_window_convicts_a_real_failure_within_1_s():
    pl, t = _beating()
    fault = t + int(0.1 * S)  # between two beats
    now = t
    verdict = None
    while verdict is None and now < t + 2 * S:
        now += int(0.02 * S)
        if L.check_silence(pl, now, CFG) == "suspect":
            L.expect_probes(pl, 3, 0.3)
        verdict = L.conclude(pl, now, CFG)
    assert verdict == "lost" and (now - fault) / S <= 1.0


def test_phi_deadline_adapts_to_each_peers_own_gaps():
    steady, _ = _beating(0.2)
    jittery, _ = _beating(0.2, jitter=(-0.1, 0.15, -0.05, 0.2))
    assert L.suspect_after_s(steady, CFG) < L.suspect_after_s(jittery, CFG) <= CFG.max_suspect_s
    assert L.suspect_after_s(steady, CFG) >= CFG.floor_periods * 0.2
    # a peer that agreed a 1 s period is judged by it: 2 periods of silence before suspicion
    slow, t = _beating(1.0, n=5)
    assert L.suspect_after_s(slow, CFG) == pytest.approx(2.0)
    assert L.check_silence(slow, t + int(1.5 * S), CFG) is None
    # phi grows with silence
    assert L.phi(0.2, steady.gaps_s, 0.2, CFG) < 1 < L.phi(0.4, steady.gaps_s, 0.2, CFG)


def test_self_awareness_stretches_deadlines_when_the_controller_itself_ran_late():
    assert L.self_factor([0.01, 0.02], 0.2, CFG) == 1.0
    f = L.self_factor([0.01, 0.4], 0.2, CFG)
    assert f == pytest.approx(3.0)
    assert L.self_factor([5.0], 0.2, CFG) == CFG.max_self_factor
    pl, t = _beating()
    assert L.check_silence(pl, t + int(0.6 * S), CFG, f) is None  # would be suspect at factor 1
    assert L.check_silence(pl, t + int(0.6 * S), CFG, 1.0) == "suspect"
    # and the probe window stretches too
    L.expect_probes(pl, 3, 0.3)
    assert L.conclude(pl, t + int(0.6 * S) + int(0.6 * S), CFG, f) is None


def test_probe_timeout_follows_a_slow_path_and_the_window_with_it():
    assert L.probe_timeout_s(CFG) == CFG.probe_timeout_s
    assert L.probe_timeout_s(CFG, 2.0) == 2 * CFG.probe_timeout_s
    assert L.probe_timeout_s(CFG, 1.0, [20.0, 900.0]) == pytest.approx(2.7)  # a 1 Mbit/s path: slow, not lost
    assert L.probe_timeout_s(CFG, 1.0, [1e5]) == L.MAX_PROBE_TIMEOUT_S
    pl, t = _beating()
    L.check_silence(pl, t + int(0.6 * S), CFG)
    L.expect_probes(pl, 3, 2.7)
    assert L.conclude(pl, t + int(2.0 * S), CFG) is None  # still inside its 2.7 s probe window
    assert L.probe_result(pl, True, "controller", pl.suspicion) == "refuted"


def test_rejoin_needs_steady_heartbeats_and_a_relapse_is_no_flap():
    pl, t = _beating()
    pl.state = L.LOST
    t += 10 * S
    assert L.heard(pl, t, CFG) == "heard_again" and pl.state == L.PROBATION
    for _ in range(2):
        t += int(0.2 * S)
        L.heard(pl, t, CFG)
        assert not L.check_back(pl, t, CFG)
    # silent again while on probation: back to lost, no new verdict and no rejoin counted
    assert L.check_silence(pl, t + int(0.6 * S), CFG) == "lost"
    assert pl.rejoin_count == 0 and pl.lost_count == 0
    t += 5 * S
    L.heard(pl, t, CFG)
    for _ in range(3):
        t += int(0.2 * S)
        L.heard(pl, t, CFG)
    assert L.check_back(pl, t, CFG) and pl.state == L.ALIVE and pl.rejoin_count == 1
    assert not L.check_back(pl, t, CFG)  # once


def test_irregular_heartbeats_restart_the_probation_clock():
    pl = L.new_peer(0.2, 0, CFG)
    pl.state = L.LOST
    L.heard(pl, 1 * S, CFG)
    L.heard(pl, int(1.7 * S), CFG)  # a 0.7 s gap > 2.5 periods
    assert not L.check_back(pl, int(1.7 * S), CFG)
    t = int(1.7 * S)
    for _ in range(3):
        t += int(0.2 * S)
        L.heard(pl, t, CFG)
    assert L.check_back(pl, t, CFG)


def test_helpers_exclude_the_suspect_and_rotate():
    agents = ["e1", "e2", "e3", "e4"]
    assert L.pick_helpers("e2", agents, 2, 0) == ["e1", "e3"]
    assert L.pick_helpers("e2", agents, 2, 1) == ["e3", "e4"]
    assert L.pick_helpers("e1", ["e1"], 2) == []


def test_config_errors_say_what_is_wrong():
    with pytest.raises(ConfigError, match="max_suspect_s"):
        L.LivenessConfig(max_suspect_s=0)
    with pytest.raises(ConfigError, match="max_self_factor"):
        L.LivenessConfig(max_self_factor=0.5)
