"""Per-expert bit allocation, the one allocator: under a memory budget (an exact ILP, a fast
greedy, a vectorised Lagrangian) or under a quality floor (`solve_for_quality`), all behind
`allocate(table, budget, solver)` on one `CostTable` built from the profile.

Every routed expert (layer, expert) gets one bit width from the profile's list (2, 3, 4, 8, 16).
Giving expert i the width b costs `cost[i, b]` in predicted quality loss and `bytes[i, b]` in
packed memory; we minimise the summed cost subject to the summed bytes <= budget. The cost is
MC-MoE's `freq^alpha * weight^beta * loss_increase(b)` ("mcmoe"), the measured
`loss_increase(b)` alone ("measured", which already reflects how often the expert is used), or
the measured output KL(fp || quantized) alone ("kl": always >= 0 and far less noisy than a
signed loss difference at 3-8 bits, where single-expert loss changes drown in noise).

Budgets are bytes, or an average bit width: `budget_bytes_for_avg_bits` turns "3.0 bits" into
what quantizing every expert uniformly at 3 bits takes (scales and zeros included), linearly
interpolated between neighbouring widths for non-integer averages, so "3 bits" means the same
bytes for every strategy. Everything here is pure: numbers in, an `Allocation` out, no I/O.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from coel_model.errors import ConfigError, InfeasibleError
from coel_model.profile_format import Profile

WEIGHTINGS = ("mcmoe", "measured", "kl", "mcmoe-mean")
SOLVERS = ("ilp", "greedy", "lagrangian")
DEFAULT_ALPHA = 1.0  # exponent on routing frequency (MC-MoE)
DEFAULT_BETA = 1.5  # exponent on mean routing weight (MC-MoE)
DEFAULT_TIME_LIMIT_S = 10.0
MB = 1 << 20
REFINE_MAX_OPTIONS = 4096  # the greedy's pairwise-swap refinement runs only below this many (expert, width) options


@dataclass(frozen=True)
class CostTable:
    """Options per expert: row i is expert keys[i], column j is bit width bits[j]."""
    keys: tuple[tuple[int, int], ...]  # (layer, expert) per row
    bits: tuple[int, ...]  # candidate widths, ascending
    cost: np.ndarray  # (n, B) float64 predicted loss of each choice
    nbytes: np.ndarray  # (n, B) int64 packed bytes of each choice

    def __post_init__(self) -> None:
        n, nb = len(self.keys), len(self.bits)
        if n == 0 or nb == 0:
            raise ConfigError(f"cost table needs experts and widths (got {n} experts, {nb} widths)")
        if list(self.bits) != sorted(set(self.bits)):
            raise ConfigError(f"bit widths must be ascending and distinct (got {list(self.bits)})")
        if self.cost.shape != (n, nb) or self.nbytes.shape != (n, nb):
            raise ConfigError(f"cost {self.cost.shape} / bytes {self.nbytes.shape} must both be ({n}, {nb})")
        if not np.all(np.isfinite(self.cost)):
            i, j = np.argwhere(~np.isfinite(self.cost))[0]
            raise ConfigError(f"cost of expert {self.keys[i]} at {self.bits[j]} bits is not finite")
        if np.any(self.nbytes <= 0):
            i, j = np.argwhere(self.nbytes <= 0)[0]
            raise ConfigError(f"bytes of expert {self.keys[i]} at {self.bits[j]} bits must be > 0")

    @property
    def n(self) -> int:
        return len(self.keys)

    def min_bytes(self) -> int:
        return int(self.nbytes.min(axis=1).sum())

    def max_bytes(self) -> int:
        return int(self.nbytes.max(axis=1).sum())

    def uniform_bytes(self, bits: int) -> int:
        return int(self.nbytes[:, self.bits.index(bits)].sum())


@dataclass(frozen=True)
class Allocation:
    """The chosen width per expert, what it is predicted to cost, and how it was found."""
    bits: Mapping[tuple[int, int], int]  # (layer, expert) -> bit width
    predicted_loss: float  # sum of the chosen costs (same units as the cost table)
    bytes_used: int  # packed bytes of all routed experts
    budget_bytes: int
    solver: str  # "ilp" | "greedy" | "uniform"
    optimal: bool  # proven optimal (ILP solved to optimality; never claimed by heuristics)
    notes: str = ""
    histogram: dict[int, int] = field(default_factory=dict)  # width -> number of experts

    def bits_array(self, n_layers: int, n_experts: int) -> np.ndarray:
        """(n_layers, n_experts) widths."""
        out = np.zeros((n_layers, n_experts), dtype=np.int64)
        for (l, e), b in self.bits.items():
            out[l, e] = b
        return out

    def average_bits(self) -> float:
        """Mean nominal width over experts (all routed experts have the same shape)."""
        return sum(self.bits.values()) / max(len(self.bits), 1)

    def to_dict(self) -> dict[str, Any]:
        return {"solver": self.solver, "optimal": self.optimal, "predicted_loss": self.predicted_loss,
                "bytes_used": self.bytes_used, "budget_bytes": self.budget_bytes,
                "average_bits": self.average_bits(),
                "histogram": {str(b): c for b, c in sorted(self.histogram.items())},
                "bits": [{"layer": l, "expert": e, "bits": b} for (l, e), b in sorted(self.bits.items())],
                "notes": self.notes}


def costs_from_profile(profile: Profile, weighting: str = "mcmoe", alpha: float = DEFAULT_ALPHA,
                       beta: float = DEFAULT_BETA, bits: list[int] | tuple[int, ...] | None = None,
                       monotone: bool = True, monotone_within: str = "chosen") -> CostTable:
    """Build the cost table from a profile (rows in (layer, expert) order).

    `monotone` replaces each measured loss by the largest loss measured at any wider width, and
    clips it at 0: measurement noise can make 8 bits look worse than 4, or quantization look
    helpful, and neither should steer the allocation. The wider widths are those among `bits`
    (monotone_within="chosen", what `coel quantize` uses) or every profiled one ("profiled":
    `Profile.loss_nats`, what the planner uses). "mcmoe-mean" is the MC-MoE weighting divided by
    its mean over experts (the planner's scale-free variant).
    """
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"unknown weighting {weighting!r}; choose one of {list(WEIGHTINGS)}")
    widths = sorted(int(b) for b in (bits or profile.bits))
    missing = [b for b in widths if b not in profile.bits]
    if missing:
        raise ConfigError(f"bit widths {missing} are not in the profile (it has {list(profile.bits)})")
    cols = [profile.bits.index(b) for b in widths]
    L, E = profile.n_layers, profile.n_experts
    keys = tuple((l, e) for l in range(L) for e in range(E))
    if weighting == "kl":
        if profile.output_kl is None:
            raise ConfigError(f"weighting 'kl' needs output_kl in the profile for every expert ({profile.source} "
                              f"has none; re-run `coel profile` without --no-kl)")
        raw = profile.output_kl
    elif monotone and monotone_within == "profiled":
        raw = profile.loss_nats
    else:
        raw = profile.loss_nats if profile.measured_loss_nats is None else profile.measured_loss_nats
    if monotone_within not in ("chosen", "profiled"):
        raise ConfigError(f"monotone_within must be 'chosen' or 'profiled' (got {monotone_within!r})")
    raw = raw[:, :, cols].reshape(L * E, len(cols)).astype(np.float64)
    if monotone and (monotone_within == "chosen" or weighting == "kl"):
        raw = np.maximum(np.maximum.accumulate(raw[:, ::-1], axis=1)[:, ::-1], 0.0)
    if weighting == "mcmoe":
        raw = raw * (profile.popularity ** alpha * profile.mean_weight ** beta).reshape(-1, 1)
    elif weighting == "mcmoe-mean":
        w = (profile.popularity ** alpha * np.maximum(profile.mean_weight, 1e-6) ** beta).reshape(-1, 1)
        raw = raw * w / max(w.mean(), 1e-12)
    nbytes = profile.nbytes[:, :, cols].reshape(L * E, len(cols)).astype(np.int64)
    return CostTable(keys, tuple(widths), raw, nbytes)


def budget_bytes_for_avg_bits(table: CostTable, avg_bits: float) -> int:
    """Bytes that a uniform allocation at `avg_bits` takes, interpolating between neighbouring widths.

    Below the narrowest width (or above the widest) the two nearest widths extrapolate, so a
    too-small average still yields a number the infeasibility error can quote.
    """
    if not math.isfinite(avg_bits) or avg_bits <= 0:
        raise ConfigError(f"average bits must be a positive number (got {avg_bits})")
    widths = table.bits
    totals = [table.uniform_bytes(b) for b in widths]
    if len(widths) == 1:
        return int(totals[0] * avg_bits / widths[0])
    if avg_bits in widths:
        return totals[widths.index(avg_bits)]
    j = int(np.searchsorted(widths, avg_bits))
    j = min(max(j, 1), len(widths) - 1)
    lo, hi = widths[j - 1], widths[j]
    frac = (avg_bits - lo) / (hi - lo)
    return int(math.floor(totals[j - 1] + frac * (totals[j] - totals[j - 1])))


def _check_budget(table: CostTable, budget_bytes: int) -> None:
    need = table.min_bytes()
    if budget_bytes < need:
        raise InfeasibleError(
            f"budget of {budget_bytes} bytes is too small for {table.n} experts: the smallest feasible "
            f"budget is {need} bytes = average bits {float(table.bits[0]):.2f} (every expert at "
            f"{table.bits[0]} bits; {need / max(budget_bytes, 1):.2f}x the budget)")


def _make(table: CostTable, choice: np.ndarray, budget_bytes: int, solver: str, optimal: bool,
          notes: str = "") -> Allocation:
    rows = np.arange(table.n)
    bits = {table.keys[i]: table.bits[int(choice[i])] for i in range(table.n)}
    hist: dict[int, int] = {}
    for b in bits.values():
        hist[b] = hist.get(b, 0) + 1
    return Allocation(bits=bits, predicted_loss=float(table.cost[rows, choice].sum()),
                      bytes_used=int(table.nbytes[rows, choice].sum()), budget_bytes=int(budget_bytes),
                      solver=solver, optimal=optimal, notes=notes, histogram=hist)


def solve_ilp(table: CostTable, budget_bytes: int, time_limit_s: float = DEFAULT_TIME_LIMIT_S) -> Allocation:
    """Exact allocation with HiGHS: one binary per (expert, width), one-hot rows, one budget row.

    Costs are rescaled to O(1) so HiGHS's absolute tolerances do not swamp tiny loss values. If
    the time limit stops the search, the best solution found is returned with optimal=False.
    """
    from scipy.optimize import LinearConstraint, milp
    from scipy.sparse import csr_matrix

    _check_budget(table, budget_bytes)
    n, nb = table.cost.shape
    c = table.cost.reshape(-1)
    c = c - np.repeat(table.cost.min(axis=1), nb)  # shift per expert: same argmin, better conditioned
    scale = float(np.abs(c).max()) or 1.0
    c = c / scale
    rows = np.repeat(np.arange(n), nb)
    onehot = csr_matrix((np.ones(n * nb), (rows, np.arange(n * nb))), shape=(n, n * nb))
    budget_row = table.nbytes.reshape(1, -1).astype(np.float64)
    constraints = [LinearConstraint(onehot, 1, 1), LinearConstraint(budget_row, -np.inf, float(budget_bytes))]
    res = milp(c, integrality=np.ones(n * nb), bounds=(0, 1), constraints=constraints,
               options={"time_limit": float(time_limit_s), "mip_rel_gap": 1e-9, "disp": False})
    if res.x is None:
        if res.status == 2:  # cannot happen after _check_budget unless the data are inconsistent
            raise InfeasibleError(f"ILP found budget {budget_bytes} bytes infeasible: {res.message}")
        # time limit without any incumbent: fall back to the greedy so the caller still gets an answer
        alloc = solve_greedy(table, budget_bytes)
        return _make(table, _choice_of(table, alloc), budget_bytes, "ilp", False,
                     f"HiGHS stopped without a solution ({res.message}); greedy result")
    choice = res.x.reshape(n, nb).argmax(axis=1)
    used = int(table.nbytes[np.arange(n), choice].sum())
    if used > budget_bytes:  # integrality tolerance rounding; repair by the greedy's feasible answer
        alloc = solve_greedy(table, budget_bytes)
        return _make(table, _choice_of(table, alloc), budget_bytes, "ilp", False,
                     f"HiGHS answer exceeded the budget by {used - budget_bytes} bytes after rounding; greedy result")
    # ties: measured costs are often exactly 0 at 8 and 16 bits (clipped noise) and HiGHS picks any
    # of the equal-cost answers; spare bytes then buy wider widths at no cost (still optimal)
    choice, used = _fill(table, choice, used, budget_bytes)
    optimal = res.status == 0
    return _make(table, choice, budget_bytes, "ilp", optimal, "" if optimal else f"HiGHS: {res.message}")


def _choice_of(table: CostTable, alloc: Allocation) -> np.ndarray:
    return np.array([table.bits.index(alloc.bits[k]) for k in table.keys], dtype=np.int64)


def _hull_steps(nbytes: np.ndarray, cost: np.ndarray) -> tuple[int, list[tuple[int, int]]]:
    """Lower convex hull of one expert's (bytes, cost) options: start option and successive steps.

    Returns (start, [(from, to) ...]) where each step buys the most cost reduction per byte
    among the remaining options; ratios along the list are non-increasing.
    """
    order = sorted(range(len(nbytes)), key=lambda j: (nbytes[j], cost[j], j))
    start = order[0]
    steps = []
    cur = start
    while True:
        best, best_ratio = None, 0.0
        for j in order:
            if nbytes[j] <= nbytes[cur] or cost[j] >= cost[cur]:
                continue
            ratio = (cost[cur] - cost[j]) / (nbytes[j] - nbytes[cur])
            if best is None or ratio > best_ratio + 1e-15 or (
                    abs(ratio - best_ratio) <= 1e-15 and nbytes[j] > nbytes[best]):
                best, best_ratio = j, ratio
        if best is None:
            return start, steps
        steps.append((cur, best))
        cur = best


def solve_greedy(table: CostTable, budget_bytes: int, refine: bool = True) -> Allocation:
    """Fast allocation: two Lagrangian (convex-hull) greedy passes, then fill and swap passes.

    Upward: every expert starts at its cheapest width and upgrades along its lower convex hull
    are taken in order of cost reduction per byte while they fit. Downward: every expert starts
    at its best width and downgrades are taken in order of least cost increase per byte freed
    until the budget holds. Each is followed by a fill pass (leftover bytes buy the best single
    upgrade that fits) and, for small tables, pairwise swaps (one expert down, another up) while
    they lower the total; the better of the two answers is returned.
    """
    _check_budget(table, budget_bytes)
    best = None
    for name, choice in (("up", _greedy_up(table, budget_bytes)), ("down", _greedy_down(table, budget_bytes))):
        used = int(table.nbytes[np.arange(table.n), choice].sum())
        choice, used = _fill(table, choice, used, budget_bytes)
        notes = f"hull greedy {name} + fill"
        if refine and table.n * len(table.bits) <= REFINE_MAX_OPTIONS and table.n > 1:
            choice, used, swaps = _swap_refine(table, choice, used, budget_bytes)
            notes += f" + {swaps} swap(s)"
        loss = float(table.cost[np.arange(table.n), choice].sum())
        if best is None or loss < best[0] - 1e-15:
            best = (loss, choice, notes)
    return _make(table, best[1], budget_bytes, "greedy", False, best[2])


def _greedy_up(table: CostTable, budget_bytes: int) -> np.ndarray:
    cost, nbytes = table.cost, table.nbytes
    n = table.n
    choice = np.zeros(n, dtype=np.int64)
    heap: list[tuple[float, int, int, int, int]] = []
    steps: list[list[tuple[int, int]]] = []
    for i in range(n):
        start, st = _hull_steps(nbytes[i], cost[i])
        choice[i] = start
        steps.append(st)
        if st:
            a, b = st[0]
            heapq.heappush(heap, (-(cost[i, a] - cost[i, b]) / (nbytes[i, b] - nbytes[i, a]), i, 0, a, b))
    used = int(nbytes[np.arange(n), choice].sum())
    while heap:
        _neg, i, k, a, b = heapq.heappop(heap)
        extra = int(nbytes[i, b] - nbytes[i, a])
        if used + extra > budget_bytes:
            continue  # this expert stays put on the hull; the fill pass may still upgrade it
        choice[i] = b
        used += extra
        if k + 1 < len(steps[i]):
            a2, b2 = steps[i][k + 1]
            heapq.heappush(heap, (-(cost[i, a2] - cost[i, b2]) / (nbytes[i, b2] - nbytes[i, a2]), i, k + 1, a2, b2))
    return choice


def _greedy_down(table: CostTable, budget_bytes: int) -> np.ndarray:
    """Walk each expert's hull backwards from its best option, cheapest loss per freed byte first."""
    cost, nbytes = table.cost, table.nbytes
    n = table.n
    hulls = []
    choice = np.zeros(n, dtype=np.int64)
    heap: list[tuple[float, int, int]] = []
    for i in range(n):
        start, st = _hull_steps(nbytes[i], cost[i])
        path = [start] + [b for _a, b in st]
        hulls.append(path)
        choice[i] = path[-1]
        if len(path) > 1:
            a, b = path[-2], path[-1]
            heapq.heappush(heap, ((cost[i, a] - cost[i, b]) / (nbytes[i, b] - nbytes[i, a]), i, len(path) - 1))
    used = int(nbytes[np.arange(n), choice].sum())
    while used > budget_bytes and heap:
        _ratio, i, pos = heapq.heappop(heap)
        path = hulls[i]
        used -= int(nbytes[i, path[pos]] - nbytes[i, path[pos - 1]])
        choice[i] = path[pos - 1]
        if pos - 1 > 0:
            a, b = path[pos - 2], path[pos - 1]
            heapq.heappush(heap, ((cost[i, a] - cost[i, b]) / (nbytes[i, b] - nbytes[i, a]), i, pos - 1))
    return choice


def _fill(table: CostTable, choice: np.ndarray, used: int, budget_bytes: int) -> tuple[np.ndarray, int]:
    """Best single move that fits and lowers the cost, repeated; then spare bytes buy wider widths
    at equal cost (ties prefer precision, as in the ILP)."""
    cost, nbytes = table.cost, table.nbytes
    rows = np.arange(table.n)
    choice = choice.copy()
    for strict in (True, False):
        while True:
            cur_cost, cur_bytes = cost[rows, choice][:, None], nbytes[rows, choice][:, None]
            gain = cur_cost - cost  # (n, B) positive = better
            extra = nbytes - cur_bytes
            fits = extra <= (budget_bytes - used)
            useful = (gain > 1e-15) if strict else ((gain >= 0) & (extra > 0))
            score = np.where(fits & useful, gain if strict else extra.astype(np.float64), -np.inf)
            i, j = np.unravel_index(int(np.argmax(score)), score.shape)
            if not np.isfinite(score[i, j]):
                break
            used += int(extra[i, j])
            choice[i] = j
    return choice, used


def _swap_refine(table: CostTable, choice: np.ndarray, used: int, budget_bytes: int,
                 max_rounds: int = 200) -> tuple[np.ndarray, int, int]:
    """Best improving (expert i -> width a, expert k -> width b) pair move, until none is left."""
    cost, nbytes = table.cost, table.nbytes
    n, nb = cost.shape
    rows = np.arange(n)
    swaps = 0
    for _ in range(max_rounds):
        d_cost = (cost - cost[rows, choice][:, None]).reshape(-1)  # (n*B,) change if that move alone
        d_bytes = (nbytes - nbytes[rows, choice][:, None]).reshape(-1)
        owner = np.repeat(rows, nb)
        total_cost = d_cost[:, None] + d_cost[None, :]
        total_bytes = d_bytes[:, None] + d_bytes[None, :]
        ok = (owner[:, None] != owner[None, :]) & (used + total_bytes <= budget_bytes) & (total_cost < -1e-12)
        if not ok.any():
            break
        masked = np.where(ok, total_cost, np.inf)
        p, q = np.unravel_index(int(np.argmin(masked)), masked.shape)
        i, a = divmod(int(p), nb)
        k, b = divmod(int(q), nb)
        used += int(d_bytes[p] + d_bytes[q])
        choice = choice.copy()
        choice[i], choice[k] = a, b
        swaps += 1
    return choice, used, swaps


def solve_uniform(table: CostTable, budget_bytes: int) -> Allocation:
    """The same width for every expert; between two widths, a popularity-agnostic round-robin mix.

    The largest width w whose all-experts size fits is the floor; then as many experts as fit get
    the next width, spread evenly over the (layer, expert) order (Bresenham), so a non-integer
    average such as 2.5 bits spends the same bytes as the mixed strategy without using the profile.
    """
    _check_budget(table, budget_bytes)
    n, nb = table.cost.shape
    fits = [j for j in range(nb) if table.uniform_bytes(table.bits[j]) <= budget_bytes]
    lo = max(fits, key=lambda j: table.bits[j])
    choice = np.full(n, lo, dtype=np.int64)
    if lo + 1 < nb:
        hi = lo + 1
        spare = budget_bytes - table.uniform_bytes(table.bits[lo])
        step = table.nbytes[:, hi] - table.nbytes[:, lo]
        # experts have equal shapes in practice; count by the largest step to stay within budget
        m = int(min(n, spare // int(step.max())))
        if m > 0:
            picks = [int(math.floor((t + 0.5) * n / m)) for t in range(m)]
            choice[picks] = hi
    return _make(table, choice, budget_bytes, "uniform", False,
                 f"round-robin mix of {table.bits[lo]} and {table.bits[min(lo + 1, nb - 1)]} bits")


def solve_lagrangian(table: CostTable, budget_bytes: float) -> Allocation:
    """One Lagrange multiplier found by bisection over the per-expert choice
    argmin_b cost(b) + lambda * bytes(b), then a greedy pass that spends what is left on one-step
    upgrades with the best cost saved per byte. Vectorised: 58 x 256 experts take milliseconds
    (the planner's solver; not proven optimal)."""
    loss, byt = table.cost, table.nbytes.astype(np.float64)
    n = table.n
    min_bytes = byt[:, 0].sum()
    if min_bytes > budget_bytes:
        raise InfeasibleError(f"experts need {min_bytes / MB:.1f} MB even at {table.bits[0]} bits, budget is "
                              f"{budget_bytes / MB:.1f} MB")
    if byt[:, -1].sum() <= budget_bytes:
        choice = np.full(n, len(table.bits) - 1)
    else:
        # lambda = loss per byte; bytes used falls as lambda grows; bisect in log space
        lo, hi = -80.0, 10.0  # log10 lambda; at 1e10 every expert takes its smallest width
        for _ in range(60):
            mid = (lo + hi) / 2
            if byt[np.arange(n), _lagrange_pick(loss, byt, 10.0 ** mid)].sum() <= budget_bytes:
                hi = mid
            else:
                lo = mid
        choice = _lagrange_fill(loss, byt, _lagrange_pick(loss, byt, 10.0 ** hi), budget_bytes)
    return _make(table, choice, budget_bytes, "lagrangian", False)


def _lagrange_pick(loss: np.ndarray, byt: np.ndarray, lam: float) -> np.ndarray:
    return np.argmin(loss + lam * byt, axis=1)


def _lagrange_fill(loss: np.ndarray, byt: np.ndarray, choice: np.ndarray, budget: float) -> np.ndarray:
    """Spend the leftover budget on one-step upgrades, best loss saved per byte first."""
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


def solve_for_quality(table: CostTable, max_cost: float, byte_weight: np.ndarray | None = None) -> Allocation:
    """The other direction: the fewest bytes whose summed cost stays <= max_cost (a quality floor),
    by the same Lagrangian bisection (minimise bytes + mu * cost), then downgrades where the floor
    still holds, cheapest cost per byte first. `byte_weight` (n,) counts bytes weighted per expert,
    e.g. by popularity: the bytes a token reads, which is what decode latency pays for."""
    loss = table.cost
    byt = table.nbytes.astype(np.float64)
    if byte_weight is not None:
        byt = byt * np.asarray(byte_weight, dtype=np.float64).reshape(-1, 1)
    n = table.n
    if loss[:, 0].sum() <= max_cost:
        return _make(table, np.zeros(n, dtype=np.int64), table.max_bytes(), "lagrangian", False)
    if loss[:, -1].sum() > max_cost:
        raise InfeasibleError(f"quality floor {max_cost:.4g} nats unreachable: even at {table.bits[-1]} bits "
                              f"the predicted loss is {loss[:, -1].sum():.4g} nats")

    def pick(mu: float) -> np.ndarray:  # minimise bytes + mu * loss; larger mu -> less loss
        return np.argmin(byt + mu * loss, axis=1)

    lo, hi = -10.0, 80.0  # log10 mu
    for _ in range(60):
        mid = (lo + hi) / 2
        if loss[np.arange(n), pick(10.0 ** mid)].sum() <= max_cost:
            hi = mid
        else:
            lo = mid
    choice = pick(10.0 ** hi)
    # greedy: downgrade where it saves bytes and the floor still holds (cheapest loss per byte first)
    slack = max_cost - loss[np.arange(n), choice].sum()
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
    return _make(table, choice, table.max_bytes(), "lagrangian", False)


def allocate(table: CostTable, budget_bytes: int, solver: str = "ilp",
             time_limit_s: float = DEFAULT_TIME_LIMIT_S) -> Allocation:
    """Dispatch by solver name ("ilp" | "greedy" | "lagrangian")."""
    if solver == "ilp":
        return solve_ilp(table, budget_bytes, time_limit_s)
    if solver == "greedy":
        return solve_greedy(table, budget_bytes)
    if solver == "lagrangian":
        return solve_lagrangian(table, budget_bytes)
    raise ConfigError(f"unknown solver {solver!r}; choose one of {list(SOLVERS)}")
