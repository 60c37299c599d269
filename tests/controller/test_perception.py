"""Perception: the measured report (nodes/perception.py) becomes Server fields
(controller/perception.py) and the cost model uses them instead of nominal constants."""
from __future__ import annotations

import pytest

from coel_model.config import MoEConfig
from controller.cluster import Cluster, Link, Server
from controller.costmodel import evaluate
from controller.perception import CPU_SHARE_EXPONENT, apply_perception, expert_line, server_fields
from controller.plan import PlanOptions, single_class
from controller.planner import plan
from controller.profile import synthetic_profile
from controller.costmodel import layout_from_plan


def report(call_ms=0.05, gbps=2.0, msg=0.4, backbone=None):
    rows = [{"bits": b, "batch": 1, "nbytes": nb, "ms": call_ms + nb / (gbps * 1e9) * 1e3}
            for b, nb in ((2, 100_000), (4, 200_000), (16, 800_000))]
    r = {"version": 1, "expert": {"rows": rows}, "msg_rtt_ms": msg, "storage": {"ms_fixed": 0.7, "ms_per_mb": 2.0}}
    if backbone:
        r["backbone"] = backbone
    return r


@pytest.mark.unit
def test_expert_line_recovers_fixed_cost_and_speed():
    icpt, bps = expert_line(report(0.05, 2.0)["expert"]["rows"])
    assert icpt == pytest.approx(0.05, rel=1e-6) and bps == pytest.approx(2e9, rel=1e-6)
    assert expert_line([]) is None


@pytest.mark.unit
def test_fields_and_servers_without_an_entry_get_the_scaled_backbone():
    servers = (Server("a", 10 << 20, 2e9), Server("b", 10 << 20, 1e9))
    cl = Cluster(servers, (Link("a", "hub", 100, 1), Link("b", "hub", 100, 1)), nodes=("hub",))
    bb = {"layer_decode_ms": 0.5, "prefill_token_layer_ms": 0.02, "head_ms": 0.1}
    out, notes = apply_perception(cl, {"a": report(), "b": report(msg=0.6)}, {"a": {"msg_rtt_ms": 0.9, "backbone": bb}})
    a, b = out.server("a"), out.server("b")
    assert a.msg_ms == 0.9 and b.msg_ms == 0.6  # the slower process on the server
    assert a.call_ms == pytest.approx(0.05) and a.bytes_per_s == pytest.approx(2e9)
    assert a.storage_ms == 0.7 and a.storage_bytes_per_s == pytest.approx(5e8)
    assert a.layer_decode_ms == 0.5 and b.layer_decode_ms == pytest.approx(1.0)  # b's nominal speed is half
    assert len(notes) == 2 and "perceived a" in notes[0]
    assert server_fields(None, None) == {}
    same, none = apply_perception(cl, {}, {})
    assert same == cl and none == []


@pytest.mark.unit
def test_cost_model_uses_the_perceived_figures_for_every_strategy():
    cfg = MoEConfig(vocab_size=256, d_model=64, n_layers=3, n_heads=4, n_kv_heads=4, n_experts=6, top_k=2,
                    expert_hidden=128)
    prof = synthetic_profile(cfg, seed=1)
    need = prof.backbone_bytes + float(prof.nbytes[:, :, prof.bit_index(4)].sum())
    servers = tuple(Server(f"s{i}", int(need * 0.7), 2e9) for i in range(3))
    cl = Cluster(servers, tuple(Link(f"s{i}", "hub", 100, 1) for i in range(3)), nodes=("hub",))
    reqs = single_class("s0")
    slow_bb = {"layer_decode_ms": 5.0, "prefill_token_layer_ms": 0.5, "head_ms": 1.0}
    seen, _ = apply_perception(cl, {f"s{i}": report(msg=2.0) for i in range(3)}, {"s0": {"backbone": slow_bb}})
    for strategy in ("coel", "uniform", "pipeline", "offload", "random"):
        p = plan(prof, cl, reqs, strategy)
        lay, _ = layout_from_plan(p, prof, cl)
        nominal = evaluate(prof, cl, reqs, lay, PlanOptions())[0]
        measured = evaluate(prof, seen, reqs, lay, PlanOptions())[0]
        # every layer's backbone now costs >= 5 ms wherever it runs, plus 1 ms of head
        assert measured.token_ms >= nominal.token_ms + 3 * 5.0 * 0.9, strategy
        assert measured.ttft_ms > nominal.ttft_ms, strategy


@pytest.mark.integration
def test_perceive_measures_every_part_quickly():
    import time

    import torch

    from coel_model.model import MoEModel
    from nodes.perception import perceive
    cfg = MoEConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, n_experts=4, top_k=2,
                    expert_hidden=128)
    t0 = time.perf_counter()
    r = perceive(MoEModel(cfg), (64, 128))
    assert time.perf_counter() - t0 < 20
    assert {row["bits"] for row in r["expert"]["rows"]} == {2, 3, 4, 8, 16}
    assert all(row["ms"] > 0 for row in r["expert"]["rows"])
    assert r["msg_rtt_ms"] > 0 and r["storage"]["ms_fixed"] >= 0
    assert r["backbone"]["layer_decode_ms"] > 0 and r["backbone"]["n_layers"] == 2
    f = server_fields(r, r)
    assert {"call_ms", "bytes_per_s", "msg_ms", "layer_decode_ms", "storage_ms"} <= set(f)
    assert torch.get_num_threads() >= 1


@pytest.mark.unit
def test_a_cpu_capped_server_is_slower_by_its_share():
    capped = dict(report(), limits={"cgroup_cpu_cores": 0.5})
    f = server_fields(capped, {"backbone": {"layer_decode_ms": 0.2, "head_ms": 0.1}, "limits": {"cgroup_cpu_cores": 0.5}})
    slow = 0.5 ** -CPU_SHARE_EXPONENT
    assert f["msg_ms"] == pytest.approx(0.4 * slow) and f["layer_decode_ms"] == pytest.approx(0.2 * slow)
    assert f["call_ms"] == pytest.approx(0.05 * slow) and f["bytes_per_s"] == pytest.approx(2e9 / slow)
    free = server_fields(dict(report(), limits={"cgroup_cpu_cores": 2.0}), None)
    assert free["msg_ms"] == pytest.approx(0.4)
