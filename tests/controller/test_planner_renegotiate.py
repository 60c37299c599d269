"""Issue 7: a link change re-negotiates the token compression of the server pairs whose measured
route changed (pure: controller.planner.renegotiate_compression + changed_pairs, and the
monitor's bw/delay verdicts). Topology: tight-star-4 (every server holds experts, s1 is the
entry), the scenario tests' d_model=64 model shape with a synthetic profile."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from controller import monitor as M
from controller.negotiation import DEFAULT_COSTS, request_quality_score

REPO = Path(__file__).resolve().parents[2]
TOPO = REPO / "testbed" / "scenarios" / "topologies" / "tight-star-4.yaml"
QUALITY = {c.name: c.quality_nats for c in DEFAULT_COSTS}


@pytest.fixture(scope="module")
def world():
    from coel_model.config import MoEConfig
    from controller.cluster import cluster_from_topology
    from controller.plan import PlanOptions, requirements_from_topology
    from controller.planner import plan, renegotiate_compression
    from controller.profile import synthetic_profile
    from topologies import load_topology
    cfg = MoEConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=8, top_k=2,
                    expert_hidden=256, max_seq_len=512, bos_token_id=-1, eos_token_id=0)
    prof = synthetic_profile(cfg, backbone_params=cfg.param_counts()["backbone"])
    topo = load_topology(str(TOPO))
    cl = cluster_from_topology(topo)
    reqs = requirements_from_topology(topo)
    # objective quality: the inter-server plan over every server (the latency objective keeps it on s1)
    p0, ch0 = renegotiate_compression(plan(prof, cl, reqs, "coel", options=PlanOptions(objective="quality")),
                                      prof, cl, reqs)
    assert sorted(p0.compression_map()) == ["s1|s2", "s1|s3", "s1|s4"], p0.compression_map()
    return dict(prof=prof, cl=cl, reqs=reqs, p0=p0)


def _after(world, cluster, current_plan):
    from controller.planner import changed_pairs, plan, renegotiate_compression
    inc = plan(world["prof"], cluster, world["reqs"], "coel", current_plan)
    changed = changed_pairs(world["cl_prev"], cluster, sorted(inc.compression_map()))
    out, ch = renegotiate_compression(inc, world["prof"], cluster, world["reqs"],
                                      current=current_plan.compression_map(), changed=changed)
    return out, ch, changed


def _names(p):
    return {k: v["name"] for k, v in p.compression_map().items()}


def test_ten_x_drop_tightens_only_that_pair_and_recovery_loosens_back(world):
    from controller.planner import diff
    cl, p0 = world["cl"], world["p0"]
    slow = cl.with_link("s2", "hub", bw_mbit=10.0, latency_ms=1.0)
    world["cl_prev"] = cl
    p1, ch, changed = _after(world, slow, p0)
    assert changed == {"s1|s2"}  # only the pair whose route crosses s2-hub
    assert [c.link for c in ch] == ["s1|s2"]
    before, after = _names(p0), _names(p1)
    assert QUALITY[after["s1|s2"]] > QUALITY[before["s1|s2"]], (before, after)  # tighter: more bytes saved
    assert {k: after[k] for k in ("s1|s3", "s1|s4")} == {k: before[k] for k in ("s1|s3", "s1|s4")}
    c = ch[0]
    assert c.bw_mbit == pytest.approx(10.0) and c.from_name == before["s1|s2"] and c.to_name == after["s1|s2"]
    # the choice is the rule's optimum: no other setting on that pair scores better
    acts = diff(p0, p1)
    assert [a.kind for a in acts] == ["set_compression"] and acts[0].server == "s1|s2"
    assert p1.placement == p0.placement and p1.bits == p0.bits  # nothing moves
    # recovery: the same rule on the nominal route gives back the original setting
    world["cl_prev"] = slow
    p2, ch2, changed2 = _after(world, cl, p1)
    assert changed2 == {"s1|s2"} and [c.link for c in ch2] == ["s1|s2"]
    assert _names(p2) == before


def test_unchanged_links_change_nothing_and_the_rule_is_deterministic(world):
    from controller.planner import diff, renegotiate_compression
    cl, p0 = world["cl"], world["p0"]
    world["cl_prev"] = cl
    p1, ch, changed = _after(world, cl, p0)
    assert changed == set() and ch == [] and diff(p0, p1) == []
    # every pair negotiated again on the same routes: the agreed settings are a fixed point
    a, cha = renegotiate_compression(p0, world["prof"], cl, world["reqs"], current=p0.compression_map())
    b, chb = renegotiate_compression(p0, world["prof"], cl, world["reqs"], current=p0.compression_map())
    assert a == b == p0 and cha == chb == []


def test_the_agreed_setting_minimises_request_time_times_perplexity(world):
    """Brute force over the pair's settings with the cost model: the winner has the lowest
    score, and the score falls on the slow route when the setting carries fewer bytes."""
    from controller.costmodel import evaluate, layout_from_plan
    from controller.plan import PlanOptions
    prof, reqs = world["prof"], world["reqs"]
    slow = world["cl"].with_link("s2", "hub", bw_mbit=10.0, latency_ms=1.0)
    world["cl_prev"] = world["cl"]
    p1, _, _ = _after(world, slow, world["p0"])
    lay, _ = layout_from_plan(p1, prof, slow)
    pair = (slow.index["s1"], slow.index["s2"])
    w = reqs.weights()
    scores = {}
    for c in DEFAULT_COSTS:
        lay.compression[pair] = c
        preds = evaluate(prof, slow, reqs, lay, PlanOptions())
        ms = sum(w[p.name] * (p.ttft_ms + next(r.new_tokens for r in reqs.classes if r.name == p.name) * p.token_ms)
                 for p in preds)
        scores[c.name] = request_quality_score(ms, max(x.quality_loss_nats for x in preds)
                                               - float(prof.expert_loss(lay.bits).sum()))
    best = min(scores, key=lambda n: (round(scores[n], 9), QUALITY[n]))
    assert _names(p1)["s1|s2"] == best, scores
    assert scores[best] < scores["none"]


def test_quality_budget_limits_the_tightening(world):
    """With a quality floor that leaves room for int8 only, a 10x drop cannot go further."""
    from controller.planner import changed_pairs, plan, renegotiate_compression
    prof, cl = world["prof"], world["cl"]
    p0 = world["p0"]
    floor = float(prof.expert_loss(__import__("numpy").array(p0.bits)).sum()) + QUALITY["int8"] + 1e-6
    reqs = world["reqs"].with_slo(max_loss_nats=floor)
    slow = cl.with_link("s2", "hub", bw_mbit=10.0, latency_ms=1.0)
    inc = plan(prof, slow, reqs, "coel", p0)
    out, ch = renegotiate_compression(inc, prof, slow, reqs, current=p0.compression_map(),
                                      changed=changed_pairs(cl, slow, sorted(inc.compression_map())))
    assert all(QUALITY[n] <= QUALITY["int8"] for n in _names(out).values()), _names(out)


def test_changed_pairs_tolerance_and_unknown_routes(world):
    from controller.planner import changed_pairs
    cl = world["cl"]
    pairs = ["s1|s2", "s1|s3"]
    assert changed_pairs(None, cl, pairs) == set(pairs)
    assert changed_pairs(cl, cl.with_link("s3", "hub", bw_mbit=99.0, latency_ms=1.0), pairs) == set()  # 1% noise
    assert changed_pairs(cl, cl.with_link("s3", "hub", bw_mbit=100.0, latency_ms=6.0), pairs) == {"s1|s3"}
    assert changed_pairs(cl, cl.without_server("s3"), pairs) == {"s1|s3"}


def test_probe_change_names_bandwidth_or_delay():
    cfg = M.MonitorConfig(probe_window=3, baseline_probes=3)
    st = M.ProbeState()
    for _ in range(3):
        M.add_probe(st, 2.0, 120.0, 0, cfg)
    for _ in range(3):
        M.add_probe(st, 2.1, 11.0, 0, cfg)
    ev, what, why = M.probe_change(st, cfg)
    assert (ev, what) == ("link_degraded", "bw") and "goodput" in why
    M.rebase(st, cfg)
    for _ in range(3):
        M.add_probe(st, 2.0, 125.0, 0, cfg)
    assert M.probe_change(st, cfg)[:2] == ("link_recovered", "bw")
    st2 = M.ProbeState()
    for i in range(3):
        M.add_probe(st2, 2.0, 100.0, i * 500_000_000, cfg)
    for i in range(3, 6):  # high for 1 s (monitor.delay_confirm_s)
        M.add_probe(st2, 22.0, 100.0, i * 500_000_000, cfg)
    assert M.probe_change(st2, cfg)[:2] == ("link_degraded", "delay")
    assert M.probe_verdict(st2, cfg)[0] == "link_degraded"


def test_request_quality_score_trades_at_equal_elasticity():
    assert request_quality_score(100.0, 0.0) == 100.0
    # 1% perplexity (0.01 nats) costs about 1% of the request time
    assert request_quality_score(100.0, 0.01) == pytest.approx(101.005, rel=1e-4)
    assert math.isinf(request_quality_score(math.inf, 0.001))


def test_delay_rise_renegotiates_that_pair_deterministically(world):
    """+20 ms one way on s2-hub: only s1|s2 is re-negotiated; compression cannot shorten a delay, but
    pruning saves calls, each of which now costs the longer round trip (so it never loosens)."""
    cl, p0 = world["cl"], world["p0"]
    far = cl.with_link("s2", "hub", bw_mbit=100.0, latency_ms=21.0)
    world["cl_prev"] = cl
    p1, ch, changed = _after(world, far, p0)
    p1b, chb, _ = _after(world, far, p0)
    assert changed == {"s1|s2"} and p1 == p1b and ch == chb
    assert all(c.link == "s1|s2" for c in ch)
    assert QUALITY[_names(p1)["s1|s2"]] >= QUALITY[_names(p0)["s1|s2"]]
