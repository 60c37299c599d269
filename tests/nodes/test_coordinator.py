"""Coordinator: same tokens as the local model, replicas, failover, bounded failure, spans, swaps."""
from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from coel_model.config import MoEConfig
from coel_model.generate import generate
from coel_model.model import MoEModel, init_weights
from nodes import protocol as P
from nodes.agent import AgentConfig, serve_in_thread
from nodes.coordinator import (LOCAL, Coordinator, CoordinatorConfig, RemoteExpertError, ReplicaChooser,
                               RemoteExpertStub)
from nodes.local import LocalCluster, deploy_experts, free_port, round_robin_placement
from nodes.transport import AgentClient

torch.set_num_threads(1)
CFG = MoEConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4, top_k=2,
                expert_hidden=48, max_seq_len=64)


def tiny_model(seed: int = 0) -> MoEModel:
    m = MoEModel(CFG)
    init_weights(m, seed)
    for l in range(CFG.n_layers):  # fp16-representable expert weights, as an fp16 checkpoint holds
        for e in range(CFG.n_experts):
            for lin in (m.expert(l, e).w_gate, m.expert(l, e).w_up, m.expert(l, e).w_down):
                lin.weight.data = lin.weight.data.half().float()
    return m.eval()


class ThreadCluster:
    """In-process agents (threads) with the LocalCluster interface used by deploy_experts."""

    def __init__(self, n: int):
        self.agents = [serve_in_thread(AgentConfig(f"tcp://127.0.0.1:{free_port()}", 1 << 20, name=f"a{i}"))
                       for i in range(n)]
        self.endpoints = [a.cfg.endpoint for a, _ in self.agents]
        self.clients = [AgentClient(ep) for ep in self.endpoints]

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        for a, th in self.agents:
            a.stop()
            th.join(5)


@pytest.fixture
def cluster():
    c = ThreadCluster(3)
    try:
        yield c
    finally:
        c.stop()


@pytest.mark.integration
def test_remote_generation_equals_local_and_writes_spans(cluster, tmp_path):
    model = tiny_model()
    prompt = [3, 14, 15, 92, 65]
    want = generate(model, prompt, 6)
    placement = round_robin_placement(CFG.n_layers, CFG.n_experts, cluster.endpoints)
    placement[(0, 0)] = [LOCAL]  # one expert stays on the entry server
    deploy_experts(model, cluster, {k: v for k, v in placement.items() if v != [LOCAL]})
    trace = tmp_path / "coord.jsonl"
    coord = Coordinator(model, placement, cfg=CoordinatorConfig(trace_path=str(trace)))
    try:
        freed = coord.strip_remote_experts()
        assert freed == 7 * 3 * 32 * 48 * 4 and isinstance(model.expert(0, 1), RemoteExpertStub)
        got = coord.generate(prompt, 6, trace_id="req1")
        assert got == want
        assert coord.bytes_sent > 0 and coord.failovers == 0
    finally:
        coord.close()
    spans = [json.loads(l) for l in trace.read_text().splitlines()]
    names = {s["span"] for s in spans}
    assert {"backbone", "encode", "wire", "decode", "combine", "request"} <= names
    assert all(s["trace_id"] == "req1" and s["t1_ns"] >= s["t0_ns"] for s in spans)
    wire = [s for s in spans if s["span"] == "wire"][0]["attrs"]
    assert wire["rtt_ns"] >= wire["remote_compute_ns"] + wire["remote_queue_ns"] >= 0


def test_replica_chooser_prefers_fast_and_idle_and_avoids_banned():
    ch = ReplicaChooser(alpha=0.5, ban_s=10, default_rtt_ms=1.0)
    ch.observe("a", 4.0)
    ch.observe("b", 1.0)
    assert ch.choose(["a", "b"], set(), 0) == "b"
    ch.inflight["b"] = 4  # 1 ms * 5 > 4 ms * 1
    assert ch.choose(["a", "b"], set(), 0) == "a"
    ch.inflight["b"] = 0
    ch.fail("b", now=100)
    assert ch.choose(["a", "b"], set(), 105) == "a"
    assert ch.choose(["a", "b"], set(), 111) == "b"  # ban expired
    assert ch.choose(["a", "b"], {"a", "b"}, 0) is None
    ch.observe("a", 2.0)
    assert ch.rtt_ms["a"] == pytest.approx(3.0)


@pytest.mark.integration
def test_failover_to_replica_when_a_holder_is_dead(cluster):
    model = tiny_model(1)
    prompt = [5, 6, 7]
    want = generate(model, prompt, 4)
    dead = f"tcp://127.0.0.1:{free_port()}"  # nothing listens here
    placement = {k: [dead, cluster.endpoints[i % 3]] for i, k in
                 enumerate((l, e) for l in range(CFG.n_layers) for e in range(CFG.n_experts))}
    deploy_experts(model, cluster, {k: v[1:] for k, v in placement.items()})
    coord = Coordinator(model, placement, cfg=CoordinatorConfig(call_timeout_s=0.3))
    coord.chooser.observe(dead, 0.01)  # make the dead one look best
    try:
        assert coord.generate(prompt, 4) == want
        assert coord.failovers >= 1
        assert coord.chooser.banned_until.get(dead, 0) > 0
    finally:
        coord.close()


@pytest.mark.integration
def test_no_holder_answers_gives_clear_error_within_bound():
    model = tiny_model(2)
    dead = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    placement = {(l, e): dead for l in range(CFG.n_layers) for e in range(CFG.n_experts)}
    coord = Coordinator(model, placement, cfg=CoordinatorConfig(call_timeout_s=0.25, layer_deadline_s=2.0))
    t0 = time.monotonic()
    try:
        with pytest.raises(RemoteExpertError) as ei:
            coord.generate([1, 2], 2)
    finally:
        coord.close()
    took = time.monotonic() - t0
    assert took < 1.5, took  # 2 replicas x 0.25 s, never a hang
    msg = str(ei.value)
    assert "layer 0 expert" in msg and "no reply within 0.25 s" in msg and dead[0] in msg and dead[1] in msg


@pytest.mark.integration
def test_error_reply_fails_over_and_placement_swap_is_atomic(cluster):
    model = tiny_model(3)
    prompt = [9, 8, 7, 6]
    want = generate(model, prompt, 3)
    a, b, c = cluster.endpoints
    full = {(l, e): [b] for l in range(CFG.n_layers) for e in range(CFG.n_experts)}
    deploy_experts(model, cluster, full)
    # `a` holds nothing: every call to it gets ERROR not_loaded and must go to `b`
    coord = Coordinator(model, {k: [a, b] for k in full}, cfg=CoordinatorConfig(call_timeout_s=2))
    coord.chooser.observe(a, 0.001)
    try:
        assert coord.generate(prompt, 3) == want
        assert coord.failovers >= 1
        # move everything to `c` (make-before-break): load there, swap, unload from `b`
        deploy_experts(model, cluster, {k: [c] for k in full})
        coord.set_placement({k: [c] for k in full})
        cluster.clients[1].call(P.MsgType.UNLOAD_SHARD, {"shards": [list(k) for k in full]})
        before = cluster.agents[2][0].counters["expert_calls"]
        assert coord.generate(prompt, 3) == want
        assert cluster.agents[2][0].counters["expert_calls"] > before
    finally:
        coord.close()


@pytest.mark.integration
def test_killing_an_agent_mid_request_completes_through_replica():
    """Real processes: SIGKILL one agent while a generation is running."""
    model = tiny_model(4)
    prompt = list(range(1, 9))
    n_new = 40
    want = generate(model, prompt, n_new)
    with LocalCluster(2, 1.0) as lc:
        placement = {(l, e): list(lc.endpoints) for l in range(CFG.n_layers) for e in range(CFG.n_experts)}
        deploy_experts(model, lc, placement)
        coord = Coordinator(model, placement, cfg=CoordinatorConfig(call_timeout_s=0.5, layer_deadline_s=3))
        killed = threading.Event()

        def on_token(step: int, tok: int) -> None:
            if step == 5 and not killed.is_set():
                victim = min(lc.endpoints, key=lambda ep: coord.chooser.rtt_ms.get(ep, 1.0))
                lc.kill(lc.endpoints.index(victim))
                killed.set()
        try:
            t0 = time.monotonic()
            got = coord.generate(prompt, n_new, on_token=on_token)
            assert killed.is_set() and got == want and coord.failovers >= 1
            assert time.monotonic() - t0 < 20
        finally:
            coord.close()


@pytest.mark.integration
def test_coordinator_holds_replies_for_the_emulated_path_delay(cluster, tmp_path):
    from coel_model.model import route
    from nodes.delayqueue import DelayTable, write_delay_file
    model = tiny_model(5)
    placement = round_robin_placement(CFG.n_layers, CFG.n_experts, cluster.endpoints)
    deploy_experts(model, cluster, placement)
    path = tmp_path / "delays.json"
    write_delay_file(path, {"mode": "emulated", "peers": {"127.0.0.1": {"delay_ms": 30.0}}})
    coord = Coordinator(model, placement, delay=DelayTable(path))
    try:
        h = torch.randn(3, CFG.d_model)
        routing = route(model.layers[0].moe.router, h, CFG.top_k, True)
        t0 = time.monotonic()
        out = coord(0, routing, h)
        took = time.monotonic() - t0
        assert set(out) == set(routing.groups) and 0.030 <= took < 0.5, took
        assert all(rtt >= 30.0 for rtt in coord.chooser.rtt_ms.values())
    finally:
        coord.close()
