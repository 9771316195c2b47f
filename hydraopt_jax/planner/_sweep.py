"""Storage vs reconstruction error of every named plan, the planner and the classic merges."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._plan import NAMED_PLANS
from .._solution import task_relative_errors
from ._budget import choose, collection_options, truncation_levels
from ._curves import DEFAULT_RANK_MULTIPLIERS

__all__ = ["storage_sweep"]


@dataclasses.dataclass(frozen=True)
class _ModuleErrors:
    task_ids: tuple[int, ...]
    relative_error: tuple[float, ...]
    task_sq_norms: tuple[float, ...]


def storage_sweep(
    collection,
    *,
    rank_multipliers: Sequence[float] = (0.5, 1.0, 2.0),
    budgets: Sequence[float] = (0.1, 0.2, 0.3, 0.5),
    baselines: Sequence[str] = ("linear", "ties", "dare_linear", "svd", "knots"),
    task_attributes: Sequence[Mapping[str, Any]] | None = None,
) -> list[dict]:
    """One row per method: the named plans at `rank_multipliers` (exact losses from the
    planner's curves: no solve), per-task truncation at every candidate rank below `r`
    (`planner.truncation_levels`, family `truncation`, in place of `separate` below `r`), the
    planner at each of `budgets`, and each baseline.

    `collection`: an `io.AdapterCollection` (read one module at a time). Rows:
    `{method, family, storage_ratio, num_params, mean_relative_error, max_relative_error}`,
    task errors as `hydraopt_jax.task_relative_errors` defines them.
    """
    from ..baselines import BASELINES, run_baseline

    for name in baselines:
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}; expected {', '.join(BASELINES)}")
    num_tasks = collection.num_tasks
    multipliers = sorted(set(rank_multipliers) | set(DEFAULT_RANK_MULTIPLIERS))
    groupings, options = None, {}
    base_solutions: dict[str, dict] = {b: {} for b in baselines}
    for _, group in collection.iter_groups():
        groupings, opts = collection_options(
            group, task_names=list(collection.names), task_attributes=task_attributes,
            rank_multipliers=multipliers,
        )  # fmt: skip
        options.update(opts)
        for module, (a, b, ranks) in group.items():
            present = [t for t, k in enumerate(ranks) if k > 0]
            for name in baselines:
                base_solutions[name][module] = run_baseline(
                    name, a[present], b[present], task_ranks=[ranks[t] for t in present],
                    task_ids=present,
                )  # fmt: skip
    original = sum(st.original_params for st, _ in options.values())
    rows = []

    def add(method, family, params, errors):
        rows.append(
            {
                "method": method,
                "family": family,
                "storage_ratio": params / original,
                "num_params": int(params),
                "mean_relative_error": float(np.mean(errors)),
                "max_relative_error": float(np.max(errors)),
            }
        )

    def add_selection(method, family, picked):
        """The row of one option per module (`{module: PlanOption}`)."""
        errors = task_relative_errors([
            _ModuleErrors(st.present, picked[m].relative_error, tuple(st.sq_norms))
            for m, (st, _) in options.items()
        ], num_tasks)  # fmt: skip
        add(method, family, sum(o.num_params for o in picked.values()), errors)

    for plan_name, key in NAMED_PLANS.items():
        family = plan_name.replace("_", "-")
        for m in rank_multipliers:
            if family == "separate" and m < 1:
                continue  # the truncation rows below
            picked = {}  # the grouping pair at this rank on every module, if all have it
            for module, (_, opts) in options.items():
                hit = [
                    o
                    for o in opts
                    if (o.a_by, o.b_by, o.rank_label, o.task_rank) == (*key, f"{m:g}r", None)
                ]
                if hit:
                    picked[module] = hit[0]
            if len(picked) == len(options):
                add_selection(f"hydraopt:{family} k={m:g}r", family, picked)
    # per-task truncation, the reference to beat: every candidate rank below r
    for level in truncation_levels(options):
        if level.fraction < 1:
            picked = {m: options[m][1][i] for m, i in level.picks.items()}
            add_selection(f"truncation {level.name}", "truncation", picked)
    for budget in budgets:
        try:
            chosen = choose(groupings, options, budget)
        except ValueError:
            continue
        add(f"planner budget={budget:g}", "planner", chosen.num_params,
            chosen.task_relative_errors())  # fmt: skip
    for name in baselines:
        solutions = base_solutions[name]
        add(name, "baseline", sum(s.num_params for s in solutions.values()),
            task_relative_errors(solutions, num_tasks))  # fmt: skip
    return rows
