"""Loss curves: every closed-form candidate of one module at every rank, from two small Grams.

For a shared-A-family plan with A-groups `g` and B-groups `j` (each inside one `g`),
`M_j = sum_{t in j} w_t dW_t / W_j`, the optimum of `sum_t w_t ||dW_t - Bh_j Ah_g||^2` at
rank `k` is (see `_solvers/exact.py`)

    L(k) = sum_t w_t ||dW_t||^2 - sum_g sum_{i <= k} lambda_{g,i}

where `lambda_{g,i}` are the eigenvalues of `sum_{j in g} W_j M_j^T M_j`: those of the small
`n_g r x n_g r` matrix `F_g^T P_g F_g` (`D_g = F_g F_g^T`), with `P = [A_s A_t^T]` (the A Gram
of the module, `C`-weighted under an activation covariance) and
`D_g = blockdiag_j [w_s w_t B_s^T B_t / W_j]`. One symmetric eigendecomposition per group
gives every rank; the shared-B family swaps the two Grams.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np

from .._loss import regularized_covariance
from .._plan import NAMED_PLANS, SharingPlan, original_params, refines, relabel

__all__ = ["ModuleStats", "PlanOption", "module_options", "module_stats"]

DEFAULT_RANK_MULTIPLIERS = (0.125, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
NAMED_PAIRS = {pair: name.replace("_", "-") for name, pair in NAMED_PLANS.items()}


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
    # nested: every task's rank j inside the shared factor (one int), or one j per task
    # present (`per_task_ranks`)
    task_rank: int | tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        base = NAMED_PAIRS.get((self.a_by, self.b_by), f"A:{self.a_by},B:{self.b_by}")
        if self.task_rank is None:
            return base
        if isinstance(self.task_rank, tuple) and len(set(self.task_rank)) > 1:
            return f"{base} j={min(self.task_rank)}..{max(self.task_rank)}"
        if isinstance(self.task_rank, tuple):
            return f"{base} j={self.task_rank[0]}"
        return f"{base} j={self.task_rank}"

    @property
    def key(self) -> tuple[str, str, str, int]:
        """What makes options of different modules "the same choice" (`j = 0`: not nested)."""
        return (self.a_by, self.b_by, self.rank_label, self.task_rank or 0)


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


def _group_eigen(p, q, w, r, outer, inner, kmax):
    """Per group `g` of `outer`: the eigen-decomposition behind its optimal shared factor.

    Yields `(order, blocks, coef, q_g, vals, keep, v)` with `order` the group's tasks
    (those of inner groups with positive weight), `blocks` their inner groups' row slices,
    `coef` each row's `w_t / W_j`, `q_g` the inner-side Gram restricted to inner groups,
    `vals` the top `kmax` eigenvalues of `F^T P_g F` (`keep`: the numerically nonzero ones)
    and `v = P_g F U` (`[n_g r, K]`): row block `t` of `v Lambda^{-1/2}` is `A_t Ah^T` for the
    optimal `Ah` of rank `K` (in the metric of `p`).
    """
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
        yield order, blocks, coef, q_g, vals, keep, p_g @ half @ vecs


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
    norms = _block_traces(q, p, r)
    captured = np.zeros(kmax + 1)
    residual = np.tile(norms, (kmax + 1, 1))
    for order, blocks, coef, q_g, vals, keep, v in _group_eigen(p, q, w, r, outer, inner, kmax):
        lam = np.concatenate([[0.0], vals, np.zeros(kmax - len(vals))])
        captured += np.cumsum(lam)
        # per-task residuals, one eigen-direction at a time
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
    return captured, np.clip(residual, 0.0, None)


def _nested_curves(p, q, w, r, outer, ranks, inner_ranks) -> dict:
    """Per-task residuals of nested plans (the closed-form start of `_solvers/nested.py`):
    the shared side grouped by `outer`, one factor per task inside it.

    For a shared factor of rank `k` (the plain plan's optimum), task `t`'s best rank-`j`
    factor inside it captures the top `j` squared singular values of
    `dW_t Ah^T = B_t A_t Ah^T`, those of `R_t (v_t Lambda_k^{-1/2})` with
    `R_t^T R_t = B_t^T B_t` (`v_t`: task `t`'s rows of `_group_eigen`'s `v`): the eigenvalues
    of `Lambda^{-1/2} v_t^T Q_tt v_t Lambda^{-1/2}` (`k x k`).

    Returns `{(k, j): residual [n]}` for `k` in `ranks` and `j` in `inner_ranks` below `k`.
    """
    n = len(outer)
    norms = _block_traces(q, p, r)
    kmax = max(ranks)
    out = {(k, j): norms.copy() for k in ranks for j in inner_ranks if j < k}
    for order, _, _, q_g, vals, keep, v in _group_eigen(p, q, w, r, outer, range(n), kmax):
        inv_sqrt = np.where(keep, 1.0 / np.sqrt(np.where(keep, vals, 1.0)), 0.0)
        for i, t in enumerate(order):
            rows = slice(i * r, (i + 1) * r)
            v_t = v[rows] * inv_sqrt  # A_t Ah^T for the rank-K shared factor
            h = v_t.T @ q_g[rows, rows] @ v_t  # its Gram under B_t^T B_t, [K, K]
            for k in ranks:
                kk = min(k, h.shape[0])
                energy = np.linalg.eigvalsh(h[:kk, :kk])[::-1]  # descending
                captured = np.cumsum(np.concatenate([[0.0], np.clip(energy, 0.0, None)]))
                for j in inner_ranks:
                    if j < k:
                        out[(k, j)][t] = max(norms[t] - captured[min(j, kk)], 0.0)
    return out


def _lower_hull(cost: np.ndarray, loss: np.ndarray) -> list[int]:
    """Indices of the points on the lower convex hull of `(cost, loss)` (cost increasing)
    where the loss still falls: the levels a Lagrangian price can pick, cheapest first."""
    hull: list[int] = []
    for i in range(len(cost)):
        if hull and loss[i] >= loss[hull[-1]]:
            continue  # no cheaper in loss than a cheaper level
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the segment a -> i: drop it
            if (loss[b] - loss[a]) * (cost[i] - cost[a]) >= (loss[i] - loss[a]) * (
                cost[b] - cost[a]
            ):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def per_task_rank_paths(cost: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Per-task levels along the lower convex hull of `sum_t loss[t, i_t]` against
    `sum_t cost[i_t]`.

    `cost [J]`: what one task stores at each level (the same for every task, increasing);
    `loss [n, J]`: each task's loss there. Start with every task at the cheapest level, then
    move one task at a time to its next hull level, the largest loss drop per parameter
    first: every choice a price `lambda` on parameters makes (each task at
    `argmin_i loss[t, i] + lambda cost[i]`) is one of the rows.

    Returns `[num_steps + 1, n]` level indices.
    """
    n = loss.shape[0]
    events = []  # (-slope, task, level)
    start = np.zeros(n, dtype=np.int64)
    for t in range(n):
        hull = _lower_hull(cost, loss[t])
        start[t] = hull[0]
        for a, b in itertools.pairwise(hull):
            events.append(((loss[t, a] - loss[t, b]) / (cost[b] - cost[a]), t, b))
    events.sort(key=lambda e: -e[0])  # stable: a task's own levels stay in order
    rows = np.tile(start, (len(events) + 1, 1))
    for step, (_, t, level) in enumerate(events, start=1):
        rows[step:, t] = level
    return rows


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
    sq_norms: np.ndarray  # [n] ||dW_t||^2 (in the activation metric, as `Solution`'s)

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
    if activation_cov is None:
        p = a @ a.T
    else:
        p = a @ regularized_covariance(np.asarray(activation_cov, np.float64), np) @ a.T
    metric = _block_traces(q, p, r)
    if isinstance(weights, str):
        if weights == "relative":
            w = np.where(metric > 0, 1.0 / np.where(metric > 0, metric, 1.0), 0.0)
        elif weights == "uniform":
            w = np.ones(len(present))
        else:
            raise ValueError(
                f"module_stats: weights must be 'relative', 'uniform' or an array (resolve "
                f"'adapter' with adapter_task_weights first); got {weights!r}"
            )
    else:
        w = np.asarray(weights, np.float64)
        if w.shape != (num_tasks,):
            raise ValueError(f"weights has shape {w.shape}, expected ({num_tasks},)")
        w = w[list(present)]
    # the same norms as the merge's (`Solution.task_sq_norms`), so that predicted and merged
    # relative errors agree, and `weights="adapter"` makes the loss sum_t err_t^2 under covs
    return ModuleStats(name, d_in, d_out, ranks, present, r, p, q, w, metric)


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


def _inner_ranks(rank_list) -> list[int]:
    """Nested ranks `j` tried inside a shared factor: 1, 2, 4, ... and the candidate ranks."""
    kmax = max(k for k, _ in rank_list)
    powers = [2**i for i in range(kmax.bit_length()) if 2**i < kmax]
    return sorted(set(powers) | {k for k, _ in rank_list if k < kmax})


def module_options(
    stats: ModuleStats,
    groupings: Mapping[str, Sequence[int]],
    *,
    rank_multipliers=DEFAULT_RANK_MULTIPLIERS,
    ranks: Sequence[int] | None = None,
    module_weight: float = 1.0,
    nested: bool = True,
    per_task_ranks: bool = False,
) -> list[PlanOption]:
    """Every closed-form candidate of one module at every candidate rank, with its loss.

    With `nested`, plans whose other side is task-specific (shared A with a B per task, or
    the mirror image) are also offered with every task at a rank `j < k` inside the shared
    factor (`_nested_curves`; one `j` for all tasks of the module). With `per_task_ranks`,
    each such shared factor is also offered with a rank `j_t <= k` per task, and `separate`
    with a rank per task (`SharingPlan.own_ranks`): the choices along
    `per_task_rank_paths` that no other option of the module beats on both storage and
    loss."""
    local = {g: relabel([labels[t] for t in stats.present]) for g, labels in groupings.items()}
    rank_list = _candidate_ranks(stats, rank_multipliers, ranks)
    kmax = max(k for k, _ in rank_list)
    metric = _block_traces(stats.q, stats.p, stats.r)
    inner = _inner_ranks(rank_list)
    options: list[PlanOption] = []
    per_task: list = []  # nested families for `per_task_ranks`
    seen: set = set()

    total = float(np.sum(stats.weights * metric))

    def _option(a_by, b_by, k, label, plan, residual, j=None, loss=None) -> PlanOption:
        """An option from each task's residual `||dW_t - dW_hat_t||^2` (loss: their weighted
        sum unless given; errors relative to `||dW_t||`)."""
        if loss is None:
            loss = float(np.sum(stats.weights * residual))
        loss *= module_weight
        errors = np.sqrt(np.where(metric > 0, residual / np.where(metric > 0, metric, 1), 0))
        return PlanOption(
            a_by, b_by, k, label, plan.num_params(stats.d_in, stats.d_out), loss, plan,
            tuple(float(x) for x in errors), j,
        )  # fmt: skip

    for a_by, a_lab in local.items():
        for b_by, b_lab in local.items():
            if refines(b_lab, a_lab):  # shared-A family (also equal groupings)
                cap, res = _family_curves(
                    stats.p, stats.q, stats.weights, stats.r, a_lab, b_lab, kmax
                )
            elif refines(a_lab, b_lab):  # shared-B family: the transposed problem
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
                loss = max(total - cap[k], 0.0)  # from the eigenvalues: exact, no cancellation
                options.append(_option(a_by, b_by, k, label, plan.with_rank(k), res[k], None, loss))
            one_side = [side for side, by in (("a", a_by), ("b", b_by)) if by == "task"]
            if nested and len(one_side) == 1:
                # the side with a factor per task nests a rank-j factor in the shared one
                shared = a_lab if one_side == ["b"] else b_lab
                grams = (stats.p, stats.q) if one_side == ["b"] else (stats.q, stats.p)
                curves = _nested_curves(
                    *grams, stats.weights, stats.r, shared, [k for k, _ in rank_list], inner
                )
                for (k, j), res_kj in curves.items():
                    label = dict(rank_list)[k]
                    nested_plan = plan.with_rank(k).with_task_rank(j)
                    options.append(_option(a_by, b_by, k, label, nested_plan, res_kj, j))
                if per_task_ranks:
                    d_task = stats.d_out if one_side == ["b"] else stats.d_in
                    for k, label in rank_list:
                        levels = [j for j in inner if j < k] + [k]
                        if len(levels) < 2:
                            continue
                        residual = np.stack(
                            [curves[(k, j)] for j in levels[:-1]] + [res[k]], axis=1
                        )  # [n, J]
                        unit = np.asarray(levels, np.float64) * (d_task + k)
                        per_task.append(
                            (a_by, b_by, label, plan.with_rank(k), unit, levels, residual)
                        )
            if per_task_ranks and _own(plan) and len(stats.present) > 1:
                # separate: every task truncated to its own rank j_t (`own_ranks`)
                base = min(max(stats.ranks[t] for t in stats.present), kmax)
                levels = list(range(1, base + 1))
                unit = np.asarray(levels, np.float64) * (stats.d_in + stats.d_out)
                label = next((lb for k, lb in rank_list if k == base), f"k={base}")
                residual = res[1 : base + 1].T  # [n, J]
                per_task.append((a_by, b_by, label, plan.with_rank(base), unit, levels, residual))
    if per_task:
        options += _per_task_options(stats, options, per_task, module_weight, _option)
    return options


def _own(plan: SharingPlan) -> bool:
    """Both sides hold one factor per task: ranks per task are each task's own truncation."""
    return plan.a_task_specific and plan.b_task_specific


def _per_task_options(stats, options, families, module_weight, make_option) -> list[PlanOption]:
    """The per-task-rank choices of `families` (`per_task_rank_paths` of each family with
    one factor per task: nested ranks in a shared factor of rank `k`, or per-task truncation
    to a rank per task) that no option of `options` or another family beats on storage and
    loss. A family is `(a_by, b_by, rank_label, plan, unit, levels, residual)`: `unit[i]`
    what one task stores at rank `levels[i]`, `residual [n, J]` each task's there."""
    from ._allocate import pareto

    n = len(stats.present)
    candidates = []  # (cost, loss, family, levels per task)

    for f, (*_, plan, unit, levels, residual) in enumerate(families):
        weighted = module_weight * stats.weights[:, None] * residual
        # the part not per task (the shared factor of a nested plan; 0 for own ranks)
        fixed = plan.with_task_rank(levels[0]).num_params(stats.d_in, stats.d_out) - n * unit[0]
        for row in per_task_rank_paths(unit, weighted):
            if np.all(row == row[0]) and not _own(plan):
                continue  # one j for every task: already an option (or the plain plan)
            loss = float(weighted[np.arange(n), row].sum())
            candidates.append((fixed + float(unit[row].sum()), loss, f, row))
    if not candidates:
        return []
    costs = np.array([o.num_params for o in options] + [c[0] for c in candidates], np.float64)
    losses = np.array([o.loss for o in options] + [c[1] for c in candidates], np.float64)
    out = []
    for i in pareto(costs, losses):  # stable: an equal existing option wins
        if i < len(options):
            continue
        _, _, f, row = candidates[i - len(options)]
        a_by, b_by, label, plan, _, levels, residual = families[f]
        js = tuple(int(levels[x]) for x in row)
        if _own(plan):
            plan = plan.with_rank(max(js))  # no padding beyond the largest rank kept
        out.append(
            make_option(a_by, b_by, plan.rank, label, plan.with_task_rank(js),
                        residual[np.arange(n), row], js)
        )  # fmt: skip
    return out


def _block_traces(q: np.ndarray, p: np.ndarray, r: int) -> np.ndarray:
    """Per task `tr(Q_tt P_tt)` = `||B_t A_t||_F^2` (in the metric of `p`)."""
    n = q.shape[0] // r
    qb = q.reshape(n, r, n, r)[np.arange(n), :, np.arange(n), :]
    pb = p.reshape(n, r, n, r)[np.arange(n), :, np.arange(n), :]
    return np.einsum("tij,tij->t", qb, pb)
