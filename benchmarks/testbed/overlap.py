"""Subspace overlap of LoRA factors across tasks.

For two tasks' factors on one module, the overlap of the row spaces of `A_i`, `A_j`
(`[r, d_in]`) is `||Q_i^T Q_j||_F^2 / r` with `Q` orthonormal bases (`d_in x r`): 1 when the
spaces coincide, 0 when orthogonal, about `r / d_in` for random subspaces. The B overlap uses
the column spaces of `B` (`[d_out, r]`).

    python -m benchmarks.testbed.overlap benchmarks/testbed/adapters/small_lr_same_seed
"""

from __future__ import annotations

import argparse
import itertools
import pathlib

import numpy as np


def orthonormal_basis(x: np.ndarray, rtol: float = 1e-6) -> np.ndarray:
    """Orthonormal basis `[n, rank]` of the column space of `x [n, m]` (SVD, rank-revealing)."""
    u, s, _ = np.linalg.svd(np.asarray(x, dtype=np.float64), full_matrices=False)
    if s.size == 0 or s[0] == 0:
        return u[:, :0]
    return u[:, s > rtol * s[0]]


def subspace_overlap(x: np.ndarray, y: np.ndarray, rank: int | None = None) -> float:
    """`||Q_x^T Q_y||_F^2 / rank` for the column spaces of `x` and `y` (default rank: x's cols)."""
    qx, qy = orthonormal_basis(x), orthonormal_basis(y)
    rank = rank or x.shape[1]
    return float(np.sum((qx.T @ qy) ** 2) / rank)


def mean_pairwise_overlap(factors: list[dict[str, tuple[np.ndarray, np.ndarray]]]) -> dict:
    """Mean over task pairs and modules of the A (row-space) and B (column-space) overlaps.

    **Arguments**: one `{module: (A [r, d_in], B [d_out, r])}` per task.
    **Returns**: `{"a": float, "b": float, "a_random": float, "b_random": float,
    "per_module": {module: (a, b)}}`, where `*_random` is the expectation `r / d` for random
    subspaces of the same sizes, averaged over modules.
    """
    modules = sorted(set.intersection(*(set(f) for f in factors)))
    per_module = {}
    a_rand, b_rand = [], []
    for m in modules:
        a_vals, b_vals = [], []
        for fi, fj in itertools.combinations(factors, 2):
            (ai, bi), (aj, bj) = fi[m], fj[m]
            r = ai.shape[0]
            a_vals.append(subspace_overlap(ai.T, aj.T, r))
            b_vals.append(subspace_overlap(bi, bj, r))
        per_module[m] = (float(np.mean(a_vals)), float(np.mean(b_vals)))
        a0, b0 = factors[0][m]
        a_rand.append(min(1.0, a0.shape[0] / a0.shape[1]))
        b_rand.append(min(1.0, b0.shape[1] / b0.shape[0]))
    return dict(
        a=float(np.mean([v[0] for v in per_module.values()])),
        b=float(np.mean([v[1] for v in per_module.values()])),
        a_random=float(np.mean(a_rand)),
        b_random=float(np.mean(b_rand)),
        per_module=per_module,
    )


def collection_overlap(collection: str | pathlib.Path) -> dict:
    """`mean_pairwise_overlap` of every adapter directory in a collection folder."""
    from .evaluate import load_adapter_factors

    dirs = sorted(
        p for p in pathlib.Path(collection).iterdir() if (p / "adapter_config.json").exists()
    )
    return mean_pairwise_overlap([load_adapter_factors(d) for d in dirs])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Mean pairwise A/B subspace overlap.")
    parser.add_argument("collections", nargs="+", type=pathlib.Path)
    args = parser.parse_args(argv)
    for c in args.collections:
        o = collection_overlap(c)
        print(
            f"{c.name}: A overlap {o['a']:.3f} (random {o['a_random']:.3f}), "
            f"B overlap {o['b']:.3f} (random {o['b_random']:.3f})"
        )


if __name__ == "__main__":
    main()
