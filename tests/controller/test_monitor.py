"""Runtime tier 1 (pure): the monitor's decisions and the deployer's routing decisions."""
from __future__ import annotations

import math

import pytest

from controller import monitor as M
from controller.cluster import Cluster, Link, Server
from coel_model.errors import ConfigError

CFG = M.MonitorConfig(probe_window=3, baseline_probes=3)
S = 1_000_000_000


def _probed(rtts, gps):
    st = M.ProbeState()
    for i, (r, g) in enumerate(zip(rtts, gps)):
        M.add_probe(st, r, g, i * S // 2, CFG)
    return st


def test_probe_verdicts_bandwidth_drop_delay_rise_recovery_and_noise():
    st = _probed([1.0, 1.1, 0.9], [100, 95, 105])
    assert st.base_rtt_ms == 1.0 and st.base_goodput_mbit == 100
    assert M.probe_verdict(st, CFG) is None
    # contention makes probes look worse; one good sample in the window says the link is fine
    for r, g in [(9.0, 20), (1.0, 90), (12.0, 15)]:
        M.add_probe(st, r, g, 0, CFG)
    assert M.probe_verdict(st, CFG) is None
    # 10x bandwidth drop over the whole window -> degraded, once: after rebase the new level is normal
    for r, g in [(1.0, 10), (1.0, 11), (1.0, 9)]:
        M.add_probe(st, r, g, 0, CFG)
    kind, why = M.probe_verdict(st, CFG)
    assert kind == "link_degraded" and "goodput <= 11.0 Mbit/s" in why
    M.rebase(st, CFG)
    assert st.degraded and st.base_goodput_mbit == 11 and M.probe_verdict(st, CFG) is None
    ob = M.observation_of(st, True)
    assert ob.bw_ratio == pytest.approx(0.11)
    # one fast sample is not a recovery (noise is one-sided: a slow one could be contention, a
    # fast one could be a shaper burst); the whole window back at 100 is
    M.add_probe(st, 1.0, 100, 0, CFG)
    assert M.probe_verdict(st, CFG) is None
    for r, g in [(1.0, 100), (1.0, 98)]:
        M.add_probe(st, r, g, 0, CFG)
    assert M.probe_verdict(st, CFG)[0] == "link_recovered"
    M.rebase(st, CFG)
    assert not st.degraded and M.observation_of(st, True).bw_ratio == 1.0


def test_delay_rise_needs_ratio_and_absolute_margin():
    st = _probed([0.3, 0.3, 0.3], [1000, 1000, 1000])
    for i, r in enumerate((1.5, 1.5, 1.5)):  # 5x but only +1.2 ms: loopback noise, not a link change
        M.add_probe(st, r, 1000, (3 + i) * S // 2, CFG)
    assert M.probe_verdict(st, CFG) is None
    # high for 0.1 s only (re-probes of a busy agent, 0.05 s apart): not yet a delay change
    for i, r in enumerate((20.0, 21.0, 19.0)):
        M.add_probe(st, r, 1000, 3 * S + i * S // 20, CFG)
    assert M.probe_verdict(st, CFG) is None
    M.add_probe(st, 19.5, 1000, 4 * S + S // 10, CFG)  # still high 1.1 s after the first high sample
    kind, why = M.probe_verdict(st, CFG)
    assert kind == "link_degraded" and "RTT >= 19.00 ms" in why and "for 1.10 s" in why, why
    M.rebase(st, CFG)
    assert M.observation_of(st, True).extra_delay_ms == pytest.approx((19.0 - 0.3) / 2)


def test_probe_payload_follows_the_measured_rate_within_bounds():
    cfg = M.MonitorConfig(probe_transfer_ms=15.0, probe_min_bytes=16 * 1024, probe_max_bytes=256 * 1024)
    assert M.probe_payload_bytes(None, None, cfg) == cfg.probe_bytes
    assert M.probe_payload_bytes(None, 100.0, cfg) == int(100e6 / 8 * 0.015)  # 187.5 kB at 100 Mbit/s
    st = _probed([1, 1, 1], [10.0, 8.0, 9.0])  # after a drop to ~10 Mbit/s the probe shrinks with it
    assert M.probe_payload_bytes(st, 100.0, cfg) == 18750
    st = _probed([1, 1, 1], [5.0, 4.0, 4.5])
    assert M.probe_payload_bytes(st, 100.0, cfg) == cfg.probe_min_bytes
    assert M.probe_payload_bytes(None, 10_000.0, cfg) == cfg.probe_max_bytes


def test_goodput_clamps_tiny_transfer_times():
    assert M.goodput_mbit(1.0, 11.0, 64 * 1024, 0.5) == pytest.approx(2 * 64 * 1024 * 8 / 0.010 / 1e6)
    assert M.goodput_mbit(1.0, 0.9, 64 * 1024, 0.5) == pytest.approx(2 * 64 * 1024 * 8 / 0.0005 / 1e6)


def test_overload_needs_consecutive_reports():
    cfg = M.MonitorConfig(overload_beats=3, overload_cpu_frac=0.9)
    assert M.overloaded([60, 59, 58], 0.6, cfg) is True  # 0.6 cores: limit 54 %
    assert M.overloaded([60, 20, 58], 0.6, cfg) is False
    assert M.overloaded([60, 60], 0.6, cfg) is False


def _star():
    servers = tuple(Server(n, 10 << 20, 1e9) for n in ("e1", "e2", "e3"))
    links = tuple(Link(n, "hub", 100.0, 2.0) for n in ("e1", "e2", "e3", "ctl"))
    return Cluster(servers, links, nodes=("hub", "ctl"))


def test_observed_cluster_removes_lost_and_scales_access_links():
    base = _star()
    obs = {"e1": M.ServerObservation(alive=False), "e2": M.ServerObservation(bw_ratio=0.1, extra_delay_ms=3.0),
           "e3": M.ServerObservation()}
    cl, notes = M.observed_cluster(base, obs, "ctl")
    assert [s.name for s in cl.servers] == ["e2", "e3"]
    ln = next(x for x in cl.links if x.key == ("e2", "hub"))
    assert ln.bw_mbit == pytest.approx(10.0) and ln.latency_ms == pytest.approx(5.0)
    assert any("e1 lost" in n for n in notes) and any("e2-hub" in n for n in notes)
    same, notes2 = M.observed_cluster(base, {n: M.ServerObservation() for n in ("e1", "e2", "e3")}, "ctl")
    assert same == base and notes2 == []


def test_merge_triggers_keeps_the_earliest():
    ts = [M.Trigger("scheduled", 5, "x"), M.Trigger("agent_lost", 3, "e1 silent", "e1", 0.85)]
    kind, reasons, t_ns, detect_s = M.merge_triggers(ts)
    assert (kind, t_ns, detect_s) == ("agent_lost", 3, 0.85) and len(reasons) == 2


def test_monitor_config_rejects_nonsense():
    with pytest.raises(ConfigError, match="bw_drop_ratio"):
        M.MonitorConfig(bw_drop_ratio=1.5)
    with pytest.raises(ConfigError):
        M.MonitorConfig(probe_timeout_s=0)


# ---- deployer decisions ----

def _plan(placement, bits=None):
    from controller.plan import Plan, Stage
    L, E = len(placement), len(placement[0])
    return Plan(strategy="coel", mode="inter", model="t", bits=tuple(tuple(bits or [4] * E) for _ in range(L)),
                placement=tuple(tuple(tuple(r) for r in row) for row in placement),
                backbone=(("e1", (Stage("e1", 0, L),)),),
                compression=(("e1|e2", (("act_dtype", "int8"), ("name", "int8"), ("prune_beta", 0.0))),))


def test_entry_holders_route_only_to_confirmed_live_copies():
    from controller.deployer import entry_holders, keep_set
    target = _plan([[["e2"], ["e3", "e2"]]])
    deployed = {"e2": {(0, 0, 4), (0, 1, 4)}, "e3": set()}  # e3's load did not happen (yet)
    holders, unplaced = entry_holders(target, deployed, {"e2", "e3"})
    assert holders == {(0, 0): ("e2",), (0, 1): ("e2",)} and unplaced == []
    # e2 dies: expert 0 falls back to its previous live holder
    holders, unplaced = entry_holders(target, {"e1": {(0, 0, 2)}, "e2": set(), "e3": set()}, {"e1", "e3"},
                                      fallback={(0, 0): ("e1",), (0, 1): ("e2",)})
    assert holders[(0, 0)] == ("e1",) and unplaced == [(0, 1)]
    keep = keep_set({(0, 0): ("e1",)}, target)
    assert ("e1", 0, 0) in keep and ("e2", 0, 0) in keep and ("e3", 0, 1) in keep


def test_entry_compression_maps_the_agreed_pair_settings():
    from controller.deployer import entry_compression
    target = _plan([[["e2"], ["e3"]]])
    comp = entry_compression(target, "e1", {"e1", "e2", "e3"})
    # the planner's knobs, minus its label, as a nodes.compression header (defaults left out)
    assert comp == {"e2": {"act_dtype": "int8"}}
    assert "e1" not in comp and "e3" not in comp
    assert entry_compression(target, "e1", {"e2"}, enabled=False) == {}


def test_entry_compression_reports_settings_the_nodes_reject():
    from controller.deployer import entry_compression
    from controller.plan import Plan
    doc = _plan([[["e2"]]]).to_dict()
    doc["compression"] = {"e1|e2": {"name": "weird", "act_dtype": "int3"}}
    target = Plan.from_dict(doc)
    with pytest.raises(ValueError, match="e1\\|e2 .*'weird'"):
        entry_compression(target, "e1", {"e2"})
    problems: list[str] = []
    assert entry_compression(target, "e1", {"e2"}, problems=problems) == {}
    assert "act_dtype" in problems[0]


# ---- deployer execution with a fake agent client ----

class FakeAgent:
    def __init__(self, fail_times=0, code="internal"):
        self.fail_times, self.code, self.calls = fail_times, code, []

    def call(self, mtype, body=None, tensors=None, timeout_s=0.0):
        from nodes.transport import RemoteError
        self.calls.append((mtype.name, [(d["layer"], d["expert"], d["bits"]) for d in body.get("shards", [])
                                        if isinstance(d, dict)]))
        if self.fail_times > 0:
            self.fail_times -= 1
            raise RemoteError("tcp://x:1", self.code, "injected")


def _deployer(agents, **kw):
    from coel_model.model import MoEModel, init_weights
    from controller.deployer import DeployConfig, Deployer, ShardSource
    from tests.runtime_fixtures import tiny_cfg
    model = MoEModel(tiny_cfg())
    init_weights(model, seed=0)
    sleeps = []
    d = Deployer(ShardSource(model), agents.get, DeployConfig(max_attempts=3, chunk_bytes=20_000), sleep=sleeps.append,
                 **kw)
    return d, sleeps


def test_deployer_retries_with_backoff_then_gives_up_per_key():
    from controller.deployer import DeployOutcome
    flaky, dead = FakeAgent(fail_times=1), FakeAgent(fail_times=99)
    d, sleeps = _deployer({"e1": flaky, "e2": dead})
    out, held = DeployOutcome(), {}
    d.load("e1", [(0, 0, 4), (0, 1, 16)], out, held)
    assert held["e1"] == {(0, 0, 4), (0, 1, 16)} and not out.failed
    assert out.bytes_moved == d.source.nbytes(0, 0, 4) + d.source.nbytes(0, 1, 16)
    assert len(flaky.calls) == 3  # 16-bit expert (49 KB) > chunk: 2 chunks, the first retried once
    d.load("e2", [(1, 2, 2)], out, held)
    assert [f[:4] for f in out.failed] == [("e2", 1, 2, 2)] and "injected" in out.failed[0][4]
    assert len(dead.calls) == 3 and sleeps == [0.2, 0.2, 0.4]  # per-load back-off doubles


def test_deployer_does_not_retry_over_budget_or_a_lost_server():
    from controller.deployer import DeployOutcome
    full = FakeAgent(fail_times=99, code="over_budget")
    d, sleeps = _deployer({"e1": full})
    out = DeployOutcome()
    d.load("e1", [(0, 0, 4)], out, {})
    assert len(full.calls) == 1 and out.failed and sleeps == []
    gone = FakeAgent(fail_times=99)
    d2, _ = _deployer({"e3": gone}, is_alive=lambda s: False)
    out2 = DeployOutcome()
    d2.load("e3", [(0, 0, 4)], out2, {})
    assert len(gone.calls) == 1 and out2.failed


def test_full_plan_only_when_clearly_better_and_within_budget():
    inc = {"token_ms_max": 10.0, "meets_slo": True, "meets_quality": True}
    ok, why = M.prefer_full_plan(inc, {"token_ms_max": 9.5, "meets_slo": True, "meets_quality": True}, 10, 100)
    assert not ok and "not worth it" in why
    ok, why = M.prefer_full_plan(inc, {"token_ms_max": 7.0, "meets_slo": True, "meets_quality": True}, 500, 100)
    assert not ok and "500 bytes > budget 100" in why
    ok, why = M.prefer_full_plan(inc, {"token_ms_max": 7.0, "meets_slo": False, "meets_quality": True}, 10, 100)
    assert not ok and "slo" in why
    ok, why = M.prefer_full_plan(inc, {"token_ms_max": 7.0, "meets_slo": True, "meets_quality": True}, 10, 100)
    assert ok and "7.000 vs 10.000" in why


def test_transition_overflow_counts_old_and_new_copies_and_in_place_rebits():
    from controller.deployer import transition_overflow
    nb = lambda l, e, b: 100 * b  # noqa: E731
    target = _plan([[["e2"], ["e2"]]], bits=[4, 4])
    held = {"e2": {(0, 0, 8)}, "e3": {(0, 1, 4)}}
    # e2: (0,0) re-bitted 8 -> 4 in place (400 replaces 800) + (0,1) new 400: peak 800
    assert transition_overflow(target, held, {"e2", "e3"}, nb, {"e2": 800, "e3": 400}) == {}
    assert transition_overflow(target, held, {"e2", "e3"}, nb, {"e2": 799, "e3": 400}) == {"e2": (800, 799)}


def test_effective_plan_records_what_is_really_deployed():
    from controller.deployer import effective_plan
    target = _plan([[["e2"], ["e3"]]], bits=[4, 4])
    assert effective_plan(target, {"e2": {(0, 0, 4)}, "e3": {(0, 1, 4)}}, {"e2", "e3"}) is target
    # (0,1) failed to load on e3 and still lives (at 8 bits) on e1: that is the truth to plan from
    eff = effective_plan(target, {"e1": {(0, 1, 8)}, "e2": {(0, 0, 4)}, "e3": set()}, {"e1", "e2", "e3"})
    assert eff.placement[0][1] == ("e1",) and eff.bits[0][1] == 8 and eff.placement[0][0] == ("e2",)
    assert "failed loads" in eff.reasons[-1]
    # nobody holds it: keep the target's entry so the next re-plan loads it again
    eff = effective_plan(target, {"e2": {(0, 0, 4)}}, {"e2", "e3"})
    assert eff.placement[0][1] == ("e3",)


def test_cgroup_limits_v1_and_v2(tmp_path):
    from nodes.cgroups import cgroup_limits
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/mn-e2\n3:cpu,cpuacct:/mn-e2\n1:cpuset:/\n")
    (tmp_path / "sys/memory/mn-e2").mkdir(parents=True)
    (tmp_path / "sys/memory/mn-e2/memory.limit_in_bytes").write_text("734003200\n")
    (tmp_path / "sys/cpu/mn-e2").mkdir(parents=True)
    (tmp_path / "sys/cpu/mn-e2/cpu.cfs_quota_us").write_text("20000\n")
    (tmp_path / "sys/cpu/mn-e2/cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_limits(proc, tmp_path / "sys") == {"cgroup_memory_limit_bytes": 734003200, "cgroup_cpu_cores": 0.2}
    (tmp_path / "sys/cpu/mn-e2/cpu.cfs_quota_us").write_text("-1\n")  # unlimited
    (tmp_path / "sys/memory/mn-e2/memory.limit_in_bytes").write_text(str(2 ** 63 - 4096))
    assert cgroup_limits(proc, tmp_path / "sys") == {}
    proc.write_text("0::/run/x\n")
    (tmp_path / "sys/run/x").mkdir(parents=True)
    (tmp_path / "sys/run/x/memory.max").write_text("max\n")
    (tmp_path / "sys/run/x/cpu.max").write_text("50000 100000\n")
    assert cgroup_limits(proc, tmp_path / "sys") == {"cgroup_cpu_cores": 0.5}
    assert cgroup_limits(tmp_path / "missing", tmp_path / "sys") == {}


def test_resource_observation_reads_squeezes_from_cgroup_limits():
    MiB = 1 << 20
    # as built by the testbed: limit = memory_mb + overhead, quota = share x cores -> as planned
    assert M.resource_observation({"cgroup_memory_limit_bytes": int(700.25 * MiB) - 100, "cgroup_cpu_cores": 0.4},
                                  0.25, 0.2, 2, 700) == (None, 0.0)
    mem, load = M.resource_observation({"cgroup_memory_limit_bytes": int(700.1 * MiB), "cgroup_cpu_cores": 0.1},
                                       0.25, 0.2, 2, 700)
    assert mem == pytest.approx(0.1 * MiB, abs=2) and load == 0.75
    assert M.resource_observation({}, 0.25, 0.2, 2, 700) == (None, 0.0)  # loopback: no limits
    cl, notes = M.observed_cluster(_star(), {"e2": M.ServerObservation(memory_bytes=MiB, load=0.5)}, "ctl")
    assert cl.server("e2").memory_bytes == MiB and cl.server("e2").load == 0.5
    assert any("10.00 -> 1.00 MiB" in n for n in notes)


def test_replan_after_a_memory_squeeze_drops_and_rehomes_copies():
    """What a resource_change trigger runs: the observed cluster with a server's squeezed budget."""
    from tests.runtime_fixtures import tiny_cfg
    from controller.cluster import cluster_from_dict
    from controller.plan import PlanOptions, single_class
    from controller.planner import plan
    from controller.profile import synthetic_profile
    prof = synthetic_profile(tiny_cfg(), seed=1)
    cl = cluster_from_dict({"servers": [{"name": n, "memory_mb": 0.2} for n in ("a1", "a2", "a3")],
                            "links": [{"a": n, "b": "hub", "bw_mbit": 1000, "latency_ms": 0.5}
                                      for n in ("a1", "a2", "a3")], "nodes": ["hub"]})
    reqs = single_class("a1")
    p0 = plan(prof, cl, reqs, "coel", options=PlanOptions(objective="quality"))  # experts spread over a1-a3
    held = sum(1 for row in p0.placement for reps in row if "a3" in reps)
    assert held > 0
    squeezed, _ = M.observed_cluster(cl, {"a3": M.ServerObservation(memory_bytes=20_000)})
    p1 = plan(prof, squeezed, reqs, "coel", current=p0)
    mem = p1.memory_map()
    assert mem.get("a3", 0) <= 20_000
    assert all(reps for row in p1.placement for reps in row)
    assert any("over its memory" in r for r in p1.reasons), p1.reasons
