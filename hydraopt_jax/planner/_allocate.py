"""Allocation: one option per module under a global parameter budget (multiple-choice
knapsack; see `hydraopt_jax.planner` for the strategies)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["allocate", "pareto"]

_DP_GRID = 4096


def pareto(costs: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Indices of the options no other option beats on both cost and loss, by cost."""
    order = np.lexsort((losses, costs))
    keep, best = [], math.inf
    for i in order:
        if losses[i] < best - 1e-12 * max(1.0, abs(best) if best < math.inf else 1.0):
            keep.append(i)
            best = losses[i]
    return np.asarray(keep, dtype=np.int64)


def _greedy_fill(choice, costs, losses, capacity) -> list[int]:
    """Upgrade modules while the budget allows: each time the move with the largest loss
    decrease per extra parameter among those that fit (the first module and option on a
    tie). Each module's best move is kept and recomputed only when it changes module or no
    longer fits (the budget left only shrinks), so a fill of many small steps stays cheap."""
    choice = list(choice)
    used = sum(costs[m][c] for m, c in enumerate(choice))

    def best_move(m, left):
        extra = costs[m] - costs[m][choice[m]]
        gain = losses[m][choice[m]] - losses[m]
        ok = (extra > 0) & (extra <= left) & (gain > 0)
        if not np.any(ok):
            return 0.0, None
        ratio = np.where(ok, gain / np.where(extra > 0, extra, 1), -np.inf)
        i = int(np.argmax(ratio))
        return float(ratio[i]), i

    moves = [best_move(m, capacity - used) for m in range(len(choice))]
    while True:
        best, best_m = 0.0, None
        for m, (ratio, i) in enumerate(moves):
            if i is not None and ratio > best:
                best, best_m = ratio, m
        if best_m is None:
            return choice
        i = moves[best_m][1]
        used += costs[best_m][i] - costs[best_m][choice[best_m]]
        choice[best_m] = i
        left = capacity - used
        for m, (_, j) in enumerate(moves):
            if m == best_m or (j is not None and costs[m][j] - costs[m][choice[m]] > left):
                moves[m] = best_move(m, left)


def _lagrangian(costs, losses, capacity) -> list[int]:
    def pick(lam):
        return [int(np.lexsort((c, l + lam * c))[0]) for c, l in zip(costs, losses, strict=True)]

    def used(choice):
        return sum(costs[m][c] for m, c in enumerate(choice))

    choice = pick(0.0)
    if used(choice) <= capacity:
        return choice
    hi = 1.0
    while used(pick(hi)) > capacity and hi < 1e300:
        hi *= 16.0
    lo = 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi) if hi < 1e-300 or lo == 0.0 else math.sqrt(lo * hi)
        if mid <= lo or mid >= hi:
            mid = 0.5 * (lo + hi)
        if used(pick(mid)) <= capacity:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-12 * hi:
            break
    return pick(hi)


def _grid_dp(costs, losses, capacity, grid: int = _DP_GRID) -> list[int] | None:
    """Exact DP with each option's cost rounded up to `capacity / grid` units (feasible)."""
    unit = capacity / grid
    units = [np.ceil(c / unit - 1e-9).astype(np.int64) for c in costs]
    if sum(int(u.min()) for u in units) > grid:
        return None
    best = np.zeros(grid + 1)
    back = []
    for u, l in zip(units, losses, strict=True):
        new = np.full(grid + 1, np.inf)
        arg = np.full(grid + 1, -1, dtype=np.int64)
        for i in np.argsort(u):
            if u[i] > grid:
                continue
            cand = np.full(grid + 1, np.inf)
            cand[u[i] :] = best[: grid + 1 - u[i]] + l[i]
            better = cand < new
            new[better] = cand[better]
            arg[better] = i
        best = new
        back.append(arg)
    if not np.isfinite(best[grid]):
        return None
    choice, c = [], grid
    for m in range(len(costs) - 1, -1, -1):
        i = int(back[m][c])
        choice.append(i)
        c -= int(units[m][i])
    return choice[::-1]


def allocate(
    costs: Sequence[Sequence[float]],
    losses: Sequence[Sequence[float]],
    capacity: float,
    *,
    seeds: Sequence[Sequence[int]] = (),
) -> tuple[list[int], str]:
    """Multiple-choice knapsack: one option per module, total cost `<= capacity`, least loss.

    Returns `(choice, method)` with `choice[m]` an index into module `m`'s options and
    `method` the winning strategy (`lagrangian`, `dp`, or `seed`). `seeds` are extra
    starting selections (e.g. uniform plans); infeasible ones are ignored. Raises
    `ValueError` if even the cheapest option of every module exceeds `capacity`.
    """
    costs = [np.asarray(c, np.float64) for c in costs]
    losses = [np.asarray(l, np.float64) for l in losses]
    minimum = sum(float(c.min()) for c in costs)
    if minimum > capacity:
        raise ValueError(
            f"the cheapest plan needs {minimum:.0f} parameters, more than the budget's "
            f"{capacity:.0f}"
        )
    fronts = [pareto(c, l) for c, l in zip(costs, losses, strict=True)]
    f_costs = [c[f] for c, f in zip(costs, fronts, strict=True)]
    f_losses = [l[f] for l, f in zip(losses, fronts, strict=True)]

    def total(choice, cs, ls):
        return (
            sum(float(ls[m][c]) for m, c in enumerate(choice)),
            sum(float(cs[m][c]) for m, c in enumerate(choice)),
        )

    candidates = []
    lag = _greedy_fill(_lagrangian(f_costs, f_losses, capacity), f_costs, f_losses, capacity)
    candidates.append(([int(fronts[m][c]) for m, c in enumerate(lag)], "lagrangian"))
    dp = _grid_dp(f_costs, f_losses, capacity)
    if dp is not None:
        dp = _greedy_fill(dp, f_costs, f_losses, capacity)
        candidates.append(([int(fronts[m][c]) for m, c in enumerate(dp)], "dp"))
    for seed in seeds:
        if total(seed, costs, losses)[1] <= capacity:
            filled = _greedy_fill(list(seed), costs, losses, capacity)
            candidates.append((filled, "seed"))
    best = min(candidates, key=lambda cm: total(cm[0], costs, losses))
    return best
