"""Pieces shared by the baselines: argument checks, factored SVD, pruning masks, reports.

Nothing here forms a `d_out x d_in` array: every merged update stays a product of factors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .._lapack import after
from .._loss import (
    all_finite,
    check_factor_shapes,
    relative_errors,
    task_norms_sq,
    task_weights,
    working_dtype,
)
from .._plan import SharingPlan
from .._solution import RESULTS, Solution

__all__ = [
    "check_inputs",
    "factored_svd",
    "merge_coefficients",
    "one_adapter_solution",
    "prune_counts",
    "resolve_rank",
    "shared_solution",
    "raw_factors",
    "topk_mask",
]


# ---------------------------------------------------------------------------- arguments
def check_inputs(name: str, A, B) -> tuple[jax.Array, jax.Array]:
    """`A [T, r, d_in]`, `B [T, d_out, r]` as arrays of one float dtype (at least float32)."""
    A, B = jnp.asarray(A), jnp.asarray(B)
    check_factor_shapes(A, B, name)
    if A.shape[0] < 1:
        raise ValueError(f"{name}: needs at least one task; got A {A.shape}")
    dtype = working_dtype(A, B)
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


def resolve_rank(name: str, rank, r: int) -> int:
    """The merged rank `k` of a method with one to choose: `rank`, or `r` by default."""
    k = r if rank is None else rank
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"{name}: rank must be an integer >= 1; got {rank!r}")
    return int(k)


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
def _magnitude_bits(x: jax.Array) -> jax.Array:
    """`|x|` as integers of the same width: for non-negative floats the bit pattern orders
    exactly as the value does."""
    itype = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(jnp.abs(x), itype)


def kth_largest_bits(bits: jax.Array, k: jax.Array) -> jax.Array:
    """Bit pattern of the `k`-th largest entry (`1 <= k <= bits.size`) of `bits`.

    Bisection on the integer value: one compare-and-count pass per bit, so
    `O(bits.size * width)` with no sort (XLA's CPU sort of ~10^6 entries per task took
    seconds; this takes tens of milliseconds).
    """
    flat = bits.reshape(-1)

    def halve(_, bounds):  # invariant: #(>= lo) >= k > #(>= hi)
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(flat >= mid, dtype=jnp.asarray(k).dtype) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    start = (jnp.zeros((), flat.dtype), jnp.max(flat) + 1)
    lo, _ = jax.lax.fori_loop(0, 8 * flat.dtype.itemsize, halve, start)
    return lo


def topk_mask(x: jax.Array, k: jax.Array) -> jax.Array:
    """Boolean mask of the `k` entries of largest magnitude in `x` (any shape; `k` traced).

    Exactly `k` entries, as `torch.topk`; among equal magnitudes the first positions win.
    """
    bits = _magnitude_bits(x).reshape(-1)
    k = jnp.clip(k, 0, bits.size)
    kth = kth_largest_bits(bits, jnp.maximum(k, 1))
    above = bits > kth
    tied = bits == kth
    room = k - jnp.sum(above, dtype=k.dtype)
    keep = above | (tied & (jnp.cumsum(tied, dtype=k.dtype) <= room))
    return (keep & (k > 0)).reshape(x.shape)


def keep_at_least(x: jax.Array, count: jax.Array) -> jax.Array:
    """Entries `>=` the `(count + 1)`-th largest magnitude (KnOTS's `topk_values_mask` rule;
    ties at the threshold are all kept)."""
    bits = _magnitude_bits(x)
    return bits >= kth_largest_bits(bits, jnp.clip(count + 1, 1, bits.size))


def _two_sided_qr(left: jax.Array, right: jax.Array):
    """`(Q_l [d_out, m_l], R_l [m_l, n], Q_r [d_in, m_r], R_r [m_r, n])` with `left = Q_l R_l`
    and `right^T = Q_r R_r`, so `left @ right = Q_l (R_l R_r^T) Q_r^T`; the second QR waits
    for the first (`_lapack.after`)."""
    q_l, r_l = jnp.linalg.qr(left)
    q_r, r_r = jnp.linalg.qr(after(right.T, q_l, r_l))
    return q_l, r_l, q_r, r_r


def factored_svd(left: jax.Array, right: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Rank-`k` truncated SVD of `left @ right` without forming it.

    `left [d_out, n]`, `right [n, d_in]`; with `left = Q_l R_l`, `right^T = Q_r R_r` the
    product is `Q_l (R_l R_r^T) Q_r^T`, so an SVD of the small core suffices.

    **Returns:** `(b_hat [d_out, k], a_hat [k, d_in])` with `b_hat = U_k S_k`, `a_hat = V_k^T`
    (PEFT's `svd` split: singular values on B). Missing directions are zero-padded.
    """
    q_l, r_l, q_r, r_r = _two_sided_qr(left, right)
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
def _split_off(basis: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`x [T, d, r] = basis @ c + e` with `e` orthogonal to `basis [d, m]` (orthonormal
    columns); projected twice (CGS2) so `e` stays orthogonal when it is tiny."""
    c = jnp.einsum("dm,tdr->tmr", basis, x)
    e = x - jnp.einsum("dm,tmr->tdr", basis, c)
    c2 = jnp.einsum("dm,tdr->tmr", basis, e)
    return c + c2, e - jnp.einsum("dm,tmr->tdr", basis, c2)


def shared_basis_residuals(A, B, left, middle, right) -> jax.Array:
    """`||B_t A_t - left @ middle_t @ right||_F^2` per task, factored and cancellation-free.

    `left [d_out, m]` and `right [n, d_in]` are shared by all tasks, `middle [T, m, n]` is not
    (`None` for one merged adapter `left @ right`; the per-task cores of `pca` / `joint`). With
    `left = Q_l R_l`, `right^T = Q_r R_r` and `B_t = Q_l C_t + E_t`, `A_t^T = Q_r D_t + F_t`
    (`E_t`, `F_t` orthogonal to the bases) the residual splits into four orthogonal parts:
    `||C_t D_t^T - R_l middle_t R_r^T||^2 + ||C_t F_t^T||^2 + ||E_t D_t^T||^2 + ||E_t F_t^T||^2`,
    the first computed entry-wise (`m x n`), the others as traces of `r x r` Grams. Costs
    `O(T (m + n) r d)` against `O(T (r + m)^2 d)` for per-task QRs, which matters for `cat`.
    """
    q_l, r_l, q_r, r_r = _two_sided_qr(left, right)
    c, e = _split_off(q_l, B)  # [T, m, r], [T, d_out, r]
    d, f = _split_off(q_r, jnp.swapaxes(A, 1, 2))  # [T, n, r], [T, d_in, r]
    if middle is None:  # one adapter for all tasks: left @ right
        shared = (r_l @ r_r.T)[None]
    else:
        shared = jnp.einsum("mi,tij,nj->tmn", r_l, middle, r_r)
    core = jnp.einsum("tmr,tnr->tmn", c, d) - shared
    gram = functools.partial(jnp.einsum, "tdr,tds->trs")
    gc, gd, ge, gf = gram(c, c), gram(d, d), gram(e, e), gram(f, f)
    cross = jnp.einsum("trs,trs->t", gc, gf) + jnp.einsum("trs,trs->t", ge, gd)
    return jnp.sum(core * core, axis=(1, 2)) + cross + jnp.einsum("trs,trs->t", ge, gf)


def report(A, B, left, middle, right):
    """`(loss, relative_error, task_sq_norms, weights, result)` of
    `dW_hat_t = left @ middle_t @ right`.

    `loss` uses the relative weights `1/||dW_t||^2`, so it equals `sum_t relative_error_t^2`
    and is comparable with `merge`'s default loss.
    """
    weights = task_weights(A, B, "relative")
    residual = shared_basis_residuals(A, B, left, middle, right)
    loss = jnp.sum(weights * residual)
    norms_sq = task_norms_sq(A, B)
    rel = relative_errors(residual, norms_sq)
    finite = jnp.isfinite(loss)
    for x in (left, right) if middle is None else (left, middle, right):
        finite = finite & all_finite(x)
    result = jnp.where(finite, RESULTS.successful, RESULTS.nonfinite).astype(jnp.int32)
    return loss, rel, norms_sq, weights, result


# Two jitted stages, the method and its report: the report is the same for every method, so
# it compiles once per shape signature instead of once per method (compiling it dominated).
@functools.partial(jax.jit, static_argnames=("impl", "statics"))
def run_impl(A, B, arrays, *, impl: Callable, statics: tuple):
    return impl(A, B, *arrays, **dict(statics))


report_jit = jax.jit(report)


def shared_solution(
    A: jax.Array,
    B: jax.Array,
    shared_a: jax.Array,
    shared_b: jax.Array,
    cores: jax.Array | None = None,
    *,
    core: str | None = None,
    steps=0,
    converged=True,
    task_ranks=None,
    task_ids=None,
) -> Solution:
    """A `Solution` on `SharingPlan.full_merge(T, rank=k)` from one shared `shared_b
    [d_out, k]` and `shared_a [k, d_in]`, with per-task `cores [T, k, k]` when given (of
    kind `core`: `"full"` or `"diagonal"`), and its per-task errors."""
    loss, rel, norms_sq, weights, result = report_jit(A, B, shared_b, cores, shared_a)
    result = jnp.where((result == 0) & ~jnp.asarray(converged), 1, result).astype(jnp.int32)
    num_tasks, r = A.shape[0], A.shape[1]
    return Solution(
        shared_a=shared_a[None],
        shared_b=shared_b[None],
        cores=cores,
        loss=loss,
        relative_error=rel,
        task_sq_norms=norms_sq,
        weights=weights,
        steps=jnp.asarray(steps, jnp.int32),
        result=result,
        plan=SharingPlan.full_merge(num_tasks, rank=int(shared_a.shape[0])),
        task_ranks=resolve_task_ranks(task_ranks, num_tasks, r),
        task_ids=resolve_task_ids(task_ids, num_tasks),
        core=core,
    )


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
    jitted, and wrap it as a `full_merge` `Solution` with its per-task errors."""
    shared_a, shared_b = run_impl(
        A, B, tuple(arrays), impl=impl, statics=tuple(sorted(statics.items()))
    )
    return shared_solution(A, B, shared_a, shared_b, task_ranks=task_ranks, task_ids=task_ids)
