"""Runtime tier 1: adaptive probing (a suspect sample is re-probed soon; two low-goodput samples
declare a bandwidth drop; a lone late probe does not), and the Prober's per-agent schedule (quick probe every interval, a full one only when suspect)."""
from __future__ import annotations

import threading
import time

import pytest

from controller import monitor as M
from controller import prober as svc
from controller.registry import Peer
from coel_model.errors import ConfigError

CFG = M.MonitorConfig(probe_window=3, baseline_probes=3, probe_confirm=2)


def _state(rtts, gps, cfg=CFG):
    st = M.ProbeState()
    for r, g in zip(rtts, gps):
        M.add_probe(st, r, g, 0, cfg)
    return st


def test_suspect_flags_low_goodput_or_rtt_change_only_after_a_baseline():
    assert not M.probe_suspect(None, 50.0, 1.0, CFG)
    assert not M.probe_suspect(M.ProbeState(), 50.0, 1.0, CFG)
    st = _state([2.0] * 3, [100.0] * 3)
    assert not M.probe_suspect(st, 2.5, 60.0, CFG)  # CPU contention halves goodput: not suspect
    assert M.probe_suspect(st, 2.0, 25.0, CFG)  # 4x slower
    assert M.probe_suspect(st, 2.0, 400.0, CFG)  # recovered-looking sample (after a rebase to a low level)
    assert M.probe_suspect(st, 12.0, 100.0, CFG)  # +10 ms and 6x
    assert not M.probe_suspect(st, 4.0, 100.0, CFG)  # 2x but only +2 ms


def test_bandwidth_drop_needs_probe_confirm_consecutive_low_samples():
    st = _state([2.0] * 3, [100.0] * 3)
    M.add_probe(st, 9.0, 12.0, 0, CFG)  # a lone slow probe (contention or the first after a drop)
    assert M.probe_change(st, CFG) is None
    M.add_probe(st, 2.0, 95.0, 0, CFG)  # ... cleared by the re-probe
    assert M.probe_change(st, CFG) is None
    M.add_probe(st, 2.0, 10.0, 0, CFG)
    M.add_probe(st, 2.1, 11.0, 0, CFG)
    ev, what, why = M.probe_change(st, CFG)
    assert (ev, what) == ("link_degraded", "bw") and "goodput <= 11.0 Mbit/s in the last 2 probes" in why
    # the new level is the best of the two samples that made the verdict, not the pre-drop 95
    M.rebase(st, CFG, M.verdict_samples(ev, what, CFG))
    assert st.base_goodput_mbit == 11.0 and st.degraded
    assert M.observation_of(st, True).bw_ratio == pytest.approx(0.11)
    assert M.probe_change(st, CFG) is None  # one change triggers once
    # recovery still needs the whole window back
    M.add_probe(st, 2.0, 100.0, 0, CFG)
    M.add_probe(st, 2.0, 98.0, 0, CFG)
    assert M.probe_change(st, CFG) is None
    M.add_probe(st, 2.0, 101.0, 0, CFG)
    assert M.probe_change(st, CFG)[:2] == ("link_recovered", "bw")
    assert M.verdict_samples("link_recovered", "bw", CFG) == 3


def test_probe_confirm_one_is_a_single_sample_test_and_config_is_validated():
    cfg = M.MonitorConfig(probe_window=3, baseline_probes=3, probe_confirm=1)
    st = _state([2.0] * 3, [100.0] * 3, cfg)
    M.add_probe(st, 2.0, 10.0, 0, cfg)
    assert M.probe_change(st, cfg)[:2] == ("link_degraded", "bw")
    with pytest.raises(ConfigError, match="probe_confirm"):
        M.MonitorConfig(probe_confirm=0)
    with pytest.raises(ConfigError, match="probe_recheck_s"):
        M.MonitorConfig(probe_recheck_s=0.0)


def test_quick_probe_asks_for_a_full_probe_only_when_it_looks_changed():
    cfg = M.MonitorConfig(probe_window=3, baseline_probes=3)
    assert M.quick_suspect(None, 2.0, 400.0, cfg)  # nothing known yet: measure fully
    st = M.ProbeState()
    for _ in range(3):
        M.add_quick(st, 8.0, 393.0, 0, cfg, full=True)
        M.add_probe(st, 8.0, 75.0, 0, cfg)
    assert st.base_quick_mbit == 393.0 and st.rtt_ms == [8.0] * 3
    assert not M.quick_suspect(st, 8.2, 341.0, cfg)  # normal jitter of the quick probe
    assert M.quick_suspect(st, 8.0, 50.0, cfg)  # 10x drop seen by the quick probe (measured: 393 -> ~50)
    assert M.quick_suspect(st, 30.0, 393.0, cfg)  # RTT rise
    M.add_quick(st, 8.1, 380.0, 5, cfg, full=False)  # a quick-only round still feeds the RTT series
    assert st.rtt_ms[-1] == 8.1 and len(st.goodput_mbit) == 3 and st.last_ok_ns == 5
    for _ in range(8):  # the reference is the recent median, not the start-up level
        M.add_quick(st, 8.0, 100.0, 0, cfg, full=False)
    assert not M.quick_suspect(st, 8.0, 60.0, cfg) and M.quick_suspect(st, 8.0, 40.0, cfg)
    st.degraded = True  # a degraded link is fully probed every round (recovery needs full samples)
    assert M.quick_suspect(st, 8.0, 393.0, cfg)
    with pytest.raises(ConfigError, match="quick_suspect_ratio"):
        M.MonitorConfig(quick_suspect_ratio=1.5)


class _FakeRegistry:
    def __init__(self, names):
        self.peers = {("agent", n): Peer(n, "agent", f"tcp://fake/{n}") for n in names}

    def snapshot(self):
        return dict(self.peers)


class _FakeClient:
    def __init__(self, endpoint, *a, **kw):
        self.endpoint = endpoint

    def close(self):
        pass


def test_prober_rechecks_a_suspect_agent_soon_and_others_at_the_interval(monkeypatch):
    monkeypatch.setattr(svc, "AgentClient", _FakeClient)
    cfg = M.MonitorConfig(probe_interval_s=0.4, probe_recheck_s=0.05)
    calls: dict[str, list[float]] = {"a": [], "b": []}
    lock = threading.Lock()

    full: dict[str, int] = {"a": 0, "b": 0}

    class FakeProber(svc.Prober):
        def probe_once(self, client, payload_bytes=None):
            name = client.endpoint.rsplit("/", 1)[1]
            with lock:
                calls[name].append(time.monotonic())
            return 1.0, (40.0 if name == "b" else 400.0)

        def payload_once(self, client, rtt, payload_bytes=None):
            name = client.endpoint.rsplit("/", 1)[1]
            full[name] += 1
            return 10.0 if name == "b" else 100.0

    pr = FakeProber(_FakeRegistry(["a", "b"]), None, cfg, None, lambda: None,
                    suspect=lambda name, rtt, gp: gp < 50.0, need_full=lambda name, rtt, quick: quick < 200.0)
    pr.start()
    try:
        time.sleep(1.0)
    finally:
        pr.stop()
    with lock:
        na, nb = len(calls["a"]), len(calls["b"])
    assert 2 <= na <= 4, calls  # every 0.4 s in 1 s: 3
    # suspect: re-probed after ~0.05 s, at most probe_window (3) times in a row, then one normal
    # interval: cycles of 3 x 0.05 + 0.4 s -> about 7 probes in 1 s (vs 3 for "a")
    assert 5 <= nb <= 10, calls
    gaps = [round(y - x, 2) for x, y in zip(calls["b"], calls["b"][1:])]
    assert min(gaps) < 0.1 and max(gaps) >= 0.35, gaps
    assert pr.results.qsize() == na + nb
    assert full["a"] == 0 and full["b"] == nb  # a full probe only where the quick one looked changed
