"""Node agent: shard loading and budget, expert calls and batching, bad input, heartbeats, RSS."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import msgpack
import pytest
import torch
import zmq

from coel_model.model import SwiGLUExpert
from nodes import protocol as P
from nodes.agent import MB, Agent, AgentConfig, _Pending, serve_in_thread
from nodes.shards import expert_tensors
from nodes.local import free_port
from nodes.transport import AgentClient, NodeTimeout, RemoteError

pytestmark = pytest.mark.integration

D, HID = 32, 64
torch.set_num_threads(1)


def _ep() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def agent():
    a, th = serve_in_thread(AgentConfig(_ep(), memory_budget_bytes=64 << 10, name="t"))
    c = AgentClient(a.cfg.endpoint, name="test")
    try:
        yield a, c
    finally:
        c.close()
        a.stop()
        th.join(5)
        assert not th.is_alive()


def _expert(seed: int) -> SwiGLUExpert:
    torch.manual_seed(seed)
    return SwiGLUExpert(D, HID)


def _load(c: AgentClient, keys, bits: int = 16, seed: int = 0) -> P.Message:
    descs, tensors = [], {}
    for i, (l, e) in enumerate(keys):
        descs.append({"layer": l, "expert": e, "bits": bits, "d_model": D, "hidden": HID})
        for n, t in expert_tensors(_expert(seed + 100 * l + e), bits).items():
            tensors[f"{i}/{n}"] = t
    return c.call(P.MsgType.LOAD_SHARD, {"shards": descs}, tensors, timeout_s=5)


def _call(c: AgentClient, l: int, e: int, x: torch.Tensor) -> P.Message:
    return c.call(P.MsgType.EXPERT_CALL, {"layer": l, "expert": e}, {"x": x}, timeout_s=5)


def _reference(l: int, e: int, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    ex = _expert(seed + 100 * l + e)
    for lin in (ex.w_gate, ex.w_up, ex.w_down):  # what an fp16 shard holds, computed in fp32
        lin.weight.data = lin.weight.data.half().float()
    with torch.no_grad():
        return ex(x)


def test_load_call_unload_and_status(agent):
    a, c = agent
    r = _load(c, [(0, 1), (2, 3)])
    per = 3 * D * HID * 2
    assert r.body["loaded"] == [[0, 1], [2, 3]] and r.body["memory_used_bytes"] == 2 * per
    x = torch.randn(5, D)
    y = _call(c, 2, 3, x)
    assert y.type == P.MsgType.EXPERT_REPLY
    assert torch.equal(y.tensors["y"], _reference(2, 3, x))
    assert y.body["compute_ns"] > 0 and y.body["queue_ns"] >= 0
    yh = _call(c, 0, 1, x.half())  # fp16 activations come back as fp16
    assert yh.tensors["y"].dtype == torch.float16
    st = c.call(P.MsgType.STATUS).body
    assert [(s["layer"], s["expert"]) for s in st["shards"]] == [(0, 1), (2, 3)]
    assert st["stats"]["rss_bytes"] > 0 and st["memory_budget_bytes"] == 64 << 10
    r = c.call(P.MsgType.UNLOAD_SHARD, {"shards": [[0, 1], [9, 9]]})
    assert r.body["unloaded"] == [[0, 1]] and r.body["memory_used_bytes"] == per
    with pytest.raises(RemoteError, match="not_loaded.*layer 0, expert 1"):
        _call(c, 0, 1, x)


def test_over_budget_load_is_refused_atomically(agent):
    a, c = agent
    per = 3 * D * HID * 2  # 12 KiB per fp16 expert, budget 64 KiB -> 5 fit
    _load(c, [(0, 0), (0, 1)])
    x = torch.randn(2, D)
    before = _call(c, 0, 0, x).tensors["y"].clone()
    with pytest.raises(RemoteError) as ei:
        _load(c, [(1, 0), (1, 1), (1, 2), (1, 3)])
    assert ei.value.code == "over_budget"
    assert str(6 * per) in ei.value.reason and str(64 << 10) in ei.value.reason
    st = c.call(P.MsgType.STATUS).body
    assert [(s["layer"], s["expert"]) for s in st["shards"]] == [(0, 0), (0, 1)]  # nothing half loaded
    assert st["memory_used_bytes"] == 2 * per
    assert torch.equal(_call(c, 0, 0, x).tensors["y"], before)  # loaded shards keep serving
    _load(c, [(0, 0)], seed=7)  # replacing a shard counts its old bytes as freed
    assert c.call(P.MsgType.STATUS).body["memory_used_bytes"] == 2 * per
    t = expert_tensors(_expert(9), 16)
    with pytest.raises(RemoteError, match="already loaded and replace=false"):
        c.call(P.MsgType.LOAD_SHARD, {"shards": [{"layer": 0, "expert": 1, "bits": 16, "d_model": D, "hidden": HID}],
                                      "replace": False}, {f"0/{k}": v for k, v in t.items()})


def test_on_demand_shards_live_in_storage_and_only_a_buffer_counts(agent):
    """Offload plans: more experts than the budget holds, kept on storage; a call loads one into
    an LRU buffer of buffer_slots (charged to the budget) and pays the load."""
    a, c = agent
    per = 3 * D * HID * 2  # 12 KiB per fp16 expert, budget 64 KiB: 5 would fit resident, 8 do not
    keys = [(0, e) for e in range(8)]
    descs, tensors = [], {}
    for i, (l, e) in enumerate(keys):
        descs.append({"layer": l, "expert": e, "bits": 16, "d_model": D, "hidden": HID, "resident": False,
                      "buffer_slots": 2})
        for n, t in expert_tensors(_expert(100 * l + e), 16).items():
            tensors[f"{i}/{n}"] = t
    r = c.call(P.MsgType.LOAD_SHARD, {"shards": descs}, tensors, timeout_s=5)
    assert r.body["memory_used_bytes"] == 2 * per  # the buffer's worst case, not 8 experts
    _load(c, [(1, 0), (1, 1)])  # resident ones next to them
    assert c.call(P.MsgType.STATUS).body["memory_used_bytes"] == 4 * per
    x = torch.randn(3, D)
    for e in (0, 1, 2, 0, 5):
        assert torch.equal(_call(c, 0, e, x).tensors["y"], _reference(0, e, x))
    assert a.store.ondemand_loads == 5 and len(a.store.buffer) == 2  # (0,0) was evicted by (0,2)
    assert torch.equal(_call(c, 0, 5, x).tensors["y"], _reference(0, 5, x))  # buffered: no load
    assert a.store.ondemand_loads == 5
    st = c.call(P.MsgType.STATUS).body
    assert sum(1 for s in st["shards"] if s.get("resident") is False) == 8
    with pytest.raises(RemoteError) as ei:  # 4 more resident would need 8 x 12 KiB with the buffer
        _load(c, [(2, 0), (2, 1), (2, 2)])
    assert ei.value.code == "over_budget"
    c.call(P.MsgType.UNLOAD_SHARD, {"shards": [[0, e] for e in range(8)]})
    assert c.call(P.MsgType.STATUS).body["memory_used_bytes"] == 2 * per
    assert not os.listdir(a.store.storage_dir())


def test_bad_shard_tensors_are_refused(agent):
    a, c = agent
    t = expert_tensors(_expert(0), 16)
    desc = {"layer": 0, "expert": 0, "bits": 16, "d_model": D, "hidden": HID + 1}
    with pytest.raises(RemoteError, match="bad_shard.*w_gate"):
        c.call(P.MsgType.LOAD_SHARD, {"shards": [desc]}, {f"0/{k}": v for k, v in t.items()})
    with pytest.raises(RemoteError, match="bad_shard"):
        c.call(P.MsgType.LOAD_SHARD, {"shards": [dict(desc, hidden=HID)]}, {"7/w_gate": t["w_gate"]})
    assert c.call(P.MsgType.STATUS).body["shards"] == []


def test_quantized_shard_over_the_wire(agent):
    quant = pytest.importorskip("coel_model.quant")
    from coel_model import packing
    a, c = agent
    ex = _expert(3)
    q = quant.quantize_expert(ex, quant.QuantSpec(bits=4, group_size=32))
    desc = {"layer": 1, "expert": 2, "bits": 4, "group_size": 32, "d_model": D, "hidden": HID}
    r = c.call(P.MsgType.LOAD_SHARD, {"shards": [desc]}, {f"0/{k}": v for k, v in q.to_tensors().items()})
    assert r.body["memory_used_bytes"] == q.nbytes == packing.packed_expert_bytes(D, HID, q.spec)
    x = torch.randn(4, D)
    with torch.no_grad():
        assert torch.allclose(_call(c, 1, 2, x).tensors["y"], q(x), atol=1e-5)


def test_malformed_oversized_unknown_get_error_and_agent_keeps_serving(agent):
    a, c = agent
    _load(c, [(0, 0)])
    bad = [
        [b"not msgpack \xc1"],
        [msgpack.packb({"v": 1, "t": 99, "id": 5, "sent_ns": 0, "body": {}, "tensors": []})],
        [msgpack.packb({"v": 2, "t": 7, "id": 6, "sent_ns": 0, "body": {}, "tensors": []})],
        [b"\x80" + b"\x00" * (P.MAX_HEADER_BYTES + 10)],
        P.encode(P.MsgType.EXPERT_CALL, 8, {"layer": 0, "expert": 0}, {"x": torch.zeros(3, D)})[:1],
        P.encode(P.MsgType.EXPERT_REPLY, 9, {"queue_ns": 0, "compute_ns": 0}),  # valid, but not a request
        P.encode(P.MsgType.EXPERT_CALL, 10, {"layer": 0, "expert": 0}, {"x": torch.zeros(3, D + 1)}),
    ]
    for frames in bad:
        c.send(frames)
        r = c.recv(2000)
        assert r is not None and r.type == P.MsgType.ERROR, frames[0][:40]
        assert r.body["reason"]
    x = torch.randn(3, D)
    assert torch.equal(_call(c, 0, 0, x).tensors["y"], _reference(0, 0, x))
    assert a.counters["malformed"] >= 5


def test_fuzz_then_a_correct_call_still_works(agent):
    a, c = agent
    _load(c, [(0, 0)])
    rng = random.Random(0)
    keys = ["v", "t", "id", "sent_ns", "src", "trace", "body", "tensors"]
    n = 150
    for i in range(n):
        if i % 2:
            frames = [rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 3))]
        else:
            h = {k: rng.choice([None, 1, -1, 2**40, "x", [], {}, [["x", "float32", [1, D]]], {"layer": 0}])
                 for k in rng.sample(keys, rng.randint(0, len(keys)))}
            h["v"] = 1
            h["t"] = rng.randint(0, 14)
            frames = [msgpack.packb(h)] + [rng.randbytes(rng.choice([0, 4 * D]))
                                           for _ in range(rng.randint(0, 2))]
        c.send(frames)
    got = 0
    while c.recv(300) is not None:
        got += 1
    assert got >= n * 0.9  # (almost) every piece of garbage got an answer
    x = torch.randn(2, D)
    assert torch.equal(_call(c, 0, 0, x).tensors["y"], _reference(0, 0, x))


def test_concurrent_callers_of_one_expert_are_batched():
    """Deterministic: feed the agent's processing step several pending calls at once."""
    a = Agent(AgentConfig("tcp://127.0.0.1:1", 1 << 20))
    a.store.load([{"layer": 0, "expert": 0, "bits": 32, "d_model": D, "hidden": HID},
                  {"layer": 0, "expert": 1, "bits": 32, "d_model": D, "hidden": HID}],
                 {f"{i}/{k}": v for i in (0, 1) for k, v in expert_tensors(_expert(i), 32).items()})
    replies: dict[int, P.Message] = {}
    xs = {rid: torch.randn(rid % 3 + 1, D) for rid in range(1, 8)}
    batch = []
    for rid, x in xs.items():
        frames = P.encode(P.MsgType.EXPERT_CALL, rid, {"layer": 0, "expert": rid % 2}, {"x": x})
        batch.append(_Pending(lambda f: replies.__setitem__(P.decode(f).req_id, P.decode(f)), P.decode(frames),
                              time.monotonic_ns()))
    bad = P.encode(P.MsgType.EXPERT_CALL, 99, {"layer": 0, "expert": 0}, {"x": torch.randn(2, D + 1)})
    batch.append(_Pending(lambda f: replies.__setitem__(P.decode(f).req_id, P.decode(f)), P.decode(bad),
                          time.monotonic_ns()))
    a._process(batch)
    bad_reply = replies.pop(99)  # a caller with wrong-width rows fails alone
    assert bad_reply.type == P.MsgType.ERROR and "takes (n, 32)" in bad_reply.body["reason"]
    assert sorted(replies) == sorted(xs)
    for rid, x in xs.items():
        r = replies[rid]
        with torch.no_grad():
            ref = _expert(rid % 2)(x)
        assert torch.allclose(r.tensors["y"], ref, atol=1e-6)
        assert r.body["batch"] == (3 if rid % 2 == 0 else 4)  # ids 2,4,6 -> expert 0; 1,3,5,7 -> expert 1
    assert a.store.shards[(0, 0)].calls == 1 and a.store.shards[(0, 1)].calls == 1
    a.ctx.term()


def test_register_heartbeat_and_reconnect():
    ctx = zmq.Context()
    ctrl = ctx.socket(zmq.ROUTER)
    ctrl.linger = 0
    port = ctrl.bind_to_random_port("tcp://127.0.0.1")
    a, th = serve_in_thread(AgentConfig(_ep(), 1 << 20, controller=f"tcp://127.0.0.1:{port}", name="hb",
                                        heartbeat_interval_s=0.05))
    try:
        seen = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len([m for m in seen if m.type == P.MsgType.HEARTBEAT]) < 3:
            if ctrl.poll(200):
                ident, *frames = ctrl.recv_multipart()
                m = P.decode(frames)
                seen.append(m)
                ctrl.send_multipart([ident] + P.encode(P.MsgType.HEARTBEAT if m.type == P.MsgType.HEARTBEAT
                                                       else P.MsgType.OK, m.req_id))
        assert seen[0].type == P.MsgType.REGISTER
        assert seen[0].body["endpoint"] == a.cfg.endpoint and seen[0].body["memory_budget_bytes"] == 1 << 20
        hb = [m for m in seen if m.type == P.MsgType.HEARTBEAT][-1]
        for k in ("cpu_percent", "rss_bytes", "available_bytes", "load1", "memory_used_bytes"):
            assert k in hb.body["stats"]
        # the controller goes silent: after LIVENESS missed beats the agent reconnects and re-registers
        deadline = time.monotonic() + 5
        registers = 0
        while time.monotonic() < deadline and registers < 1:
            if ctrl.poll(200):
                _ident, *frames = ctrl.recv_multipart()
                registers += P.decode(frames).type == P.MsgType.REGISTER
        assert registers == 1 and a.link.counters["reconnects"] >= 1
    finally:
        a.stop()
        th.join(5)
        ctrl.close()
        ctx.term()


def test_rss_growth_tracks_accounted_bytes():
    """A real agent process: RSS after loading ~48 MiB of shards grows by about what it accounts."""
    ep = _ep()
    proc = subprocess.Popen([sys.executable, "-m", "nodes.agent", "--endpoint", ep, "--memory-mb", "64"],
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    c = AgentClient(ep)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                st0 = c.call(P.MsgType.STATUS, timeout_s=1).body
                break
            except NodeTimeout:
                assert time.monotonic() < deadline and proc.poll() is None
        d, hid = 512, 1024  # 3 MiB per fp16 expert
        # warm up torch's compute path (thread pools, allocator) so the baseline holds it
        warm = {"layer": 99, "expert": 0, "bits": 16, "d_model": d, "hidden": hid}
        c.call(P.MsgType.LOAD_SHARD, {"shards": [warm]}, {"0/w_gate": torch.zeros(hid, d).half(),
               "0/w_up": torch.zeros(hid, d).half(), "0/w_down": torch.zeros(d, hid).half()}, timeout_s=20)
        c.call(P.MsgType.EXPERT_CALL, {"layer": 99, "expert": 0}, {"x": torch.randn(1, d)}, timeout_s=10)
        c.call(P.MsgType.UNLOAD_SHARD, {"shards": [[99, 0]]})
        st0 = c.call(P.MsgType.STATUS).body
        for batch in range(4):  # 16 experts in 4 messages
            descs, tensors = [], {}
            for i in range(4):
                descs.append({"layer": batch, "expert": i, "bits": 16, "d_model": d, "hidden": hid})
                tensors.update({f"{i}/w_gate": torch.randn(hid, d).half(), f"{i}/w_up": torch.randn(hid, d).half(),
                                f"{i}/w_down": torch.randn(d, hid).half()})
            c.call(P.MsgType.LOAD_SHARD, {"shards": descs}, tensors, timeout_s=20)
        st1 = c.call(P.MsgType.STATUS).body
        accounted = st1["memory_used_bytes"]
        assert accounted == 16 * 3 * d * hid * 2
        growth = st1["stats"]["rss_bytes"] - st0["stats"]["rss_bytes"]
        assert 0.9 * accounted < growth < 1.1 * accounted + 2 * MB, (growth, accounted)
        for i in range(4):  # serving adds only transient working memory (one expert upcast to fp32)
            c.call(P.MsgType.EXPERT_CALL, {"layer": 0, "expert": i}, {"x": torch.randn(1, d)}, timeout_s=10)
        growth = c.call(P.MsgType.STATUS).body["stats"]["rss_bytes"] - st0["stats"]["rss_bytes"]
        assert growth < accounted + 2 * 3 * d * hid * 4 + 4 * MB, (growth, accounted)  # allocator slack
        with pytest.raises(RemoteError, match="over_budget"):  # 48 MiB + 24 MiB > 64 MiB
            c.call(P.MsgType.LOAD_SHARD, {"shards": [{"layer": 9, "expert": i, "bits": 16, "d_model": d,
                                                       "hidden": hid} for i in range(2)]},
                   {f"{i}/{n}": torch.zeros(*(s)).half() for i in range(2) for n, s in
                    (("w_gate", (hid * 4, d)), ("w_up", (hid * 4, d)), ("w_down", (d, hid * 4)))}, timeout_s=20)
    finally:
        c.close()
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_delay_queue_holds_requests_for_the_path_delay(tmp_path):
    from nodes.delayqueue import DelayTable, write_delay_file
    path = tmp_path / "delays.json"
    write_delay_file(path, {"mode": "emulated", "peers": {"127.0.0.1": {"delay_ms": 40.0}}})
    a, th = serve_in_thread(AgentConfig(_ep(), 1 << 20), delay=DelayTable(path))
    c = AgentClient(a.cfg.endpoint)
    try:
        t0 = time.monotonic()
        c.call(P.MsgType.PROBE, {}, timeout_s=5)
        rtt = time.monotonic() - t0
        assert 0.040 <= rtt < 0.040 + 0.2, rtt  # one way delayed at the agent, reply undelayed here
        # in-band update: SET_PATH_DELAYS replaces the table
        c.call(P.MsgType.SET_PATH_DELAYS, {"delays_ms": {"127.0.0.1": 0.0}}, timeout_s=5)
        t0 = time.monotonic()
        c.call(P.MsgType.PROBE, {}, timeout_s=5)
        assert time.monotonic() - t0 < 0.035
    finally:
        c.close()
        a.stop()
        th.join(5)
