"""Pieces shared by the baselines: argument checks, factored SVD, pruning masks, reports.

Nothing here forms a `d_out x d_in` array: every merged update stays a product of factors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .._loss import relative_errors, residual_norms_sq, task_norms_sq, task_weights
from .._plan import SharingPlan
from .._solution import RESULTS, Solution

__all__ = [
    "check_inputs",
    "factored_svd",
    "merge_coefficients",
    "one_adapter_solution",
    "prune_counts",
    "raw_factors",
    "topk_mask",
]


# ---------------------------------------------------------------------------- arguments
def check_inputs(name: str, A, B) -> tuple[jax.Array, jax.Array]:
    """`A [T, r, d_in]`, `B [T, d_out, r]` as arrays of one float dtype (at least float32)."""
    A, B = jnp.asarray(A), jnp.asarray(B)
    if A.ndim != 3 or B.ndim != 3:
        raise ValueError(
            f"{name}: A must be [T, r, d_in] and B [T, d_out, r]; got A {A.shape}, B {B.shape}"
        )
    if A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2]:
        raise ValueError(
            f"{name}: A {A.shape} and B {B.shape} disagree; expected A [T, r, d_in] and "
            "B [T, d_out, r] with the same T and r"
        )
    if A.shape[0] < 1:
        raise ValueError(f"{name}: needs at least one task; got A {A.shape}")
    dtype = jnp.promote_types(jnp.promote_types(A.dtype, B.dtype), jnp.float32)
    return A.astype(dtype), B.astype(dtype)


def merge_coefficients(name: str, weights, num_tasks: int, default: str, dtype) -> jax.Array:
    """Per-task merge coefficients `[T]`: given, or the method's averaging default.

    `default="mean"` gives `1/T` (sum-type merges: the merged update is the mean update);
    `default="one"` gives `1` (disjoint merges such as TIES already divide by the number of
    tasks that agree on an entry).
    """
    if weights is None:
        value = 1.0 / num_tasks if default == "mean" else 1.0
        return jnp.full((num_tasks,), value, dtype)
    w = jnp.asarray(weights, dtype)
    if w.shape != (num_tasks,):
        raise ValueError(f"{name}: weights has shape {w.shape}, expected ({num_tasks},)")
    return w


def raw_factors(name: str, B: jax.Array, scales, dtype) -> tuple[jax.Array, jax.Array]:
    """`(B_raw [T, d_out, r], s [T])` with `B = s_t B_raw_t`: undo the folded LoRA scale.

    Factor-wise merges (PEFT's `linear`, `ties`, `dare_*`) are not invariant to how `dW_t` is
    split between `A_t` and `B_t`; PEFT splits `w_t s_t` as `sqrt` on each side of the raw
    factors. Without `scales` the folded `B` is taken as a scale-1 adapter.
    """
    num_tasks = B.shape[0]
    if scales is None:
        return B, jnp.ones((num_tasks,), dtype)
    s = jnp.asarray(scales, dtype)
    if s.shape != (num_tasks,):
        raise ValueError(f"{name}: scales has shape {s.shape}, expected ({num_tasks},)")
    safe = jnp.where(s != 0, s, 1.0)
    return jnp.where((s != 0)[:, None, None], B / safe[:, None, None], 0.0), s


def resolve_task_ranks(task_ranks, num_tasks: int, r: int) -> tuple[int, ...]:
    if task_ranks is None:
        return (r,) * num_tasks
    ranks = tuple(int(x) for x in task_ranks)
    if len(ranks) != num_tasks or any(not 0 <= x <= r for x in ranks):
        raise ValueError(
            f"task_ranks={list(ranks)}: expected {num_tasks} ranks, each between 0 and r={r}"
        )
    return ranks


def resolve_task_ids(task_ids, num_tasks: int) -> tuple[int, ...]:
    ids = tuple(range(num_tasks)) if task_ids is None else tuple(int(x) for x in task_ids)
    if len(ids) != num_tasks:
        raise ValueError(f"task_ids has {len(ids)} entries, expected {num_tasks}")
    return ids


def check_density(name: str, density, *, allow_zero: bool) -> float:
    if density is None:
        raise ValueError(f"{name}: needs density= (the fraction of entries kept, in (0, 1])")
    density = float(density)
    low_ok = density >= 0 if allow_zero else density > 0
    if not (low_ok and density <= 1):
        bound = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name}: density must lie in {bound}; got {density}")
    return density


def prune_counts(density: float, sizes: Sequence[int]) -> np.ndarray:
    """Entries kept per task: PEFT's `int(density * numel)` on the unpadded tensor."""
    if density >= 1:
        return np.asarray(sizes, np.int32)
    return np.asarray([int(density * n) for n in sizes], np.int32)


# ---------------------------------------------------------------------------- kernels
def topk_mask(x: jax.Array, k: jax.Array) -> jax.Array:
    """Boolean mask of the `k` entries of largest magnitude in `x` (any shape; `k` traced).

    Exactly `k` entries, as `torch.topk`; equal magnitudes are broken by position.
    """
    flat = jnp.abs(x).reshape(-1)
    order = jnp.argsort(-flat, stable=True)
    position = (
        jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    )
    return (position < k).reshape(x.shape)


def factored_svd(left: jax.Array, right: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Rank-`k` truncated SVD of `left @ right` without forming it.

    `left [d_out, n]`, `right [n, d_in]`; with `left = Q_l R_l`, `right^T = Q_r R_r` the
    product is `Q_l (R_l R_r^T) Q_r^T`, so an SVD of the small core suffices.

    **Returns:** `(b_hat [d_out, k], a_hat [k, d_in])` with `b_hat = U_k S_k`, `a_hat = V_k^T`
    (PEFT's `svd` split: singular values on B). Missing directions are zero-padded.
    """
    q_l, r_l = jnp.linalg.qr(left)  # [d_out, m_l], [m_l, n]
    q_r, r_r = jnp.linalg.qr(right.T)  # [d_in, m_r], [m_r, n]
    u, s, vt = jnp.linalg.svd(r_l @ r_r.T, full_matrices=False)
    m = s.shape[0]
    kk = min(k, m)
    b_hat = (q_l @ u[:, :kk]) * s[None, :kk]
    a_hat = vt[:kk] @ q_r.T
    if kk < k:
        b_hat = jnp.concatenate([b_hat, jnp.zeros((b_hat.shape[0], k - kk), b_hat.dtype)], 1)
        a_hat = jnp.concatenate([a_hat, jnp.zeros((k - kk, a_hat.shape[1]), a_hat.dtype)], 0)
    return b_hat, a_hat


# ---------------------------------------------------------------------------- reports
def report(A, B, task_a, task_b, *finite_also):
    """`(loss, relative_error, weights, result)` of per-task reconstructions `task_b @ task_a`.

    `loss` uses the relative weights `1/||dW_t||^2`, so it equals `sum_t relative_error_t^2`
    and is comparable with `merge`'s default loss.
    """
    weights = task_weights(A, B, "relative")
    residual = residual_norms_sq(A, B, task_a, task_b)
    loss = jnp.sum(weights * residual)
    rel = relative_errors(residual, task_norms_sq(A, B))
    finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(task_a)) & jnp.all(jnp.isfinite(task_b))
    for x in finite_also:
        finite = finite & jnp.all(jnp.isfinite(x))
    result = jnp.where(finite, RESULTS.successful, RESULTS.nonfinite).astype(jnp.int32)
    return loss, rel, weights, result


@functools.partial(jax.jit, static_argnames=("impl", "statics"))
def _merge_and_report(A, B, arrays, *, impl: Callable, statics: tuple):
    shared_a, shared_b = impl(A, B, *arrays, **dict(statics))
    num_tasks = A.shape[0]
    task_a = jnp.broadcast_to(shared_a[None], (num_tasks,) + shared_a.shape)
    task_b = jnp.broadcast_to(shared_b[None], (num_tasks,) + shared_b.shape)
    loss, rel, weights, result = report(A, B, task_a, task_b)
    return shared_a, shared_b, loss, rel, weights, result


def one_adapter_solution(
    impl: Callable,
    A: jax.Array,
    B: jax.Array,
    arrays: tuple,
    statics: dict,
    *,
    task_ranks,
    task_ids,
) -> Solution:
    """Run a one-adapter merge `impl(A, B, *arrays, **statics) -> (a [k, d_in], b [d_out, k])`
    under one jit and wrap it as a `full_merge` `Solution` with its per-task errors."""
    shared_a, shared_b, loss, rel, weights, result = _merge_and_report(
        A, B, tuple(arrays), impl=impl, statics=tuple(sorted(statics.items()))
    )
    num_tasks, r = A.shape[0], A.shape[1]
    return Solution(
        shared_a=shared_a[None],
        shared_b=shared_b[None],
        loss=loss,
        relative_error=rel,
        weights=weights,
        steps=jnp.asarray(0, jnp.int32),
        result=result,
        plan=SharingPlan.full_merge(num_tasks, rank=int(shared_a.shape[0])),
        task_ranks=resolve_task_ranks(task_ranks, num_tasks, r),
        task_ids=resolve_task_ids(task_ids, num_tasks),
    )
