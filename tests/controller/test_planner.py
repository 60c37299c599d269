"""Planner properties (hypothesis) and unit checks: memory, coverage, re-homing, monotone
latency, infeasible inputs, diff. Pure and fast: tiny synthetic models and clusters."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from coel_model.config import MoEConfig
from coel_model.errors import ConfigError, InfeasibleError
from controller.cluster import Cluster, Link, Server, cluster_from_dict
from controller.costmodel import evaluate, layout_from_plan
from controller.plan import Plan, PlanOptions, RequestClass, Requirements, single_class
from controller.planner import bytes_loaded, diff, plan, replan, server_bytes, strategy_names
from controller.profile import packed_expert_bytes, synthetic_profile

MB = 1 << 20
STRATEGIES = ["coel", "uniform", "pipeline", "offload", "random"]
HYP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tiny_cfg(n_layers=3, n_experts=6, top_k=2, d_model=64, hidden=128) -> MoEConfig:
    return MoEConfig(vocab_size=256, d_model=d_model, n_layers=n_layers, n_heads=4, n_kv_heads=4,
                     n_experts=n_experts, top_k=top_k, expert_hidden=hidden)


def star(mems_bytes, bws, lats, speeds=None) -> Cluster:
    n = len(mems_bytes)
    speeds = speeds or [2e9] * n
    servers = tuple(Server(f"s{i}", int(m), float(speeds[i])) for i, m in enumerate(mems_bytes))
    links = tuple(Link(f"s{i}", "hub", float(bws[i]), float(lats[i])) for i in range(n))
    return Cluster(servers, links, nodes=("hub",))


def need_bytes(prof, bits=2):
    return prof.backbone_bytes + prof.nbytes[:, :, prof.bit_index(bits)].sum()


def check_plan(p: Plan, prof, cluster: Cluster):
    """Independent re-computation of the invariants from the plan's own fields."""
    cap = {s.name: s.memory_bytes for s in cluster.servers}
    assert len(p.bits) == prof.n_layers and all(len(r) == prof.n_experts for r in p.bits)
    used = {s: 0 for s in cap}
    od = p.on_demand_map()
    for l in range(prof.n_layers):
        for e in range(prof.n_experts):
            reps = p.placement[l][e]
            assert len(reps) >= 1, f"layer {l} expert {e} unplaced"
            assert p.bits[l][e] in (2, 3, 4, 8, 16)
            assert len(set(reps)) == len(reps)
            for s in reps:
                assert s in cap
                if (l, e) not in od.get(s, set()):
                    used[s] += int(prof.nbytes[l, e, prof.bit_index(p.bits[l][e])])
    for s, mem in p.memory_map().items():
        assert mem <= cap[s], f"{s} over memory: {mem} > {cap[s]}"
        assert mem >= used[s]
    for _, stages in p.backbone:
        assert stages[0].server in cap


cluster_args = st.tuples(
    st.integers(2, 5),  # servers
    st.floats(1.2, 4.0),  # total memory / need at 2 bits
    st.integers(0, 10_000),  # seed
)


@HYP
@given(cluster_args, st.sampled_from(STRATEGIES), st.floats(0.0, 1.5))
def test_every_strategy_respects_memory_and_places_every_expert(args, strategy, skew):
    n, factor, seed = args
    rng = np.random.default_rng(seed)
    prof = synthetic_profile(tiny_cfg(), seed=seed, skew=skew)
    w = rng.uniform(0.5, 2.0, n)
    mems = w / w.sum() * need_bytes(prof) * factor
    mems[0] = max(mems[0], prof.backbone_bytes * 1.05)  # the entry can hold the backbone
    cl = star(mems, rng.uniform(10, 1000, n), rng.uniform(0.1, 20, n), list(rng.uniform(1e9, 1e10, n)))
    reqs = single_class("s0", token_slo_ms=float(rng.uniform(1, 100)))
    try:
        p = plan(prof, cl, reqs, strategy, options=PlanOptions(seed=seed))
    except InfeasibleError as exc:
        # only allowed when the baseline's own rule cannot fit (message carries numbers)
        assert any(ch.isdigit() for ch in str(exc))
        assert strategy != "coel" or factor < 1.3, str(exc)
        return
    check_plan(p, prof, cl)
    assert Plan.from_json(p.to_json()) == p
    assert diff(p, p) == []


@HYP
@given(st.integers(0, 10_000), st.floats(0.1, 0.95))
def test_cannot_fit_even_at_2_bits_raises_for_every_strategy(seed, short):
    prof = synthetic_profile(tiny_cfg(), seed=seed)
    total = need_bytes(prof) * short
    cl = star([total * 0.6, total * 0.4], [100, 100], [1, 1])
    for s in STRATEGIES:
        with pytest.raises(InfeasibleError, match=r"MB"):
            plan(prof, cl, single_class("s0"), s)


def test_unreachable_servers_are_not_used_and_named_when_memory_is_short():
    prof = synthetic_profile(tiny_cfg(), seed=1)
    need = need_bytes(prof)
    cl = star([need * 0.7, need * 2.0], [100, 100], [1, 1]).with_link("s1", "hub", up=False)
    with pytest.raises(InfeasibleError, match=r"unreachable servers \['s1'\]"):
        plan(prof, cl, single_class("s0"), "coel")
    cl2 = star([need * 0.7, need * 2.0, need * 2.0], [100, 100, 100], [1, 1, 1]).with_link("s1", "hub", up=False)
    p = plan(prof, cl2, single_class("s0"), "coel")
    assert "s1" not in p.servers_used()
    assert any("unreachable" in r and "s1" in r for r in p.reasons)


def test_quality_floor_too_strict_raises_with_numbers():
    prof = synthetic_profile(tiny_cfg(), seed=2)
    cl = star([need_bytes(prof) * 1.1], [100], [1])
    with pytest.raises(InfeasibleError, match=r"quality floor .* needs .* MB"):
        plan(prof, cl, single_class("s0", max_loss_nats=1e-6), "coel")


def test_unknown_strategy_lists_valid_names():
    prof = synthetic_profile(tiny_cfg(), seed=0)
    cl = star([need_bytes(prof) * 3], [100], [1])
    with pytest.raises(ConfigError) as exc:
        plan(prof, cl, single_class("s0"), "magic")
    for name in strategy_names():
        assert name in str(exc.value)


@HYP
@given(st.integers(3, 6), st.integers(0, 10_000))
def test_lost_server_experts_are_rehomed_within_the_migration_bound(n, seed):
    rng = np.random.default_rng(seed)
    prof = synthetic_profile(tiny_cfg(n_layers=3, n_experts=8), seed=seed, skew=1.0)
    need = need_bytes(prof, 4)
    # every server can hold little: the model must spread (inter-server)
    mems = np.full(n, need * 2.5 / n)
    mems[0] = prof.backbone_bytes + need * 0.3
    cl = star(mems, rng.uniform(50, 500, n), rng.uniform(0.5, 5, n))
    reqs = single_class("s0", token_slo_ms=1e6)
    p = plan(prof, cl, reqs, "coel")
    check_plan(p, prof, cl)
    victims = [s.name for s in cl.servers[1:] if server_bytes(p, prof, s.name) > 0]
    if not victims:
        return
    lost = victims[int(rng.integers(len(victims)))]
    cl2 = cl.without_server(lost)
    p2 = replan(p, prof, cl2, reqs)
    check_plan(p2, prof, cl2)
    assert lost not in p2.servers_used()
    acts = diff(p, p2)
    moved = bytes_loaded(acts, prof)
    assert moved <= 2 * server_bytes(p, prof, lost)
    # copies on surviving servers are kept
    for l in range(prof.n_layers):
        for e in range(prof.n_experts):
            for s in p.placement[l][e]:
                if s != lost and p2.bits[l][e] == p.bits[l][e]:
                    assert s in p2.placement[l][e]


@HYP
@given(st.integers(2, 5), st.integers(0, 10_000), st.sampled_from(STRATEGIES),
       st.sampled_from(["latency", "bandwidth", "loss"]), st.floats(1.01, 20.0))
def test_predicted_latency_never_improves_when_a_link_gets_slower(n, seed, strategy, what, factor):
    rng = np.random.default_rng(seed)
    prof = synthetic_profile(tiny_cfg(), seed=seed)
    mems = np.full(n, need_bytes(prof, 8) * 1.5 / n)
    mems[0] = max(mems[0], prof.backbone_bytes * 1.3)
    cl = star(mems, rng.uniform(10, 1000, n), rng.uniform(0.1, 20, n))
    reqs = single_class("s0", token_slo_ms=1e6)
    try:
        p = plan(prof, cl, reqs, strategy)
    except InfeasibleError:
        return
    k = int(rng.integers(n))
    ln = cl.links[k]
    change = {"latency": {"latency_ms": ln.latency_ms * factor + 0.1},
              "bandwidth": {"bw_mbit": ln.bw_mbit / factor},
              "loss": {"loss_pct": min(ln.loss_pct + factor, 50.0)}}[what]
    slow = cl.with_link(ln.a, ln.b, **change)
    opts = PlanOptions()
    before = evaluate(prof, cl, reqs, layout_from_plan(p, prof, cl)[0], opts)
    after = evaluate(prof, slow, reqs, layout_from_plan(p, prof, slow)[0], opts)
    for b, a in zip(before, after):
        assert a.token_ms >= b.token_ms - 1e-9
        assert a.ttft_ms >= b.ttft_ms - 1e-9


def test_replan_with_nothing_changed_yields_no_actions():
    prof = synthetic_profile(tiny_cfg(n_experts=8), seed=3)
    need = need_bytes(prof, 4)
    cl = star([prof.backbone_bytes + need * 0.3, need, need], [100, 50, 200], [1, 3, 2])
    reqs = single_class("s0", token_slo_ms=1e6)
    p = plan(prof, cl, reqs, "coel")
    p2 = replan(p, prof, cl, reqs)
    assert diff(p, p2) == []
    assert p2.bits == p.bits and p2.placement == p.placement and p2.compression == p.compression


def test_diff_orders_loads_before_routes_before_drops_and_is_deterministic():
    prof = synthetic_profile(tiny_cfg(n_experts=8), seed=4)
    need = need_bytes(prof, 4)
    cl = star([prof.backbone_bytes + need * 0.2, need * 0.6, need * 0.6, need * 0.6], [100] * 4, [1, 2, 3, 4])
    reqs = single_class("s0", token_slo_ms=1e6)
    p = plan(prof, cl, reqs, "coel", options=PlanOptions(objective="quality"))  # an inter-server plan
    victim = max((s.name for s in cl.servers[1:]), key=lambda s: server_bytes(p, prof, s))
    p2 = replan(p, prof, cl.without_server(victim), reqs)
    acts = diff(p, p2)
    assert acts == diff(p, p2)
    kinds = [a.kind for a in acts]
    assert "load_shard" in kinds and "update_routes" in kinds and "drop_shard" in kinds
    first_route = kinds.index("update_routes")
    assert all(k in ("load_backbone", "load_shard", "set_compression") for k in kinds[:first_route])
    assert all(k in ("update_routes", "drop_shard", "drop_backbone") for k in kinds[first_route:])
    loads = {(a.server, a.layer, a.expert) for a in acts if a.kind == "load_shard"}
    for a in acts:
        if a.kind == "drop_shard" and a.server != victim:  # made room: narrowed in place or a spare replica
            assert (a.server, a.layer, a.expert) in loads or len(p2.placement[a.layer][a.expert]) >= 1
    assert all(a.server != victim for a in acts if a.kind == "load_shard")
    # a fresh deployment loads everything and drops nothing
    fresh = diff(None, p)
    assert {a.kind for a in fresh} >= {"load_backbone", "load_shard", "update_routes"}
    assert not any(a.kind.startswith("drop") for a in fresh)


def test_intra_server_when_one_server_holds_the_model_and_meets_the_slo():
    prof = synthetic_profile(tiny_cfg(), seed=5)
    cl = star([need_bytes(prof, 16) * 1.2, need_bytes(prof, 16)], [100, 100], [5, 5])
    p = plan(prof, cl, single_class("s0", token_slo_ms=1e6), "coel", options=PlanOptions(objective="quality"))
    assert p.mode == "intra"
    assert p.servers_used() == {"s0"}
    assert all(b == 16 for row in p.bits for b in row)  # room for full precision
    assert any("intra-server" in r for r in p.reasons)


def test_inter_server_hot_traffic_stays_on_the_near_server():
    cfg = tiny_cfg(n_layers=2, n_experts=8, top_k=2)
    prof = synthetic_profile(cfg, seed=6, skew=1.5)
    e16 = float(prof.nbytes[:, :, -1].sum())
    # the entry holds the backbone + a few experts; a near and a far server, neither can hold the backbone
    cl = star([prof.backbone_bytes + e16 * 0.05, prof.backbone_bytes * 0.9, prof.backbone_bytes * 0.9],
              [1000, 1000, 1000], [0.1, 0.5, 20.0])
    reqs = single_class("s0", token_slo_ms=1e6)
    p = plan(prof, cl, reqs, "coel", options=PlanOptions(objective="quality"))
    assert p.mode == "inter", p.reasons
    lay = layout_from_plan(p, prof, cl)[0]
    pop = prof.popularity
    near = (pop * lay.hosted[:, :, 1]).sum()
    far = (pop * lay.hosted[:, :, 2]).sum()
    assert near > far


@pytest.mark.parametrize("pairs", [((0, 1), (2, 3)), ((0, 2), (1, 3))])
def test_experts_that_fire_together_are_placed_together(pairs):
    from dataclasses import replace
    cfg = tiny_cfg(n_layers=1, n_experts=4, top_k=2)
    prof = synthetic_profile(cfg, seed=0, skew=0.0)  # every expert fires for half of the tokens
    co = np.zeros((1, 4, 4))
    for i, j in pairs:
        co[0, i, j] = co[0, j, i] = 0.5  # always together
    prof = replace(prof, coact_same=co)
    x16 = float(prof.nbytes[0, 0, -1])
    cl = star([prof.backbone_bytes + 0.5 * x16, 2.5 * x16, 2.5 * x16], [100, 100, 100], [1.0, 3.0, 3.0])
    p = plan(prof, cl, single_class("s0", token_slo_ms=1e6), "coel",
             options=PlanOptions(allowed_bits=(16,), headroom_frac=0.0))
    assert p.mode == "inter", p.reasons
    where = {e: p.placement[0][e] for e in range(4)}
    for i, j in pairs:
        assert where[i] == where[j], where


def test_multi_entry_requests_get_replicas_near_each_entry():
    prof = synthetic_profile(tiny_cfg(n_experts=8), seed=7, skew=1.2)
    need = need_bytes(prof, 16)
    cl = star([prof.backbone_bytes + need * 0.4, prof.backbone_bytes + need * 0.4, need], [100] * 3, [2, 2, 10])
    reqs = Requirements((RequestClass("a", "s0", token_slo_ms=1e-3), RequestClass("b", "s1", token_slo_ms=1e-3)))
    p = plan(prof, cl, reqs, "coel")
    check_plan(p, prof, cl)
    bb = p.backbone_map()
    assert bb["s0"][0].server == "s0" and bb["s1"][0].server == "s1"
    assert max(len(r) for row in p.placement for r in row) >= 2  # some expert replicated


def test_synthetic_bytes_are_exact_groupwise_packing():
    # 2-bit codes for d x h + gate/up/down groups of 64 with an fp16 scale and zero each
    d, h = 128, 256
    n = 3 * d * h
    groups = 2 * h * (d // 64) + d * (h // 64)
    assert packed_expert_bytes(d, h, 2, 64) == n * 2 // 8 + 4 * groups
    assert packed_expert_bytes(d, h, 16, 64) == 2 * n
    prof = synthetic_profile(tiny_cfg(), seed=0, skew=1.0)
    assert np.allclose(prof.popularity.sum(1), prof.cfg.top_k)
    assert (prof.popularity <= 1.0 + 1e-9).all()
    assert (np.diff(prof.loss_nats, axis=2) <= 0).all()  # loss falls with bits
    assert (np.diff(prof.nbytes, axis=2) > 0).all()


def test_cluster_routes_only_through_forwarders_and_skip_down_links():
    cl = cluster_from_dict({"servers": [{"name": "a", "memory_mb": 1}, {"name": "b", "memory_mb": 1},
                                        {"name": "c", "memory_mb": 1}],
                            "links": [{"a": "a", "b": "b", "bw_mbit": 10, "delay_ms": 1},
                                      {"a": "b", "b": "c", "bw_mbit": 10, "delay_ms": 1},
                                      {"a": "a", "b": "r", "bw_mbit": 5, "delay_ms": 4},
                                      {"a": "r", "b": "c", "bw_mbit": 50, "delay_ms": 4}],
                            "nodes": ["r"]})
    ps = cl.path("a", "c")
    assert ps.hops == ("a", "r", "c") and ps.latency_ms == 8 and ps.bw_mbit == 5  # b is a server: no transit
    down = cl.with_link("a", "r", up=False)
    assert down.path("a", "c") is None and down.path("a", "b") is not None


@HYP
@given(st.integers(2, 5), st.integers(0, 10_000), st.floats(0.01, 0.5), st.floats(1.0, 3.0))
def test_coel_meets_the_quality_floor_or_raises(n, seed, floor, factor):
    rng = np.random.default_rng(seed)
    prof = synthetic_profile(tiny_cfg(), seed=seed)
    mems = np.full(n, need_bytes(prof, 4) * factor / n)
    mems[0] = max(mems[0], prof.backbone_bytes * 1.1)
    cl = star(mems, rng.uniform(10, 1000, n), rng.uniform(0.1, 20, n))
    try:
        p = plan(prof, cl, single_class("s0", token_slo_ms=float(rng.uniform(0.5, 50)), max_loss_nats=floor), "coel")
    except InfeasibleError as exc:
        assert "MB" in str(exc)
        return
    check_plan(p, prof, cl)
    assert p.predicted_map()["_overall"]["meets_quality"], p.reasons


def test_losing_the_coordinator_moves_the_backbone_and_rehomes_its_experts():
    prof = synthetic_profile(tiny_cfg(n_experts=8), seed=1)
    bb, e4 = prof.backbone_bytes, float(prof.nbytes[:, :, 2].sum())
    cl = star([bb * 0.5, bb * 1.2 + e4 * 0.3, bb * 1.2 + e4 * 0.6, e4 * 0.8], [100] * 4, [1, 2, 3, 4])
    reqs = single_class("s0", token_slo_ms=1e6)
    p = plan(prof, cl, reqs, "coel")
    coord = p.backbone_map()["s0"][0].server
    assert coord != "s0"  # the entry is too small for the backbone
    cl2 = cl.without_server(coord)
    p2 = replan(p, prof, cl2, reqs)
    check_plan(p2, prof, cl2)
    new = p2.backbone_map()["s0"][0].server
    assert new not in (coord, "s0")
    acts = diff(p, p2)
    assert [a.server for a in acts if a.kind == "load_backbone"] == [new]
    assert [a.server for a in acts if a.kind == "drop_backbone"] == [coord]
    assert any(coord in r and new in r for r in p2.reasons)


def test_utilization_scales_with_the_arrival_rate_and_warns_when_saturated():
    prof = synthetic_profile(tiny_cfg(), seed=2)
    cl = star([need_bytes(prof, 16) * 1.5], [100], [1])
    low = plan(prof, cl, single_class("s0", rate_rps=100.0), "coel").predicted_map()["_utilization"]["s0"]
    high_plan = plan(prof, cl, single_class("s0", rate_rps=1e5), "coel")
    high = high_plan.predicted_map()["_utilization"]["s0"]
    assert high == pytest.approx(low * 1e3, rel=1e-3)
    assert high >= 1.0 and any("busy beyond 80 %" in r for r in high_plan.reasons)


def test_greedy_placement_is_near_the_brute_force_optimum_on_small_cases():
    """Every single-copy placement of 5 experts on 3 servers, judged by the same cost model."""
    import itertools
    from controller.costmodel import Layout
    ratios = []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        prof = synthetic_profile(tiny_cfg(n_layers=1, n_experts=5, top_k=2), seed=seed, skew=float(rng.uniform(0, 1.5)))
        x16, bb = float(prof.nbytes[0, 0, -1]), prof.backbone_bytes
        caps = [bb + x16 * rng.uniform(0, 2.5)] + list(x16 * rng.uniform(1.5, 4, 2))
        cl = star(caps, list(rng.uniform(10, 500, 3)), list(rng.uniform(0.2, 10, 3)), list(rng.uniform(1e9, 1e10, 3)))
        reqs = single_class("s0", token_slo_ms=1e9)
        opts = PlanOptions(allowed_bits=(16,), headroom_frac=0.0, max_replicas=1)
        try:
            p = plan(prof, cl, reqs, "coel", options=opts)
        except InfeasibleError:
            continue
        if p.mode != "inter":
            continue
        lay = layout_from_plan(p, prof, cl)[0]
        lay.compression = {}
        greedy = evaluate(prof, cl, reqs, lay, opts)[0].token_ms
        free = np.array(caps) - np.array([bb, 0, 0])
        best = math.inf
        for assign in itertools.product(range(3), repeat=5):
            if (np.bincount(assign, minlength=3) * x16 > free + 0.5).any():
                continue
            h = np.zeros((1, 5, 3), bool)
            h[0, np.arange(5), assign] = True
            best = min(best, evaluate(prof, cl, reqs, Layout(lay.bits, h, np.zeros_like(h), lay.stages), opts)[0].token_ms)
        ratios.append(greedy / best)
    assert len(ratios) >= 4
    assert max(ratios) <= 1.15, ratios  # measured: mean ~1 %, worst 13 % (a two-swap optimum)
