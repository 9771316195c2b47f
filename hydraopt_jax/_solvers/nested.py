"""Nested ranks: a shared factor of rank `k` and, per task, a rank-`j_t` factor inside it.

Shared-A orientation (the per-task factor on the B side; the mirror image is the transposed
problem): `dW_hat_t = U_t V_t^T Ah[a(t)]` with `U_t [d_out, j_t]`, `V_t [k, j_t]`.

* **Per-task part, exact for a fixed `Ah`.** With `Ah`'s rows orthonormal,
  `||dW_t - X Ah||^2 = ||dW_t (I - Ah^T Ah)||^2 + ||dW_t Ah^T - X||^2`, so the best `X` of
  rank `j_t` is the truncated SVD of `M_t = dW_t Ah^T = B_t (A_t Ah^T)` (`d_out x k`). Its
  right singular vectors are those of the small `F_t (A_t Ah^T)` (`r x k`, with
  `F_t^T F_t = B_t^T B_t`), so `V_t` = the top `j_t` of them and `U_t = B_t (A_t Ah^T) V_t`:
  no `d_out x d_in` matrix, no QR of `B_t`.
* **Shared part.** The exact solver's top-`k` subspace of the plain plan (`j_t = k`) is the
  closed-form start (`solve_nested`). `solve_nested_als` then alternates a least-squares
  update of `Ah` given the tasks' `X_t = U_t V_t^T` (re-orthonormalised: only its span
  matters) with the exact per-task part: the loss never increases.

Properties the tests check (same weighted loss): per-task truncation at rank `j` <= nested
`(k, j)` <= shared A at rank `j`, because the top-`j` subspace lies inside the top-`k` one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._loss import plan_loss, plan_objective
from .._plan import SharingPlan
from .._solution import plain_factors
from ._linalg import gram_factor
from .als import als_update_a, run_descent_loop
from .exact import solve_exact

__all__ = ["mask_padding", "nested_objective", "solve_nested", "solve_nested_als"]


def _plain(plan: SharingPlan, k: int) -> SharingPlan:
    return SharingPlan(plan.a_group, plan.b_group, k)


def _swapped(plan: SharingPlan, k: int) -> SharingPlan:
    return SharingPlan(plan.b_group, plan.a_group, k, plan.task_rank)


def _orthonormal_rows(shared: jax.Array) -> jax.Array:
    """Rows of each `[k, d]` group replaced by an orthonormal basis of their span (and zero
    rows beyond `d` when `k > d`: the factor keeps the plan's shape)."""
    q, _ = jnp.linalg.qr(jnp.swapaxes(shared, -1, -2))  # [..., d, min(d, k)]
    missing = shared.shape[-2] - q.shape[-1]
    if missing > 0:
        q = jnp.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, missing)])
    return jnp.swapaxes(q, -1, -2)


def _rank_mask(plan: SharingPlan) -> np.ndarray:
    """`[T, j_max]`: 1 for each task's first `j_t` directions, 0 for the padding (static)."""
    j = np.asarray(plan.task_rank)
    return (np.arange(j.max())[None, :] < j[:, None]).astype(np.float32)


def mask_padding(params, plan: SharingPlan):
    """`(shared_a, shared_b, cores)` of a nested plan with every entry beyond a task's `j_t`
    set to zero (the padding up to `j_max`, which no task's factors use)."""
    shared_a, shared_b, cores = params
    by_task = _rank_mask(plan)
    if plan.nested_side == "b":  # U_t: shared_b [group, d_out, j]; V_t^T: cores [T, j, k]
        by_group = jnp.asarray(_by_group(by_task, plan.b_group), shared_b.dtype)
        return (shared_a, shared_b * by_group[:, None, :],
                cores * jnp.asarray(by_task, cores.dtype)[:, :, None])  # fmt: skip
    by_group = jnp.asarray(_by_group(by_task, plan.a_group), shared_a.dtype)
    return (shared_a * by_group[:, :, None], shared_b,
            cores * jnp.asarray(by_task, cores.dtype)[:, None, :])  # fmt: skip


def _task_parts(A, B, shared_a, plan: SharingPlan, deps=(), axis_name=None):
    """The exact per-task part for a fixed `Ah` (orthonormal rows): `(U [T, d_out, j_max],
    C [T, j_max, k])` with `U_t C_t = X_t` the best rank-`j_t` factor inside `Ah`'s span
    (columns beyond `j_t` zero). Tasks are indexed by task, not by group."""
    mask = _rank_mask(plan)  # [T, j_max]
    ah = shared_a[np.asarray(plan.a_group)]  # [T, k, d_in]
    proj = jnp.einsum("trd,tkd->trk", A, ah)  # A_t Ah^T
    small = jnp.einsum("tsr,trk->tsk", gram_factor(B, deps, axis_name), proj)  # F_t A_t Ah^T
    gram = jnp.einsum("tsk,tsl->tkl", small, small)
    _, vecs = jnp.linalg.eigh(0.5 * (gram + jnp.swapaxes(gram, -1, -2)))  # ascending
    top = vecs[..., ::-1][..., : mask.shape[1]]  # [T, k, j_max]
    top = top * jnp.asarray(mask, top.dtype)[:, None, :]
    u = jnp.einsum("tor,trk,tkj->toj", B, proj, top)
    return u, jnp.swapaxes(top, -1, -2)


def _by_group(x_task: jax.Array, groups) -> jax.Array:
    """Per-task arrays reordered by the (task-specific) group ids: `out[g]` = task of `g`."""
    return x_task[np.argsort(np.asarray(groups))]


def _stationary_b(A, B, weights, norms_sq, plan, k, svd_method, deps, axis_name, start,
                  iterate):  # fmt: skip
    """Shared-A orientation: `(Ah, U by B-group, cores by task, steps, converged)`.

    `start`: an `Ah`, or `None` for the closed-form start; `iterate`: `None` for that start
    with each task's exact part inside it, or `(max_steps, tol)` for ALS from it."""
    base = _plain(plan, k)
    if start is None:
        shared_a, _ = solve_exact(A, B, weights, base, k, svd_method, deps, axis_name)
    else:
        shared_a = start
    shared_a = _orthonormal_rows(shared_a)
    u, cores = _task_parts(A, B, shared_a, plan, deps=(shared_a,), axis_name=axis_name)
    steps, converged = jnp.asarray(0, jnp.int32), jnp.asarray(True)
    if iterate is not None:
        max_steps, tol = iterate

        def per_task_b(carry):
            _, u, cores = carry
            return _by_group(jnp.einsum("toj,tjk->tok", u, cores), plan.b_group)

        def step_fn(carry):
            ah = _orthonormal_rows(als_update_a(per_task_b(carry), A, B, weights, base))
            u, cores = _task_parts(A, B, ah, plan, deps=(ah,), axis_name=axis_name)
            return ah, u, cores

        def loss_fn(carry):
            return plan_loss(carry[0], per_task_b(carry), A, B, weights, norms_sq, base)

        (shared_a, u, cores), _, steps, converged = run_descent_loop(
            step_fn, loss_fn, (shared_a, u, cores), max_steps, tol
        )
    return shared_a, _by_group(u, plan.b_group), cores, steps, converged


def _solve(A, B, weights, norms_sq, plan, k, svd_method, deps, axis_name, start, iterate):
    if plan.nested_side == "b":
        return _stationary_b(A, B, weights, norms_sq, plan, k, svd_method, deps, axis_name, start,
                             iterate)  # fmt: skip
    # The mirror image: dW_t^T = A_t^T B_t^T, B-groups play the role of A-groups.
    sa, u, cores, steps, converged = _stationary_b(
        jnp.swapaxes(B, 1, 2), jnp.swapaxes(A, 1, 2), weights, norms_sq, _swapped(plan, k), k,
        svd_method, deps, axis_name, None if start is None else jnp.swapaxes(start, -1, -2),
        iterate,
    )  # fmt: skip
    return (
        jnp.swapaxes(u, 1, 2),  # per-task Z_t^T [K_A, j_max, d_in]
        jnp.swapaxes(sa, 1, 2),  # shared Bh [K_B, d_out, k]
        jnp.swapaxes(cores, 1, 2),  # W_t [T, k, j_max]
        steps,
        converged,
    )


def solve_nested(A, B, weights, norms_sq, plan: SharingPlan, k: int, svd_method="auto", deps=(),
                 axis_name=None, start=None):  # fmt: skip
    """The closed-form start: the plain plan's exact top-`k` shared factor (or `start`, a
    given shared factor), then each task's exact best rank-`j_t` factor inside it. Returns
    `(shared_a, shared_b, cores)` in the layout of `Solution` (the per-task factors by group
    id, `cores` by task)."""
    sa, sb, cores, _, _ = _solve(A, B, weights, norms_sq, plan, k, svd_method, deps, axis_name,
                                 start, None)  # fmt: skip
    return sa, sb, cores


def solve_nested_als(A, B, weights, norms_sq, plan: SharingPlan, k: int, svd_method, deps,
                     axis_name, max_steps, tol, start=None):  # fmt: skip
    """ALS refinement of `solve_nested` (from `start`, the shared factor, when given):
    `(shared_a, shared_b, cores, steps, converged)`; the loss never increases."""
    return _solve(A, B, weights, norms_sq, plan, k, svd_method, deps, axis_name, start,
                  (max_steps, tol))  # fmt: skip


def nested_objective(A, B, weights, norms_sq, plan: SharingPlan):
    """`(shared_a, shared_b, cores) -> loss / sum_t w_t ||dW_t||^2` of a nested plan, of the
    factors as they are used (`mask_padding`: whatever a solver leaves in the padding beyond
    `j_t` does not count, and is zeroed after the solve)."""
    plain = plan_objective(A, B, weights, norms_sq, _plain(plan, plan.rank))
    return lambda params: plain(plain_factors(*mask_padding(params, plan), plan, "nested")[:2])
