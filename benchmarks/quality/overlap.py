"""How alike the tasks' factors are: mean pairwise subspace overlap, and drift from init.

For two tasks' factors on one module, the overlap of the row spaces of `A_i`, `A_j`
(`[r, d_in]`) is `hydraopt_jax.subspace_overlap` (`||Q_i^T Q_j||_F^2 / r`): 1 when the spaces
coincide, 0 when orthogonal, about `r / d_in` for random subspaces. The B overlap uses the
column spaces of `B` (`[d_out, r]`).

    python -m benchmarks.quality.overlap benchmarks/testbed/adapters/small_lr_same_seed
"""

from __future__ import annotations

import argparse
import itertools
import pathlib

import numpy as np

from .torch_lora import load_adapter

__all__ = ["collection_overlap", "drift_from_init", "load_adapters", "mean_pairwise_overlap"]


def load_adapters(collection: str | pathlib.Path, tasks=None) -> dict[str, dict]:
    """`{task: {module: (A, s B)}}` of every adapter directory in a collection folder (of
    those named in `tasks`, when given: e.g. the finished rows of a training manifest)."""
    return {
        path.name: load_adapter(path)
        for path in sorted(pathlib.Path(collection).iterdir())
        if (path / "adapter_config.json").exists() and (tasks is None or path.name in tasks)
    }


def mean_pairwise_overlap(factors: list[dict[str, tuple[np.ndarray, np.ndarray]]]) -> dict:
    """Mean over task pairs and modules of the A (row-space) and B (column-space) overlaps.

    **Arguments**: one `{module: (A [r, d_in], B [d_out, r])}` per task.
    **Returns**: `{"a": float, "b": float, "a_random": float, "b_random": float,
    "per_module": {module: (a, b)}}`, where `*_random` is the expectation `r / d` for random
    subspaces of the same sizes, averaged over modules.
    """
    from hydraopt_jax import basis_overlap, orthonormal_basis

    modules = sorted(set.intersection(*(set(f) for f in factors)))
    per_module = {}
    a_rand, b_rand = [], []
    for m in modules:
        # each task's bases once, then every pair: T SVDs per side instead of T (T - 1)
        qa = [orthonormal_basis(f[m][0].T) for f in factors]
        qb = [orthonormal_basis(f[m][1]) for f in factors]
        pairs = list(itertools.combinations(range(len(factors)), 2))
        a_vals = [basis_overlap(qa[i], qa[j]) for i, j in pairs]
        b_vals = [basis_overlap(qb[i], qb[j]) for i, j in pairs]
        per_module[m] = (float(np.nanmean(a_vals)), float(np.nanmean(b_vals)))
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
    return mean_pairwise_overlap(list(load_adapters(collection).values()))


def drift_from_init(adapters: dict[str, dict], initial_factors, seeds: dict) -> dict:
    """Mean over tasks and modules of `||A - A0|| / ||A0||` and of the A0/A row-space
    overlap. `adapters`: `{task: {module: (A, B)}}` (`load_adapters`);
    `initial_factors(seed) -> {module: A0}`: the `lora_A` PEFT initialises under that seed
    (called once per distinct seed); `seeds`: each task's training seed."""
    from hydraopt_jax import subspace_overlap

    rel, ovl = [], []
    init_by_seed: dict[int, dict] = {}
    for name, factors in adapters.items():
        if seeds[name] not in init_by_seed:
            init_by_seed[seeds[name]] = initial_factors(seeds[name])
        init = init_by_seed[seeds[name]]
        for module, (a, _) in factors.items():
            a0 = init[module]
            rel.append(np.linalg.norm(a - a0) / np.linalg.norm(a0))
            ovl.append(subspace_overlap(a.T, a0.T))
    return dict(a_relative_drift=float(np.mean(rel)), a_init_overlap=float(np.mean(ovl)))


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
