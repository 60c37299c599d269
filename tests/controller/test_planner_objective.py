"""CoEL's objective and candidate set (pure): the latency objective picks the fastest candidate
that keeps memory, the quality floor and the SLOs; `quality` keeps the old choice; every
baseline's layout is a candidate, so CoEL is never predicted worse than a baseline that keeps
the floor and the SLOs."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from coel_model.config import MoEConfig
from coel_model.errors import ConfigError, InfeasibleError
from controller.cluster import Cluster, Link, Server
from controller.plan import PlanOptions, single_class
from controller.planner import plan
from controller.profile import synthetic_profile
from controller.strategies import BASELINES

pytestmark = pytest.mark.unit
HYP = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def cfg(n_layers=3, n_experts=6) -> MoEConfig:
    return MoEConfig(vocab_size=256, d_model=64, n_layers=n_layers, n_heads=4, n_kv_heads=4,
                     n_experts=n_experts, top_k=2, expert_hidden=128)


def star(mems, bws, lats) -> Cluster:
    servers = tuple(Server(f"s{i}", int(m), 2e9) for i, m in enumerate(mems))
    links = tuple(Link(f"s{i}", "hub", float(bws[i]), float(lats[i])) for i in range(len(mems)))
    return Cluster(servers, links, nodes=("hub",))


def weighted_token_ms(p) -> float:
    pr = p.predicted_map()
    return sum(v["token_ms"] for k, v in pr.items() if not k.startswith("_"))  # one class


def test_objective_is_validated():
    with pytest.raises(ConfigError, match="objective"):
        PlanOptions(objective="cheapest")


def test_latency_objective_takes_the_fastest_candidate_and_quality_the_best_quality():
    prof = synthetic_profile(cfg(), seed=5)
    full = prof.backbone_bytes + float(prof.nbytes[:, :, -1].sum())
    cl = star([full * 1.2, full], [100, 100], [5, 5])
    reqs = single_class("s0", token_slo_ms=1e6, max_loss_nats=0.05)
    fast = plan(prof, cl, reqs, "coel")
    good = plan(prof, cl, reqs, "coel", options=PlanOptions(objective="quality"))
    assert weighted_token_ms(fast) <= weighted_token_ms(good) + 1e-9
    assert fast.predicted_map()["_overall"]["quality_loss_nats"] <= 0.05 + 1e-9
    assert good.predicted_map()["_overall"]["quality_loss_nats"] <= \
        fast.predicted_map()["_overall"]["quality_loss_nats"] + 1e-9
    assert any(r.startswith("objective latency") for r in fast.reasons)
    assert any(r.startswith("objective quality") for r in good.reasons)
    runner = [r for r in fast.reasons if r.startswith("runner-up candidates")]
    assert runner and "ms/token" in runner[0] and "TTFT" in runner[0]
    for b in BASELINES:
        assert f"{b}-layout" in runner[0] or any(f"{b}-layout" in r for r in fast.reasons)


def test_slo_beats_speed_only_among_candidates_that_keep_the_floor():
    """A floor that only wide experts meet: the 2-bit layouts are faster but never chosen."""
    prof = synthetic_profile(cfg(), seed=2)
    full = prof.backbone_bytes + float(prof.nbytes[:, :, -1].sum())
    cl = star([full * 0.6, full * 0.6, full * 0.6], [100, 100, 100], [1, 2, 3])
    floor = float(prof.expert_loss(np.full((3, 6), 8)).sum()) + 1e-6
    p = plan(prof, cl, single_class("s0", max_loss_nats=floor), "coel")
    assert p.predicted_map()["_overall"]["quality_loss_nats"] <= floor + 1e-9


@HYP
@given(seed=st.integers(0, 10_000), n=st.integers(2, 5), slo=st.sampled_from([math.inf, 1e6]),
       floor=st.sampled_from([math.inf, 0.05, 0.2]), data=st.data())
def test_coel_is_never_predicted_worse_than_a_baseline_that_keeps_floor_and_slo(seed, n, slo, floor, data):
    rng = np.random.default_rng(seed)
    prof = synthetic_profile(cfg(n_layers=int(rng.integers(2, 4)), n_experts=int(rng.integers(4, 8))), seed=seed)
    need = prof.backbone_bytes + float(prof.nbytes[:, :, prof.bit_index(4)].sum())
    mems = [need * float(x) for x in rng.uniform(0.35, 1.3, n)]
    mems[0] = max(mems[0], prof.backbone_bytes * 1.3)
    cl = star(mems, rng.uniform(5, 1000, n).tolist(), rng.uniform(0.1, 20, n).tolist())
    reqs = single_class("s0", token_slo_ms=slo, max_loss_nats=floor)
    try:
        coel = plan(prof, cl, reqs, "coel")
    except InfeasibleError:
        # CoEL may only give up when no baseline keeps the floor either
        for b in BASELINES:
            try:
                bp = plan(prof, cl, reqs, b)
            except InfeasibleError:
                continue
            assert not bp.predicted_map()["_overall"]["meets_quality"], b
        return
    c_ms = weighted_token_ms(coel)
    c_ov = coel.predicted_map()["_overall"]
    assert c_ov["meets_quality"]
    for b in BASELINES:
        try:
            bp = plan(prof, cl, reqs, b)
        except InfeasibleError:
            continue
        ov = bp.predicted_map()["_overall"]
        if ov["meets_quality"] and (ov["meets_slo"] or not c_ov["meets_slo"]):
            assert c_ms <= weighted_token_ms(bp) + 1e-6, (b, c_ms, weighted_token_ms(bp), coel.reasons[-2:])


def test_hybrid_candidates_exist_with_stage_execution_and_keep_memory():
    prof = synthetic_profile(cfg(n_layers=4, n_experts=6), seed=3)
    need = prof.backbone_bytes + float(prof.nbytes[:, :, prof.bit_index(4)].sum())
    cl = star([need * 0.45, need * 0.35, need * 0.35, need * 0.35], [100, 100, 100, 100], [1, 2, 3, 4])
    reqs = single_class("s0", max_loss_nats=0.2)
    p = plan(prof, cl, reqs, "coel", options=PlanOptions(stage_execution=True))
    assert any("hybrid" in r for r in p.reasons), p.reasons[-3:]
    cap = {s.name: s.memory_bytes for s in cl.servers}
    assert all(b <= cap[s] for s, b in p.memory_map().items())
    q = plan(prof, cl, reqs, "coel")  # the runtime without stages: no hybrid candidates
    assert not any("hybrid" in r for r in q.reasons)
