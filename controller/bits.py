"""Per-expert bit widths under a byte budget or a quality floor (Lagrangian + greedy fill).

The objective is the profile's measured loss increase per expert (sum over experts, the
additive first-order model the profile's "only this expert quantized" measurement supports);
with `mc_moe=True` it is the MC-MoE form popularity^1.0 x weight^1.5 x loss. Both directions
are solved with one Lagrange multiplier found by bisection over the per-expert choice
argmin_b loss(b) + lambda * bytes(b), then a greedy pass spends what is left on the upgrades
with the best loss saved per byte. Vectorised: 58 x 256 experts take milliseconds.
"""
from __future__ import annotations

import numpy as np

from coel_model.errors import InfeasibleError
from controller.profile import Profile

MB = 1 << 20


def _objective(profile: Profile, allowed: np.ndarray, mc_moe: bool) -> tuple[np.ndarray, np.ndarray]:
    loss = profile.loss_nats.reshape(-1, len(profile.bits))[:, allowed]
    byt = profile.nbytes.reshape(-1, len(profile.bits))[:, allowed].astype(np.float64)
    if mc_moe:
        w = (profile.popularity ** 1.0 * np.maximum(profile.mean_weight, 1e-6) ** 1.5).reshape(-1, 1)
        loss = loss * w / max(w.mean(), 1e-12)
    return loss, byt


def _pick(loss: np.ndarray, byt: np.ndarray, lam: float) -> np.ndarray:
    return np.argmin(loss + lam * byt, axis=1)


def allocate_for_budget(profile: Profile, budget_bytes: float, allowed_bits: tuple[int, ...] = (2, 3, 4, 8, 16),
                        mc_moe: bool = False) -> np.ndarray:
    """(L, E) bits minimising predicted loss with total expert bytes <= budget_bytes."""
    allowed = np.array([b in allowed_bits for b in profile.bits])
    if not allowed.any():
        raise InfeasibleError(f"no allowed bit width among the profiled ones {list(profile.bits)}")
    bits_arr = np.array(profile.bits)[allowed]
    loss, byt = _objective(profile, allowed, mc_moe)
    n = loss.shape[0]
    min_bytes = byt[:, 0].sum()
    if min_bytes > budget_bytes:
        raise InfeasibleError(f"experts need {min_bytes / MB:.1f} MB even at {bits_arr[0]} bits, budget is "
                              f"{budget_bytes / MB:.1f} MB")
    if byt[:, -1].sum() <= budget_bytes:
        choice = np.full(n, len(bits_arr) - 1)
    else:
        # lambda = loss per byte; bytes used falls as lambda grows; bisect in log space
        lo, hi = -80.0, 10.0  # log10 lambda; at 1e10 every expert takes its smallest width
        for _ in range(60):
            mid = (lo + hi) / 2
            if byt[np.arange(n), _pick(loss, byt, 10.0 ** mid)].sum() <= budget_bytes:
                hi = mid
            else:
                lo = mid
        hi = 10.0 ** hi
        choice = _pick(loss, byt, hi)
        choice = _greedy_fill(loss, byt, choice, budget_bytes)
    return bits_arr[choice].reshape(profile.n_layers, profile.n_experts)


def _greedy_fill(loss: np.ndarray, byt: np.ndarray, choice: np.ndarray, budget: float) -> np.ndarray:
    """Spend the leftover budget on one-step upgrades, best loss-saved per byte first."""
    n, B = loss.shape
    choice = choice.copy()
    left = budget - byt[np.arange(n), choice].sum()
    for _ in range(B):
        can = choice < B - 1
        if not can.any() or left <= 0:
            break
        nxt = np.minimum(choice + 1, B - 1)
        gain = loss[np.arange(n), choice] - loss[np.arange(n), nxt]
        cost = byt[np.arange(n), nxt] - byt[np.arange(n), choice]
        ratio = np.where(can & (gain > 0), gain / np.maximum(cost, 1e-12), -np.inf)
        order = np.argsort(-ratio, kind="stable")
        order = order[np.isfinite(ratio[order])]
        if not len(order):
            break
        csum = np.cumsum(cost[order])
        take = order[csum <= left]
        if not len(take):
            break
        choice[take] += 1
        left -= cost[take].sum()
    return choice


def allocate_for_quality(profile: Profile, max_loss_nats: float, allowed_bits: tuple[int, ...] = (2, 3, 4, 8, 16),
                         active: bool = False) -> np.ndarray:
    """(L, E) bits with the fewest bytes whose predicted loss (sum of loss increases) <= max_loss_nats.
    active=True counts bytes weighted by popularity instead: the bytes a token reads, which is
    what decode latency pays for (hot experts then get fewer bits, cold ones more)."""
    allowed = np.array([b in allowed_bits for b in profile.bits])
    bits_arr = np.array(profile.bits)[allowed]
    loss, byt = _objective(profile, allowed, False)
    if active:
        byt = byt * (profile.popularity.reshape(-1, 1) + 1e-6)
    n = loss.shape[0]
    if loss[:, 0].sum() <= max_loss_nats:
        return np.full((profile.n_layers, profile.n_experts), bits_arr[0])
    if loss[:, -1].sum() > max_loss_nats:
        raise InfeasibleError(f"quality floor {max_loss_nats:.4g} nats unreachable: even at {bits_arr[-1]} bits "
                              f"the predicted loss is {loss[:, -1].sum():.4g} nats")
    def pick(mu: float) -> np.ndarray:  # minimise bytes + mu * loss; larger mu -> less loss
        return np.argmin(byt + mu * loss, axis=1)

    lo, hi = -10.0, 80.0  # log10 mu
    for _ in range(60):
        mid = (lo + hi) / 2
        if loss[np.arange(n), pick(10.0 ** mid)].sum() <= max_loss_nats:
            hi = mid
        else:
            lo = mid
    hi = 10.0 ** hi
    choice = pick(hi)
    # greedy: downgrade where it saves bytes and the floor still holds (cheapest loss per byte first)
    slack = max_loss_nats - loss[np.arange(n), choice].sum()
    can = choice > 0
    prv = np.maximum(choice - 1, 0)
    dloss = loss[np.arange(n), prv] - loss[np.arange(n), choice]
    dbytes = byt[np.arange(n), choice] - byt[np.arange(n), prv]
    ratio = np.where(can, dloss / np.maximum(dbytes, 1e-12), np.inf)
    order = np.argsort(ratio, kind="stable")
    order = order[np.isfinite(ratio[order])]
    csum = np.cumsum(dloss[order])
    take = order[csum <= slack]
    choice[take] -= 1
    return bits_arr[choice].reshape(profile.n_layers, profile.n_experts)
