"""The packed expert weight format (what quantized shards and checkpoints store, what the
kernels compute on): the spec of one expert, padding, bit packing, sizes and the reference
dequantize.

Format of one quantized linear layer W (out, in) at b bits, group size g:
    the input dim is zero-padded to Kp = round_up(in, lcm(g, 64)) and split into Kp/g groups;
    per (row, group): fp16 scale s and fp16 zero z (float, so error-compensating methods can
    move it); code q = clamp(round(w/s + z), 0, 2^b - 1); dequantized w' = (q - z) * s.

Packing ("lane-interleaved", chosen so one AVX2 register unpacks with shifts only):
a block of 64 codes is stored in 8 lanes; code j*8 + i of the block sits in lane i at bit
offset j*pb, so shifting all 8 lanes by j*pb yields 8 consecutive codes. Lane width = 8*pb bits:
    2 bit: int16 lanes            -> qweight int16 (out, Kp/8)
    3 bit: low 2 bits as 2-bit    -> qweight int16 (out, Kp/8)
           high bit, uint8 lanes  -> qweight_hi uint8 (out, Kp/8)
    4 bit: int32 lanes            -> qweight int32 (out, Kp/8)
    8 bit: plain bytes            -> qweight uint8 (out, Kp)
    16   : passthrough            -> weight float16 / bfloat16 (out, in)
so stored bytes are exactly out * Kp * b / 8 + 4 * out * Kp / g, which `packed_expert_bytes`
computes without building anything. Matmuls go through coel_model.kernels (fused
unpack + dequant + dot in C++/AVX2 when a compiler is there; a tiled torch fallback otherwise).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BITS = (2, 3, 4, 8, 16)
METHODS = ("rtn", "hqq", "gptq")
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
PACK_BLOCK = 64  # codes per packing block along the input dim (8 lanes x 8 shifts)


@dataclass(frozen=True)
class QuantSpec:
    """How one expert is stored: bit width, group size along the input dim, method."""
    bits: int  # 2, 3, 4, 8 (integer codes) or 16 (float passthrough)
    group_size: int = 64  # input-dim elements sharing one scale/zero; a multiple of 8
    method: str = "rtn"  # "rtn" (round to nearest) | "hqq" (half-quadratic zero/range refinement)
    #                      | "gptq" (Hessian-aware error feedback; needs calibration inputs)
    float_dtype: str = "float16"  # storage dtype when bits == 16: "float16" | "bfloat16"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise ValueError(f"QuantSpec: bits={self.bits!r}, expected one of {BITS}")
        if (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                or self.group_size < 8 or self.group_size % 8 or self.group_size > 4096):
            raise ValueError(f"QuantSpec: group_size={self.group_size!r}, expected a multiple of 8 "
                             f"in [8, 4096]")
        if self.method not in METHODS:
            raise ValueError(f"QuantSpec: method={self.method!r}, expected one of {METHODS}")
        if self.float_dtype not in FLOAT_DTYPES:
            raise ValueError(f"QuantSpec: float_dtype={self.float_dtype!r}, expected one of "
                             f"{sorted(FLOAT_DTYPES)}")

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "method": self.method,
                "float_dtype": self.float_dtype}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        unknown = set(d) - {"bits", "group_size", "method", "float_dtype"}
        if unknown:
            raise ValueError(f"QuantSpec: unknown key(s) {sorted(unknown)}")
        return cls(**d)


# --------------------------------------------------------------------------- sizes

def padded_in_features(in_features: int, group_size: int) -> int:
    """Kp: the input dim rounded up so groups and 64-code packing blocks tile it exactly."""
    unit = math.lcm(group_size, PACK_BLOCK)
    return -(-in_features // unit) * unit


def packed_linear_bytes(out_features: int, in_features: int, spec: QuantSpec) -> int:
    """Exact stored bytes of one (out, in) weight in this format (codes + fp16 scales/zeros)."""
    if spec.bits == 16:
        return out_features * in_features * 2
    kp = padded_in_features(in_features, spec.group_size)
    return out_features * kp * spec.bits // 8 + 2 * 2 * out_features * (kp // spec.group_size)


def packed_expert_bytes(d_model: int, hidden: int, spec: QuantSpec) -> int:
    """Exact bytes of a SwiGLU expert (gate, up: hidden x d; down: d x hidden) in this format."""
    return 2 * packed_linear_bytes(hidden, d_model, spec) + packed_linear_bytes(d_model, hidden, spec)


# --------------------------------------------------------------------------- packing

_LANE_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _pack_plane(codes: torch.Tensor, pb: int) -> torch.Tensor:
    """codes (O, Kp) with values < 2^pb -> lanes (O, Kp/8) of width 8*pb bits (see module doc)."""
    O, kp = codes.shape
    c = codes.to(torch.int64).view(O, kp // PACK_BLOCK, 8, 8)  # (O, blocks, j, lane)
    shifts = (torch.arange(8, dtype=torch.int64) * pb).view(1, 1, 8, 1)
    words = (c << shifts).sum(dim=2)  # (O, blocks, lane): disjoint bit fields, so sum == or
    return words.reshape(O, kp // 8).to(_LANE_DTYPE[pb])  # int64 -> narrower wraps modulo 2^width


def _unpack_plane(lanes: torch.Tensor, pb: int) -> torch.Tensor:
    """Inverse of _pack_plane: lanes (O, Kp/8) -> codes (O, Kp) uint8."""
    O, n = lanes.shape
    w = lanes.to(torch.int64) & ((1 << (8 * pb)) - 1)
    w = w.view(O, n // 8, 1, 8)
    shifts = (torch.arange(8, dtype=torch.int64) * pb).view(1, 1, 8, 1)
    return ((w >> shifts) & ((1 << pb) - 1)).reshape(O, n * 8).to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Integer codes (O, Kp) in [0, 2^bits) -> the packed tensors of the format."""
    if bits == 8:
        return {"qweight": codes.to(torch.uint8).contiguous()}
    if bits in (2, 4):
        return {"qweight": _pack_plane(codes, bits)}
    if bits == 3:
        c = codes.to(torch.int64)
        return {"qweight": _pack_plane(c & 3, 2), "qweight_hi": _pack_plane(c >> 2, 1)}
    raise ValueError(f"pack_codes: bits={bits} is not an integer format (2, 3, 4, 8)")


def unpack_codes(packed: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """Packed tensors -> integer codes (O, Kp) uint8; exact inverse of pack_codes."""
    if bits == 8:
        return packed["qweight"].to(torch.uint8)
    if bits in (2, 4):
        return _unpack_plane(packed["qweight"], bits)
    if bits == 3:
        lo = _unpack_plane(packed["qweight"], 2)
        hi = _unpack_plane(packed["qweight_hi"], 1)
        return lo | (hi << 2)
    raise ValueError(f"unpack_codes: bits={bits} is not an integer format (2, 3, 4, 8)")


def packed_shapes(out_features: int, in_features: int, spec: QuantSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every stored tensor of one linear layer (for validation)."""
    if spec.bits == 16:
        return {"weight": ((out_features, in_features), FLOAT_DTYPES[spec.float_dtype])}
    kp = padded_in_features(in_features, spec.group_size)
    G = kp // spec.group_size
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    if spec.bits == 8:
        shapes["qweight"] = ((out_features, kp), torch.uint8)
    elif spec.bits == 4:
        shapes["qweight"] = ((out_features, kp // 8), torch.int32)
    else:  # 2 and 3
        shapes["qweight"] = ((out_features, kp // 8), torch.int16)
        if spec.bits == 3:
            shapes["qweight_hi"] = ((out_features, kp // 8), torch.uint8)
    shapes["scales"] = ((out_features, G), torch.float16)
    shapes["zeros"] = ((out_features, G), torch.float16)
    return shapes


def dequantize_weight(t: dict[str, torch.Tensor], spec: QuantSpec, in_features: int) -> torch.Tensor:
    """Stored tensors -> (out, in) float32 weight. Reference path; the kernels never do this whole."""
    if spec.bits == 16:
        return t["weight"].float()
    q = unpack_codes(t, spec.bits).float()
    O, kp = q.shape
    G = kp // spec.group_size
    w = (q.view(O, G, spec.group_size) - t["zeros"].float().unsqueeze(-1)) * t["scales"].float().unsqueeze(-1)
    return w.view(O, kp)[:, :in_features]
