"""Per module: `pca`'s reconstruction loss against the best planner option at its storage.

    python -m benchmarks.testbed.module_front small_lr_diff_seed [--ranks 2,4,8]

For every module of a committed collection and every `pca` rank, prints `pca`'s loss (sum
over tasks of squared relative errors: the planner's objective with its default relative
weights) and the lowest loss among the planner's candidate options (`plan_budget`'s
per-module closed forms) that store at most as many parameters. It shows whether a
shared-basis family would change the planner's choices (see the testbed README).
"""

from __future__ import annotations

import argparse

import numpy as np

from . import evaluate_methods as EM


def compare(collection: str, ranks=(2, 4, 8)) -> list[dict]:
    from hydraopt_jax._planner import collection_options
    from hydraopt_jax.baselines import run_baseline

    coll = EM.load_testbed_collection(collection)
    _, options = collection_options(
        coll.factors(), task_names=coll.tasks, task_attributes=coll.attributes()
    )
    rows = []
    for m in coll.modules:
        for k in ranks:
            sol = run_baseline("pca", coll.A[m], coll.B[m], rank=k)
            params = int(sol.num_params)
            fits = [o for o in options[m][1] if o.num_params <= params]
            best = min(fits, key=lambda o: o.loss) if fits else None
            rows.append(dict(
                module=m, k=k, storage=params / int(sol.original_params),
                pca_loss=float(np.sum(np.asarray(sol.relative_error, np.float64) ** 2)),
                best_loss=best.loss if best else float("nan"),
                best=f"{best.name}@{best.rank}" if best else "-",
            ))  # fmt: skip
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("collection")
    parser.add_argument("--ranks", default="2,4,8", help="pca ranks, comma-separated")
    args = parser.parse_args(argv)
    rows = compare(args.collection, tuple(int(k) for k in args.ranks.split(",")))
    print(f"{'module':36s} {'k':>2s} {'storage':>8s} {'pca loss':>9s} {'best plan':>9s}  option")
    for r in rows:
        print(f"{r['module']:36s} {r['k']:2d} {r['storage']:8.3f} {r['pca_loss']:9.2f} "
              f"{r['best_loss']:9.2f}  {r['best']}")  # fmt: skip
    for k in sorted({r["k"] for r in rows}):
        sub = [r for r in rows if r["k"] == k]
        lower = sum(r["best_loss"] < r["pca_loss"] for r in sub)
        print(f"k = {k}: a planner option at <= pca's storage has the lower loss on "
              f"{lower} of {len(sub)} modules")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
