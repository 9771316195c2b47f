"""The planner: per-module sharing plans and ranks under one global storage budget.

`plan_budget(collection, budget=0.3)` chooses, for every module, which side is shared (A,
B, both = one merged adapter, or neither = each task kept, possibly at a lower rank), how
tasks are grouped (all tasks together, by a task attribute such as application or language,
or task-specific) and the shared rank `k`, so that the total reconstruction loss summed over
modules is lowest while the stored parameters stay within `budget` times the original
adapters' parameters.

**Candidates.** Only plans with a closed form are considered: an A-grouping and a
B-grouping where one nests inside the other (the shared-A family when every B-group lies in
one A-group, the shared-B family otherwise). Groupings are `all`, one per task attribute,
and `task`. Ranks are multiples of each module's (largest) LoRA rank, by default
`r/8, r/4, r/2, r, 3r/2, 2r, 3r, 4r` (at least 1), capped at `min(d_in, d_out)`. The low
ranks matter at small budgets: a task kept on its own at rank `r/4` often fits better than
any sharing at the same storage.

**Evaluation, for every rank at once.** For a shared-A-family plan with A-groups `g` and
B-groups `j` (each inside one `g`), `M_j = sum_{t in j} w_t dW_t / W_j`, the optimum of
`sum_t w_t ||dW_t - Bh_j Ah_g||^2` at rank `k` is (see `_solvers/exact.py`)

    L(k) = sum_t w_t ||dW_t||^2 - sum_g sum_{i <= k} lambda_{g,i}

where `lambda_{g,i}` are the eigenvalues of `sum_{j in g} W_j M_j^T M_j`. Those are the
eigenvalues of the small `n_g r x n_g r` matrix `F_g^T P_g F_g` (`D_g = F_g F_g^T`), with
`P = [A_s A_t^T]` (the A Gram of the module, `C`-weighted under an activation covariance) and
`D_g = blockdiag_j [w_s w_t B_s^T B_t / W_j]`. So two Grams of size `T r x T r` per module
give every candidate's loss at every rank from one symmetric eigendecomposition per group:
no `d_out x d_in` matrix, no solver run and no compilation per candidate. The shared-B
family is the same with the roles of the two Grams swapped (the transposed problem).
`tests/test_planner.py` checks these losses against `merge`'s exact solver.

**Allocation (multiple-choice knapsack).** Each module offers options `(params, loss)`;
one per module must be chosen with total params `<= budget * original`. We keep each
module's Pareto front and take the best feasible selection among:

1. *Lagrangian relaxation*: per module `argmin loss + lam * params`, bisection on `lam` for
   the smallest `lam` that fits (optimal for the convexified problem), followed by a
   *greedy fill* of the leftover budget (repeatedly the upgrade with the largest loss
   decrease per extra parameter that still fits);
2. *exact dynamic programming on a grid*: parameters rounded up to `budget / 4096` units
   (so the result is always feasible), then the same greedy fill;
3. every *uniform* selection (the same grouping pair and rank multiple on every module, e.g.
   shared-A at `k = r` everywhere) that fits, greedily filled.

(3) guarantees the planner is never worse than a uniform closed-form plan (named or grouped)
at the same or lower storage.

The result is a `BudgetPlan`: per module the chosen `SharingPlan` (over all tasks of the
collection), and `to_yaml(task_names)` writes the per-module plan file that
`hydraopt merge --config` reads.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._plan import SharingPlan, _refines, _relabel, original_params

__all__ = [
    "BudgetPlan",
    "ModuleChoice",
    "PlanOption",
    "allocate",
    "module_options",
    "plan_budget",
    "task_attributes_from_names",
]

DEFAULT_RANK_MULTIPLIERS = (0.125, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
NAMED_PAIRS = {
    ("all", "task"): "shared-a",
    ("task", "all"): "shared-b",
    ("all", "all"): "full-merge",
    ("task", "task"): "separate",
}
# Same ridge as `merge`'s whitening (relative to the covariance's mean eigenvalue).
_COV_RIDGE = 1e-6
_DP_GRID = 4096


# --------------------------------------------------------------------------- task attributes


def task_attributes_from_names(
    names: Sequence[str], pattern: str | None = None
) -> list[dict[str, str]]:
    """Task attributes parsed from task names.

    With `pattern`, a regular expression with named groups that must match each whole name,
    e.g. `(?P<application>[a-z]+)_(?P<language>[a-z]+)`. Without, names that all split on
    `_` into the same number (>= 2) of parts give attributes `part0`, `part1`, ...; any other
    names give no attributes.
    """
    if pattern is not None:
        regex = re.compile(pattern)
        if not regex.groupindex:
            raise ValueError(f"attribute pattern {pattern!r} has no named group (?P<name>...)")
        out = []
        for name in names:
            match = regex.fullmatch(name)
            if match is None:
                raise ValueError(f"task name {name!r} does not match the pattern {pattern!r}")
            out.append({k: v for k, v in match.groupdict().items() if v is not None})
        return out
    parts = [name.split("_") for name in names]
    if not parts or len({len(p) for p in parts}) != 1 or len(parts[0]) < 2:
        return [{} for _ in names]
    return [{f"part{i}": p for i, p in enumerate(split)} for split in parts]


def _groupings(num_tasks: int, attributes: Sequence[Mapping[str, Any]] | None) -> dict:
    """`{grouping name: labels [T]}`: `all`, one per attribute (when distinct), `task`."""
    out: dict[str, tuple[int, ...]] = {"all": (0,) * num_tasks}
    seen = {out["all"]: "all", tuple(range(num_tasks)): "task"}
    if attributes:
        if len(attributes) != num_tasks:
            raise ValueError(f"{len(attributes)} task attribute dicts for {num_tasks} tasks")
        keys = sorted({k for attrs in attributes for k in attrs})
        for key in keys:
            if not all(key in attrs for attrs in attributes):
                continue  # an attribute some tasks lack cannot group them all
            labels = _relabel([attrs[key] for attrs in attributes])
            if labels not in seen:
                seen[labels] = key
                out[key] = labels
    out["task"] = tuple(range(num_tasks))
    return out


# --------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class PlanOption:
    """One candidate on one module: grouping of each side, rank, cost and loss.

    `a_by` / `b_by` are grouping names (`all`, an attribute, `task`); `rank_label` names the
    rank relative to the module's LoRA rank (`1r`, `2r`, ...) or absolutely (`k=8`), so that
    options compare across modules; `loss` is the weighted objective of `merge`'s exact solver
    (times the module weight); `plan` is over the tasks present on the module.
    """

    a_by: str
    b_by: str
    rank: int
    rank_label: str
    num_params: int
    loss: float
    plan: SharingPlan
    relative_error: tuple[float, ...] = ()  # per task present, as `merge` reports it

    @property
    def name(self) -> str:
        return NAMED_PAIRS.get((self.a_by, self.b_by), f"A:{self.a_by},B:{self.b_by}")

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.a_by, self.b_by, self.rank_label)


def _psd_factor_blocks(d: np.ndarray, blocks: Sequence[slice]) -> np.ndarray:
    """Block-diagonal `F` with `F F^T = d` (`d` PSD, block-diagonal on `blocks`): the
    symmetric square root for small blocks, a Cholesky factor (with a `1e-12` relative
    jitter, for rank-deficient Grams) for large ones, where it is several times cheaper."""
    out = np.zeros_like(d)
    for s in blocks:
        block = d[s, s]
        if block.shape[0] <= 64:
            vals, vecs = np.linalg.eigh(block)
            out[s, s] = (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T
        else:
            jitter = 1e-12 * max(float(np.max(np.diag(block))), np.finfo(np.float64).tiny)
            out[s, s] = np.linalg.cholesky(block + jitter * np.eye(block.shape[0]))
    return out


def _top_eigh(m: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` largest eigenpairs of a symmetric `m`, descending."""
    n = m.shape[0]
    k = min(k, n)
    if k < n // 2:
        import scipy.linalg

        vals, vecs = scipy.linalg.eigh(m, subset_by_index=[n - k, n - 1], driver="evr")
    else:
        vals, vecs = np.linalg.eigh(m)
    return vals[::-1][:k], vecs[:, ::-1][:, :k]


def _family_curves(p, q, w, r, outer, inner, kmax) -> tuple[np.ndarray, np.ndarray]:
    """Loss pieces of a closed-form plan at every rank `k = 0..kmax`.

    `outer`: the shared side's group labels (A-groups in the shared-A family), `inner`: the
    other side's, nested inside `outer`; `p`: the outer side's Gram, `q`: the inner side's.

    Returns `captured [kmax + 1]` (`sum_g sum_{i <= k} lambda_{g,i}`, so the loss is
    `sum_t w_t ||dW_t||^2 - captured[k]`) and `residual [kmax + 1, n]`, each task's
    `||dW_t - dW_hat_t||^2` at rank `k` (the projector onto group `g`'s top-`k` subspace is
    `Y^T D^{1/2} U_k Lambda_k^{-1} U_k^T D^{1/2} Y`, whose inner products with the tasks'
    updates reduce to the two Grams).
    """
    n = len(outer)
    norms = _block_traces(q, p, r)
    captured = np.zeros(kmax + 1)
    residual = np.tile(norms, (kmax + 1, 1))
    for g in range(max(outer) + 1):
        inner_groups: dict[int, list[int]] = {}
        for t, (o, i) in enumerate(zip(outer, inner, strict=True)):
            if o == g:
                inner_groups.setdefault(i, []).append(t)
        order, blocks, sq_coef, coef = [], [], [], []
        for members in inner_groups.values():
            total = float(sum(w[t] for t in members))
            if total <= 0:
                continue  # Bh_j = 0: these tasks keep residual = ||dW_t||^2
            start = len(order) * r
            order.extend(members)
            blocks.append(slice(start, start + len(members) * r))
            sq_coef.extend(np.repeat([w[t] / math.sqrt(total) for t in members], r))
            coef.extend(np.repeat([w[t] / total for t in members], r))
        if not order:
            continue
        idx = np.concatenate([np.arange(t * r, (t + 1) * r) for t in order])
        mask = np.zeros((len(idx), len(idx)), dtype=bool)
        for s in blocks:
            mask[s, s] = True
        q_g = np.where(mask, q[np.ix_(idx, idx)], 0.0)  # within one inner group only
        p_g = p[np.ix_(idx, idx)]
        sq_coef, coef = np.asarray(sq_coef), np.asarray(coef)
        half = _psd_factor_blocks(q_g * np.outer(sq_coef, sq_coef), blocks)  # D = F F^T
        m = half.T @ p_g @ half
        vals, vecs = _top_eigh(0.5 * (m + m.T), kmax)
        keep = vals > max(float(vals[0]) if len(vals) else 0.0, 0.0) * 1e-12
        vals, vecs = np.where(keep, vals, 0.0), vecs * keep
        lam = np.concatenate([[0.0], vals, np.zeros(kmax - len(vals))])
        captured += np.cumsum(lam)
        # per-task residuals, one eigen-direction at a time
        v = p_g @ half @ vecs  # [n_g r, K]
        inv = np.where(keep, 1.0 / np.where(keep, vals, 1.0), 0.0)
        cv = coef[:, None] * v
        qcv = q_g @ cv
        num = len(order)
        cross = (v * qcv).reshape(num, r, -1).sum(axis=1) * inv  # [n_g, K]
        self_sq = (cv * qcv).reshape(num, r, -1).sum(axis=1) * inv
        group_of = np.repeat(np.arange(len(blocks)), [(s.stop - s.start) // r for s in blocks])
        mpi = np.zeros((len(blocks), self_sq.shape[1]))
        np.add.at(mpi, group_of, self_sq)
        delta = -2.0 * cross + mpi[group_of]  # [n_g, K]
        delta = np.concatenate([np.zeros((num, 1)), np.cumsum(delta, axis=1)], axis=1)
        delta = np.pad(delta, ((0, 0), (0, kmax + 1 - delta.shape[1])), mode="edge")
        residual[:, order] += delta.T
    del n
    return captured, np.clip(residual, 0.0, None)


@dataclasses.dataclass
class ModuleStats:
    """What the planner keeps of a module: its two `n r x n r` Grams and bookkeeping."""

    name: str
    d_in: int
    d_out: int
    ranks: tuple[int, ...]  # per task of the collection; 0 = absent
    present: tuple[int, ...]
    r: int
    p: np.ndarray  # [n r, n r] blocks A_s C A_t^T
    q: np.ndarray  # [n r, n r] blocks B_s^T B_t
    weights: np.ndarray  # [n]
    sq_norms: np.ndarray  # [n] ||dW_t||^2 (unwhitened, for reports)

    @property
    def original_params(self) -> int:
        return original_params([self.ranks[t] for t in self.present], self.d_in, self.d_out)


def module_stats(name, A, B, ranks=None, *, weights="relative", activation_cov=None):
    """`ModuleStats` of one module from `A [T, r, d_in]`, `B [T, d_out, r]` (scale folded)."""
    A = np.asarray(A, np.float64)
    B = np.asarray(B, np.float64)
    num_tasks, r, d_in = A.shape
    d_out = B.shape[1]
    ranks = tuple(int(x) for x in ranks) if ranks is not None else (r,) * num_tasks
    present = tuple(t for t, k in enumerate(ranks) if k > 0)
    a = A[list(present)].reshape(len(present) * r, d_in)
    b = np.moveaxis(B[list(present)], 1, 0).reshape(d_out, len(present) * r)
    q = b.T @ b
    p_raw = a @ a.T
    if activation_cov is None:
        p = p_raw
    else:
        cov = np.asarray(activation_cov, np.float64)
        cov = 0.5 * (cov + cov.T)
        cov = cov + (_COV_RIDGE * np.trace(cov) / d_in + np.finfo(np.float32).tiny) * np.eye(d_in)
        p = a @ cov @ a.T
    metric = _block_traces(q, p, r)
    if isinstance(weights, str):
        if weights == "relative":
            w = np.where(metric > 0, 1.0 / np.where(metric > 0, metric, 1.0), 0.0)
        elif weights == "uniform":
            w = np.ones(len(present))
        else:
            raise ValueError(f"weights must be 'relative', 'uniform' or an array; got {weights!r}")
    else:
        w = np.asarray(weights, np.float64)
        if w.shape != (num_tasks,):
            raise ValueError(f"weights has shape {w.shape}, expected ({num_tasks},)")
        w = w[list(present)]
    sq = metric if activation_cov is None else _block_traces(q, p_raw, r)
    return ModuleStats(name, d_in, d_out, ranks, present, r, p, q, w, sq)


def _candidate_ranks(stats: ModuleStats, multipliers, ranks) -> list[tuple[int, str]]:
    cap = min(stats.d_in, stats.d_out)
    base = max(stats.ranks[t] for t in stats.present)
    out: dict[int, str] = {}
    for m in multipliers or ():
        k = min(cap, max(1, int(round(m * base))))
        out.setdefault(k, f"{m:g}r")
    for k in ranks or ():
        k = min(cap, int(k))
        out.setdefault(k, f"k={k}")
    return sorted(out.items())


def module_options(
    stats: ModuleStats,
    groupings: Mapping[str, Sequence[int]],
    *,
    rank_multipliers=DEFAULT_RANK_MULTIPLIERS,
    ranks: Sequence[int] | None = None,
    module_weight: float = 1.0,
) -> list[PlanOption]:
    """Every closed-form candidate of one module at every candidate rank, with its loss."""
    local = {g: _relabel([labels[t] for t in stats.present]) for g, labels in groupings.items()}
    rank_list = _candidate_ranks(stats, rank_multipliers, ranks)
    kmax = max(k for k, _ in rank_list)
    metric = _block_traces(stats.q, stats.p, stats.r)
    total = float(np.sum(stats.weights * metric))
    options: list[PlanOption] = []
    seen: set = set()
    for a_by, a_lab in local.items():
        for b_by, b_lab in local.items():
            if _refines(b_lab, a_lab):  # shared-A family (also equal groupings)
                cap, res = _family_curves(
                    stats.p, stats.q, stats.weights, stats.r, a_lab, b_lab, kmax
                )
            elif _refines(a_lab, b_lab):  # shared-B family: the transposed problem
                cap, res = _family_curves(
                    stats.q, stats.p, stats.weights, stats.r, b_lab, a_lab, kmax
                )
            else:
                continue
            if (a_lab, b_lab) in seen:
                continue
            seen.add((a_lab, b_lab))
            plan = SharingPlan(a_lab, b_lab)
            for k, label in rank_list:
                loss = max(total - cap[k], 0.0) * module_weight
                options.append(
                    PlanOption(
                        a_by,
                        b_by,
                        k,
                        label,
                        plan.num_params(stats.d_in, stats.d_out, k),
                        loss,
                        plan.with_rank(k),
                        tuple(
                            float(x)
                            for x in np.sqrt(
                                np.where(metric > 0, res[k] / np.where(metric > 0, metric, 1), 0)
                            )
                        ),
                    )
                )
    return options


def _block_traces(q: np.ndarray, p: np.ndarray, r: int) -> np.ndarray:
    """Per task `tr(Q_tt P_tt)` = `||B_t A_t||_F^2` (in the metric of `p`)."""
    n = q.shape[0] // r
    qb = q.reshape(n, r, n, r)[np.arange(n), :, np.arange(n), :]
    pb = p.reshape(n, r, n, r)[np.arange(n), :, np.arange(n), :]
    return np.einsum("tij,tij->t", qb, pb)


# --------------------------------------------------------------------------- allocation


def _pareto(costs: np.ndarray, losses: np.ndarray) -> np.ndarray:
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
    decrease per extra parameter among those that fit."""
    choice = list(choice)
    used = sum(costs[m][c] for m, c in enumerate(choice))
    while True:
        best, best_move = 0.0, None
        left = capacity - used
        for m, c in enumerate(choice):
            extra = costs[m] - costs[m][c]
            gain = losses[m][c] - losses[m]
            ok = (extra > 0) & (extra <= left) & (gain > 0)
            if not np.any(ok):
                continue
            ratio = np.where(ok, gain / np.where(extra > 0, extra, 1), -np.inf)
            i = int(np.argmax(ratio))
            if ratio[i] > best:
                best, best_move = float(ratio[i]), (m, i)
        if best_move is None:
            return choice
        m, i = best_move
        used += costs[m][i] - costs[m][choice[m]]
        choice[m] = i


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
    fronts = [_pareto(c, l) for c, l in zip(costs, losses, strict=True)]
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


# --------------------------------------------------------------------------- the result


def _escape(name: str) -> str:
    """An fnmatch pattern matching exactly `name`."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@dataclasses.dataclass(frozen=True)
class ModuleChoice:
    """The planner's choice on one module, with the options it chose from."""

    module: str
    option: PlanOption
    plan: SharingPlan  # over all tasks of the collection
    original_params: int
    num_present: int
    options: tuple[PlanOption, ...] = dataclasses.field(repr=False)
    task_ids: tuple[int, ...] = ()
    sq_norms: tuple[float, ...] = ()  # ||dW_t||_F^2 per task present

    @property
    def storage_ratio(self) -> float:
        return self.option.num_params / self.original_params

    @property
    def rms_relative_error(self) -> float:
        """`sqrt(loss / n)`: the RMS relative error over the module's tasks (exact with the
        default relative weights and module weight 1)."""
        return math.sqrt(self.option.loss / max(self.num_present, 1))


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    """Per-module plans chosen under a global storage budget (see `plan_budget`)."""

    budget: float
    modules: dict[str, ModuleChoice]
    groupings: dict[str, tuple[int, ...]]
    method: str

    @property
    def plans(self) -> dict[str, SharingPlan]:
        """`{module: SharingPlan}` over all tasks: the input of `merge_adapters`."""
        return {m: c.plan for m, c in self.modules.items()}

    @property
    def num_params(self) -> int:
        return sum(c.option.num_params for c in self.modules.values())

    @property
    def original_params(self) -> int:
        return sum(c.original_params for c in self.modules.values())

    @property
    def storage_ratio(self) -> float:
        return self.num_params / self.original_params

    @property
    def loss(self) -> float:
        """Predicted total loss: the sum over modules of `merge`'s exact-solver loss."""
        return sum(c.option.loss for c in self.modules.values())

    @property
    def rms_relative_error(self) -> float:
        """Predicted RMS of the per-(module, task) relative errors (relative weights)."""
        pairs = sum(c.num_present for c in self.modules.values())
        return math.sqrt(self.loss / max(pairs, 1))

    def task_relative_errors(self) -> np.ndarray:
        """Each task's predicted relative error over all modules, as `hydraopt merge`
        reports it: `sqrt(sum_m err_m^2 ||dW_m||^2 / sum_m ||dW_m||^2)`."""
        num_tasks = len(next(iter(self.groupings.values())))
        num, den = np.zeros(num_tasks), np.zeros(num_tasks)
        for c in self.modules.values():
            for t, err, sq in zip(c.task_ids, c.option.relative_error, c.sq_norms, strict=True):
                num[t] += err**2 * sq
                den[t] += sq
        return np.sqrt(np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0))

    @property
    def mean_relative_error(self) -> float:
        """Predicted mean over tasks of `task_relative_errors()`."""
        return float(np.mean(self.task_relative_errors()))

    def summary(self) -> dict:
        return {
            m: {
                "plan": c.option.name,
                "a": c.option.a_by,
                "b": c.option.b_by,
                "rank": c.option.rank,
                "num_params": c.option.num_params,
                "storage_ratio": c.storage_ratio,
                "loss": c.option.loss,
                "rms_relative_error": c.rms_relative_error,
            }
            for m, c in self.modules.items()
        }

    def to_yaml(self, task_names: Sequence[str], header: Sequence[str] = ()) -> str:
        """The plan file for `hydraopt merge --config`: a `modules:` section naming every
        module exactly, each with both sides and its rank."""
        import json

        names = list(task_names)
        lines = [f"# {h}" for h in header]
        lines += [
            f"# hydraopt plan: budget {self.budget:g}, storage ratio {self.storage_ratio:.4f} "
            f"({self.num_params:,} / {self.original_params:,} params), predicted mean relative "
            f"error {self.mean_relative_error:.4g}",
            "modules:",
        ]

        def side(key: str, by: str) -> str:
            if by == "all":
                return f"{key}: shared"
            if by == "task":
                return f"{key}: per-task"
            groups: dict[str, list[str]] = {}
            labels = self.groupings[by]
            for t, name in enumerate(names):
                groups.setdefault(f"{by}{labels[t]}", []).append(_escape(name))
            return f"{key}_groups: {json.dumps(groups)}"

        for module, choice in self.modules.items():
            opt = choice.option
            lines.append(
                f"  {json.dumps(_escape(module))}:  # {opt.name} k={opt.rank}: "
                f"{opt.num_params:,} params ({choice.storage_ratio:.3f}), "
                f"RMS rel err {choice.rms_relative_error:.4g}"
            )
            lines.append(f"    {side('a', opt.a_by)}")
            lines.append(f"    {side('b', opt.b_by)}")
            lines.append(f"    rank: {opt.rank}")
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- entry point


def _iter_modules(collection):
    """`(name, A, B, ranks)` from `{module: (A, B[, ranks])}` or an `AdapterCollection`."""
    if hasattr(collection, "iter_groups"):
        for _, group in collection.iter_groups():
            for name, (a, b, ranks) in group.items():
                yield name, a, b, ranks
        return
    for name, value in collection.items():
        a, b = value[0], value[1]
        ranks = value[2] if len(value) > 2 else None
        yield name, a, b, ranks


MODULE_WEIGHTINGS = ("equal", "size")


def _resolve_module_weights(collection, module_weights):
    """`{module: weight}` (or None) from `None`, `"equal"`, `"size"` or a mapping.

    `"size"`: each module's loss times its size `d_in + d_out` over the mean size, so a
    module counts in proportion to its share of the adapters' parameters (under `"equal"`
    a small `k_proj` and a large `down_proj` weigh the same, and the allocation starves the
    large modules, whose loss falls less per stored parameter).
    """
    if module_weights is None or isinstance(module_weights, Mapping):
        return module_weights
    if module_weights not in MODULE_WEIGHTINGS:
        raise ValueError(
            f"module_weights must be {' or '.join(map(repr, MODULE_WEIGHTINGS))} or a mapping, "
            f"got {module_weights!r}"
        )
    if module_weights == "equal":
        return None
    if hasattr(collection, "iter_groups"):  # an AdapterCollection: shapes without loading
        sizes = {m: info.d_in + info.d_out for m, info in collection.modules.items()}
    else:
        sizes = {m: np.shape(v[0])[-1] + np.shape(v[1])[-2] for m, v in collection.items()}
    mean = float(np.mean(list(sizes.values())))
    return {m: size / mean for m, size in sizes.items()}


def collection_options(
    collection,
    *,
    task_names: Sequence[str] | None = None,
    task_attributes: Sequence[Mapping[str, Any]] | str | None = "auto",
    attribute_pattern: str | None = None,
    rank_multipliers: Sequence[float] = DEFAULT_RANK_MULTIPLIERS,
    ranks: Sequence[int] | None = None,
    weights="relative",
    activation_covs: Mapping[str, Any] | None = None,
    module_weights: Mapping[str, float] | str | None = None,
):
    """`(groupings, {module: (ModuleStats, [PlanOption])})` for a whole collection."""
    if hasattr(collection, "names") and task_names is None:
        task_names = list(collection.names)
    module_weights = _resolve_module_weights(collection, module_weights)
    options: dict[str, tuple[ModuleStats, list[PlanOption]]] = {}
    groupings = None
    for name, a, b, ranks_m in _iter_modules(collection):
        num_tasks = np.shape(a)[0]
        if groupings is None:
            if isinstance(task_attributes, str):
                attrs = (
                    task_attributes_from_names(task_names, attribute_pattern)
                    if task_names is not None
                    else None
                )
            else:
                attrs = task_attributes
            groupings = _groupings(num_tasks, attrs)
        stats = module_stats(
            name,
            a,
            b,
            ranks_m,
            weights=weights,
            activation_cov=None if activation_covs is None else activation_covs.get(name),
        )
        if not stats.present:
            continue
        weight = 1.0 if module_weights is None else float(module_weights.get(name, 1.0))
        opts = module_options(
            stats, groupings, rank_multipliers=rank_multipliers, ranks=ranks, module_weight=weight
        )
        # keep only what the allocation and the report need (the Grams can be large)
        stats = dataclasses.replace(stats, p=np.zeros((0, 0)), q=np.zeros((0, 0)))
        options[name] = (stats, opts)
    if groupings is None:
        raise ValueError("plan_budget: the collection has no modules")
    return groupings, options


def choose(groupings, options, budget: float) -> BudgetPlan:
    """Allocate `budget` (a fraction of the original parameters) over `options`."""
    if not budget > 0:
        raise ValueError(
            f"budget must be > 0 (a fraction of the original parameters), got {budget}"
        )
    modules = list(options)
    original = sum(options[m][0].original_params for m in modules)
    capacity = budget * original * (1 + 1e-12)
    costs = [[o.num_params for o in options[m][1]] for m in modules]
    losses = [[o.loss for o in options[m][1]] for m in modules]
    # uniform selections: the same (A grouping, B grouping, rank label) on every module
    index = [{o.key: i for i, o in enumerate(options[m][1])} for m in modules]
    common = set(index[0]).intersection(*index[1:]) if index else set()
    seeds = [[idx[key] for idx in index] for key in sorted(common)]
    try:
        choice, method = allocate(costs, losses, capacity, seeds=seeds)
    except ValueError as err:
        minimum = sum(min(c) for c in costs) / original
        raise ValueError(
            f"budget {budget:g} is below the smallest achievable storage ratio {minimum:.4g} "
            f"({err})"
        ) from None
    chosen = {}
    num_tasks = len(next(iter(groupings.values())))
    for m, i in zip(modules, choice, strict=True):
        stats, opts = options[m]
        opt = opts[i]
        plan = SharingPlan.from_labels(groupings[opt.a_by], groupings[opt.b_by], opt.rank)
        assert plan.num_tasks == num_tasks
        chosen[m] = ModuleChoice(
            m,
            opt,
            plan,
            stats.original_params,
            len(stats.present),
            tuple(opts),
            tuple(stats.present),
            tuple(float(x) for x in stats.sq_norms),
        )
    return BudgetPlan(budget, chosen, dict(groupings), method)


def plan_budget(
    collection,
    budget: float,
    *,
    task_names: Sequence[str] | None = None,
    task_attributes: Sequence[Mapping[str, Any]] | str | None = "auto",
    attribute_pattern: str | None = None,
    rank_multipliers: Sequence[float] = DEFAULT_RANK_MULTIPLIERS,
    ranks: Sequence[int] | None = None,
    weights="relative",
    activation_covs: Mapping[str, Any] | None = None,
    module_weights: Mapping[str, float] | str | None = None,
) -> BudgetPlan:
    """Choose per module the shared side, task groups and rank under one storage budget.

    **Arguments:**

    - `collection`: `{module: (A [T, r, d_in], B [T, d_out, r])}` or `{module: (A, B,
      ranks)}` (scale folded into B; `ranks[t] = 0` marks a task absent from the module),
      or a `hydraopt_jax.io.AdapterCollection` (read one shape group at a time).
    - `budget`: stored parameters as a fraction of the original adapters' (e.g. `0.3`).
    - `task_names`: for attribute parsing and the YAML (default: the collection's names).
    - `task_attributes`: one `{attribute: value}` per task (tasks sharing a value may share
      a factor); `"auto"` parses them from `task_names` (see `task_attributes_from_names`,
      with `attribute_pattern`); `None` for no attribute groupings.
    - `rank_multipliers`: candidate ranks as multiples of each module's largest LoRA rank;
      `ranks`: extra absolute candidate ranks.
    - `weights`: task weights as in `merge` (`"relative"` default: each task counts equally
      within a module).
    - `activation_covs`: optional `{module: E[x x^T]}`; losses are then measured on the
      layer's outputs (as `merge(..., activation_cov=...)`).
    - `module_weights`: `"equal"` (default: every module's relative loss counts the same),
      `"size"` (each module's loss times its `d_in + d_out` over the mean: a module counts
      in proportion to its share of the adapters' parameters), or `{module: weight}`.

    **Returns:** a `BudgetPlan`; `.plans` feeds `merge_adapters`, `.to_yaml(names)` writes a
    plan file for `hydraopt merge --config`.

    ```python
    bp = hj.plan_budget(collection, 0.3, task_names=names)
    solutions = hj.merge_adapters(collection, bp.plans)
    ```
    """
    groupings, options = collection_options(
        collection,
        task_names=task_names,
        task_attributes=task_attributes,
        attribute_pattern=attribute_pattern,
        rank_multipliers=rank_multipliers,
        ranks=ranks,
        weights=weights,
        activation_covs=activation_covs,
        module_weights=module_weights,
    )
    return choose(groupings, options, budget)
