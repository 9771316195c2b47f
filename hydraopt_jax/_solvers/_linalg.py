"""Small linear-algebra kernels shared by the solvers (all batched by `vmap` at call sites)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .._lapack import after
from .._loss import all_finite, cond_across

# Randomized subspace iteration: extra columns beyond k, and power steps. With these the
# captured energy matches a full SVD to ~1e-7 relative on the collections we test.
OVERSAMPLE = 16
POWER_STEPS = 6
# Use randomized subspace iteration once the stacked matrix has at least this many rows
# (and at least 4x the sketch width); below it the direct small-Gram solve is cheaper and exact.
RANDOMIZED_MIN_ROWS = 512

_SKETCH_SEED = 0  # fixed: results are deterministic run to run


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    """Zero rows appended up to `rows` (a zero row of `Ah` contributes nothing)."""
    missing = rows - x.shape[0]
    if missing <= 0:
        return x[:rows]
    return jnp.concatenate([x, jnp.zeros((missing,) + x.shape[1:], x.dtype)], axis=0)


def top_right_singular_vectors(stacked: jax.Array, k: int) -> jax.Array:
    """Top-`k` right singular vectors of `stacked [n, d]` as orthonormal rows `[k, d]`.

    For `n <= d`: the eigenvectors `U` of the small Gram `stacked stacked^T [n, n]` give the
    rows `U^T stacked` (`S V^T`), orthonormalised by a thin QR of `[d, k]`. Only the top-`k`
    subspace is needed and the loss is stationary in it, so the Gram's squared conditioning
    costs no measurable optimality (tests: within 1.0001 of the dense float64 optimum); this
    avoids forming the `[d, n]` Q of a QR of `stacked^T` (half the solve time at n = 256,
    d = 2048). Directions with a zero singular value come out as arbitrary orthonormal rows
    (they cannot change the loss). Rows beyond `min(n, d)` are zero-padded.
    """
    n, d = stacked.shape
    if n <= d:
        kk = min(k, n)
        gram = stacked @ stacked.T
        evals, evecs = jnp.linalg.eigh(0.5 * (gram + gram.T))  # ascending
        top = evecs[:, ::-1][:, :kk]
        # Rows `u_i^T stacked = s_i v_i^T` in descending order; Householder QR is columnwise
        # backward stable, so each column keeps its direction whatever its norm, and the
        # span of the first j columns is the top-j subspace. No direction is dropped: one
        # at 1e-3 of the largest singular value is still signal (zeroing it cost a lossless
        # plan a relative error of 1e-3).
        basis, _ = jnp.linalg.qr((top.T @ stacked).T)  # [d, kk], orthonormal columns
        basis = basis.T
    else:
        _, _, basis = jnp.linalg.svd(stacked, full_matrices=False)  # [d, d]
    return _pad_rows(basis, k)


def gram_factor(x: jax.Array, deps=(), axis_name: str | None = None) -> jax.Array:
    """Upper-triangular `F [..., n, n]` with `F^T F = x^T x` for `x [..., m, n]`: the `R` of a
    thin QR of `x` up to row signs (zero rows below `min(m, n)`), from the Cholesky factor of
    the small Gram (a GEMM and an `n x n` factorisation: ~4x faster than LAPACK's Householder
    QR at m = 2048, n = 256).

    Each diagonal entry of the Gram is raised by `n eps` of itself (a relative perturbation of
    every column's norm of `n eps / 2`), so that columns of any scale keep their relative
    accuracy and zero or repeated columns factor. Dependent columns can still leave a pivot
    below the Gram's own rounding (float32, small `n`, large `m`): the Cholesky then fails
    and the QR runs instead, chosen by one `lax.cond` for the whole batch (`axis_name`: a
    `vmap` axis to decide across, so that the QR only runs when needed). Use it where only
    `F^T F` matters (right singular vectors of `F y`), not for residuals that must resolve
    cancellation. `deps`: arrays whose LAPACK calls must finish first (`_lapack.after`).
    """
    m, n = x.shape[-2:]
    gram = jnp.einsum("...mi,...mj->...ij", x, x)
    diag = jnp.diagonal(gram, axis1=-2, axis2=-1)
    ridge = n * jnp.finfo(x.dtype).eps * diag + jnp.finfo(x.dtype).tiny
    gram = gram + ridge[..., None] * jnp.eye(n, dtype=x.dtype)[(None,) * (x.ndim - 2)]
    factor = jnp.swapaxes(jnp.linalg.cholesky(after(gram, *deps)), -1, -2)

    def by_qr():  # after the Cholesky: the branch waits for its result
        r = jnp.linalg.qr(x, mode="r")  # [..., min(m, n), n]
        pad = [(0, 0)] * (x.ndim - 2) + [(0, n - r.shape[-2]), (0, 0)]
        return jnp.pad(r, pad)

    return cond_across(~all_finite(factor), axis_name, by_qr, lambda: factor)


def top_eigvecs_randomized(
    gram_apply: Callable[[jax.Array], jax.Array], d: int, k: int, dtype, deps=()
) -> jax.Array:
    """Top-`k` eigenvectors `[k, d]` of a PSD operator `x [d, p] -> G x` by subspace iteration.

    Halko, Martinsson & Tropp (2011), Alg. 4.3 with a Rayleigh-Ritz step; `G` is never formed.
    `deps`: arrays whose computation (LAPACK calls) must finish first (`_lapack.after`).
    """
    width = min(k + OVERSAMPLE, d)
    sketch = jax.random.normal(jax.random.PRNGKey(_SKETCH_SEED), (d, width), dtype)
    sketch = after(sketch, *deps)
    q, _ = jnp.linalg.qr(gram_apply(sketch))
    q = jax.lax.fori_loop(0, POWER_STEPS, lambda _, q: jnp.linalg.qr(gram_apply(q))[0], q)
    small = q.T @ gram_apply(q)
    _, vecs = jnp.linalg.eigh(0.5 * (small + small.T))
    top = vecs[:, ::-1][:, : min(k, width)]
    return _pad_rows((q @ top).T, k)


def use_randomized(rows: int, k: int, method: str) -> bool:
    """Static choice of the subspace method for a stacked matrix with `rows` rows."""
    if method not in ("auto", "direct", "randomized"):
        raise ValueError(f"svd_method must be 'auto', 'direct' or 'randomized'; got {method!r}")
    if method == "auto":
        return rows >= RANDOMIZED_MIN_ROWS and rows >= 4 * (k + OVERSAMPLE)
    return method == "randomized"


def padded_members(groups: Sequence[Sequence[int]], dummy: int) -> np.ndarray:
    """Group membership as a rectangular index array `[K, m]`, padded with `dummy`."""
    width = max(len(m) for m in groups)
    return np.array([list(m) + [dummy] * (width - len(m)) for m in groups], dtype=np.int32)


def gather_padded(x: jax.Array, idx: np.ndarray) -> jax.Array:
    """`x` with a zero entry appended, indexed by the static `idx [K, m]` (padding points at
    the zero). When `idx` is just `arange(len(x))` reshaped, this is a reshape, not a copy:
    the common shared-A / shared-B / separate cases then hold each factor once in memory."""
    if idx.size == x.shape[0] and np.array_equal(idx.ravel(), np.arange(x.shape[0])):
        return x.reshape(idx.shape + x.shape[1:])
    return append_zero(x)[idx]


def append_zero(x: jax.Array) -> jax.Array:
    """`x` with one zero entry appended on axis 0: the target of padded indices."""
    return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)], axis=0)


def psd_solve_right(rhs: jax.Array, gram: jax.Array) -> jax.Array:
    """Minimum-norm `X` with `X gram = rhs` for a PSD `gram [k, k]` (pseudo-inverse).

    Eigen-directions below `rcond * max_eig` are dropped, so rank-deficient Grams (a group
    whose factors do not span `k` directions) give finite, optimal steps.
    """
    evals, evecs = jnp.linalg.eigh(0.5 * (gram + gram.T))
    rcond = 10.0 * gram.shape[-1] * jnp.finfo(gram.dtype).eps
    keep = evals > rcond * jnp.max(evals)
    inv = jnp.where(keep, 1.0 / jnp.where(keep, evals, 1.0), 0.0)
    return ((rhs @ evecs) * inv[None, :]) @ evecs.T
