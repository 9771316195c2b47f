"""SVD merge (PEFT's `svd`) and KnOTS (Stoica et al. 2024), both in factored form."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._solution import Solution
from ._common import (
    check_density,
    check_inputs,
    factored_svd,
    keep_at_least,
    merge_coefficients,
    one_adapter_solution,
    resolve_rank,
)

__all__ = ["knots", "svd"]

KNOTS_MERGES = ("ties", "linear")
KNOTS_DEFAULT_DENSITY = 0.2


# ---------------------------------------------------------------------------- svd
def _svd_impl(A, B, coef, *, rank: int):
    num_tasks, r, d_in = A.shape
    left = jnp.moveaxis(B * coef[:, None, None], 0, 1).reshape(B.shape[1], num_tasks * r)
    b, a = factored_svd(left, A.reshape(num_tasks * r, d_in), rank)
    return a, b


def svd(A, B, *, rank=None, weights=None, task_ranks=None, task_ids=None) -> Solution:
    """SVD merge, as PEFT's `svd`: the rank-`k` truncated SVD of `sum_t w_t dW_t`.

    Computed from the QR factors of `[w_1 B_1 ... w_T B_T]` and `[A_1; ...; A_T]` and an SVD of
    their `T r x T r` core; PEFT's split: `Bh = U_k S_k`, `Ah = V_k^T`. Optimal for the mean
    update (Eckart-Young), not for the tasks themselves.

    **Arguments:**

    - `A`: `[T, r, d_in]`; `B`: `[T, d_out, r]`, LoRA scale folded in.
    - `rank`: `k`, default `r` (PEFT's `max(adapter ranks)`).
    - `weights`: merge coefficients `[T]`, default `1/T` (the mean update).

    **Returns:** a `Solution` on `SharingPlan.full_merge(T, rank=k)`.
    """
    A, B = check_inputs("svd", A, B)
    k = resolve_rank("svd", rank, A.shape[1])
    coef = merge_coefficients("svd", weights, A.shape[0], "mean", A.dtype)
    return one_adapter_solution(
        _svd_impl, A, B, (coef,), dict(rank=k), task_ranks=task_ranks, task_ids=task_ids
    )


# ---------------------------------------------------------------------------- knots
def knots_aligned(A, B):
    """KnOTS's alignment in factored form: `[dW_1 ... dW_T] = U S [V_1^T ... V_T^T]`.

    With `[B_1 ... B_T] = Q_b R_b` and `A_t^T = Q_t R_t` the concatenation is
    `Q_b [R_b,t R_t^T]_t blockdiag(Q_t^T)`: an SVD of the small core gives the shared basis
    `U = Q_b u` and the per-task blocks `S V_t^T = S vt_t Q_t^T`.

    **Returns:** `(U [d_out, K], sv [T, K, d_in], s [K])` with `K = min(d_out, T r)` and
    `dW_t = U @ sv[t]`.
    """
    num_tasks, r, d_in = A.shape
    d_out = B.shape[1]
    q_b, r_b = jnp.linalg.qr(jnp.moveaxis(B, 0, 1).reshape(d_out, num_tasks * r))
    q_t, r_t = jnp.linalg.qr(jnp.swapaxes(A, 1, 2))  # [T, d_in, m], [T, m, r]
    n_b, m = r_b.shape[0], r_t.shape[1]
    r_b_t = jnp.moveaxis(r_b.reshape(n_b, num_tasks, r), 1, 0)  # [T, n_b, r]
    blocks = jnp.einsum("tnr,tmr->tnm", r_b_t, r_t)  # [T, n_b, m]
    core = jnp.moveaxis(blocks, 0, 1).reshape(n_b, num_tasks * m)
    u, s, vt = jnp.linalg.svd(core, full_matrices=False)  # vt [K, T m]
    size = s.shape[0]
    vt_t = jnp.moveaxis(vt.reshape(size, num_tasks, m), 1, 0)  # [T, K, m]
    sv = s[None, :, None] * jnp.einsum("tkm,tdm->tkd", vt_t, q_t)
    return q_b @ u, sv, s


def _knots_ties(sv, coef, count, keep_all):
    """KnOTS's TIES on the aligned blocks (its `ties_masking` + disjoint `mean` merge).

    Each task keeps its entries `>=` the `(count + 1)`-th largest magnitude (the reference
    code's `kthvalue(n - int(n K))` threshold keeps `int(n K) + 1`); the elected sign is that of
    the sum (a zero sum takes the overall majority sign); the agreeing weighted entries are
    averaged over the tasks that keep a non-zero there.
    """
    keep = jax.vmap(keep_at_least, in_axes=(0, None))(sv, count) | keep_all
    pruned = jnp.where(keep, sv, 0.0)
    elected = jnp.sign(jnp.sum(pruned, axis=0))
    elected = jnp.where(elected == 0, jnp.sign(jnp.sum(elected)), elected)
    agree = jnp.where(elected[None] > 0, pruned > 0, pruned < 0)
    vectors = jnp.where(agree, pruned, 0.0) * coef[:, None, None]
    count = jnp.sum(vectors != 0, axis=0).astype(sv.dtype)
    return jnp.sum(vectors, axis=0) / jnp.maximum(count, 1.0)


def _knots_impl(A, B, coef, density, *, rank: int, merge: str):
    basis, sv, s = knots_aligned(A, B)
    # KnOTS keeps only supported directions (s > 1e-5 in float64); relative here
    rcond = 10.0 * max(sv.shape[1], sv.shape[2]) * jnp.finfo(sv.dtype).eps
    support = s > rcond * s[0]
    sv = jnp.where(support[None, :, None], sv, 0.0)
    if merge == "linear":
        merged = jnp.einsum("t,tkd->kd", coef, sv)
    else:
        # int(density * n) over the supported entries, n = K_eff d_in
        size = jnp.sum(support) * sv.shape[2]
        count = jnp.floor(density * size.astype(sv.dtype)).astype(jnp.int32)
        merged = _knots_ties(sv, coef, count, density >= 1)
    b, a = factored_svd(basis, merged, rank)
    return a, b


def knots(
    A, B, *, rank=None, weights=None, merge="ties", density=KNOTS_DEFAULT_DENSITY,
    task_ranks=None, task_ids=None,
) -> Solution:  # fmt: skip
    """KnOTS (Stoica et al. 2024, "Model merging with SVD to tie the KnOTS"), factored.

    SVD of the concatenated updates `[dW_1 ... dW_T] = U S [V_1^T ... V_T^T]` (shared basis
    `U`, per-task aligned blocks `S V_t^T`, as the reference code's `s_on_V=True`), merge the
    aligned blocks with TIES (default) or linearly, and map back: `dW = U merged`. The merged
    update has rank up to `T r`; it is truncated to `rank` by an exact factored SVD.

    **Arguments:**

    - `A`: `[T, r, d_in]`; `B`: `[T, d_out, r]`, LoRA scale folded in.
    - `rank`: rank `k` of the merged adapter, default `r`; `T r` keeps the KnOTS merge exactly.
    - `merge`: `"ties"` or `"linear"` (`"linear"` equals the SVD merge: `U` is orthonormal).
    - `density`: fraction of each task's aligned entries TIES keeps (default 0.2), counted
      as the reference code does: entries `>=` the `(int(density n) + 1)`-th largest
      magnitude, `n` = supported directions x `d_in`; `1` keeps everything.
    - `weights`: per-task coefficients, default 1 for `"ties"` (disjoint mean), `1/T` for
      `"linear"`.

    **Returns:** a `Solution` on `SharingPlan.full_merge(T, rank=k)`.
    """
    A, B = check_inputs("knots", A, B)
    if merge not in KNOTS_MERGES:
        raise ValueError(f"knots: merge must be one of {KNOTS_MERGES}; got {merge!r}")
    k = resolve_rank("knots", rank, A.shape[1])
    default = "one" if merge == "ties" else "mean"
    coef = merge_coefficients("knots", weights, A.shape[0], default, A.dtype)
    density = 1.0 if merge == "linear" else check_density("knots", density, allow_zero=True)
    return one_adapter_solution(
        _knots_impl, A, B, (coef, jnp.asarray(density, A.dtype)), dict(rank=k, merge=merge),
        task_ranks=task_ranks, task_ids=task_ids,
    )  # fmt: skip
