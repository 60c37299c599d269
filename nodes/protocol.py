"""The CoEL wire protocol: every constant, message type and validation rule in one module.

A message is a list of ZeroMQ frames:

    [header, tensor_0, tensor_1, ...]

`header` is a small msgpack map (a few hundred bytes):
    {"v": PROTOCOL_VERSION, "t": MsgType, "id": request id (echoed in the reply),
     "sent_ns": sender's time.monotonic_ns() (all Mininet hosts share one clock),
     "src": sender name, "trace": trace id or None, "body": type-specific map,
     "tensors": [[name, dtype, [shape...]], ...]}          # one entry per following frame
Tensor frames are the raw little-endian bytes of contiguous tensors, sent zero-copy when large
and never converted to Python lists. `decode` validates everything (version, type, body schema,
dtype whitelist, shape vs frame size, size limits) and raises ProtocolError with a reason;
servers answer such input with an ERROR message and keep serving.

ROUTER sockets add identity frames in front; the transport strips them before `decode`.
See docs/protocol.md for the message catalogue.
"""
from __future__ import annotations

import enum
import math
import time
import warnings
from typing import Any, Iterable

import msgpack
import numpy as np
import torch
import zmq

PROTOCOL_VERSION = 1

# ---- size limits (a peer can never make us allocate more than this per message) ----
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSORS = 256
MAX_TENSOR_DIMS = 4
MAX_NAME_CHARS = 128
MAX_MESSAGE_BYTES = 1 << 30  # 1 GiB of tensor data (a large shard batch)
MAX_TOKENS_PER_CALL = 1 << 16
MAX_STR_CHARS = 4096

# ---- timing constants (the controller link, nodes/ctrllink.py) ----
HEARTBEAT_INTERVAL_S = 0.2  # agent/entry -> controller heartbeat period (told to the controller in REGISTER)
HEARTBEAT_LIVENESS = 3  # heartbeat periods without any controller reply before the link reconnects
RECONNECT_INITIAL_S = 0.25  # reconnect backoff: short and capped low, so a server whose link came
RECONNECT_MAX_S = 1.0  # back re-registers within about a second (zguide's 16 s cap kept it away)

# messages smaller than this are copied by pyzmq anyway; larger frames go zero-copy
ZERO_COPY_MIN_BYTES = 64 * 1024

# Received frames are read-only buffers and tensors decoded from them are views that we never
# write into; torch warns about that on every frombuffer (and catch_warnings costs ~5 us a call).
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


class MsgType(enum.IntEnum):
    REGISTER = 1  # agent -> controller: who I am, my budget and shards; reply OK
    HEARTBEAT = 2  # agent -> controller: stats; controller answers HEARTBEAT (liveness)
    LOAD_SHARD = 3  # -> agent: expert tensors; reply OK (body: loaded, memory) or ERROR
    UNLOAD_SHARD = 4  # -> agent: drop shards; reply OK
    EXPERT_CALL = 5  # -> agent: run (layer, expert) on token vectors x (n, d)
    EXPERT_REPLY = 6  # agent -> caller: y (n, d), queue and compute time
    STATUS = 7  # -> agent: request; the reply is a STATUS with the body filled
    PROBE = 8  # -> agent: echo (RTT and bandwidth probes); reply PROBE with the same payload and recv_ns (when
    #            the agent took it off its socket, before any emulated delay: packet-train dispersion)
    ERROR = 9  # any reply: {"code", "reason"}
    OK = 10  # generic success reply
    SET_PATH_DELAYS = 11  # -> agent: one-way delays per peer for the in-transport delay queue
    SHUTDOWN = 12  # -> agent: reply OK, then exit cleanly
    # runtime (controller / entry service / client); see docs/protocol.md "Runtime messages"
    GENERATE = 13  # client -> entry: a prompt (tensor "prompt" int64 ids, or body prompt_text); streamed reply
    TOKEN = 14  # entry -> client: one generated token {"index", "token"}
    DONE = 15  # entry -> client: the request finished {"new_tokens", "prompt_tokens", ...}
    PLACEMENT = 16  # controller -> entry: expert holders + per-endpoint compression; reply OK
    CONTROL = 17  # control API request {"op", "args"}; reply OK {"result"} or ERROR
    PROBE_PEER = 18  # controller -> agent (over its controller link): probe {"target"} endpoint for me (SWIM
    #                  indirect probe); the agent replies PROBE_PEER {"target", "reached", "rtt_ms", "error"}
    # pipeline stages (nodes.stage): the hidden state hops one way from stage to stage
    LOAD_STAGE = 30  # -> agent: the backbone slice of layers [l0, l1) (tensors by parameter name); reply OK
    STAGE_STEP = 31  # -> stage: one step of a request (tensor "x": ids or hidden state); no reply: the
    #                  last stage sends STAGE_RESULT (or ERROR) to the body's reply_to endpoint
    STAGE_RESULT = 32  # last stage -> entry: tensor "logits" (1, vocab) of the step's last position
    STAGE_RELEASE = 33  # -> stage: drop the KV caches of finished requests {"requests": [...]} (no reply), or
    #                     with "unload": true the whole slice (reply OK)


class ErrorCode(str, enum.Enum):
    MALFORMED = "malformed"  # could not decode / validate
    UNSUPPORTED = "unsupported"  # valid but not something this receiver handles
    OVER_BUDGET = "over_budget"  # LOAD_SHARD would exceed the memory budget
    NOT_LOADED = "not_loaded"  # EXPERT_CALL / UNLOAD for a shard this agent does not hold
    BAD_SHARD = "bad_shard"  # shard tensors do not match the shard description
    INTERNAL = "internal"  # the handler raised; the agent keeps serving
    UNAVAILABLE = "unavailable"  # a request could not finish in its bounded time (no expert holder answered)
    BUSY = "busy"  # the receiver is not ready (e.g. an entry without a placement yet)
    STAGE_CACHE = "stage_cache"  # a stage holds no KV cache of the request at that position: replay it


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32,
    "int64": torch.int64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


class ProtocolError(ValueError):
    """A message that does not follow this protocol; `reason` says which rule it broke."""

    def __init__(self, reason: str, req_id: int = 0):
        super().__init__(reason)
        self.reason = reason
        self.req_id = req_id


# ---- body schemas: field -> (allowed python types, required) ----
_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_MAP = (dict,)
_LIST = (list,)
_OPT_MAP = (dict, type(None))

BODY_SCHEMAS: dict[MsgType, dict[str, tuple[tuple[type, ...], bool]]] = {
    MsgType.REGISTER: {"name": (_STR, True), "endpoint": (_STR, True), "memory_budget_bytes": (_INT, True),
                       "threads": (_INT, False), "shards": (_LIST, False), "pid": (_INT, False),
                       "heartbeat_s": (_NUM, False), "warmup_ms": (_NUM, False),
                       "perception": (_MAP, False)},  # nodes/perception.py report
    MsgType.HEARTBEAT: {"name": (_STR, False), "stats": (_MAP, False), "perception": (_MAP, False)},
    MsgType.LOAD_SHARD: {"shards": (_LIST, True), "replace": ((bool,), False)},
    MsgType.UNLOAD_SHARD: {"shards": (_LIST, True)},
    MsgType.EXPERT_CALL: {"layer": (_INT, True), "expert": (_INT, True), "compression": (_OPT_MAP, False),
                          "meta": (_OPT_MAP, False)},
    MsgType.EXPERT_REPLY: {"queue_ns": (_INT, True), "compute_ns": (_INT, True), "batch": (_INT, False),
                           "compression": (_OPT_MAP, False), "meta": (_OPT_MAP, False)},
    MsgType.STATUS: {},
    MsgType.PROBE: {"echo": ((int, float, str, type(None)), False), "recv_ns": (_INT, False)},
    MsgType.ERROR: {"code": (_STR, True), "reason": (_STR, True)},
    MsgType.OK: {},
    MsgType.SET_PATH_DELAYS: {"delays_ms": (_MAP, True)},
    MsgType.SHUTDOWN: {},
    MsgType.GENERATE: {"max_new_tokens": (_INT, True), "prompt_text": (_STR, False),
                       "max_prompt_tokens": (_INT, False), "temperature": (_NUM, False), "top_k": (_INT, False),
                       "top_p": (_NUM, False), "seed": ((int, type(None)), False), "class": (_STR, False),
                       "stop_at_eos": ((bool,), False)},
    MsgType.TOKEN: {"index": (_INT, True), "token": (_INT, True)},
    MsgType.DONE: {"new_tokens": (_INT, True), "prompt_tokens": (_INT, True)},
    MsgType.PLACEMENT: {"version": (_INT, True), "holders": (_LIST, True), "compression": (_MAP, False),
                        "stages": (_LIST, False)},
    MsgType.CONTROL: {"op": (_STR, True), "args": (_OPT_MAP, False)},
    MsgType.PROBE_PEER: {"target": (_STR, True), "timeout_ms": (_NUM, False), "reached": ((bool,), False),
                         "rtt_ms": ((int, float, type(None)), False), "error": (_STR, False)},
    MsgType.LOAD_STAGE: {"l0": (_INT, True), "l1": (_INT, True), "config": (_MAP, True),
                         "holders": (_LIST, True), "kv_cache_bytes": (_INT, True), "compression": (_MAP, False),
                         "ends": ((bool,), False)},
    MsgType.STAGE_STEP: {"request": (_STR, True), "pos": (_INT, True), "max_len": (_INT, True),
                         "l0": (_INT, True), "route": (_LIST, True), "reply_to": (_STR, True),
                         "reply_id": (_INT, True), "hops": (_LIST, False)},
    MsgType.STAGE_RESULT: {"request": (_STR, True), "hops": (_LIST, True)},
    MsgType.STAGE_RELEASE: {"requests": (_LIST, True), "unload": ((bool,), False)},
}
# types whose bodies may carry extra keys (replies with free-form status data)
OPEN_BODIES = {MsgType.STATUS, MsgType.OK, MsgType.HEARTBEAT, MsgType.REGISTER, MsgType.DONE}
MAX_NEW_TOKENS = 1 << 14  # GENERATE: largest max_new_tokens accepted
CONTROL_OPS = ("STATUS", "PLAN", "SET_SLO", "REPLAN", "SHUTDOWN")  # control API operations

HEADER_SCHEMA = {"v": (_INT, True), "t": (_INT, True), "id": (_INT, True), "sent_ns": (_INT, True),
                 "src": (_STR, False), "trace": ((str, type(None)), False), "body": (_MAP, True),
                 "tensors": (_LIST, True)}

_HEADER_KEYS = frozenset(HEADER_SCHEMA)
_TYPES = {int(m): m for m in MsgType}
_ITEMSIZE = {k: v.itemsize for k, v in DTYPES.items()}

SHARD_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "layer": (_INT, True), "expert": (_INT, True), "bits": (_INT, True), "d_model": (_INT, True),
    "hidden": (_INT, True), "group_size": (_INT, False), "method": (_STR, False),
    # on-demand (offload plans): kept on the agent's storage, loaded into a buffer of buffer_slots when called
    "resident": ((bool,), False), "buffer_slots": (_INT, False),
}
VALID_BITS = (2, 3, 4, 8, 16, 32)

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16, "int8": np.int8,
              "uint8": np.uint8, "int16": np.int16, "int32": np.int32, "int64": np.int64}
_NP_NAMES = {np.dtype(v): k for k, v in _NP_DTYPES.items() if k != "bfloat16"}
_NP_DT = {k: np.dtype(v) for k, v in _NP_DTYPES.items()}


class Message:
    """A decoded (validated) message; tensors share memory with the received frames.

    `arrays` holds the numpy views of the tensor frames ({name: (ndarray, dtype name)}; bfloat16
    as int16 bits); the torch views in `tensors` are made on first access, so a receiver that
    works on the numpy views (the agent's fp16/fp32 activation path) pays no torch call for them.
    """
    __slots__ = ("type", "req_id", "body", "_tensors", "arrays", "trace", "sent_ns", "src", "nbytes")

    def __init__(self, type: MsgType, req_id: int = 0, body: dict[str, Any] | None = None,
                 tensors: dict[str, torch.Tensor] | None = None, trace: str | None = None, sent_ns: int = 0,
                 src: str = "", nbytes: int = 0, arrays: dict[str, tuple[np.ndarray, str]] | None = None):
        self.type, self.req_id, self.trace, self.sent_ns, self.src, self.nbytes = type, req_id, trace, sent_ns, src, nbytes
        self.body = {} if body is None else body
        self.arrays = {} if arrays is None else arrays
        self._tensors = tensors if tensors is not None or arrays is not None else {}

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            self._tensors = {name: _as_tensor(a, dt) for name, (a, dt) in self.arrays.items()}
        return self._tensors

    @tensors.setter
    def tensors(self, value: dict[str, torch.Tensor]) -> None:
        self._tensors = value

    def __repr__(self) -> str:
        return (f"Message({self.type.name}, id={self.req_id}, src={self.src!r}, body={self.body!r}, "
                f"tensors={ {k: (dt, a.shape) for k, (a, dt) in self.arrays.items()} }, trace={self.trace!r})")


def tensor_frame(t: torch.Tensor | np.ndarray) -> memoryview:
    """Raw bytes of a contiguous CPU tensor without copying (bfloat16 via an int16 view)."""
    if type(t) is np.ndarray:
        return memoryview(np.ascontiguousarray(t)).cast("B") if t.size else memoryview(b"")
    if t.requires_grad:
        t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.numpy()).cast("B")


def _tensor_spec(name: str, t: torch.Tensor | np.ndarray) -> tuple[list, memoryview]:
    """[name, dtype, shape] and the frame of one tensor (or numpy array: no torch call at all).

    Fast path: one `t.numpy()` call gives dtype, shape and buffer (torch calls are the costly part
    of a message once other processes have evicted the caches); requires_grad, non-CPU, bfloat16 or
    non-contiguous tensors take the general path."""
    if type(t) is not np.ndarray:
        try:
            a = t.numpy()
        except (RuntimeError, TypeError):  # requires grad, not on the CPU, or bfloat16
            if t.dtype not in DTYPE_NAMES:
                raise ProtocolError(f"tensor {name!r}: dtype {t.dtype} is not sendable") from None
            return [name, DTYPE_NAMES[t.dtype], list(t.shape)], tensor_frame(t)
    else:
        a = t
    dt = _NP_NAMES.get(a.dtype)
    if dt is None:
        raise ProtocolError(f"tensor {name!r}: dtype {getattr(t, 'dtype', a.dtype)} is not sendable")
    if a.size == 0:
        return [name, dt, list(a.shape)], memoryview(b"")
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return [name, dt, list(a.shape)], memoryview(a).cast("B")


def encode(mtype: MsgType, req_id: int = 0, body: dict[str, Any] | None = None,
           tensors: dict[str, torch.Tensor | np.ndarray] | None = None, trace: str | None = None,
           src: str = "", sent_ns: int | None = None) -> list[Any]:
    """Message -> frames ready for `socket.send_multipart(frames, copy=False)`.

    Tensors may be torch tensors or numpy arrays (numpy has no bfloat16: int16 arrays go as int16)."""
    specs, frames = [], []
    if tensors:
        for name, t in tensors.items():
            spec, frame = _tensor_spec(name, t)
            specs.append(spec)
            frames.append(frame)
    header = {"v": PROTOCOL_VERSION, "t": int(mtype), "id": int(req_id),
              "sent_ns": time.monotonic_ns() if sent_ns is None else int(sent_ns),
              "src": src, "trace": trace, "body": body or {}, "tensors": specs}
    frames.insert(0, msgpack.packb(header, use_bin_type=True))
    return frames


def error_frames(req_id: int, code: ErrorCode | str, reason: str, src: str = "") -> list[Any]:
    code = code.value if isinstance(code, ErrorCode) else code
    return encode(MsgType.ERROR, req_id, {"code": code, "reason": reason[:MAX_STR_CHARS]}, src=src)


def _frame_buffer(frame: Any) -> memoryview:
    if isinstance(frame, (bytes, bytearray, memoryview)):
        return memoryview(frame)
    buf = getattr(frame, "buffer", None)  # zmq.Frame
    if buf is None:
        raise ProtocolError(f"frame of type {type(frame).__name__} is not a buffer")
    return buf


_MISSING = object()


def _check_fields(where: str, d: dict, schema: dict, open_keys: bool, req_id: int) -> None:
    if not open_keys:
        extra = d.keys() - schema.keys()
        if extra:
            raise ProtocolError(f"{where}: unknown field(s) {sorted(map(str, extra))[:5]} "
                                f"(allowed: {sorted(schema)})", req_id)
    elif not all(type(k) is str for k in d):
        raise ProtocolError(f"{where}: non-string key", req_id)
    for k, (types, required) in schema.items():
        v = d.get(k, _MISSING)
        if v is _MISSING:
            if required:
                raise ProtocolError(f"{where}: missing field {k!r}", req_id)
            continue
        tv = type(v)
        if tv is bool and bool not in types:
            raise ProtocolError(f"{where}: field {k!r} must be {'/'.join(t.__name__ for t in types)}, "
                                f"got bool", req_id)
        if not isinstance(v, types):
            raise ProtocolError(f"{where}: field {k!r} must be {'/'.join(t.__name__ for t in types)}, "
                                f"got {tv.__name__}", req_id)
        if tv is int and not -(1 << 62) <= v <= (1 << 62):
            raise ProtocolError(f"{where}: field {k!r} out of range", req_id)


def validate_shard_desc(i: int, s: Any, req_id: int = 0) -> None:
    if not isinstance(s, dict):
        raise ProtocolError(f"shards[{i}] must be a map", req_id)
    _check_fields(f"shards[{i}]", s, SHARD_FIELDS, False, req_id)
    if s["bits"] not in VALID_BITS:
        raise ProtocolError(f"shards[{i}]: bits={s['bits']} not in {VALID_BITS}", req_id)
    for k in ("layer", "expert"):
        if not 0 <= s[k] < 1 << 20:
            raise ProtocolError(f"shards[{i}]: {k}={s[k]} out of range", req_id)
    for k in ("d_model", "hidden"):
        if not 0 < s[k] <= 1 << 20:
            raise ProtocolError(f"shards[{i}]: {k}={s[k]} out of range", req_id)
    if not 1 <= s.get("buffer_slots", 1) <= 64:
        raise ProtocolError(f"shards[{i}]: buffer_slots={s['buffer_slots']} out of range (1..64)", req_id)


_I62 = 1 << 62


def _fast_body_ok(mtype: MsgType, body: dict) -> bool:
    """True when `body` is the common, uncompressed shape of an expert call / reply / probe and
    passes every check `_check_fields` makes on it (exact key set, exact int types: no bools, ranges);
    False means: let the generic check decide (and word the error)."""
    n = len(body)
    if mtype is MsgType.EXPERT_CALL:
        if n != 2:
            return False
        layer, expert = body.get("layer"), body.get("expert")
        return type(layer) is int and type(expert) is int and 0 <= layer < _I62 and 0 <= expert < _I62
    if mtype is MsgType.EXPERT_REPLY:
        if n != 3:
            return False
        q, c, b = body.get("queue_ns"), body.get("compute_ns"), body.get("batch")
        return (type(q) is int and type(c) is int and type(b) is int and -_I62 <= q <= _I62
                and -_I62 <= c <= _I62 and -_I62 <= b <= _I62)
    if mtype is MsgType.PROBE:
        return n == 0
    return False


def _validate_body(mtype: MsgType, body: dict, tensors: dict[str, tuple[str, tuple[int, ...]]],
                   req_id: int) -> None:
    if not _fast_body_ok(mtype, body):
        _check_fields(f"{mtype.name} body", body, BODY_SCHEMAS[mtype], mtype in OPEN_BODIES, req_id)
    if mtype == MsgType.EXPERT_CALL:
        if not (0 <= body["layer"] < 1 << 20 and 0 <= body["expert"] < 1 << 20):
            raise ProtocolError(f"EXPERT_CALL: layer/expert out of range", req_id)
        if "x" not in tensors:
            raise ProtocolError("EXPERT_CALL carries no tensor 'x'", req_id)
    if mtype in (MsgType.EXPERT_CALL, MsgType.EXPERT_REPLY):
        name = "x" if mtype == MsgType.EXPERT_CALL else "y"
        if name in tensors:
            dt, shape = tensors[name]
            comp = body.get("compression") or {}
            if dt not in FLOAT_DTYPES and not comp:
                raise ProtocolError(f"{mtype.name}: tensor {name!r} dtype {dt} needs compression "
                                    f"settings (raw activations must be float)", req_id)
            if len(shape) != 2:
                raise ProtocolError(f"{mtype.name}: tensor {name!r} must be 2-D (n, d), got {list(shape)}",
                                    req_id)
            if shape[0] > MAX_TOKENS_PER_CALL:
                raise ProtocolError(f"{mtype.name}: {shape[0]} tokens > limit {MAX_TOKENS_PER_CALL}", req_id)
    elif mtype == MsgType.LOAD_SHARD:
        if not body["shards"]:
            raise ProtocolError("LOAD_SHARD lists no shards", req_id)
        for i, s in enumerate(body["shards"]):
            validate_shard_desc(i, s, req_id)
    elif mtype == MsgType.UNLOAD_SHARD:
        for i, s in enumerate(body["shards"]):
            if not (isinstance(s, list) and len(s) == 2 and all(type(v) is int and v >= 0 for v in s)):
                raise ProtocolError(f"UNLOAD_SHARD shards[{i}] must be [layer, expert]", req_id)
    elif mtype == MsgType.SET_PATH_DELAYS:
        for k, v in body["delays_ms"].items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)) \
                    or not (0 <= v < 1e6) or math.isnan(v):
                raise ProtocolError(f"SET_PATH_DELAYS: bad entry {k!r}: {v!r}", req_id)
    elif mtype == MsgType.GENERATE:
        if not 1 <= body["max_new_tokens"] <= MAX_NEW_TOKENS:
            raise ProtocolError(f"GENERATE: max_new_tokens={body['max_new_tokens']} not in 1..{MAX_NEW_TOKENS}",
                                req_id)
        if "prompt" in tensors:
            dt, shape = tensors["prompt"]
            if dt not in ("int32", "int64") or len(shape) != 1 or not 1 <= shape[0] <= MAX_TOKENS_PER_CALL:
                raise ProtocolError(f"GENERATE: tensor 'prompt' must be 1-D int32/int64 with 1..{MAX_TOKENS_PER_CALL} "
                                    f"ids, got {dt} {list(shape)}", req_id)
        elif not body.get("prompt_text"):
            raise ProtocolError("GENERATE carries neither a 'prompt' tensor nor a prompt_text", req_id)
        if body.get("max_prompt_tokens", 1) < 1 or body.get("top_k", 0) < 0 \
                or not 0.0 <= body.get("temperature", 0.0) <= 100.0 or not 0.0 < body.get("top_p", 1.0) <= 1.0:
            raise ProtocolError("GENERATE: need max_prompt_tokens >= 1, top_k >= 0, 0 <= temperature <= 100, "
                                "0 < top_p <= 1", req_id)
    elif mtype == MsgType.PLACEMENT:
        for i, h in enumerate(body["holders"]):
            if not (isinstance(h, list) and len(h) == 3 and all(type(v) is int and 0 <= v < 1 << 20 for v in h[:2])
                    and isinstance(h[2], list) and h[2] and all(isinstance(ep, str) for ep in h[2])):
                raise ProtocolError(f"PLACEMENT holders[{i}] must be [layer, expert, [endpoint, ...]]", req_id)
        for ep, c in (body.get("compression") or {}).items():
            if not isinstance(c, dict):
                raise ProtocolError(f"PLACEMENT compression[{ep!r}] must be a map", req_id)
        stages = body.get("stages") or []
        for i, r in enumerate(stages):
            if not (isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and "://" in r[0]
                    and all(type(v) is int for v in r[1:]) and 0 <= r[1] < r[2]):
                raise ProtocolError(f"PLACEMENT stages[{i}] must be [endpoint, l0, l1]", req_id)
        if stages and (stages[0][1] != 0 or any(a[2] != b[1] for a, b in zip(stages, stages[1:]))):
            raise ProtocolError(f"PLACEMENT stages {[r[1:] for r in stages]} must run layers from 0 in order", req_id)
    elif mtype == MsgType.PROBE_PEER:
        if "://" not in body["target"] or len(body["target"]) > MAX_NAME_CHARS:
            raise ProtocolError(f"PROBE_PEER: target {body['target'][:40]!r} must be an endpoint tcp://IP:PORT", req_id)
        if not 0 < body.get("timeout_ms", 1) <= 10_000:
            raise ProtocolError("PROBE_PEER: timeout_ms must be in (0, 10000]", req_id)
    elif mtype == MsgType.LOAD_STAGE:
        if not 0 <= body["l0"] < body["l1"] <= 1 << 20 or body["kv_cache_bytes"] < 0:
            raise ProtocolError(f"LOAD_STAGE: need 0 <= l0 < l1 and kv_cache_bytes >= 0 (got l0={body['l0']}, "
                                f"l1={body['l1']}, kv_cache_bytes={body['kv_cache_bytes']})", req_id)
        for i, h in enumerate(body["holders"]):
            if not (isinstance(h, list) and len(h) == 3 and all(type(v) is int and 0 <= v < 1 << 20 for v in h[:2])
                    and isinstance(h[2], list) and h[2] and all(isinstance(ep, str) for ep in h[2])):
                raise ProtocolError(f"LOAD_STAGE holders[{i}] must be [layer, expert, [endpoint, ...]]", req_id)
    elif mtype == MsgType.STAGE_STEP:
        if "x" not in tensors:
            raise ProtocolError("STAGE_STEP carries no tensor 'x'", req_id)
        dt, shape = tensors["x"]
        ids = dt in ("int32", "int64") and len(shape) == 2
        hidden = dt in FLOAT_DTYPES and len(shape) == 3
        if not (ids or hidden) or shape[0] != 1 or not 1 <= shape[1] <= MAX_TOKENS_PER_CALL:
            raise ProtocolError(f"STAGE_STEP: tensor 'x' must be ids (1, T) int or a hidden state (1, T, d) float "
                                f"with 1 <= T <= {MAX_TOKENS_PER_CALL}, got {dt} {list(shape)}", req_id)
        if not 0 <= body["pos"] < body["max_len"] <= 1 << 24 or body["pos"] + shape[1] > body["max_len"]:
            raise ProtocolError(f"STAGE_STEP: pos {body['pos']} + {shape[1]} tokens must fit max_len "
                                f"{body['max_len']}", req_id)
        if "://" not in body["reply_to"] or len(body["request"]) > MAX_NAME_CHARS:
            raise ProtocolError("STAGE_STEP: reply_to must be an endpoint and request a short id", req_id)
        route = body["route"]
        for i, r in enumerate(route):  # the last hop, [coordinator, L, L], is the head (norm + lm_head)
            if not (isinstance(r, list) and len(r) == 3 and isinstance(r[0], str) and "://" in r[0]
                    and all(type(v) is int for v in r[1:]) and 0 <= r[1] <= r[2]
                    and (r[1] < r[2] or i == len(route) - 1)):
                raise ProtocolError(f"STAGE_STEP route[{i}] must be [endpoint, l0, l1] (l0 == l1 only for the "
                                    f"final head hop)", req_id)
    elif mtype == MsgType.STAGE_RESULT:
        if "logits" not in tensors or tensors["logits"][0] not in FLOAT_DTYPES:
            raise ProtocolError("STAGE_RESULT carries no float tensor 'logits'", req_id)
    elif mtype == MsgType.STAGE_RELEASE:
        if not all(isinstance(r, str) for r in body["requests"]):
            raise ProtocolError("STAGE_RELEASE requests must be request ids", req_id)
    elif mtype == MsgType.CONTROL:
        if body["op"] not in CONTROL_OPS:
            raise ProtocolError(f"CONTROL: unknown op {body['op'][:40]!r}; valid: {list(CONTROL_OPS)}", req_id)
    elif mtype == MsgType.ERROR:
        try:
            ErrorCode(body["code"])
        except ValueError:
            raise ProtocolError(f"ERROR: unknown code {body['code']!r}", req_id) from None


def decode(frames: list[Any]) -> Message:
    """Frames -> Message, validating every field; raises ProtocolError(reason)."""
    if not frames:
        raise ProtocolError("empty message")
    hbuf = _frame_buffer(frames[0])
    if len(hbuf) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(hbuf)} bytes > limit {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(hbuf, raw=False, strict_map_key=True, max_str_len=MAX_HEADER_BYTES,
                                 max_bin_len=MAX_HEADER_BYTES, max_array_len=4096, max_map_len=4096,
                                 max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"header is not msgpack ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a map, got {type(header).__name__}")
    rid = header.get("id", 0)
    req_id = rid if type(rid) is int and 0 <= rid < 1 << 63 else 0
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {header.get('v')!r} != {PROTOCOL_VERSION}", req_id)
    # fast path for well-formed headers; the generic check words the error otherwise
    t, sent, body, specs = header.get("t"), header.get("sent_ns"), header.get("body"), header.get("tensors")
    src, trace = header.get("src", ""), header.get("trace")
    if (header.keys() - _HEADER_KEYS or "id" not in header or type(rid) is not int or type(t) is not int
            or type(sent) is not int or not -(1 << 62) <= sent <= (1 << 62) or type(body) is not dict
            or type(specs) is not list or type(src) is not str or not (trace is None or type(trace) is str)):
        _check_fields("header", header, HEADER_SCHEMA, False, req_id)
    mtype = _TYPES.get(t)
    if mtype is None:
        raise ProtocolError(f"unknown message type {t}", req_id)
    if header["id"] != req_id:
        raise ProtocolError(f"request id {header['id']} out of range", req_id)
    specs = header["tensors"]
    if len(specs) > MAX_TENSORS:
        raise ProtocolError(f"{len(specs)} tensors > limit {MAX_TENSORS}", req_id)
    if len(frames) != 1 + len(specs):
        raise ProtocolError(f"header lists {len(specs)} tensors but {len(frames) - 1} frames follow", req_id)
    metas: dict[str, tuple[str, tuple[int, ...]]] = {}
    arrays: dict[str, tuple[np.ndarray, str]] = {}
    total = 0
    for i, spec in enumerate(specs):
        if not (type(spec) is list and len(spec) == 3 and type(spec[0]) is str
                and type(spec[1]) is str and type(spec[2]) is list):
            raise ProtocolError(f"tensor spec {i} must be [name, dtype, shape]", req_id)
        name, dt, shape = spec
        if not name or len(name) > MAX_NAME_CHARS or name in metas:
            raise ProtocolError(f"tensor {i}: bad or duplicate name {name[:40]!r}", req_id)
        npdt = _NP_DT.get(dt)
        if npdt is None:
            raise ProtocolError(f"tensor {name!r}: dtype {dt[:20]!r} not in {sorted(DTYPES)}", req_id)
        if len(shape) > MAX_TENSOR_DIMS:
            raise ProtocolError(f"tensor {name!r}: bad shape {shape[:8]}", req_id)
        nbytes = npdt.itemsize
        for dim in shape:
            if type(dim) is not int or not 0 <= dim < 1 << 31:
                raise ProtocolError(f"tensor {name!r}: bad shape {shape[:8]}", req_id)
            nbytes *= dim
        frame = frames[1 + i]
        buf = frame.buffer if type(frame) is zmq.Frame else _frame_buffer(frame)
        if nbytes != len(buf):
            raise ProtocolError(f"tensor {name!r}: shape {shape} {dt} needs {nbytes} bytes, frame has "
                                f"{len(buf)}", req_id)
        total += nbytes
        if total > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"tensor data {total} bytes > limit {MAX_MESSAGE_BYTES}", req_id)
        shape = tuple(shape)
        metas[name] = (dt, shape)
        # a numpy view of the frame (no copy, no torch call); torch views are made on demand
        arrays[name] = (np.frombuffer(buf, npdt).reshape(shape) if nbytes else np.empty(shape, npdt), dt)
    _validate_body(mtype, body, metas, req_id)
    return Message(mtype, req_id, body, None, trace, sent, src, len(hbuf) + total, arrays)


def _as_tensor(a: np.ndarray, dt: str) -> torch.Tensor:
    """A torch view of a received frame's numpy view (numpy path: ~3x cheaper than torch.frombuffer)."""
    if a.size == 0:
        return torch.empty(a.shape, dtype=DTYPES[dt])
    t = torch.from_numpy(a)
    if dt == "bfloat16":
        t = t.view(torch.bfloat16)
    return t


def frames_nbytes(frames: Iterable[Any]) -> int:
    """Bytes a message occupies on the wire (payload only, without ZMTP framing)."""
    return sum(len(_frame_buffer(f)) for f in frames)
