"""The routing step: which (token, expert) assignments still travel. MC-MoE's beta rule and the
optional dropping of unimportant tokens, both sparing the most important tokens.

Shapes: N tokens in the layer call, k top-k."""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F

from coel_model.model import Routing
from nodes.compression.settings import CompressionSettings


def token_importance(h: torch.Tensor) -> torch.Tensor:
    """Attention-free importance proxy (N,): 1 - cosine(h_i, mean of h over the call).

    Why: at the expert seam we have no attention scores. Tokens unlike the rest of the batch
    (attention sinks such as BOS, rare tokens, delimiters) are the ones whose loss of a secondary
    expert or merge into a neighbour cannot be compensated by similar tokens; the router-weight
    margin is already what the beta rule thresholds, so it would add nothing.
    """
    hf = h.float()
    if hf.shape[0] <= 1:
        return torch.zeros(hf.shape[0])
    mean = hf.mean(dim=0, keepdim=True)
    return 1.0 - F.cosine_similarity(hf, mean.expand_as(hf), dim=-1, eps=1e-12)


def protected_mask(importance: torch.Tensor, frac: float) -> torch.Tensor:
    """bool (N,): the floor(frac * N) most important tokens (ties: lower index first).

    floor, not ceil: in batch-1 decode (N = 1) nothing is protected, so pruning can still save a hop.
    """
    n = importance.shape[0]
    count = int(math.floor(frac * n + 1e-9))
    mask = torch.zeros(n, dtype=torch.bool)
    if count > 0:
        order = torch.sort(-importance.float(), stable=True).indices[:count]
        mask[order] = True
    return mask


def prune_routing(routing: Routing, settings: CompressionSettings, *,
                  protected: torch.Tensor | None = None,
                  remote: Iterable[int] | None = None) -> Routing:
    """New Routing with low-value remote assignments removed (weights 0, gone from groups).

    Rules, applied to assignments whose expert is remote (`remote` = expert ids of this layer,
    None = all) and whose token is not `protected`:
      * beta: slot j >= 1 goes when weight_j < prune_beta * weight_0 (MC-MoE online pruning);
      * drop: in each remote expert's group, the floor(drop_tokens_frac * n) lowest-weight rows
        that are not a token's top-1 assignment go too.
    A token's top-1 assignment is never removed. Pruned weight is zeroed by default: with
    y = w1 f1 + w2 f2, zeroing errs by w2 f2 while renormalising (prune_renorm, kept weights
    rescaled to the old sum) errs by w2 (f1 - f2), which is larger when experts specialise
    (uncorrelated outputs). Measured on tiny-moe, zeroing keeps top-1 agreement higher at every
    beta (docs/bench/compression.md). The input is not modified; with nothing to prune it is
    returned as is.
    """
    if not settings.prunes:
        return routing
    ids, w = routing.expert_ids, routing.weights  # (N, k)
    N, k = ids.shape
    if k < 2 or N == 0:
        return routing
    prot = torch.zeros(N, dtype=torch.bool) if protected is None else protected.to(torch.bool)
    if prot.shape != (N,):
        raise ValueError(f"protected mask has shape {tuple(prot.shape)}, routing has {N} tokens")
    if remote is None:
        is_remote = torch.ones_like(ids, dtype=torch.bool)
    else:
        rset = torch.tensor(sorted(set(int(e) for e in remote)), dtype=ids.dtype)
        is_remote = torch.isin(ids, rset)
    top1 = torch.zeros_like(ids, dtype=torch.bool)
    top1[:, 0] = True
    candidate = is_remote & ~top1 & ~prot.unsqueeze(1)  # (N, k)
    drop = torch.zeros_like(candidate)
    if settings.prune_beta > 0:
        drop |= candidate & (w < settings.prune_beta * w[:, :1])
    if settings.drop_tokens_frac > 0:
        for e, (tok, slot) in routing.groups.items():
            alive = ~drop[tok, slot]
            n_alive = int(alive.sum())
            count = int(math.floor(settings.drop_tokens_frac * n_alive + 1e-9))
            if count == 0:
                continue
            cand = candidate[tok, slot] & alive
            if not bool(cand.any()):
                continue
            cw = torch.where(cand, w[tok, slot], torch.full_like(w[tok, slot], float("inf")))
            order = torch.sort(cw, stable=True).indices[:min(count, int(cand.sum()))]
            drop[tok[order], slot[order]] = True
    if not bool(drop.any()):
        return routing
    keep = ~drop
    new_w = torch.where(keep, w, torch.zeros_like(w))
    if settings.prune_renorm:
        total = w.sum(dim=1, keepdim=True)
        kept = new_w.sum(dim=1, keepdim=True)
        new_w = new_w * (total / kept.clamp_min(torch.finfo(w.dtype).tiny))
    groups = {}
    for e, (tok, slot) in routing.groups.items():
        m = keep[tok, slot]
        if bool(m.all()):
            groups[e] = (tok, slot)
        elif bool(m.any()):
            groups[e] = (tok[m], slot[m])
    return Routing(ids, new_w, routing.probs, groups)


def prune_links(routing: Routing, h: torch.Tensor,
                experts_by_settings: dict[CompressionSettings, Iterable[int] | None]) -> dict[float, torch.Tensor]:
    """For an executor: protect and prune the experts bound for each link's settings (None = every
    routed expert), writing the result into the routing the model passed (the model combines with
    the Routing object it handed to the executor). Token importance is computed once. Returns the
    protected-token masks (N,) by protect fraction, for compress_group (index a mask with a
    group's token indices). The coordinator and the measurement both prune through here."""
    active = {st: es for st, es in experts_by_settings.items() if st.prunes or st.fuses}
    prot: dict[float, torch.Tensor] = {}
    if not active:
        return prot
    importance = token_importance(h)
    for st, es in active.items():
        if st.protect_top_frac > 0 and st.protect_top_frac not in prot:
            prot[st.protect_top_frac] = protected_mask(importance, st.protect_top_frac)
        if st.prunes:
            pruned = prune_routing(routing, st, protected=prot.get(st.protect_top_frac), remote=es)
            if pruned is not routing:
                routing.weights, routing.groups = pruned.weights, pruned.groups
    return prot


def prune_in_place(routing: Routing, h: torch.Tensor, settings: CompressionSettings,
                   remote: Iterable[int] | None = None) -> torch.Tensor | None:
    """`prune_links` for one link: the protected-token mask (N,), or None when nothing is protected."""
    return prune_links(routing, h, {settings: remote}).get(settings.protect_top_frac)
