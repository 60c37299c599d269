"""Expert profiling: how often each expert fires, with what weight, with whom, and what it costs
the model's loss to quantize it -- measured, not assumed (popularity alone misleads; see MC-MoE
and EdgeMoE in docs/profile-format.md).

One baseline pass over calibration tokens records the routing (popularity, mean routing weight,
co-activation within a layer and from layer l to l+1) and caches, per layer, the residual stream
after that layer's MoE. Quantizing only expert (l, e) changes layer l's output by
`w * (q_e(h) - f_e(h))` on exactly the tokens routed to e, so each measurement adds that delta to
the cached stream and re-runs only layers l+1.. and the head: no full forward per measurement.

The document format ("coel-profile" v1), its one validator and the `Profile` type that the
planner and `coel quantize` read are coel_model/profile_format.py (docs/profile-format.md).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from coel_model.config import MoEConfig
from coel_model.errors import ConfigError
from coel_model.model import ForwardObserver, MoEModel, Routing
from coel_model.profile_format import ALL_BITS, PROFILE_FORMAT, PROFILE_VERSION

DEFAULT_MEASURED_BITS = (2, 3, 4, 8)
DEFAULT_WINDOW = 512

Progress = Callable[[int, int, str], None]  # (done, total, what is running)


# --------------------------------------------------------------------------- measurement

def backbone_params(model: MoEModel) -> int:
    """Parameters outside the routed experts (tied embeddings counted once)."""
    return sum(p.numel() for n, p in model.named_parameters() if ".moe.experts." not in n)


class _MoEInputs(ForwardObserver):
    """Every layer's MoE input and routing of the passes it observes."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []  # (N, d) per layer
        self.routings: list[Routing] = []

    def moe_input(self, layer: int, h: torch.Tensor) -> None:
        self.inputs.append(h)

    def routed(self, layer: int, routing: Routing) -> None:
        self.routings.append(routing)


def calibration_batch(ids: list[int], window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping full windows -> inputs (B, W) and next-token targets (B, W)."""
    if len(ids) < 2:
        raise ConfigError(f"calibration needs at least 2 tokens (got {len(ids)})")
    window = min(window, len(ids) - 1)
    n = (len(ids) - 1) // window
    t = torch.tensor(ids[: n * window + 1], dtype=torch.long)
    x = torch.stack([t[i * window:(i + 1) * window] for i in range(n)])
    y = torch.stack([t[i * window + 1:(i + 1) * window + 1] for i in range(n)])
    return x, y


def _dequantized_expert(expert: torch.nn.Module, bits: int, group_size: int, method: str):
    """The expert as the packed format reproduces it, run with plain float matmuls (the packed
    kernels compute the same products; dense float is faster for the many-token profiling calls)."""
    from coel_model.quant import QuantSpec, quantize_expert
    q = quantize_expert(expert, QuantSpec(bits, group_size, method))
    wg, wu, wd = q.w_gate.dequantize(), q.w_up.dequantize(), q.w_down.dequantize()
    return lambda x: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)


def _mean_nll(logp: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean negative log-likelihood summed in float64: differences of 1e-6 nats must survive."""
    return float(-logp.gather(1, targets.unsqueeze(1)).double().mean())


@torch.inference_mode()
def profile_model(model: MoEModel, ids: list[int], bits: tuple[int, ...] = DEFAULT_MEASURED_BITS,
                  group_size: int = 64, method: str = "rtn", window: int = DEFAULT_WINDOW,
                  with_kl: bool = False, source: str = "unknown",
                  progress: Progress | None = None) -> dict:
    """Measure everything a "coel-profile" v1 document holds for `model` on the token stream `ids`.

    `bits` are the widths whose loss is measured; 16 is always listed with loss 0.0 (the fp
    reference). The model must be unquantized (float experts).
    """
    from coel_model.packing import QuantSpec, packed_expert_bytes

    cfg = model.cfg
    L, E, k, d = cfg.n_layers, cfg.n_experts, cfg.top_k, cfg.d_model
    measured = sorted({int(b) for b in bits} - {16})
    bad = [b for b in measured if b not in ALL_BITS]
    if bad:
        raise ConfigError(f"cannot profile bit widths {bad}; choose from {list(ALL_BITS[:-1])}")
    for l in range(L):
        for e in range(E):
            if not hasattr(model.expert(l, e), "w_gate") or not isinstance(
                    getattr(model.expert(l, e).w_gate, "weight", None), torch.Tensor):
                raise ConfigError(f"expert (layer {l}, expert {e}) is not a float SwiGLU expert; "
                                  f"profile the unquantized model")
    t_start = time.monotonic()
    x_tok, y_tok = calibration_batch(ids, min(window, cfg.max_seq_len))
    B, T = x_tok.shape
    N = B * T
    targets = y_tok.reshape(-1)

    # ---- baseline pass (MoEModel's own forward, one layer at a time): the stream after every
    # layer, each layer's MoE input and routing decisions
    seen = _MoEInputs()
    after: list[torch.Tensor] = []  # (B, T, d) residual stream after layer l
    x = model.embed(x_tok)
    for i in range(L):
        x = model.run_layers(x, i, i + 1, observer=seen)
        after.append(x)
    logits = model.head(x).reshape(N, -1)
    routings, normed = seen.routings, seen.inputs  # normed[l]: (N, d) MoE input of layer l
    base_logp = F.log_softmax(logits.float(), dim=-1)
    base_loss = _mean_nll(base_logp, targets)

    # ---- routing statistics
    counts = torch.zeros(L, E, dtype=torch.float64)
    wsum = torch.zeros(L, E, dtype=torch.float64)
    same, nxt = [], []
    onehots = []
    for l, r in enumerate(routings):
        oh = torch.zeros(N, E, dtype=torch.float64)
        oh.scatter_(1, r.expert_ids, 1.0)
        onehots.append(oh)
        counts[l] = oh.sum(0)
        wsum[l].index_add_(0, r.expert_ids.reshape(-1), r.weights.reshape(-1).double())
        same.append((oh.T @ oh).round().long().tolist())
    for l in range(L - 1):
        nxt.append((onehots[l].T @ onehots[l + 1]).round().long().tolist())

    # ---- importance: loss increase with only (l, e) quantized to b bits
    total = L * E * len(measured)
    done = 0
    loss_inc = [[{} for _ in range(E)] for _ in range(L)]
    kls = [[{} for _ in range(E)] for _ in range(L)]
    for l in range(L):
        r = routings[l]
        for e in range(E):
            expert = model.expert(l, e)
            if e not in r.groups:  # never routed here: quantizing it cannot change these tokens
                for b in measured:
                    loss_inc[l][e][str(b)] = 0.0
                    kls[l][e][str(b)] = 0.0
                done += len(measured)
                if progress:
                    progress(done, total, f"layer {l} expert {e} (unused)")
                continue
            tok, slot = r.groups[e]
            xe = normed[l].index_select(0, tok)
            w = r.weights[tok, slot].unsqueeze(-1).to(xe.dtype)
            fp_out = expert(xe)
            for b in measured:
                q_out = _dequantized_expert(expert, b, group_size, method)(xe)
                stream = after[l].reshape(N, d).index_add(0, tok, (q_out - fp_out) * w).view(B, T, d)
                stream = model.run_layers(stream, l + 1, L)
                logp = F.log_softmax(model.head(stream).reshape(N, -1).float(), dim=-1)
                loss_inc[l][e][str(b)] = _mean_nll(logp, targets) - base_loss
                if with_kl:
                    kls[l][e][str(b)] = float(F.kl_div(logp, base_logp, log_target=True,
                                                       reduction="sum")) / N
                done += 1
                if progress:
                    progress(done, total, f"layer {l} expert {e} {b}-bit")

    widths = measured + [16]
    bytes_at = {b: packed_expert_bytes(d, cfg.expert_hidden, QuantSpec(b, group_size)) for b in widths}
    experts = []
    for l in range(L):
        for e in range(E):
            c = float(counts[l, e])
            ent = {"layer": l, "expert": e,
                   "popularity": c / N,
                   "mean_weight": float(wsum[l, e]) / c if c else 0.0,
                   "loss_increase": {**loss_inc[l][e], "16": 0.0},
                   "bytes": {str(b): int(bytes_at[b]) for b in widths}}
            if with_kl:
                ent["output_kl"] = {**kls[l][e], "16": 0.0}
            experts.append(ent)
    bb = backbone_params(model)
    return {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "model_config": cfg.to_dict(),
            "group_size": group_size, "bits": widths, "experts": experts,
            "coactivation": {"same_layer": same, "next_layer": nxt},
            "backbone_bytes": {"16": 2 * bb, "32": 4 * bb},
            "calibration": {"tokens": N, "source": source, "windows": B, "window": T,
                            "method": method, "base_loss_nats": round(base_loss, 6),
                            "seconds": round(time.monotonic() - t_start, 1)}}
