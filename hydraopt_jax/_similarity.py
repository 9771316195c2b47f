"""How similar the tasks' factors are: the subspace overlap `hydraopt inspect` reports."""

from __future__ import annotations

import numpy as np

__all__ = ["basis_overlap", "orthonormal_basis", "subspace_overlap"]


def orthonormal_basis(m) -> np.ndarray | None:
    """Orthonormal basis (float64 `[d, rank]`) of `m`'s column space, dropping directions
    below float32 round-off of the largest singular value; None if `m` is zero."""
    m = np.asarray(m, np.float64)
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    if not s.size or s[0] <= 0:
        return None
    return u[:, s > s[0] * max(m.shape) * np.finfo(np.float32).eps]


def basis_overlap(qx: np.ndarray | None, qy: np.ndarray | None) -> float:
    """`||Q_x^T Q_y||_F^2 / min(r_x, r_y)` of two `orthonormal_basis` results (NaN for None)."""
    if qx is None or qy is None:
        return float("nan")
    return float(np.sum((qx.T @ qy) ** 2) / min(qx.shape[1], qy.shape[1]))


def subspace_overlap(x, y) -> float:
    """`||Q_x^T Q_y||_F^2 / min(r_x, r_y)` for orthonormal bases of two factors' column spaces.

    `x`: `[d, r_x]`, `y`: `[d, r_y]` (compare A factors as `A^T`). 1 means one subspace
    contains the other, 0 means orthogonal; random subspaces of a large `d` give about
    `max(r_x, r_y) / d`. Directions below float32 round-off of the largest singular value
    do not count. NaN if a factor is zero.
    """
    return basis_overlap(orthonormal_basis(x), orthonormal_basis(y))
