"""Reconstruction losses in factored form, and the dense reference used by tests.

For one task, with `dW = B A` and `dW_hat = Bh Ah`,

    ||B A - Bh Ah||_F^2 = tr((B^T B)(A A^T)) - 2 tr((Bh^T B)(A Ah^T)) + tr((Bh^T Bh)(Ah Ah^T))

Every Gram here is `r x r`, `k x r` or `k x k`: loss and gradient cost `O(r k (d_in + d_out))`
per task. No function in this module except `dense_loss_reference` forms a `d_out x d_in`
array.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ._lapack import after
from ._plan import SharingPlan

__all__ = [
    "COV_RIDGE",
    "adapter_task_weights",
    "all_finite",
    "cond_across",
    "dense_loss_reference",
    "map_task_chunks",
    "plan_gram_errors",
    "plan_loss",
    "plan_objective",
    "plan_residual_norms_sq",
    "regularized_covariance",
    "reported_residuals",
    "residual_norms_sq",
    "task_norms_sq",
    "task_weights",
    "working_dtype",
]


def working_dtype(*arrays) -> jnp.dtype:
    """What the solvers compute in: float64 when an input is float64 (and JAX has x64 on),
    else float32 (half-precision adapters are widened)."""
    wide = any(np.dtype(a.dtype) == np.float64 for a in arrays)
    return jnp.dtype(jnp.float64 if wide and jax.config.jax_enable_x64 else jnp.float32)


def check_factor_shapes(A, B, where: str) -> None:
    """Raise `ValueError` naming `where` unless `A [T, r, d_in]` and `B [T, d_out, r]` agree."""
    if A.ndim != 3 or B.ndim != 3:
        raise ValueError(
            f"{where}: A must be [T, r, d_in] and B [T, d_out, r]; got A {A.shape}, B {B.shape}"
        )
    if A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2]:
        raise ValueError(
            f"{where}: A {A.shape} and B {B.shape} disagree; expected A [T, r, d_in] and "
            "B [T, d_out, r] with the same T and r"
        )


# Elements of one chunk of tasks in `map_task_chunks` (float32: 16 MiB): bounds the workspace
# of per-task products whatever the number of tasks.
TASK_CHUNK_ELEMENTS = 1 << 22


def all_finite(x: jax.Array) -> jax.Array:
    """`jnp.all(jnp.isfinite(x))` as one fused reduction: `x * 0` is 0 where `x` is finite and
    NaN elsewhere. (XLA's CPU backend materialises `isfinite(x)` as a bool array of `x`'s
    size: 125 MiB for the per-task B of 1000 adapters at d = 4096.)"""
    return jnp.isfinite(jnp.sum(x * 0))


def cond_across(pred: jax.Array, axis_name: str | None, true_fn, false_fn) -> jax.Array:
    """`lax.cond(pred, true_fn, false_fn)` decided once for a whole `vmap` batch: `pred` (a
    scalar bool per batch element) is or-reduced over the axis `axis_name` when given, so the
    branch stays a real branch instead of a select that computes both."""
    flag = pred.astype(jnp.int32)
    if axis_name is not None:
        flag = jax.lax.psum(flag, axis_name)
    return jax.lax.cond(flag > 0, true_fn, false_fn)


def map_task_chunks(fn, *xs: jax.Array, row_elements: int) -> jax.Array:
    """`fn(*xs)` computed a chunk of the leading (task) axis at a time.

    `fn` maps arrays with a leading task axis to one array with that leading axis, task by
    task. XLA copies an operand whose contracted axis is not the minor one (e.g. `B` in
    `B_t^T B_t`); chunking bounds that copy, and any per-task intermediate, to
    `TASK_CHUNK_ELEMENTS` (`row_elements`: the elements one task touches). Small
    collections run in one chunk, i.e. exactly `fn(*xs)`.
    """
    num_tasks = xs[0].shape[0]
    chunk = max(1, min(num_tasks, TASK_CHUNK_ELEMENTS // max(row_elements, 1)))
    if chunk == num_tasks:
        return fn(*xs)
    shapes = [jax.ShapeDtypeStruct((chunk, *x.shape[1:]), x.dtype) for x in xs]
    out = jax.eval_shape(fn, *shapes)

    def body(i, acc):
        # the last chunk is shifted back to end at T (it recomputes a few tasks, identically)
        start = jnp.minimum(i * chunk, num_tasks - chunk)
        # Slicing a flattened [T, -1] view keeps XLA from giving the whole operand the
        # layout `fn` prefers for its chunk (a full relayout copy before the loop, e.g. of B
        # for a LAPACK QR): only the chunk is relaid out.
        part = fn(*(
            jax.lax.dynamic_slice_in_dim(x.reshape(num_tasks, -1), start, chunk).reshape(
                (chunk, *x.shape[1:])
            )
            for x in xs
        ))  # fmt: skip
        return jax.lax.dynamic_update_slice_in_dim(acc, part, start, 0)

    init = jnp.zeros((num_tasks, *out.shape[1:]), out.dtype)
    return jax.lax.fori_loop(0, -(-num_tasks // chunk), body, init)


def task_norms_sq(A: jax.Array, B: jax.Array) -> jax.Array:
    """`||B_t A_t||_F^2 = tr((B_t^T B_t)(A_t A_t^T))` for every task. `A: [T, r, d_in]`,
    `B: [T, d_out, r]` -> `[T]`."""

    def norms(a, b):
        gram_b = jnp.einsum("tor,tos->trs", b, b)
        gram_a = jnp.einsum("trd,tsd->trs", a, a)
        return jnp.einsum("trs,trs->t", gram_b, gram_a)

    return map_task_chunks(norms, A, B, row_elements=A.shape[1] * (A.shape[2] + B.shape[1]))


def task_weights(A: jax.Array, B: jax.Array, weights="relative") -> jax.Array:
    """Task weights `w_t` of the objective.

    `"relative"` (default): `1 / ||dW_t||_F^2`, so every task counts equally whatever its norm
    (a task with a zero update gets weight 0); `"uniform"`: 1; or an array `[T]` of
    non-negative weights. `"adapter"` needs every module (`adapter_task_weights`): the
    callers that see them all resolve it to its array first.
    """
    num_tasks = A.shape[0]
    dtype = A.dtype
    if isinstance(weights, str):
        if weights == "relative":
            norms = task_norms_sq(A, B)
            return jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0).astype(dtype)
        if weights == "uniform":
            return jnp.ones((num_tasks,), dtype)
        if weights == "adapter":
            raise ValueError(
                "weights='adapter' needs every module of the adapters: pass it to "
                "merge_adapters, merge_collection or the planner (or adapter_task_weights' array)"
            )
        raise ValueError(
            f"weights must be 'relative', 'uniform', 'adapter' or an array; got {weights!r}"
        )
    w = jnp.asarray(weights, dtype)
    if w.shape != (num_tasks,):
        raise ValueError(f"weights has shape {w.shape}, expected ({num_tasks},): one per task")
    return w


def adapter_task_weights(modules, activation_covs=None) -> np.ndarray:
    """The `"adapter"` task weights: `w_t = 1 / sum_m ||dW_{m,t}||_F^2`, the same on every
    module (`||dW_{m,t} C_m^{1/2}||^2` under input covariances `C_m`); 0 for a task with no
    update. Summed over modules, the objective is then `sum_t err_t^2`, each task's squared
    relative error over its whole adapter (what `task_relative_errors` reports), whereas
    `"relative"` (`1 / ||dW_{m,t}||^2`, module by module) counts every module's relative
    error alike, however small its update.

    `modules`: iterable of `(name, A [T, r, d_in], B [T, d_out, r], ranks)` (scale folded
    into `B`; `ranks[t] = 0`: task absent from the module; `None`: all present). float64,
    numpy."""
    total = None
    for name, a, b, ranks in modules:
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        present = np.ones(a.shape[0], bool) if ranks is None else np.asarray(ranks) > 0
        cov = None if activation_covs is None else activation_covs.get(name)
        if cov is not None:  # a module without covariances keeps the plain metric
            c = regularized_covariance(np.asarray(cov, np.float64), np)
            gram_a = np.einsum("tri,ij,tsj->trs", a, c, a, optimize=True)
        else:
            gram_a = np.einsum("tri,tsi->trs", a, a)
        norms = np.einsum("trs,trs->t", np.einsum("tor,tos->trs", b, b), gram_a)
        norms = np.where(present, norms, 0.0)
        total = norms if total is None else total + norms
    if total is None:
        raise ValueError("adapter_task_weights: no modules")
    return np.where(total > 0, 1.0 / np.where(total > 0, total, 1.0), 0.0)


def residual_norms_sq(
    A: jax.Array, B: jax.Array, task_a: jax.Array, task_b: jax.Array
) -> jax.Array:
    """`||B_t A_t - Bh_t Ah_t||_F^2` per task, accurate to working precision even when tiny.

    Writes the residual as `[B, -Bh] @ [A; Ah]` and takes the triangular factors of both
    sides: `||[B, -Bh] [A; Ah]||_F = ||R_b R_a^T||_F`. No cancellation of large Gram terms,
    so an exact reconstruction reports ~1e-7 (float32), not ~1e-4.
    """
    left = jnp.concatenate([B, -task_b], axis=-1)  # [T, d_out, r + k]
    right = jnp.concatenate([A, task_a], axis=-2)  # [T, r + k, d_in]
    r_left = jnp.linalg.qr(left, mode="r")
    r_right = jnp.linalg.qr(after(jnp.swapaxes(right, -1, -2), r_left), mode="r")
    core = jnp.einsum("tir,tjr->tij", r_left, r_right)
    return jnp.sum(core * core, axis=(-2, -1))


def _map_plan_tasks(fn, A, B, shared_a, shared_b, plan: SharingPlan) -> jax.Array:
    """`fn(a, b, ah, bh)` for every task against its groups' shared factors, a chunk of tasks
    at a time (`map_task_chunks`): no `[T, k, d_in]` broadcast of the shared factors is held
    for the whole collection."""
    r, d_in, d_out, k = A.shape[1], A.shape[2], B.shape[1], shared_a.shape[1]

    def per_chunk(a, b, ia, ib):
        return fn(a, b, shared_a[ia], shared_b[ib])

    return map_task_chunks(
        per_chunk,
        A,
        B,
        jnp.asarray(np.asarray(plan.a_group, np.int32)),
        jnp.asarray(np.asarray(plan.b_group, np.int32)),
        row_elements=(r + k) * (d_in + d_out),
    )


def plan_residual_norms_sq(
    A: jax.Array, B: jax.Array, shared_a: jax.Array, shared_b: jax.Array, plan: SharingPlan
) -> jax.Array:
    """`residual_norms_sq` of every task against its groups' shared factors, a chunk of tasks
    at a time: the `[T, d_out, r + k]` concatenation of the whole collection is never held."""
    return _map_plan_tasks(residual_norms_sq, A, B, shared_a, shared_b, plan)


def _against_groups(x: jax.Array, shared: jax.Array, group, spec: str) -> jax.Array:
    """`einsum(spec, x_t, shared[group[t]])` for every task `t`: one GEMM when there is one
    group, a batched product when every task is its own group (in order), and otherwise a
    chunk of tasks at a time (the gathered `[T, ...]` copy of `shared` is never held whole).
    `spec` names the task axis `t` in `x` and the output, not in the shared factor."""
    x_sub, rest = spec.split(",")
    group = np.asarray(group, np.int32)
    if shared.shape[0] == 1:
        return jnp.einsum(spec, x, shared[0])
    batched = f"{x_sub},t{rest}"
    if np.array_equal(group, np.arange(x.shape[0])):
        return jnp.einsum(batched, x, shared)
    return map_task_chunks(
        lambda xs, g: jnp.einsum(batched, xs, shared[g]),
        x,
        jnp.asarray(group),
        row_elements=x[0].size + shared[0].size,
    )


def plan_gram_errors(
    A: jax.Array,
    B: jax.Array,
    shared_a: jax.Array,
    shared_b: jax.Array,
    plan: SharingPlan,
    norms_sq: jax.Array,
) -> jax.Array:
    """`||B_t A_t - Bh_t Ah_t||_F^2` of every task against its groups' shared factors by the
    Gram identity (module docstring; `norms_sq` is `task_norms_sq(A, B)`, which solvers compute
    once): each shared factor's Gram once per group, each task's cross terms `A_t Ah^T` and
    `B_t^T Bh` against its group's factor (see `_against_groups`). Cheap and differentiable,
    but it cancels when the error is far below `||dW_t||^2`: use `residual_norms_sq` to
    *report* small errors."""
    a_idx, b_idx = np.asarray(plan.a_group), np.asarray(plan.b_group)
    cross = jnp.einsum(
        "trk,trk->t",
        _against_groups(A, shared_a, a_idx, "trd,kd->trk"),
        _against_groups(B, shared_b, b_idx, "tor,ok->trk"),
    )
    gram_a = jnp.einsum("gkd,gld->gkl", shared_a, shared_a)
    gram_b = jnp.einsum("gok,gol->gkl", shared_b, shared_b)
    quad = jnp.einsum("tkl,tkl->t", gram_b[b_idx], gram_a[a_idx])
    return norms_sq - 2.0 * cross + quad


# A residual of at least this fraction of its task's `||dW_t||^2` is reported from the Gram
# identity: its cancellation then costs at most a factor ~13 of rounding (measured in float32:
# <= 2e-6 relative, against ~2e-7 by QR). Smaller residuals need the QR form.
GRAM_REPORT_MIN_FRACTION = 0.25


def reported_residuals(
    A: jax.Array,
    B: jax.Array,
    shared_a: jax.Array,
    shared_b: jax.Array,
    plan: SharingPlan,
    norms_sq: jax.Array,
    axis_name: str | None = None,
) -> jax.Array:
    """Per-task `||B_t A_t - Bh_t Ah_t||_F^2`: at the Gram cost (`plan_gram_errors`, ~1e-6
    relative in float32) when every task's residual is large (merges of dissimilar tasks), by
    QR (`plan_residual_norms_sq`, round-off of `||dW_t||` only) when some task is
    reconstructed closely.

    The Gram form is tried first only when no task has a factor of its own (every A- and
    B-group holds two tasks or more): such merges reconstruct each task loosely. Plans with
    task-specific factors usually fit closely and go straight to QR (the check and the branch
    would cost them ~10%). The choice is one `lax.cond` for the whole call; `axis_name` names
    a `vmap` axis to make it across (so it stays a real branch, not a select of both).
    """
    if min(len(m) for side in "ab" for m in plan.groups(side)) < 2:
        return plan_residual_norms_sq(A, B, shared_a, shared_b, plan)
    gram = plan_gram_errors(A, B, shared_a, shared_b, plan, norms_sq)
    return cond_across(
        jnp.any(gram < GRAM_REPORT_MIN_FRACTION * norms_sq),
        axis_name,
        lambda: plan_residual_norms_sq(A, B, shared_a, shared_b, plan),
        lambda: gram,
    )


def relative_errors(residual_sq: jax.Array, norms_sq: jax.Array) -> jax.Array:
    """`sqrt(residual / norm)` per task; a task with a zero update reports its absolute error."""
    safe = jnp.where(norms_sq > 0, norms_sq, 1.0)
    return jnp.sqrt(jnp.maximum(residual_sq, 0.0) / safe)


def dense_loss_reference(
    A: np.ndarray,
    B: np.ndarray,
    shared_a: np.ndarray,
    shared_b: np.ndarray,
    plan: SharingPlan,
    weights: Sequence[float] | np.ndarray,
) -> float:
    """DENSE REFERENCE for tests: `sum_t w_t ||B_t A_t - Bh_b(t) Ah_a(t)||_F^2` in float64.

    Builds every `d_out x d_in` update explicitly; never use it outside tests and checks.
    """
    A, B = np.asarray(A, np.float64), np.asarray(B, np.float64)
    shared_a, shared_b = np.asarray(shared_a, np.float64), np.asarray(shared_b, np.float64)
    total = 0.0
    for t in range(plan.num_tasks):
        dense = B[t] @ A[t]
        dense_hat = shared_b[plan.b_group[t]] @ shared_a[plan.a_group[t]]
        total += float(weights[t]) * float(np.sum((dense - dense_hat) ** 2))
    return total


def plan_loss(
    shared_a: jax.Array,
    shared_b: jax.Array,
    A: jax.Array,
    B: jax.Array,
    weights: jax.Array,
    norms_sq: jax.Array,
    plan: SharingPlan,
) -> jax.Array:
    """The objective `sum_t w_t ||B_t A_t - Bh_b(t) Ah_a(t)||_F^2`, factored (differentiable;
    `plan_gram_errors`, without a `[T, k, d]` broadcast of the shared factors)."""
    return jnp.sum(weights * plan_gram_errors(A, B, shared_a, shared_b, plan, norms_sq))


def plan_objective(A, B, weights, norms_sq, plan: SharingPlan):
    """`(shared_a, shared_b) -> loss / sum_t w_t ||dW_t||^2`: the plan's objective in units
    of its value at zero, so that one learning rate suits any adapter norm."""
    total = jnp.sum(weights * norms_sq)
    total = jnp.where(total > 0, total, 1.0)

    def loss_fn(params):
        return plan_loss(params[0], params[1], A, B, weights, norms_sq, plan) / total

    return loss_fn


# Whitening ridge of activation covariances, relative to their mean eigenvalue.
COV_RIDGE = 1e-6


def regularized_covariance(cov, xp=np):
    """`(C + C^T) / 2 + (COV_RIDGE tr(C) / d + tiny) I`: the input covariance every
    activation-aware computation uses (`merge`'s whitening Cholesky, the planner's Grams).
    `xp`: `numpy` (float64 planner) or `jax.numpy`."""
    d = cov.shape[-1]
    sym = 0.5 * (cov + cov.T)
    ridge = COV_RIDGE * xp.trace(sym) / d + float(np.finfo(np.float32).tiny)
    return sym + ridge * xp.eye(d, dtype=sym.dtype)
