"""Expert shards as LOAD_SHARD carries them: the tensors of one expert at a bit width
(`expert_tensors`, what the deployer sends), the module an agent builds from them (`build_shard`,
checked against the description), and the bytes a module holds. The agent, the deployer and
perception (which measures shards built exactly as agents build them) share this module.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from nodes import protocol as P


class ShardError(Exception):
    def __init__(self, code: P.ErrorCode, reason: str):
        super().__init__(reason)
        self.code = code


class HalfExpert(nn.Module):
    """An fp16/fp32 SwiGLU expert held as received (zero-copy); computes in float32.

    kernel "exact": upcast the weights per call, so results are bit-identical to a float32 model
    loaded from the same fp16 checkpoint (what `coel generate` runs); costs a transient fp32 copy
    of one matrix. kernel "fast": coel_model.kernels.float_matmul (fused convert + dot, fp32
    accumulation, ~1e-7 relative difference, no copy); the better choice for large experts.
    """

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, kernel: str = "exact"):
        super().__init__()
        self.w_gate, self.w_up, self.w_down = w_gate, w_up, w_down
        self.kernel = kernel

    def _lin(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if w.dtype == torch.float32:
            return F.linear(x, w)
        if self.kernel == "fast":
            from coel_model import kernels
            return kernels.float_matmul(x, w)
        return F.linear(x, w.to(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, d) -> (n, d)
        return self._lin(F.silu(self._lin(x, self.w_gate)) * self._lin(x, self.w_up), self.w_down)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w_gate, self.w_up, self.w_down))


SWIGLU_TENSORS = ("w_gate", "w_up", "w_down")


def expert_tensors(module: nn.Module, bits: int) -> dict[str, torch.Tensor]:
    """What LOAD_SHARD carries for one expert: fp weights (bits 16/32) or the packed tensors."""
    if bits in (16, 32) and hasattr(module, "w_gate") and isinstance(module.w_gate, nn.Linear):
        dt = torch.float16 if bits == 16 else torch.float32
        return {n: getattr(module, n).weight.detach().to(dt).contiguous() for n in SWIGLU_TENSORS}
    if hasattr(module, "to_tensors"):
        return module.to_tensors()
    raise ShardError(P.ErrorCode.BAD_SHARD, f"cannot serialise {type(module).__name__} at {bits} bits")


def build_shard(desc: dict[str, Any], tensors: dict[str, torch.Tensor], fp16_kernel: str = "exact") -> nn.Module:
    """Module for one shard description + its tensors; raises ShardError naming the problem."""
    l, e, bits, d, hid = desc["layer"], desc["expert"], desc["bits"], desc["d_model"], desc["hidden"]
    where = f"shard (layer {l}, expert {e}, {bits} bits)"
    if bits in (16, 32) and set(tensors) == set(SWIGLU_TENSORS):
        want_dt = torch.float16 if bits == 16 else torch.float32
        shapes = {"w_gate": (hid, d), "w_up": (hid, d), "w_down": (d, hid)}
        for n, t in tensors.items():
            if t.dtype != want_dt or tuple(t.shape) != shapes[n]:
                raise ShardError(P.ErrorCode.BAD_SHARD, f"{where}: tensor {n} is {tuple(t.shape)} {t.dtype}, "
                                 f"expected {shapes[n]} {want_dt}")
        return HalfExpert(tensors["w_gate"], tensors["w_up"], tensors["w_down"], fp16_kernel)
    try:
        from coel_model import quant
    except ModuleNotFoundError:
        raise ShardError(P.ErrorCode.UNSUPPORTED, f"{where}: quantized shards need coel_model.quant, "
                         f"which this install lacks") from None
    try:
        spec = quant.QuantSpec(bits=bits, group_size=desc.get("group_size", 64),
                               method=desc.get("method", "rtn"))
        # own the memory: received frames are read-only views
        return quant.QuantizedExpert.from_tensors(spec, d, hid, {k: v.clone() for k, v in tensors.items()})
    except Exception as exc:
        raise ShardError(P.ErrorCode.BAD_SHARD, f"{where}: {type(exc).__name__}: {exc}") from None


def module_nbytes(m: nn.Module) -> int:
    nb = getattr(m, "nbytes", None)
    if nb is not None:
        return int(nb)
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
