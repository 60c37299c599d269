"""Bit allocation: ILP optimal against brute force, greedy close to the ILP, budgets and errors."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from coel_model.allocate import (CostTable, budget_bytes_for_avg_bits, costs_from_profile, solve_for_quality,
                                 solve_greedy, solve_ilp, solve_uniform, allocate)
from coel_model.errors import ConfigError, InfeasibleError


def random_table(seed: int, n: int, bits=(2, 3, 4), params: int = 3 * 64 * 128, equal_shapes=True) -> CostTable:
    """Loss decreasing with bits (noisy power law), bytes = packed bits + fp16 scale/zero per 64."""
    rng = np.random.default_rng(seed)
    keys = tuple((i // 4, i % 4) for i in range(n))
    cost = np.zeros((n, len(bits)))
    nbytes = np.zeros((n, len(bits)), dtype=np.int64)
    for i in range(n):
        sens = rng.lognormal(0, 1.0)
        p = params if equal_shapes else int(params * rng.integers(1, 4))
        for j, b in enumerate(bits):
            cost[i, j] = sens * 2.0 ** (-b) * rng.uniform(0.7, 1.3)
            nbytes[i, j] = p * b // 8 + (p // 64) * 4
    return CostTable(keys, tuple(bits), cost, nbytes)


def brute_force(table: CostTable, budget: int) -> float:
    best = np.inf
    rows = np.arange(table.n)
    for combo in itertools.product(range(len(table.bits)), repeat=table.n):
        c = np.array(combo)
        if table.nbytes[rows, c].sum() <= budget:
            best = min(best, table.cost[rows, c].sum())
    return best


@pytest.mark.parametrize("seed", range(6))
def test_ilp_is_optimal_against_brute_force(seed):
    table = random_table(seed, 5, equal_shapes=seed % 2 == 0)
    lo, hi = table.min_bytes(), table.max_bytes()
    for frac in (0.0, 0.13, 0.37, 0.5, 0.81, 1.0):
        budget = int(lo + frac * (hi - lo))
        alloc = solve_ilp(table, budget)
        assert alloc.optimal
        assert alloc.bytes_used <= budget
        assert alloc.predicted_loss == pytest.approx(brute_force(table, budget), rel=1e-9, abs=1e-12)


def test_greedy_agrees_with_ilp_on_small_cases():
    """Equal-shape experts (real MoE layers): the greedy mostly finds the optimum, never far off."""
    gaps = []
    for seed in range(6):
        table = random_table(100 + seed, 12, bits=(2, 3, 4, 8, 16))
        lo, hi = table.min_bytes(), table.max_bytes()
        for frac in np.linspace(0, 1, 9):
            budget = int(lo + frac * (hi - lo))
            exact = solve_ilp(table, budget)
            fast = solve_greedy(table, budget)
            assert fast.bytes_used <= budget
            assert not fast.optimal
            assert fast.predicted_loss >= exact.predicted_loss - 1e-12  # the ILP is a lower bound
            gaps.append((fast.predicted_loss - exact.predicted_loss) / max(exact.predicted_loss, 1e-12))
    gaps = np.array(gaps)
    assert np.mean(gaps < 1e-9) >= 0.85, f"greedy optimal in only {np.mean(gaps < 1e-9):.0%} of cases"
    assert gaps.max() < 0.15, f"greedy was {gaps.max():.2%} worse than the ILP"


def test_greedy_feasible_on_unequal_shapes():
    for seed in range(4):
        table = random_table(200 + seed, 10, bits=(2, 3, 4, 8, 16), equal_shapes=False)
        for frac in (0.1, 0.4, 0.7):
            budget = int(table.min_bytes() + frac * (table.max_bytes() - table.min_bytes()))
            fast, exact = solve_greedy(table, budget), solve_ilp(table, budget)
            assert fast.bytes_used <= budget
            assert fast.predicted_loss >= exact.predicted_loss - 1e-12


def test_greedy_matches_ilp_exactly_at_uniform_budgets():
    """With convex costs and equal shapes, uniform budgets sit on hull vertices: same answer."""
    n, bits = 10, (2, 3, 4, 8)
    params = 3 * 64 * 128
    keys = tuple((0, i) for i in range(n))
    sens = np.linspace(1.0, 3.0, n)
    cost = np.array([[s * 4.0 ** (-b) for b in bits] for s in sens])
    nbytes = np.array([[params * b // 8 + params // 16 for b in bits]] * n, dtype=np.int64)
    table = CostTable(keys, bits, cost, nbytes)
    for b in bits:
        budget = table.uniform_bytes(b)
        assert solve_greedy(table, budget).predicted_loss == pytest.approx(
            solve_ilp(table, budget).predicted_loss, rel=1e-12)


def test_mixed_allocation_beats_uniform_at_equal_bytes():
    table = random_table(7, 16, bits=(2, 3, 4, 8, 16))
    budget = budget_bytes_for_avg_bits(table, 3.0)
    uni = solve_uniform(table, budget)
    mixed = solve_ilp(table, budget)
    assert set(uni.bits.values()) == {3}
    assert uni.bytes_used == budget
    assert mixed.predicted_loss < uni.predicted_loss
    assert abs(mixed.bytes_used - uni.bytes_used) <= 0.01 * uni.bytes_used


def test_uniform_at_fractional_bits_spends_the_same_bytes():
    table = random_table(3, 40, bits=(2, 3, 4, 8, 16))
    for avg in (2.5, 3.5, 2.25):
        budget = budget_bytes_for_avg_bits(table, avg)
        uni = solve_uniform(table, budget)
        assert uni.bytes_used <= budget
        assert uni.bytes_used >= 0.99 * budget
        assert uni.average_bits() == pytest.approx(avg, abs=1 / 40 + 1e-9)
        mixed = solve_ilp(table, budget)
        assert abs(mixed.bytes_used - uni.bytes_used) <= 0.01 * uni.bytes_used
    # round-robin spreads the wider width evenly instead of bunching it in the first layers
    uni = solve_uniform(table, budget_bytes_for_avg_bits(table, 2.5))
    by_layer = {}
    for (l, _e), b in uni.bits.items():
        by_layer.setdefault(l, []).append(b)
    assert all(3 in bs and 2 in bs for bs in by_layer.values())


def test_budget_from_average_bits_interpolates():
    table = random_table(1, 6, bits=(2, 3, 4, 8, 16))
    b2, b3, b8, b16 = (table.uniform_bytes(b) for b in (2, 3, 8, 16))
    assert budget_bytes_for_avg_bits(table, 2.0) == b2
    assert budget_bytes_for_avg_bits(table, 2.5) == (b2 + b3) // 2
    assert budget_bytes_for_avg_bits(table, 12.0) == (b8 + b16) // 2
    assert budget_bytes_for_avg_bits(table, 1.0) < b2  # extrapolates so the error can quote it
    with pytest.raises(ConfigError):
        budget_bytes_for_avg_bits(table, -1.0)


def test_infeasible_budget_names_the_smallest_feasible_one():
    table = random_table(2, 5)
    need = table.min_bytes()
    for solver in ("ilp", "greedy"):
        with pytest.raises(InfeasibleError) as err:
            allocate(table, need - 1, solver=solver)
        msg = str(err.value)
        assert str(need) in msg and "2.00" in msg and str(need - 1) in msg
    with pytest.raises(InfeasibleError):
        solve_uniform(table, need - 1)
    assert allocate(table, need, solver="greedy").bits == {k: 2 for k in table.keys}
    with pytest.raises(ConfigError, match="unknown solver"):
        allocate(table, need, solver="magic")


def _profile(loss, pop, mw, kl=None):
    """A two-expert, one-layer Profile with these per-width measurements."""
    from coel_model.config import MoEConfig
    from coel_model.profile_format import Profile
    bits = (2, 3, 4, 8, 16)
    cfg = MoEConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2, n_kv_heads=2, n_experts=2, top_k=1,
                    expert_hidden=64)
    measured = np.array([loss])
    return Profile(cfg=cfg, group_size=64, bits=bits, popularity=np.array([pop]), mean_weight=np.array([mw]),
                   loss_nats=np.maximum(np.maximum.accumulate(measured[:, :, ::-1], axis=2)[:, :, ::-1], 0.0),
                   nbytes=np.array([[[100 * b for b in bits]] * 2]), coact_same=np.zeros((1, 2, 2)),
                   backbone_bytes=1, measured_loss_nats=measured,
                   output_kl=None if kl is None else np.array([kl]))


def test_costs_from_profile_weighting_and_monotone():
    loss = [[0.3, 0.2, 0.1, 0.01, 0.0], [0.4, 0.1, 0.2, -0.01, 0.0]]
    prof = _profile(loss, [1.5, 0.5], [0.75, 0.25])
    t = costs_from_profile(prof, weighting="measured")
    assert t.keys == ((0, 0), (0, 1))  # (layer, expert) order
    assert t.cost[1].tolist() == pytest.approx([0.4, 0.2, 0.2, 0.0, 0.0])  # non-increasing, clipped at 0
    raw = costs_from_profile(prof, weighting="measured", monotone=False)
    assert raw.cost[1, 3] == pytest.approx(-0.01)
    m = costs_from_profile(prof)  # mcmoe: freq^1 * weight^1.5
    assert m.cost[0, 0] == pytest.approx(1.5 * 0.75 ** 1.5 * 0.3)
    assert m.cost[1, 0] == pytest.approx(0.5 * 0.25 ** 1.5 * 0.4)
    mean = costs_from_profile(prof, weighting="mcmoe-mean")
    assert mean.cost.sum() == pytest.approx((m.cost / np.mean([1.5 * 0.75 ** 1.5, 0.5 * 0.25 ** 1.5])).sum())
    with pytest.raises(ConfigError, match="needs output_kl"):
        costs_from_profile(prof, weighting="kl")
    k = costs_from_profile(_profile(loss, [1.5, 0.5], [0.75, 0.25],
                                    kl=[[0.2, 0.2, 0.1, 0.0, 0.0], [0.3, 0.1, 0.05, 0.001, 0.0]]), weighting="kl")
    assert k.cost[0].tolist() == pytest.approx([0.2, 0.2, 0.1, 0.0, 0.0])
    assert k.cost[1].tolist() == pytest.approx([0.3, 0.1, 0.05, 0.001, 0.0])
    sub = costs_from_profile(prof, weighting="measured", bits=[2, 8])
    assert sub.bits == (2, 8) and sub.nbytes.shape == (2, 2)
    assert sub.cost[1].tolist() == pytest.approx([0.4, 0.0])  # monotone within the chosen widths
    over_all = costs_from_profile(prof, weighting="measured", bits=[2, 3], monotone_within="profiled")
    assert over_all.cost[1].tolist() == pytest.approx([0.4, 0.2])  # 3 bits reads the 4-bit measurement
    with pytest.raises(ConfigError, match="not in the profile"):
        costs_from_profile(prof, bits=[5])
    with pytest.raises(ConfigError, match="unknown weighting"):
        costs_from_profile(prof, weighting="vibes")


def test_lagrangian_and_quality_floor_solvers():
    table = random_table(3, 40)
    budget = (table.min_bytes() + table.max_bytes()) // 2
    lag = allocate(table, budget, solver="lagrangian")
    exact = solve_ilp(table, budget)
    assert lag.solver == "lagrangian" and not lag.optimal and lag.bytes_used <= budget
    assert lag.predicted_loss <= exact.predicted_loss * 1.10 + 1e-12
    with pytest.raises(InfeasibleError, match="even at"):
        allocate(table, table.min_bytes() - 1, solver="lagrangian")
    floor = (table.cost[:, 0].sum() + table.cost[:, -1].sum()) / 2
    q = solve_for_quality(table, floor)
    assert q.predicted_loss <= floor + 1e-12 and q.bytes_used < table.max_bytes()
    assert solve_for_quality(table, table.cost[:, 0].sum()).histogram == {table.bits[0]: table.n}
    with pytest.raises(InfeasibleError, match="unreachable"):
        solve_for_quality(table, table.cost[:, -1].sum() - 1.0)


def test_ilp_handles_tiny_loss_values():
    """Loss increases of 1e-7 nats must still be ranked correctly (costs are rescaled)."""
    table = random_table(11, 5)
    tiny = CostTable(table.keys, table.bits, table.cost * 1e-8, table.nbytes)
    budget = (table.min_bytes() + table.max_bytes()) // 2
    assert solve_ilp(tiny, budget).bits == solve_ilp(table, budget).bits


def test_ties_prefer_wider_widths():
    """Costs clipped to 0 at 8 and 16 bits: a budget that fits 16 bits everywhere must use it."""
    n, bits = 6, (2, 4, 8, 16)
    keys = tuple((0, i) for i in range(n))
    cost = np.array([[0.5, 0.1, 0.0, 0.0]] * n)
    nbytes = np.array([[100, 200, 400, 800]] * n, dtype=np.int64)
    table = CostTable(keys, bits, cost, nbytes)
    for solve in (solve_ilp, solve_greedy):
        assert set(solve(table, table.uniform_bytes(16)).bits.values()) == {16}
        mixed = solve(table, table.uniform_bytes(8) + 400)
        assert sorted(mixed.bits.values()) == [8, 8, 8, 8, 8, 16]
