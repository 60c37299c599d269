"""The wire codec of activations, the one every process uses: rows of token vectors as they travel
(`WireTensor`: fp32, fp16, or int8 with per-row absmax scales), and the named tensors of an
expert call or reply (`encode_activations`/`decode_activations`), with or without settings.

Shapes: n rows bound for one expert, d model width."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from nodes.compression.settings import ACT_DTYPES, CompressionSettings

_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                 "int8": torch.int8}
_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}
_FP16_MAX = 65504.0
_FP16_TINY = 6.104e-05  # smallest normal fp16; int8 scales are kept at or above it


@dataclass
class WireTensor:
    """Rows of activations as they travel: data (+ per-row fp16 scales for int8)."""
    act_dtype: str  # fp32 | fp16 | int8
    data: torch.Tensor  # (m, d) in act_dtype
    scales: torch.Tensor | None  # (m,) fp16 for int8, else None
    orig_dtype: str  # fp32 | fp16 | bf16: what decode_rows returns

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        """Payload bytes on the wire (data + scales); the header is counted separately."""
        n = self.data.numel() * self.data.element_size()
        if self.scales is not None:
            n += self.scales.numel() * self.scales.element_size()
        return n

    def meta(self) -> dict[str, Any]:
        """msgpack-friendly description that, with frames(), rebuilds this tensor."""
        return {"act_dtype": self.act_dtype, "shape": list(self.shape), "orig_dtype": self.orig_dtype}

    def frames(self) -> list[memoryview]:
        """Raw byte frames (zero-copy views): [data] or [data, scales]."""
        out = [memoryview(self.data.contiguous().numpy()).cast("B")]
        if self.scales is not None:
            out.append(memoryview(self.scales.contiguous().numpy()).cast("B"))
        return out

    @classmethod
    def from_wire(cls, meta: Any, frames: Sequence[bytes | memoryview], *,
                  max_rows: int = 1 << 20, max_width: int = 1 << 16) -> "WireTensor":
        """Validated inverse of meta()/frames(); a malformed message raises ValueError saying why."""
        if not isinstance(meta, dict):
            raise ValueError(f"wire tensor meta must be a map, got {type(meta).__name__}")
        act, shape, orig = meta.get("act_dtype"), meta.get("shape"), meta.get("orig_dtype")
        if act not in ACT_DTYPES:
            raise ValueError(f"wire tensor act_dtype {act!r} not one of {list(ACT_DTYPES)}")
        if orig not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"wire tensor orig_dtype {orig!r} not one of fp32|fp16|bf16")
        if (not isinstance(shape, (list, tuple)) or len(shape) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
                or not (0 <= shape[0] <= max_rows and 0 < shape[1] <= max_width)):
            raise ValueError(f"wire tensor shape {shape!r} invalid (want [rows<={max_rows}, "
                             f"1..{max_width}])")
        m, d = shape
        want = 2 if act == "int8" else 1
        if len(frames) != want:
            raise ValueError(f"wire tensor {act} needs {want} frame(s), got {len(frames)}")
        itemsize = np.dtype(_NP_DTYPES[act]).itemsize
        if len(frames[0]) != m * d * itemsize:
            raise ValueError(f"wire tensor data frame has {len(frames[0])} bytes, shape {shape} "
                             f"{act} needs {m * d * itemsize}")
        data = torch.from_numpy(np.frombuffer(frames[0], dtype=_NP_DTYPES[act]).reshape(m, d).copy())
        scales = None
        if act == "int8":
            if len(frames[1]) != m * 2:
                raise ValueError(f"wire tensor scales frame has {len(frames[1])} bytes, {m} rows need {m * 2}")
            scales = torch.from_numpy(np.frombuffer(frames[1], dtype=np.float16).copy())
            if not bool(torch.isfinite(scales).all()):
                raise ValueError("wire tensor int8 scales contain inf/nan")
        elif not bool(torch.isfinite(data).all()):
            raise ValueError(f"wire tensor {act} data contains inf/nan")
        return cls(act, data, scales, orig)


    def to_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """As named tensors for nodes.protocol: {name: (m, d) data[, name + '_scale': (m,) fp16]}."""
        out = {name: self.data.contiguous()}
        if self.scales is not None:
            out[name + "_scale"] = self.scales.contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], name: str,
                     orig_dtype: str = "fp32") -> "WireTensor":
        """Validated inverse of to_tensors; the wire dtype is read from the data tensor."""
        if name not in tensors:
            raise ValueError(f"message carries no tensor {name!r} (has {sorted(tensors)})")
        data = tensors[name]
        act = {torch.float32: "fp32", torch.float16: "fp16", torch.int8: "int8"}.get(data.dtype)
        if act is None:
            raise ValueError(f"tensor {name!r} has dtype {data.dtype}; compressed rows travel as "
                             f"float32, float16 or int8")
        if data.dim() != 2:
            raise ValueError(f"tensor {name!r} must be (rows, d), got shape {tuple(data.shape)}")
        scales = None
        if act == "int8":
            key = name + "_scale"
            scales = tensors.get(key)
            if scales is None:
                raise ValueError(f"int8 tensor {name!r} arrived without its scales {key!r}")
            if scales.dtype != torch.float16 or tuple(scales.shape) != (data.shape[0],):
                raise ValueError(f"{key!r} must be float16 of shape ({data.shape[0]},), got "
                                 f"{scales.dtype} {tuple(scales.shape)}")
            if not bool(torch.isfinite(scales).all()):
                raise ValueError(f"{key!r} contains inf/nan")
        elif not bool(torch.isfinite(data).all()):
            raise ValueError(f"tensor {name!r} contains inf/nan")
        return cls(act, data, scales, orig_dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _TORCH_DTYPES.items():
        if dt == dtype and name != "int8":
            return name
    raise ValueError(f"activations of dtype {dtype} cannot be sent (want float32/float16/bfloat16)")


def encode_rows(x: torch.Tensor, act_dtype: str) -> WireTensor:
    """(m, d) float -> WireTensor. int8: per-row absmax scale s (fp16), q = round(x / s).

    Error bounds: fp16 relative 2^-11 per element; int8 |x - x'| <= s / 2 with
    s = fp16(max(absmax / 127, 6.1e-5)) (rounding s to fp16 never makes |x / s| round past 127).
    fp16 falls back to fp32 when a value would overflow (|x| > 65504) rather than send inf.
    """
    if x.dim() != 2:
        raise ValueError(f"activations must be (rows, d), got shape {tuple(x.shape)}")
    orig = _dtype_name(x.dtype)
    if act_dtype == "fp32":
        return WireTensor("fp32", x if x.dtype == torch.float32 else x.float(), None, orig)
    xf = x.detach().float()
    a = xf.contiguous().numpy()  # numpy: a single-row message costs half the torch op overhead
    absmax = np.abs(a).max(axis=1) if a.size else np.zeros(a.shape[0], np.float32)  # (m,)
    if not np.isfinite(absmax).all():
        bad = np.nonzero(~np.isfinite(absmax))[0][:5].tolist()
        raise ValueError(f"activations to send contain inf/nan (rows {bad} of {a.shape[0]})")
    if act_dtype == "fp16":
        if absmax.size and float(absmax.max()) > _FP16_MAX:
            return WireTensor("fp32", xf, None, orig)
        return WireTensor("fp16", torch.from_numpy(a.astype(np.float16)), None, orig)
    if act_dtype == "int8":
        # nearest fp16 scale: at most 2^-11 below absmax/127, so |x| / s <= 127.07 rounds to <= 127
        s16 = np.maximum(absmax * np.float32(1 / 127), np.float32(_FP16_TINY)).astype(np.float16)
        if np.isinf(s16).any():
            return WireTensor("fp32", xf, None, orig)
        q = np.rint(a / s16.astype(np.float32)[:, None])
        np.clip(q, -127, 127, out=q)
        return WireTensor("int8", torch.from_numpy(q.astype(np.int8)), torch.from_numpy(s16), orig)
    raise ValueError(f"act_dtype must be one of {list(ACT_DTYPES)} (got {act_dtype!r})")


def decode_rows(w: WireTensor) -> torch.Tensor:
    """WireTensor -> (m, d) tensor in the sender's original dtype."""
    if w.act_dtype == "int8":
        assert w.scales is not None
        x = w.data.float() * w.scales.float().unsqueeze(1)
    else:
        x = w.data
    target = _TORCH_DTYPES[w.orig_dtype]
    return x if x.dtype == target else x.to(target)


def decode_activations(tensors: dict[str, torch.Tensor], compression: dict | None,
                       name: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """Receiver side of an expert call or reply: named tensors + header settings -> float32 rows
    (m, d), plus the meta that `encode_activations` needs to answer in kind.

    Without settings the tensor travels as float32/float16/bfloat16 and the reply uses the same
    dtype; with settings, the link's act_dtype (e.g. int8 + scales).
    """
    if not compression:
        x = tensors[name]
        return x.float(), {"dtype": x.dtype}
    settings = CompressionSettings.from_header(compression)
    x = decode_rows(WireTensor.from_tensors(tensors, name)).float()
    return x, {"settings": settings}


def encode_activations(y: torch.Tensor, compression: dict | None, name: str,
                       meta: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Reply side: rows (m, d) -> named tensors in the link's act_dtype (without settings: in the
    request's dtype, `meta` from `decode_activations`)."""
    if not compression:
        return {name: y.to(meta["dtype"])}
    settings = (meta or {}).get("settings") or CompressionSettings.from_header(compression)
    return encode_rows(y, settings.act_dtype).to_tensors(name)


# plain float rows straight from the received numpy view (no settings): the agent's fast path,
# fewest torch calls per expert call
PLAIN_NP_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}


def decode_plain(a: np.ndarray, dtype_name: str) -> tuple[torch.Tensor, np.dtype]:
    """Received (n, d) float32/float16 array -> float32 rows and the dtype to reply in."""
    x = torch.from_numpy(a)
    if dtype_name == "float16":
        x = x.float()  # torch converts fp16 ~4x faster than numpy's astype
    return x, PLAIN_NP_DTYPES[dtype_name]


def encode_plain(y: torch.Tensor, reply_dtype: np.dtype, name: str) -> dict[str, Any]:
    """Rows -> {name: array in the request's dtype}, sent from numpy."""
    f16 = reply_dtype is PLAIN_NP_DTYPES["float16"]
    try:
        return {name: (y.half() if f16 else y.float()).numpy()}
    except RuntimeError:  # an output that requires grad (a module run outside inference mode)
        return {name: y.detach().to(torch.float16 if f16 else torch.float32)}
