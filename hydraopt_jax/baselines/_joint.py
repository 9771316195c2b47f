"""Shared bases with per-task cores: Compress-then-Serve joint factorisation and per-factor PCA.

Both work in the coordinates of the stacked factors. With `[B_1 ... B_T] = Q_b R_b` and
`[A_1; ...; A_T]^T = Q_a R_a` (thin QR), every update is `dW_t = Q_b M_t Q_a^T` with the small
`M_t = R_b,t R_a,t^T` (`R_b,t`, `R_a,t`: task `t`'s `r` columns). The optimal bases lie in
`span(Q_b)` and `span(Q_a)`, so `U = Q_b u`, `V^T = Q_a v`, and every iteration costs
`O(T (T r) r k)`, independent of `d_in`, `d_out`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._lapack import after
from .._loss import task_weights
from .._solution import Solution
from ._common import check_inputs, resolve_rank, run_impl, shared_solution

__all__ = ["joint", "pca"]

DEFAULT_MAX_STEPS = 100
DEFAULT_TOL = 1e-7


def _pad_columns(x: jax.Array, k: int) -> jax.Array:
    missing = k - x.shape[-1]
    if missing <= 0:
        return x
    return jnp.concatenate([x, jnp.zeros(x.shape[:-1] + (missing,), x.dtype)], axis=-1)


def _top_eigvecs(gram: jax.Array, k: int) -> jax.Array:
    """Top-`k` eigenvectors `[n, k]` of a symmetric `gram [n, n]` (descending)."""
    _, vecs = jnp.linalg.eigh(0.5 * (gram + gram.T))
    return vecs[:, ::-1][:, :k]


def _polar(x: jax.Array) -> jax.Array:
    """The orthonormal polar factor of `x [n, k]`, `n >= k` (orthogonal Procrustes)."""
    left, _, right_t = jnp.linalg.svd(x, full_matrices=False)
    return left @ right_t


def stacked_coordinates(A, B):
    """`(Q_b [d_out, n_b], Q_a [d_in, n_a], rb [T, n_b, r], ra [T, n_a, r])` with
    `dW_t = Q_b rb_t ra_t^T Q_a^T`."""
    num_tasks, r, d_in = A.shape
    d_out = B.shape[1]
    q_b, r_b = jnp.linalg.qr(jnp.moveaxis(B, 0, 1).reshape(d_out, num_tasks * r))
    q_a, r_a = jnp.linalg.qr(after(A.reshape(num_tasks * r, d_in).T, q_b, r_b))
    rb = jnp.moveaxis(r_b.reshape(r_b.shape[0], num_tasks, r), 1, 0)
    ra = jnp.moveaxis(r_a.reshape(r_a.shape[0], num_tasks, r), 1, 0)
    return q_b, q_a, rb, ra


# ---------------------------------------------------------------------------- joint (CtS)
def _cores(u, v, rb, ra):
    """`u^T M_t v = (u^T rb_t)(ra_t^T v)`, `[T, k, k]`."""
    return jnp.einsum(
        "tkr,tlr->tkl", jnp.einsum("nk,tnr->tkr", u, rb), jnp.einsum("nl,tnr->tlr", v, ra)
    )


def _joint_impl(A, B, weights, tol, max_steps, *, rank: int, diagonal: bool):
    q_b, q_a, rb, ra = stacked_coordinates(A, B)
    k = min(rank, rb.shape[1], ra.shape[1])
    gram_b = jnp.einsum("tnr,tns->trs", rb, rb)
    gram_a = jnp.einsum("tnr,tns->trs", ra, ra)
    norms = jnp.einsum("trs,trs->t", gram_b, gram_a)  # ||dW_t||^2
    w = weights

    def u_full(v):  # top-k of sum_t w_t M_t v v^T M_t^T
        c = jnp.einsum("tnr,nk->trk", ra, v)
        g = jnp.einsum("t,tnr,trk,tsk,tms->nm", w, rb, c, c, rb)
        return _top_eigvecs(g, k)

    def v_full(u):
        c = jnp.einsum("tnr,nk->trk", rb, u)
        g = jnp.einsum("t,tnr,trk,tsk,tms->nm", w, ra, c, c, ra)
        return _top_eigvecs(g, k)

    def sigma(u, v):
        return jnp.diagonal(_cores(u, v, rb, ra), axis1=1, axis2=2)  # [T, k]

    def u_diag(v, s):  # Procrustes: max tr(u^T sum_t w_t M_t v diag(s_t))
        c = jnp.einsum("tnr,nk->trk", ra, v)
        return _polar(jnp.einsum("t,tnr,trk,tk->nk", w, rb, c, s))

    def v_diag(u, s):
        c = jnp.einsum("tnr,nk->trk", rb, u)
        return _polar(jnp.einsum("t,tnr,trk,tk->nk", w, ra, c, s))

    def loss_of(u, v):
        if diagonal:
            captured = jnp.sum(sigma(u, v) ** 2, axis=1)
        else:
            captured = jnp.sum(_cores(u, v, rb, ra) ** 2, axis=(1, 2))
        return jnp.sum(w * (norms - captured))

    def step(u, v):
        if diagonal:
            u = u_diag(v, sigma(u, v))
            v = v_diag(u, sigma(u, v))
        else:
            u = u_full(v)
            v = v_full(u)
        return u, v

    # start: the top-k left / right singular subspaces of the concatenated weighted updates
    u0 = _top_eigvecs(jnp.einsum("t,tnr,trs,tms->nm", w, rb, gram_a, rb), k)
    v0 = _top_eigvecs(after(jnp.einsum("t,tnr,trs,tms->nm", w, ra, gram_b, ra), u0), k)
    scale = jnp.maximum(jnp.sum(w * norms), jnp.finfo(A.dtype).tiny)

    def cond(state):
        i, _, _, prev, cur = state
        decrease = (prev - cur) / scale
        return (i < max_steps) & ((i == 0) | (decrease > tol))

    def body(state):
        i, u, v, _, cur = state
        u, v = step(u, v)
        return i + 1, u, v, cur, loss_of(u, v)

    init = (jnp.asarray(0, jnp.int32), u0, v0, jnp.asarray(jnp.inf, A.dtype), loss_of(u0, v0))
    steps, u, v, prev, cur = jax.lax.while_loop(cond, body, init)
    cores = _cores(u, v, rb, ra)
    if diagonal:
        cores = cores * jnp.eye(k, dtype=cores.dtype)[None]
    converged = (steps < max_steps) | ((prev - cur) / scale <= tol)
    pad = rank - k
    shared_u = _pad_columns(q_b @ u, rank)
    shared_v = _pad_columns(q_a @ v, rank).T
    cores = jnp.pad(cores, ((0, 0), (0, pad), (0, pad)))
    return shared_u, shared_v, cores, steps, converged


def _pca_impl(A, B, *, rank: int):
    q_b, q_a, rb, ra = stacked_coordinates(A, B)
    k = min(rank, rb.shape[1], ra.shape[1])
    # top-k left singular vectors of [B_1 ... B_T] = Q_b R_b: those of R_b, from its Gram
    u = _top_eigvecs(jnp.einsum("tnr,tmr->nm", rb, rb), k)
    v = _top_eigvecs(after(jnp.einsum("tnr,tmr->nm", ra, ra), u), k)
    cores = _cores(u, v, rb, ra)  # (P_B^T B_t)(A_t P_A^T)
    shared_u = _pad_columns(q_b @ u, rank)
    shared_v = _pad_columns(q_a @ v, rank).T
    pad = rank - k
    cores = jnp.pad(cores, ((0, 0), (0, pad), (0, pad)))
    return shared_u, shared_v, cores, jnp.asarray(0, jnp.int32), jnp.asarray(True)


def _core_solution(impl, A, B, arrays, statics, *, diagonal, task_ranks, task_ids) -> Solution:
    out = run_impl(A, B, tuple(arrays), impl=impl, statics=tuple(sorted(statics.items())))
    shared_u, shared_v, cores, steps, converged = out
    return shared_solution(
        A, B, shared_v, shared_u, cores, core="diagonal" if diagonal else "full",
        steps=steps, converged=converged, task_ranks=task_ranks, task_ids=task_ids,
    )  # fmt: skip


def joint(
    A, B, *, rank=None, weights=None, diagonal=False, max_steps=DEFAULT_MAX_STEPS, tol=DEFAULT_TOL,
    task_ranks=None, task_ids=None,
) -> Solution:  # fmt: skip
    """Compress-then-Serve joint factorisation (Gabrielsson et al. 2024), factored.

    `min sum_t w_t ||dW_t - U Sigma_t V||_F^2` over orthonormal `U [d_out, k]`, `V [k, d_in]`
    and per-task cores `Sigma_t [k, k]` (full) or diagonal. Full: `Sigma_t = U^T dW_t V^T`,
    and `U`, `V` alternate as the top-`k` eigenvectors of `sum_t w_t dW_t V^T V dW_t^T` and
    its transpose. Diagonal: `sigma_t = diag(U^T dW_t V^T)`, and `U`, `V` alternate as the
    orthogonal Procrustes solutions. Each half-step is exact, so the loss never increases.
    Starts from the top-`k` singular subspaces of `[dW_1 ... dW_T]` and `[dW_1; ...; dW_T]`;
    stops when the decrease relative to `sum_t w_t ||dW_t||^2` falls below `tol`.

    **Arguments:**

    - `A`: `[T, r, d_in]`; `B`: `[T, d_out, r]`, LoRA scale folded in.
    - `rank`: `k`, default `r`. `k > T r` is zero-padded (no gain past `T r`).
    - `weights`: `"uniform"` (default, as published), `"relative"` or an array `[T]`.
    - `diagonal`: diagonal cores (`k` numbers per task) instead of full `k x k` ones.
    - `max_steps`, `tol`: the alternation's bounds.

    **Returns:** a `Solution` with one shared `U` (`shared_b`), `V` (`shared_a`) and per-task
    `cores` (`core="full"` or `"diagonal"`); `result` is 1 when `max_steps` stopped it.
    """
    A, B = check_inputs("joint", A, B)
    k = resolve_rank("joint", rank, A.shape[1])
    if int(max_steps) < 0:
        raise ValueError(f"joint: max_steps must be >= 0; got {max_steps}")
    w = task_weights(A, B, "uniform" if weights is None else weights)
    statics = dict(rank=k, diagonal=bool(diagonal))
    arrays = (w, jnp.asarray(tol, A.dtype), jnp.asarray(int(max_steps), jnp.int32))
    return _core_solution(
        _joint_impl, A, B, arrays, statics,
        diagonal=bool(diagonal), task_ranks=task_ranks, task_ids=task_ids,
    )  # fmt: skip


def pca(A, B, *, rank=None, weights=None, task_ranks=None, task_ids=None) -> Solution:
    """Per-factor PCA (lorashare-style): one basis for all A's, one for all B's.

    `P_A [k, d_in]`: top-`k` right singular vectors of the stacked `[A_1; ...; A_T]`;
    `P_B [d_out, k]`: top-`k` left singular vectors of `[B_1 ... B_T]` (uncentred, as a
    projection basis must be). Each task keeps its coefficients:
    `dW_t ~ P_B (P_B^T B_t)(A_t P_A^T) P_A`, stored as the core `(P_B^T B_t)(A_t P_A^T)`.

    **Arguments:**

    - `A`: `[T, r, d_in]`; `B`: `[T, d_out, r]`, LoRA scale folded in.
    - `rank`: `k`, default `r`.
    - `weights`: not used by the method; must be `None`.

    **Returns:** a `Solution` with full `k x k` `cores` (`core="full"`).
    """
    if weights is not None:
        raise ValueError("pca: the per-factor PCA takes no task weights; got weights=")
    A, B = check_inputs("pca", A, B)
    k = resolve_rank("pca", rank, A.shape[1])
    return _core_solution(
        _pca_impl, A, B, (), dict(rank=k), diagonal=False,
        task_ranks=task_ranks, task_ids=task_ids,
    )  # fmt: skip
