"""The expert-call fast paths must check and compute exactly what the general paths do."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nodes import protocol as P
from nodes.agent import AgentConfig, serve_in_thread
from nodes.local import free_port
from nodes.transport import AgentClient

torch.set_num_threads(1)

_values = st.one_of(st.integers(-(1 << 64), 1 << 64), st.booleans(), st.none(), st.floats(allow_nan=False),
                    st.text(max_size=3), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))
_keys = st.sampled_from(["layer", "expert", "queue_ns", "compute_ns", "batch", "echo", "compression", "meta", "x"])


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([P.MsgType.EXPERT_CALL, P.MsgType.EXPERT_REPLY, P.MsgType.PROBE]),
       st.dictionaries(_keys, _values, max_size=4))
def test_fast_body_check_never_accepts_what_the_generic_check_rejects(mtype, body):
    if not P._fast_body_ok(mtype, body):
        return
    P._check_fields("body", body, P.BODY_SCHEMAS[mtype], mtype in P.OPEN_BODIES, 0)  # must not raise


@pytest.mark.parametrize("body,why", [({"layer": True, "expert": 0}, "bool"), ({"layer": 0, "expert": -1}, "range"),
                                      ({"layer": 0, "expert": 0, "x": 1}, "unknown"),
                                      ({"layer": 1 << 21, "expert": 0}, "range"), ({"layer": 0}, "missing")])
def test_malformed_expert_call_bodies_still_rejected(body, why):
    frames = P.encode(P.MsgType.EXPERT_CALL, 3, body, {"x": torch.zeros(1, 8)})
    with pytest.raises(P.ProtocolError):
        P.decode(frames)


def test_numpy_and_torch_tensors_encode_to_the_same_frames():
    t = torch.arange(12, dtype=torch.float16).reshape(3, 4)
    a = P.encode(P.MsgType.PROBE, 1, {}, {"x": t}, sent_ns=5)
    b = P.encode(P.MsgType.PROBE, 1, {}, {"x": t.numpy()}, sent_ns=5)
    assert [bytes(f) for f in a] == [bytes(f) for f in b]
    # the general path: requires grad, non-contiguous, bfloat16, empty
    odd = {"g": torch.ones(2, 3, requires_grad=True), "nc": torch.arange(6.0).reshape(2, 3).t(),
           "bf": torch.tensor([1.5, -2.0], dtype=torch.bfloat16), "z": torch.zeros(0, 4)}
    m = P.decode(P.encode(P.MsgType.PROBE, 1, {}, odd))
    for k, v in odd.items():
        assert m.tensors[k].dtype == v.dtype and torch.equal(m.tensors[k], v.detach()), k
    assert m.arrays["bf"][1] == "bfloat16"
    with pytest.raises(P.ProtocolError, match="not sendable"):
        P.encode(P.MsgType.PROBE, 1, {}, {"b": torch.ones(2, dtype=torch.bool)})


def test_decoded_tensors_are_views_made_on_demand():
    x = torch.randn(2, 16)
    frames = P.encode(P.MsgType.EXPERT_CALL, 9, {"layer": 1, "expert": 2}, {"x": x})
    m = P.decode(frames)
    assert m._tensors is None  # nothing built yet
    assert torch.equal(m.tensors["x"], x) and m.tensors["x"] is m.tensors["x"]
    assert np.shares_memory(m.arrays["x"][0], np.frombuffer(frames[1], np.float32))


class _Hold:
    """Delay hook releasing every message at one fixed moment, so two replies come due together."""

    def __init__(self, release_ns: int):
        self.release_ns = release_ns

    def hold_until_ns(self, peer_addr: str, sent_ns: int, nbytes: int) -> int:
        return self.release_ns


@pytest.fixture
def agent_ep():
    ep = f"tcp://127.0.0.1:{free_port()}"
    agent, th = serve_in_thread(AgentConfig(endpoint=ep, memory_budget_bytes=1 << 22, name="hot", fp16_kernel="exact"))
    try:
        yield ep
    finally:
        agent.stop()
        th.join(5)


@pytest.mark.integration
def test_agent_fast_path_replies_in_request_dtype_and_matches_module(agent_ep):
    d, hid = 32, 16
    g = torch.Generator().manual_seed(0)
    w = {f"0/{k}": (torch.randn(*s, generator=g) * 0.1).half()
         for k, s in (("w_gate", (hid, d)), ("w_up", (hid, d)), ("w_down", (d, hid)))}
    c = AgentClient(agent_ep, name="t")
    try:
        c.call(P.MsgType.LOAD_SHARD, {"shards": [{"layer": 0, "expert": 0, "bits": 16, "d_model": d, "hidden": hid}]}, w)
        wg, wu, wd = (w[f"0/{k}"].float() for k in ("w_gate", "w_up", "w_down"))
        for dt in (torch.float16, torch.float32, torch.bfloat16):
            x = torch.randn(3, d, generator=g).to(dt)
            y = c.call(P.MsgType.EXPERT_CALL, {"layer": 0, "expert": 0}, {"x": x}).tensors["y"]
            xf = x.float()
            lin = torch.nn.functional.linear
            ref = lin(torch.nn.functional.silu(lin(xf, wg)) * lin(xf, wu), wd)
            assert y.dtype == dt and y.shape == (3, d)
            assert torch.equal(y, ref.to(dt)), dt
        with pytest.raises(Exception, match="takes \\(n, 32\\)"):
            c.call(P.MsgType.EXPERT_CALL, {"layer": 0, "expert": 0}, {"x": torch.zeros(1, 8).half()})
    finally:
        c.close()


@pytest.mark.integration
def test_client_keeps_replies_that_come_due_together(agent_ep):
    c = AgentClient(agent_ep, name="t", delay=_Hold(time.monotonic_ns() + 300_000_000))
    try:
        for rid in (101, 102):
            c.send(P.encode(P.MsgType.PROBE, rid, {"echo": rid}, src="t"))
        time.sleep(0.1)  # both replies are in the socket; the first recv holds both, then both come due
        got = [c.recv(1000), c.recv(1000)]
        assert sorted(m.req_id for m in got if m is not None) == [101, 102]
    finally:
        c.close()
