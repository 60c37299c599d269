"""Expert quantization: the quantizers (RTN, HQQ, GPTQ) and the quantized modules; the stored
format is coel_model.packing, checkpoints are coel_model.checkpoint.

RTN picks s = (hi - lo) / (2^b - 1) over the group's range widened to include 0, so every
element's error is at most s/2 (up to fp32 rounding); HQQ refines the zero (and picks a range
shrink) per group to lower the reconstruction error at 2-3 bits, where clipping outliers pays.

Checkpoint (own format, see coel_model.checkpoint): config.json + model.safetensors holding the
backbone tensors and, per quantized expert, `layers.{l}.moe.experts.{e}.{w_gate|w_up|w_down}.
{qweight|qweight_hi|scales|zeros|weight}` + quant.json (format "coel-quant", version 1).
"""
from __future__ import annotations

import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from coel_model import kernels as _kernels
from coel_model.packing import (FLOAT_DTYPES, QuantSpec, dequantize_weight, pack_codes, packed_shapes,
                                padded_in_features)
from coel_model.errors import CheckpointError

PROJ_NAMES = ("w_gate", "w_up", "w_down")


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
