"""Wire protocol: round trips, and every malformed input becomes a ProtocolError with a reason."""
from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nodes import protocol as P


def test_round_trip_all_dtypes_and_fields():
    tensors = {
        "x": torch.randn(3, 8),
        "h": torch.randn(2, 4).half(),
        "b": torch.randn(5).to(torch.bfloat16),
        "q": torch.randint(-127, 127, (4, 4), dtype=torch.int8),
        "u": torch.randint(0, 255, (7,), dtype=torch.uint8),
        "i": torch.arange(6, dtype=torch.int32).view(2, 3),
        "l": torch.arange(3, dtype=torch.int64),
        "z": torch.empty(0, 8),
    }
    frames = P.encode(P.MsgType.PROBE, 42, {"echo": "hi"}, tensors, trace="abc", src="me", sent_ns=123)
    msg = P.decode(frames)
    assert msg.type == P.MsgType.PROBE and msg.req_id == 42 and msg.trace == "abc"
    assert msg.src == "me" and msg.sent_ns == 123 and msg.body == {"echo": "hi"}
    assert list(msg.tensors) == list(tensors)
    for k, t in tensors.items():
        assert msg.tensors[k].dtype == t.dtype and msg.tensors[k].shape == t.shape
        assert torch.equal(msg.tensors[k], t)
    assert msg.nbytes == P.frames_nbytes(frames)


def test_large_tensor_frame_is_a_view_not_a_copy():
    x = torch.randn(1024, 256)
    frames = P.encode(P.MsgType.EXPERT_CALL, 1, {"layer": 0, "expert": 0}, {"x": x})
    assert isinstance(frames[1], memoryview)
    x[0, 0] = 7.0  # the frame aliases the tensor memory (zero copy)
    assert P.decode(frames).tensors["x"][0, 0] == 7.0


def _hdr(**over):
    h = {"v": P.PROTOCOL_VERSION, "t": int(P.MsgType.STATUS), "id": 1, "sent_ns": 0, "src": "", "trace": None,
         "body": {}, "tensors": []}
    h.update(over)
    return msgpack.packb(h)


def _call_hdr(shape=(1, 4), dtype="float32", **body):
    b = {"layer": 0, "expert": 0, **body}
    return _hdr(t=int(P.MsgType.EXPERT_CALL), body=b, tensors=[["x", dtype, list(shape)]])


@pytest.mark.parametrize("frames, reason", [
    ([], "empty"),
    ([b"\xc1garbage"], "not msgpack"),
    ([msgpack.packb([1, 2, 3])], "must be a map"),
    ([_hdr(v=99)], "protocol version"),
    ([_hdr(t=77)], "unknown message type"),
    ([_hdr(extra=1)], "unknown field"),
    ([_hdr(id="x")], "field 'id'"),
    ([_hdr(body=[])], "field 'body'"),
    ([_call_hdr(), b"\x00" * 15], "needs 16 bytes"),
    ([_call_hdr()], "frames follow"),
    ([_call_hdr(dtype="complex64"), b"\x00" * 32], "dtype"),
    ([_call_hdr(shape=(1, 2, 2)), b"\x00" * 16], "2-D"),
    ([_call_hdr(shape=(1, -4)), b"\x00" * 16], "bad shape"),
    ([_call_hdr(dtype="int8"), b"\x00" * 4], "needs compression"),
    ([_hdr(t=int(P.MsgType.EXPERT_CALL), body={"layer": 0, "expert": 0})], "no tensor 'x'"),
    ([_hdr(t=int(P.MsgType.EXPERT_CALL), body={"layer": True, "expert": 0}, tensors=[["x", "float32", [1, 1]]]),
      b"\x00" * 4], "got bool"),
    ([_hdr(t=int(P.MsgType.LOAD_SHARD), body={"shards": [{"layer": 0, "expert": 0, "bits": 5, "d_model": 4,
                                                            "hidden": 4}]})], "bits=5"),
    ([_hdr(t=int(P.MsgType.LOAD_SHARD), body={"shards": []})], "no shards"),
    ([_hdr(t=int(P.MsgType.UNLOAD_SHARD), body={"shards": [[0]]})], "[layer, expert]"),
    ([_hdr(t=int(P.MsgType.ERROR), body={"code": "nope", "reason": ""})], "unknown code"),
    ([_hdr(t=int(P.MsgType.SET_PATH_DELAYS), body={"delays_ms": {"10.0.0.1": -1}})], "bad entry"),
    ([b"\x80" + b"\x00" * P.MAX_HEADER_BYTES], "header of"),
])
def test_malformed_messages_are_rejected_with_a_reason(frames, reason):
    with pytest.raises(P.ProtocolError) as ei:
        P.decode(frames)
    assert reason in ei.value.reason


def test_oversized_token_count_rejected_before_allocation():
    n = P.MAX_TOKENS_PER_CALL + 1
    frames = [_call_hdr(shape=(n, 1), dtype="uint8" if False else "float16"), b"\x00" * (2 * n)]
    with pytest.raises(P.ProtocolError, match="tokens > limit"):
        P.decode(frames)


def test_error_reply_keeps_request_id_when_readable():
    with pytest.raises(P.ProtocolError) as ei:
        P.decode([_hdr(id=17, t=99)])
    assert ei.value.req_id == 17


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=4))
def test_fuzz_random_bytes_only_raise_protocol_error(frames):
    try:
        P.decode(frames)
    except P.ProtocolError:
        pass


_mp = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8)
                   | st.binary(max_size=8), lambda c: st.lists(c, max_size=4)
                   | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "t", "id", "sent_ns", "src", "trace", "body", "tensors", "x"]),
                       _mp, max_size=9), st.lists(st.binary(max_size=64), max_size=3))
def test_fuzz_random_msgpack_headers_only_raise_protocol_error(header, extra):
    header.setdefault("v", P.PROTOCOL_VERSION)
    try:
        P.decode([msgpack.packb(header, use_bin_type=True)] + extra)
    except P.ProtocolError:
        pass
