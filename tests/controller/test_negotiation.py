"""Token-compression negotiation (pure) and the profile/config inputs of the planner."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from coel_model.config import MoEConfig
from coel_model.errors import ConfigError
from controller.cluster import Cluster, Link, Server
from controller.negotiation import (DEFAULT_COSTS, AgentCapabilities, LinkView, Traffic, agree, answer_message,
                                    costs_from_measurements, decision_message, parse_answer, propose,
                                    propose_message)
from controller.plan import PlanOptions, single_class
from controller.planner import diff, plan, replan
from coel_model.profile_format import load_profile, profile_from_dict
from controller.profile import (bundled_model_configs, load_model_spec,
                                synthetic_profile)

TRAFFIC = Traffic(d_model=4096, prompt_tokens=512, new_tokens=64)


def test_fast_link_sends_uncompressed_slow_link_compresses():
    fast = propose(LinkView("a|b", 10_000, 0.5), DEFAULT_COSTS, TRAFFIC, quality_budget_nats=0.02,
                   slo_request_ms=5000)
    slow = propose(LinkView("a|b", 5, 20), DEFAULT_COSTS, TRAFFIC, quality_budget_nats=0.02, slo_request_ms=5000)
    assert fast[0].name == "none"
    assert slow[0].name != "none" and slow[0].prefill_ms < [c for c in slow if c.name == "none"][0].prefill_ms


def test_quality_budget_excludes_costly_settings_but_keeps_none():
    cands = propose(LinkView("a|b", 1, 5), DEFAULT_COSTS, TRAFFIC, quality_budget_nats=0.0)
    assert [c.name for c in cands] == ["none"]
    cands = propose(LinkView("a|b", 1, 5), DEFAULT_COSTS, TRAFFIC, quality_budget_nats=0.001)
    assert {c.name for c in cands} == {"none", "int8"}


def test_agree_takes_the_first_setting_every_agent_supports_within_budget():
    prop = propose(LinkView("a|b", 5, 20), DEFAULT_COSTS, TRAFFIC, quality_budget_nats=1.0, slo_request_ms=1e9)
    best = prop[0].name
    a = AgentCapabilities("a", frozenset(c.name for c in DEFAULT_COSTS))
    b_without = AgentCapabilities("b", frozenset({"none", "int8"}))
    assert agree(prop, [a, a], 1.0).name == best
    assert agree(prop, [a, b_without], 1.0).name in {"none", "int8"}
    # an agent that measured int8 as too costly vetoes it
    b_measured = AgentCapabilities("b", frozenset({"none", "int8"}), (("int8", 0.5),))
    assert agree(prop, [a, b_measured], 0.1).name == "none"


def test_messages_round_trip_and_bad_answers_are_rejected():
    prop = propose(LinkView("a|b", 5, 20), DEFAULT_COSTS, TRAFFIC, 1.0)
    msg = propose_message("a|b", prop)
    assert msg["type"] == "compress.propose" and msg["candidates"][0]["name"] == prop[0].name
    json.dumps(msg)
    caps = AgentCapabilities("b", frozenset({"none", "int8"}), (("int8", 0.0004),))
    assert parse_answer(answer_message("a|b", caps)) == caps
    with pytest.raises(ConfigError, match="compress.answer"):
        parse_answer({"type": "hello", "version": 1})
    assert decision_message("a|b", prop[0])["settings"]["act_dtype"] in ("fp16", "int8")


def test_measured_costs_replace_the_defaults():
    # rows shaped like nodes.compression.measure_compression_cost output
    rows = [{"settings": {"act_dtype": "fp32"}, "name": "none", "bytes_ratio": 1.0, "vector_bytes_ratio": 1.0,
             "loss_increase": 0.0, "ppl_increase": 0.0, "pruned_frac": 0.0, "merged_frac": 0.0},
            {"settings": {"act_dtype": "int8"}, "name": "int8", "bytes_ratio": 0.26, "vector_bytes_ratio": 0.26,
             "loss_increase": 0.002, "ppl_increase": 0.002, "pruned_frac": 0.0, "merged_frac": 0.0},
            {"settings": {"act_dtype": "int8", "prune_beta": 0.5}, "name": "int8+prune", "bytes_ratio": 0.2,
             "vector_bytes_ratio": 0.26, "loss_increase": -0.001, "pruned_frac": 0.2, "merged_frac": 0.0}]
    costs = costs_from_measurements(rows)
    assert [c.name for c in costs] == ["none", "int8", "int8+prune"]
    assert costs[1].quality_nats == pytest.approx(0.002) and costs[1].bytes_factor == pytest.approx(0.52)
    assert costs[2].quality_nats == 0.0 and costs[2].calls_factor == pytest.approx(0.8)
    assert dict(costs[2].settings)["prune_beta"] == 0.5
    # older rows without loss_increase: ln(1 + ppl_increase)
    old = costs_from_measurements([{"settings": {"act_dtype": "int8"}, "bytes_ratio": 0.5, "ppl_increase": 0.01}])
    assert math.isclose(old[1].quality_nats, math.log1p(0.01))
    with pytest.raises(ConfigError, match="row 0"):
        costs_from_measurements([{"settings": {}}])


def test_a_link_change_renegotiates_compression_in_replan():
    cfg = MoEConfig(vocab_size=256, d_model=512, n_layers=2, n_heads=4, n_kv_heads=4, n_experts=8, top_k=2,
                    expert_hidden=128)
    prof = synthetic_profile(cfg, seed=0)
    bb = prof.backbone_bytes
    e16 = float(prof.nbytes[:, :, -1].sum())
    servers = (Server("s0", int(bb + 0.05 * e16), 2e9), Server("s1", int(bb * 0.9), 2e9), Server("s2", int(bb * 0.9), 2e9))
    links = (Link("s0", "hub", 10_000, 0.2), Link("s1", "hub", 10_000, 0.2), Link("s2", "hub", 10_000, 0.2))
    cl = Cluster(servers, links, nodes=("hub",))
    reqs = single_class("s0", token_slo_ms=1e6, max_loss_nats=0.5)
    p = plan(prof, cl, reqs, "coel", options=PlanOptions(objective="quality"))  # experts on s1 and s2 too
    assert all(v["name"] == "none" for v in p.compression_map().values())
    slow = cl.with_link("s1", "hub", bw_mbit=0.5, latency_ms=30)
    p2 = replan(p, prof, slow, reqs)
    changed = {k: v["name"] for k, v in p2.compression_map().items() if "s1" in k}
    assert changed and all(n != "none" for n in changed.values())
    acts = diff(p, p2)
    assert any(a.kind == "set_compression" for a in acts)
    assert not any(a.kind in ("load_shard", "drop_shard") for a in acts)


# ---- planner inputs: profiles and configs

def test_profile_written_by_coel_profile_with_counts_is_read_as_probabilities():
    cfg = MoEConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, n_experts=4, top_k=2,
                    expert_hidden=64)
    prof = synthetic_profile(cfg, seed=3)
    doc = prof.to_dict()
    tokens = 1000
    counts = prof.coact_same * tokens
    for l in range(2):
        np.fill_diagonal(counts[l], prof.popularity[l] * tokens)
    doc["coactivation"]["same_layer"] = counts.tolist()
    back = profile_from_dict(doc, "x.json")
    assert np.allclose(back.coact_same, prof.coact_same, atol=1e-6)
    assert np.allclose(back.popularity, prof.popularity)


def test_bad_profiles_name_the_problem(tmp_path):
    cfg = MoEConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, n_experts=4, top_k=2,
                    expert_hidden=64)
    doc = synthetic_profile(cfg, seed=3).to_dict(include_coactivation=False)
    bad = dict(doc, experts=doc["experts"][:-1])
    with pytest.raises(ConfigError, match="layer 1 expert 3"):
        profile_from_dict(bad, "p.json")
    bad = json.loads(json.dumps(doc))
    bad["experts"][2]["bytes"]["4"] = 1
    with pytest.raises(ConfigError, match="bytes must grow"):
        profile_from_dict(bad, "p.json")
    (tmp_path / "broken.json").write_text("{\n  nope")
    with pytest.raises(ConfigError, match=r"broken.json:2"):
        load_profile(tmp_path / "broken.json")


def test_bundled_big_configs_have_their_published_sizes():
    assert set(bundled_model_configs()) >= {"deepseek-v3", "mixtral-8x7b", "qwen3-30b-a3b"}
    mix = load_model_spec("mixtral-8x7b").cfg.param_counts()["total"]
    qwen = load_model_spec("qwen3-30b-a3b").cfg.param_counts()["total"]
    assert 46.0e9 < mix < 47.5e9 and 30.0e9 < qwen < 31.0e9
    ds = load_model_spec("deepseek-v3")
    assert ds.cfg.n_layers == 58 and ds.cfg.n_experts == 256
    total = ds.cfg.param_counts()["experts"] + ds.backbone_params
    assert 665e9 < total < 677e9  # 671 B published
    prof = ds.profile()
    assert prof.popularity.shape == (58, 256) and np.allclose(prof.popularity.sum(1), 8)


def test_noisy_measured_losses_are_made_monotone_in_bits():
    cfg = MoEConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2, n_kv_heads=2, n_experts=2, top_k=1,
                    expert_hidden=64)
    doc = synthetic_profile(cfg, seed=0).to_dict(include_coactivation=False)
    doc["experts"][0]["loss_increase"].update({"4": 0.001, "8": 0.003})  # noise: 8 bits "worse" than 4
    doc["experts"][1]["loss_increase"]["3"] = -0.01  # noise: quantization "helps"
    prof = profile_from_dict(doc)
    i4, i8 = prof.bit_index(4), prof.bit_index(8)
    assert prof.loss_nats[0, 0, i4] == pytest.approx(0.003) and prof.loss_nats[0, 0, i8] == pytest.approx(0.003)
    assert (np.diff(prof.loss_nats, axis=2) <= 0).all() and (prof.loss_nats >= 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bit_allocation_is_close_to_the_exact_ilp(seed):
    allocate = pytest.importorskip("coel_model.allocate")
    from controller.strategies import allocate_for_budget
    cfg = MoEConfig(vocab_size=64, d_model=64, n_layers=3, n_heads=2, n_kv_heads=2, n_experts=6, top_k=2,
                    expert_hidden=128)
    prof = synthetic_profile(cfg, seed=seed, skew=1.2)
    table = allocate.costs_from_profile(prof, weighting="measured")
    for avg_bits in (2.5, 3.0, 4.5):
        budget = allocate.budget_bytes_for_avg_bits(table, avg_bits)
        exact = allocate.solve_ilp(table, budget)
        ours = allocate_for_budget(prof, budget, prof.bits)
        assert prof.expert_bytes(ours).sum() <= budget
        our_loss = float(prof.expert_loss(ours).sum())
        assert our_loss <= exact.predicted_loss * 1.10 + 1e-12, (avg_bits, our_loss, exact.predicted_loss)


def test_malformed_plan_files_are_rejected_with_the_place():
    from controller.plan import Plan
    from controller.cluster import Cluster, Link, Server
    cfg = MoEConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, n_experts=4, top_k=2,
                    expert_hidden=64)
    prof = synthetic_profile(cfg, seed=0)
    cl = Cluster((Server("a", 10 << 20, 1e9),), ())
    doc = plan(prof, cl, single_class("a"), "coel").to_dict()
    bad = json.loads(json.dumps(doc))
    bad["placement"][1][2] = []
    with pytest.raises(ConfigError, match="layer 1 expert 2 is placed on no server"):
        Plan.from_dict(bad, "p.json")
    bad = json.loads(json.dumps(doc))
    bad["bits"][0][1] = 5
    with pytest.raises(ConfigError, match="layer 0 expert 1: bit width 5"):
        Plan.from_dict(bad, "p.json")
    with pytest.raises(ConfigError, match="not a plan"):
        Plan.from_dict({"format": "x"}, "p.json")


def test_costs_from_the_real_measurement_function():
    comp = pytest.importorskip("nodes.compression")
    import torch
    from coel_model.model import MoEModel, init_weights
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = MoEConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, n_experts=4, top_k=2,
                    expert_hidden=64, max_seq_len=64)
    model = MoEModel(cfg)
    init_weights(model, 0)
    model.eval()
    tokens = torch.randint(0, 128, (1, 48))
    settings = [comp.CompressionSettings(act_dtype="int8"),
                comp.CompressionSettings(act_dtype="int8", prune_beta=0.6)]
    with torch.inference_mode():
        rows = comp.measure_compression_cost(model, tokens, settings)
    costs = costs_from_measurements(rows)
    assert len(costs) == 3 and costs[0].name == "none"
    assert 0.4 < costs[1].bytes_factor < 0.7  # int8 rows vs fp16
    assert costs[2].calls_factor <= 1.0
    prop = propose(LinkView("a|b", 1, 10), costs, TRAFFIC, quality_budget_nats=10.0, slo_request_ms=1e6)
    assert prop[0].name != "none"  # a 1 Mbit/s link pays for compression
