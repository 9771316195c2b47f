"""Per module: `pca`'s reconstruction loss against the best planner option at its storage.

    python -m benchmarks.testbed.module_front small_lr_diff_seed [--ranks 2,4,8] [--score 8]

For every module of a committed collection and every `pca` rank, prints `pca`'s loss (sum
over tasks of squared relative errors: the planner's objective with its default relative
weights) and the lowest loss among the planner's candidate options (`plan_budget`'s
per-module closed forms) that store at most as many parameters. It shows whether a
shared-basis family would change the planner's choices (see the testbed README).

`--score K` also scores (test accuracy ratio, as the testbed) `pca` at rank `K` against the
*matched* HydraOpt selection: on every module the lowest-loss option at `pca`'s storage
there, plain and activation-aware. It separates the allocation (the planner's choice across
modules) from the structure (what one module's parameters can hold).
"""

from __future__ import annotations

import argparse

import numpy as np

from ..quality.methods import Merged, Method, merge_method, task_loras
from ..quality.run import score_accuracies
from . import evaluate as E
from . import evaluate_methods as EM


def compare(collection: str, ranks=(2, 4, 8)) -> list[dict]:
    from hydraopt_jax.baselines import run_baseline
    from hydraopt_jax.planner import collection_options

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


def matched_scores(collection: str, k: int) -> list[dict]:
    """Score `pca` at rank `k` and, plain and activation-aware, the HydraOpt selection with
    the lowest loss per module at `pca`'s storage on that module."""
    from hydraopt_jax import merge_adapters
    from hydraopt_jax.baselines import run_baseline
    from hydraopt_jax.planner import collection_options

    from . import model as M

    coll = EM.load_testbed_collection(collection)
    base = M.load_base_model()
    covs = EM.activation_covariances(base, coll)
    pca = merge_method(Method("pca", "baseline", baseline="pca", rank_mult=k / coll.rank), coll)
    results = [("baseline:pca", pca, "")]
    for act in (None, covs):
        groupings, options = collection_options(
            coll.factors(), task_names=coll.tasks, task_attributes=coll.attributes(),
            activation_covs=act,
        )  # fmt: skip
        plans, picked = {}, []
        for m in coll.modules:
            cap = int(run_baseline("pca", coll.A[m], coll.B[m], rank=k).num_params)
            best = min((o for o in options[m][1] if o.num_params <= cap), key=lambda o: o.loss)
            plans[m] = best.plan.restrict(range(coll.num_tasks))
            picked.append(f"{best.name}@{best.rank}")
        sols = merge_adapters(coll.factors(), plans, activation_covs=act)
        merged = Merged(task_loras(coll, sols), sum(int(s.num_params) for s in sols.values()),
                        sum(int(s.original_params) for s in sols.values()), {}, 0.0)  # fmt: skip
        name = "hydraopt:matched" + ("+act" if act is not None else "")
        results.append((name, merged, " ".join(picked)))
    rows = []
    for name, merged, picked in results:
        acc = {t: float(E.evaluate_task(base, t, lora)) for t, lora in merged.loras.items()}
        score, worst, _ = score_accuracies(acc, coll.own_accuracy)
        rows.append(dict(method=name, storage=merged.storage_ratio, score=score,
                         min_task_ratio=worst, options=picked))  # fmt: skip
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("collection")
    parser.add_argument("--ranks", default="2,4,8", help="pca ranks, comma-separated")
    parser.add_argument(
        "--score",
        type=int,
        default=None,
        metavar="K",
        help="also score pca at rank K against the matched HydraOpt selection",
    )
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
    if args.score is not None:
        for r in matched_scores(args.collection, args.score):
            print(f"{r['method']:24s} storage {r['storage']:.4f} score {r['score']:.4f} "
                  f"min {r['min_task_ratio']:.4f}  {r['options']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
