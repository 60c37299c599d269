"""Runtime tier 1 (pure): one monitoring step (controller.triggers): link verdicts, the contention
discount, overload, cgroup squeezes, and the re-deployment choice."""
from __future__ import annotations

import pytest

from controller import monitor as M
from controller import triggers as T

pytestmark = pytest.mark.unit

CFG = M.MonitorConfig(probe_window=3, baseline_probes=3, probe_confirm=2)
S = 1_000_000_000


def _state(rtts, gps, quick=None):
    st = M.ProbeState()
    for i, (r, g) in enumerate(zip(rtts, gps)):
        M.add_quick(st, r, (quick or gps)[i], i * S // 2, CFG, full=True)
        M.add_probe(st, r, g, i * S // 2, CFG)
    return st


def _quiet():
    return _state([2.0] * 3, [100.0] * 3)


def test_a_delay_rise_on_one_agent_is_a_link_verdict():
    states = {"a": _state([2.0] * 3 + [20.0] * 3, [100.0] * 6), "b": _quiet(), "c": _quiet()}
    ev, trig = T.probe_step("a", states["a"], states, 7, CFG)
    assert ev.kind == "link_degraded" and ev.attrs["change"] == "delay"
    assert trig.kind == "delay" and trig.server == "a" and trig.detected_ns == 7
    assert states["a"].base_rtt_ms == 20.0  # re-based: one change triggers once
    assert T.probe_step("a", states["a"], states, 8, CFG) == (None, None)


def test_the_same_rise_on_every_agent_is_contention_not_a_link():
    slow = lambda: _state([2.0] * 3 + [20.0] * 3, [100.0] * 6)  # noqa: E731
    states = {"a": slow(), "b": slow(), "c": slow()}
    ev, trig = T.probe_step("a", states["a"], states, 7, CFG)
    assert trig is None and ev.kind == "link_change_discounted" and "contention" in ev.attrs["reason"]
    assert states["a"].base_rtt_ms == 2.0  # not re-based: the verdict stands if only this one stays slow
    states["b"], states["c"] = _quiet(), _quiet()
    ev, trig = T.probe_step("a", states["a"], states, 9, CFG)
    assert trig is not None and trig.kind == "delay"


def test_a_bandwidth_drop_on_one_agent_stands_and_a_common_one_is_discounted():
    drop = lambda: _state([2.0] * 5, [100.0] * 3 + [20.0] * 2, quick=[100.0] * 3 + [20.0] * 2)  # noqa: E731
    states = {"a": drop(), "b": _quiet(), "c": _quiet()}
    ev, trig = T.probe_step("a", states["a"], states, 5, CFG)
    assert trig.kind == "bw" and ev.kind == "link_degraded"
    states = {"a": drop(), "b": drop(), "c": drop()}
    ev, trig = T.probe_step("a", states["a"], states, 5, CFG)
    assert trig is None and ev.kind == "link_change_discounted"
    # with a single witness nothing is discounted (too little evidence of a common cause)
    states = {"a": drop(), "b": drop()}
    assert T.probe_step("a", states["a"], states, 5, CFG)[1] is not None


def test_overload_enters_after_the_beats_and_leaves_below_half_the_share():
    cores = {"a": 0.5, "b": 0.5}
    hist = {"a": [49.0] * CFG.overload_beats, "b": [10.0] * CFG.overload_beats}
    over, trigs = T.overload_step(hist, set(), cores, 3, CFG)
    assert over == {"a"} and [t.server for t in trigs] == ["a"]
    over, trigs = T.overload_step(hist, over, cores, 4, CFG)
    assert over == {"a"} and trigs == []  # once
    over, _ = T.overload_step({"a": hist["a"] + [20.0]}, over, cores, 5, CFG)
    assert over == set()


def test_resource_step_reports_a_squeeze_once():
    planned = {"a": (None, 0.0)}
    new, events, trigs = T.resource_step({"a": (1 << 20, 0.0)}, planned, 1)
    assert new["a"] == (1 << 20, 0.0) and events[0].kind == "resource_change" and trigs[0].kind == "resource_change"
    assert T.resource_step({"a": (1 << 20, 0.05)}, new, 2)[2] == []  # within the tolerances


def test_choose_full_plan():
    inc = {"token_ms_max": 10.0, "meets_slo": True, "meets_quality": True}
    full = {"token_ms_max": 5.0, "meets_slo": True, "meets_quality": True}
    ok, why = T.choose_full_plan("bw", inc, full, 100, 1000, {})
    assert ok and "adopted" in why
    ok, why = T.choose_full_plan("bw", inc, full, 100, 1000, {"e1": (9, 5)})
    assert not ok and "e1 (9 > 5 bytes)" in why
    assert not T.choose_full_plan("bw", inc, full, 5000, 1000, {})[0]  # over the migration budget
    missed = dict(inc, meets_slo=False)
    assert T.choose_full_plan("slo_change", missed, full, 5000, 1000, {})[0]  # a missed SLO lifts the budget
    assert not T.choose_full_plan("bw", inc, {"token_ms_max": 9.5, "meets_slo": True, "meets_quality": True},
                                  0, 1000, {})[0]  # not 20% better


def test_probes_shrink_on_a_degraded_link():
    st = _state([2.0] * 5, [100.0] * 3 + [1.0] * 2)
    assert M.quick_payload_bytes(st, CFG) == CFG.quick_probe_bytes  # no verdict yet: full size
    ev, trig = T.probe_step("a", st, {"a": st}, 5, CFG)
    assert trig.kind == "bw" and st.degraded
    # 1 Mbit/s: 20 ms of it is 2.5 kB -> the 4 KiB floor, for the quick and the full probe
    assert M.quick_payload_bytes(st, CFG) == CFG.degraded_probe_min_bytes
    assert M.probe_payload_bytes(st, 100.0, CFG) == CFG.degraded_probe_min_bytes
    st2 = _state([2.0] * 5, [100.0] * 3 + [5.0] * 2)
    T.probe_step("a", st2, {"a": st2}, 5, CFG)
    assert M.quick_payload_bytes(st2, CFG) == 12500  # 20 ms at 5 Mbit/s
