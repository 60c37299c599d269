"""Expert quantization: group-wise asymmetric integer formats, real bit packing, checkpoints.

Format of one quantized linear layer W (out, in) at b bits, group size g:
    the input dim is zero-padded to Kp = round_up(in, lcm(g, 64)) and split into Kp/g groups;
    per (row, group): fp16 scale s and fp16 zero z (float, so error-compensating methods can
    move it); code q = clamp(round(w/s + z), 0, 2^b - 1); dequantized w' = (q - z) * s.
RTN picks s = (hi - lo) / (2^b - 1) over the group's range widened to include 0, so every
element's error is at most s/2 (up to fp32 rounding); HQQ refines the zero (and picks a range
shrink) per group to lower the reconstruction error at 2-3 bits, where clipping outliers pays.

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

Checkpoint (own format, see coel_model.checkpoint): config.json + model.safetensors holding the
backbone tensors and, per quantized expert, `layers.{l}.moe.experts.{e}.{w_gate|w_up|w_down}.
{qweight|qweight_hi|scales|zeros|weight}` + quant.json (format "coel-quant", version 1).
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from coel_model import kernels as _kernels
from coel_model.errors import CheckpointError

BITS = (2, 3, 4, 8, 16)
METHODS = ("rtn", "hqq", "gptq")
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
PACK_BLOCK = 64  # codes per packing block along the input dim (8 lanes x 8 shifts)
QUANT_FORMAT = "coel-quant"
QUANT_VERSION = 1
PROJ_NAMES = ("w_gate", "w_up", "w_down")


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


# --------------------------------------------------------------------------- quantizers

def _fp16_scale(s: torch.Tensor) -> torch.Tensor:
    """fp16 scale rounded UP from s (fp32) so the group's range still fits in 2^b - 1 steps."""
    if torch.isfinite(s).logical_not().any() or s.max() > 65504.0 / 2:
        raise ValueError(f"weight range too large for fp16 scales (largest scale {s.max().item():.4g})")
    s = s.clamp(min=2.0 ** -24)
    s16 = s.to(torch.float16)
    up = torch.nextafter(s16, torch.full_like(s16, float("inf")))
    return torch.where(s16.float() < s, up, s16)


def _codes(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(wg / s.unsqueeze(-1) + z.unsqueeze(-1)), 0, qmax)


def _range_params(wg: torch.Tensor, qmax: int, shrink: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min/max params over each group's range (widened to include 0, times shrink)."""
    lo = wg.amin(dim=-1).clamp(max=0) * shrink
    hi = wg.amax(dim=-1).clamp(min=0) * shrink
    s = (hi - lo) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    s16 = _fp16_scale(s)
    z16 = (-lo / s16.float()).to(torch.float16)
    return s16, z16


def _group_err(wg: torch.Tensor, s16: torch.Tensor, z16: torch.Tensor, qmax: int) -> torch.Tensor:
    s, z = s16.float(), z16.float()
    q = _codes(wg, s, z, qmax)
    return ((q - z.unsqueeze(-1)) * s.unsqueeze(-1) - wg).pow(2).sum(-1)


HQQ_SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


def _shrink_params(wg: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group, the range shrink (clipping) with the lowest squared error: (s16, z16, err)."""
    best_s, best_z = _range_params(wg, qmax)
    best_err = _group_err(wg, best_s, best_z, qmax)
    for shrink in HQQ_SHRINKS[1:]:
        s16, z16 = _range_params(wg, qmax, shrink)
        err = _group_err(wg, s16, z16, qmax)
        better = err < best_err
        best_s = torch.where(better, s16, best_s)
        best_z = torch.where(better, z16, best_z)
        best_err = torch.where(better, err, best_err)
    return best_s, best_z, best_err


def _hqq_params(wg: torch.Tensor, qmax: int, iters: int = 20, lp: float = 0.7,
                beta: float = 10.0, kappa: float = 1.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group: best range shrink by squared error, then half-quadratic zero refinement
    (HQQ: alternate an l_p shrinkage of the residual with a closed-form zero update), keeping,
    per group, whichever zero gave the lowest squared reconstruction error so far."""
    best_s, best_z, best_err = _shrink_params(wg, qmax)
    s = best_s.float().unsqueeze(-1)
    z = best_z.float().unsqueeze(-1)
    for _ in range(iters):
        q = torch.clamp(torch.round(wg / s + z), 0, qmax)
        e = wg - (q - z) * s
        a = e.abs()
        we = torch.sign(e) * F.relu(a - a.clamp(min=1e-12).pow(lp - 1) / beta)  # l_p shrinkage
        z = (q - (wg - we) / s).mean(dim=-1, keepdim=True)
        beta *= kappa
        z16 = z.squeeze(-1).to(torch.float16)
        err = _group_err(wg, best_s, z16, qmax)
        better = err < best_err
        best_z = torch.where(better, z16, best_z)
        best_err = torch.where(better, err, best_err)
    return best_s, best_z


def _gptq_codes(w: torch.Tensor, spec: QuantSpec, calib_x: torch.Tensor, damp: float = 0.01,
                block: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al. 2022): quantize input columns in order and spread each column's
    rounding error over the columns not yet quantized, weighted by the inverse Hessian
    H = X^T X of the calibration inputs, so the layer OUTPUT error on those inputs is minimised
    (not the weight error). Group params are chosen (clip search) when a group is reached,
    from the already error-updated weights. Returns codes (O, Kp) uint8, scales, zeros (O, G)."""
    O, K = w.shape
    g, qmax = spec.group_size, (1 << spec.bits) - 1
    kp = padded_in_features(K, g)
    X = calib_x.detach().float().reshape(-1, K)
    H = X.T @ X / max(1, X.shape[0])  # (K, K)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    H += damp * torch.diagonal(H).mean() * torch.eye(K)
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except RuntimeError as exc:  # not positive definite even after damping
        raise ValueError(f"gptq: calibration Hessian ({K}x{K}) is not positive definite: {exc}") from None
    W = w.detach().float().clone()
    codes = torch.zeros(O, kp, dtype=torch.uint8)
    G = kp // g
    S = torch.ones(O, G, dtype=torch.float16)
    Z = torch.zeros(O, G, dtype=torch.float16)
    block = max(g, block // g * g)  # groups never straddle a block
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        s = z = None
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # entering a group: its params from the current (updated) weights
                wg = F.pad(W1[:, i:i + g], (0, g - W1[:, i:i + g].shape[1])).unsqueeze(1)
                s16, z16, _ = _shrink_params(wg, qmax)
                S[:, col // g], Z[:, col // g] = s16[:, 0], z16[:, 0]
                s, z = s16[:, 0].float(), z16[:, 0].float()
            q = torch.clamp(torch.round(W1[:, i] / s + z), 0, qmax)
            codes[:, col] = q.to(torch.uint8)
            err = (W1[:, i] - (q - z) * s) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    if kp > K:  # padding columns: whatever code represents 0 best (never multiplied by real x)
        last = Z[:, (K - 1) // g:].float().repeat_interleave(g, dim=1)[:, K % g if K % g else g:]
        codes[:, K:] = torch.clamp(torch.round(last[:, : kp - K]), 0, qmax).to(torch.uint8)
    return codes, S, Z


def quantize_weight(w: torch.Tensor, spec: QuantSpec, calib_x: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """(out, in) float weight -> the stored tensors of the format (see packed_shapes).
    calib_x (n, in): calibration inputs of this layer, required by method "gptq" only."""
    if w.dim() != 2:
        raise ValueError(f"quantize_weight: expected a 2-D weight, got shape {tuple(w.shape)}")
    O, K = w.shape
    bad = int((~torch.isfinite(w)).sum())
    if bad:
        raise ValueError(f"quantize_weight: the ({O}, {K}) weight has {bad} NaN/inf value(s)")
    if spec.bits == 16:
        return {"weight": w.detach().to(FLOAT_DTYPES[spec.float_dtype]).contiguous()}
    g, qmax = spec.group_size, (1 << spec.bits) - 1
    kp = padded_in_features(K, g)
    if spec.method == "gptq":
        if calib_x is None or calib_x.shape[-1] != K:
            got = None if calib_x is None else tuple(calib_x.shape)
            raise ValueError(f"quantize_weight: method 'gptq' needs calib_x of shape (n, {K}), got {got}")
        q, s16, z16 = _gptq_codes(w, spec, calib_x)
        return {**pack_codes(q, spec.bits), "scales": s16.contiguous(), "zeros": z16.contiguous()}
    wp = F.pad(w.detach().float(), (0, kp - K))
    wg = wp.view(O, kp // g, g)
    s16, z16 = (_hqq_params(wg, qmax) if spec.method == "hqq" and spec.bits <= 4
                else _range_params(wg, qmax))
    q = _codes(wg, s16.float(), z16.float(), qmax).to(torch.uint8).view(O, kp)
    return {**pack_codes(q, spec.bits), "scales": s16.contiguous(), "zeros": z16.contiguous()}


def dequantize_weight(t: dict[str, torch.Tensor], spec: QuantSpec, in_features: int) -> torch.Tensor:
    """Stored tensors -> (out, in) float32 weight. Reference path; the kernels never do this whole."""
    if spec.bits == 16:
        return t["weight"].float()
    q = unpack_codes(t, spec.bits).float()
    O, kp = q.shape
    G = kp // spec.group_size
    w = (q.view(O, G, spec.group_size) - t["zeros"].float().unsqueeze(-1)) * t["scales"].float().unsqueeze(-1)
    return w.view(O, kp)[:, :in_features]


# --------------------------------------------------------------------------- modules

class QuantizedLinear(nn.Module):
    """y = x @ W'^T for a packed W' (no bias); the packed tensors are buffers, so they move with
    .to() and show in state_dict; `nbytes` is what they really take."""

    def __init__(self, spec: QuantSpec, in_features: int, out_features: int,
                 tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.spec, self.in_features, self.out_features = spec, in_features, out_features
        self.names = tuple(packed_shapes(out_features, in_features, spec))
        for name in self.names:
            self.register_buffer(name, tensors[name])

    @classmethod
    def from_float(cls, w: torch.Tensor, spec: QuantSpec) -> "QuantizedLinear":
        return cls(spec, w.shape[1], w.shape[0], quantize_weight(w, spec))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.names}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def dequantize(self) -> torch.Tensor:
        return dequantize_weight(self.tensors(), self.spec, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = _kernels
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.spec.bits == 16:
            y = kernels.float_matmul(x2, self.weight)
        else:
            y = kernels.qmatmul(x2, self.tensors(), self.spec.bits, self.spec.group_size,
                                self.in_features, self.out_features)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.spec.bits}, "
                f"group={self.spec.group_size}, method={self.spec.method}")


class QuantizedExpert(nn.Module):
    """A SwiGLU expert with packed weights: down(silu(gate(x)) * up(x)), x (n, d) -> (n, d)."""

    def __init__(self, spec: QuantSpec, d_model: int, hidden: int,
                 w_gate: QuantizedLinear, w_up: QuantizedLinear, w_down: QuantizedLinear):
        super().__init__()
        self.spec, self.d_model, self.hidden = spec, d_model, hidden
        self.w_gate, self.w_up, self.w_down = w_gate, w_up, w_down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.dtype == torch.float32:
            n = x.shape[0]
            if self.spec.bits == 16:
                fused = not _kernels.use_gemm(n, self.hidden, self.d_model)
            else:
                kpd = self.w_gate.scales.shape[1] * self.spec.group_size
                kph = self.w_down.scales.shape[1] * self.spec.group_size
                fused = not _kernels.use_gemm(n, self.hidden, kpd)
                small = max(self.hidden * kpd, self.d_model * kph) <= _kernels.TILE_FLOATS
                if not fused and small and n < _kernels.GEMM_MIN_BATCH:
                    w = _kernels.qexpert_weights(self)  # one native dequantize, then 3 GEMMs
                    if w is not None:
                        return F.linear(F.silu(F.linear(x, w[0])) * F.linear(x, w[1]), w[2])
            if fused:
                y = _kernels.qexpert(self, x)  # one native call for the whole expert
                if y is not None:
                    return y
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))

    @property
    def nbytes(self) -> int:
        return self.w_gate.nbytes + self.w_up.nbytes + self.w_down.nbytes

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor dict, e.g. 'w_gate.qweight', 'w_down.scales' (for safetensors/wire)."""
        return {f"{p}.{n}": t for p in PROJ_NAMES for n, t in getattr(self, p).tensors().items()}

    @classmethod
    def from_tensors(cls, spec: QuantSpec, d_model: int, hidden: int,
                     tensors: dict[str, torch.Tensor], source: str = "tensors") -> "QuantizedExpert":
        """Rebuild from to_tensors() output; every missing, extra or mis-shaped tensor is named
        (CheckpointError, prefixed with `source`, e.g. the file and tensor prefix)."""
        dims = {"w_gate": (hidden, d_model), "w_up": (hidden, d_model), "w_down": (d_model, hidden)}
        expected = {f"{p}.{n}": sd for p, (o, i) in dims.items()
                    for n, sd in packed_shapes(o, i, spec).items()}
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing:
            raise CheckpointError(f"{source}: missing tensor(s) {missing} for a {spec.bits}-bit expert "
                                  f"(group {spec.group_size})")
        if extra:
            raise CheckpointError(f"{source}: unexpected tensor(s) {extra} for a {spec.bits}-bit expert "
                                  f"(wrong bits in quant.json?)")
        for name, (shape, dtype) in expected.items():
            t = tensors[name]
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise CheckpointError(f"{source}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, a "
                                      f"{spec.bits}-bit group-{spec.group_size} expert with d_model="
                                      f"{d_model}, hidden={hidden} needs {dtype} {shape}")
        mods = {}
        for p, (o, i) in dims.items():
            names = packed_shapes(o, i, spec)
            mods[p] = QuantizedLinear(spec, i, o, {n: tensors[f"{p}.{n}"].contiguous() for n in names})
        return cls(spec, d_model, hidden, mods["w_gate"], mods["w_up"], mods["w_down"])

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, hidden={self.hidden}, bits={self.spec.bits}, nbytes={self.nbytes}"


def quantize_expert(expert: nn.Module, spec: QuantSpec, calib_x: torch.Tensor | None = None) -> QuantizedExpert:
    """Quantize a SwiGLUExpert (w_gate, w_up, w_down nn.Linear) into the packed format.
    calib_x (n, d_model): tokens routed to this expert; needed for method "gptq" (w_down is then
    calibrated on the already-quantized gate/up outputs, as sequential GPTQ does)."""
    d_model = expert.w_gate.weight.shape[1]
    hidden = expert.w_gate.weight.shape[0]
    if spec.method == "gptq" and spec.bits < 16:
        if calib_x is None:
            raise ValueError("quantize_expert: method 'gptq' needs calib_x (tokens routed to the expert)")
        x = calib_x.detach().float().reshape(-1, d_model)
        gate = QuantizedLinear(spec, d_model, hidden, quantize_weight(expert.w_gate.weight, spec, x))
        up = QuantizedLinear(spec, d_model, hidden, quantize_weight(expert.w_up.weight, spec, x))
        with torch.no_grad():
            hx = F.silu(gate(x)) * up(x)
        down = QuantizedLinear(spec, hidden, d_model, quantize_weight(expert.w_down.weight, spec, hx))
        return QuantizedExpert(spec, d_model, hidden, gate, up, down)
    lin = {}
    for p in PROJ_NAMES:
        try:
            lin[p] = QuantizedLinear.from_float(getattr(expert, p).weight, spec)
        except ValueError as exc:
            raise ValueError(f"{p}: {exc}") from None
    return QuantizedExpert(spec, d_model, hidden, lin["w_gate"], lin["w_up"], lin["w_down"])


# --------------------------------------------------------------------------- checkpoints

def _expert_prefix(layer: int, e: int) -> str:
    return f"layers.{layer}.moe.experts.{e}."


def save_quantized(model, specs: dict[tuple[int, int], QuantSpec], out_dir: str | Path,
                   base_model: str | None = None, backbone_dtype: torch.dtype = torch.float16) -> Path:
    """Write a quantized checkpoint: config.json, model.safetensors (backbone in backbone_dtype +
    packed experts), quant.json. Experts missing from `specs` are stored as 16-bit float.
    Experts that are already QuantizedExpert are written as they are when their spec matches."""
    from coel_model.checkpoint import write_own_format

    cfg = model.cfg
    bad = sorted(k for k in specs if not (0 <= k[0] < cfg.n_layers and 0 <= k[1] < cfg.n_experts))
    if bad:
        raise ValueError(f"save_quantized: specs name experts {bad[:5]} outside the model "
                         f"({cfg.n_layers} layers x {cfg.n_experts} experts)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if ".moe.experts." in name or (cfg.tie_embeddings and name == "lm_head.weight"):
            continue
        t = t.detach().contiguous()
        state[name] = t.to(backbone_dtype) if t.is_floating_point() else t
    entries = []
    for l in range(cfg.n_layers):
        for e in range(cfg.n_experts):
            spec = specs.get((l, e), QuantSpec(16))
            mod = model.expert(l, e)
            if isinstance(mod, QuantizedExpert):
                if mod.spec != spec:
                    raise ValueError(f"save_quantized: expert (layer {l}, expert {e}) is already "
                                     f"quantized as {mod.spec}, cannot re-quantize to {spec}")
                q = mod
            else:
                q = quantize_expert(mod, spec)
            for n, t in q.to_tensors().items():
                state[_expert_prefix(l, e) + n] = t.contiguous()
            entries.append({"layer": l, "expert": e, **spec.to_dict(), "bytes": q.nbytes})
    write_own_format(out, state, cfg)
    total = sum(x["bytes"] for x in entries)
    meta = {"format": QUANT_FORMAT, "version": QUANT_VERSION, "base_model": base_model,
            "backbone_dtype": str(backbone_dtype).removeprefix("torch."),
            "expert_bytes": total, "experts": entries}
    (out / "quant.json").write_text(json.dumps(meta, indent=1) + "\n")
    if base_model is not None:  # a relative base_model may be relative to out_dir or to the cwd
        for cand in (out / base_model, Path(base_model)):
            if (cand / "tokenizer.json").is_file():
                shutil.copyfile(cand / "tokenizer.json", out / "tokenizer.json")
                break
    return out


def read_quant_json(path: str | Path) -> dict:
    """Parse and validate quant.json; returns {(layer, expert): QuantSpec} under 'specs'."""
    qpath = Path(path) / "quant.json"
    try:
        meta = json.loads(qpath.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{qpath}: file not found") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{qpath}: not valid JSON (line {exc.lineno}): {exc.msg}") from None
    if meta.get("format") != QUANT_FORMAT:
        raise CheckpointError(f"{qpath}: format is {meta.get('format')!r}, expected {QUANT_FORMAT!r}")
    if meta.get("version") != QUANT_VERSION:
        raise CheckpointError(f"{qpath}: version {meta.get('version')!r} is not supported "
                              f"(this code reads version {QUANT_VERSION})")
    specs = {}
    for i, ent in enumerate(meta.get("experts", [])):
        try:
            key = (int(ent["layer"]), int(ent["expert"]))
            spec = QuantSpec.from_dict({k: ent[k] for k in ("bits", "group_size", "method", "float_dtype")
                                        if k in ent})
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{qpath}: experts[{i}] is invalid: {exc}") from None
        if key in specs:
            raise CheckpointError(f"{qpath}: experts[{i}] repeats (layer {key[0]}, expert {key[1]})")
        specs[key] = spec
    meta["specs"] = specs
    return meta


def load_quantized_checkpoint(model, path: str | Path, state: dict[str, torch.Tensor]) -> None:
    """Swap QuantizedExpert modules into `model` from a quantized checkpoint's tensors and load
    the backbone; any inconsistency raises CheckpointError naming the file and tensor."""
    from coel_model.checkpoint import load_state_into

    path = Path(path)
    cfg = model.cfg
    meta = read_quant_json(path)
    specs = meta["specs"]
    source = str(path / "model.safetensors")
    need = {(l, e) for l in range(cfg.n_layers) for e in range(cfg.n_experts)}
    missing = sorted(need - set(specs))
    extra = sorted(set(specs) - need)
    if missing or extra:
        raise CheckpointError(f"{path / 'quant.json'}: lists {len(specs)} experts, the config has "
                              f"{cfg.n_layers} layers x {cfg.n_experts}; missing {missing[:5]}, "
                              f"outside the model {extra[:5]}")
    backbone = {k: v for k, v in state.items() if ".moe.experts." not in k}
    by_expert: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if ".moe.experts." in k:
            head, _, rest = k.partition(".moe.experts.")
            try:
                l = int(head.removeprefix("layers."))
                e_str, _, name = rest.partition(".")
                key = (l, int(e_str))
            except ValueError:
                raise CheckpointError(f"{source}: tensor {k!r} is not a valid expert tensor name") from None
            if key not in need:
                raise CheckpointError(f"{source}: tensor {k!r} names an expert outside the model")
            by_expert.setdefault(key, {})[name] = v
    for (l, e) in sorted(need):
        q = QuantizedExpert.from_tensors(specs[(l, e)], cfg.d_model, cfg.expert_hidden,
                                         by_expert.get((l, e), {}),
                                         source=f"{source} [{_expert_prefix(l, e)}*]")
        model.set_expert(l, e, q)
    expert_keys = {k for k in model.state_dict() if ".moe.experts." in k}
    load_state_into(model, backbone, source, skip=expert_keys)
