"""`Solution`: one result type for every solver and baseline, and one per-task error metric
shared by bundles, the planner, the commands, the demo and the testbeds."""

from __future__ import annotations

import numpy as np
import pytest

import hydraopt_jax as hj
from hydraopt_jax import SharingPlan, task_relative_errors
from hydraopt_jax._synthetic import synthetic_collection
from tests.helpers.references import random_collection


def dense_task_errors(collection: dict, solutions: dict, num_tasks: int) -> np.ndarray:
    """DENSE REFERENCE: each task's relative error of its whole update (all modules at once),
    `||[dW_m - dW_hat_m]_m||_F / ||[dW_m]_m||_F`, from the full matrices."""
    num, den = np.zeros(num_tasks), np.zeros(num_tasks)
    for name, sol in solutions.items():
        a_all, b_all = (np.asarray(x, np.float64) for x in collection[name][:2])
        for local, t in enumerate(sol.task_ids):
            a_hat, b_hat = (np.asarray(x, np.float64) for x in sol.task_factors(local))
            dense = b_all[t] @ a_all[t]
            num[t] += np.sum((dense - b_hat @ a_hat) ** 2)
            den[t] += np.sum(dense**2)
    return np.sqrt(num / den)


def test_task_error_is_the_relative_error_of_the_whole_update(collection):
    from tests.helpers.grid import NAMES

    solutions = hj.merge_adapters(collection, SharingPlan.shared_a(len(NAMES), 2))
    np.testing.assert_allclose(
        task_relative_errors(solutions, len(NAMES)),
        dense_task_errors(collection, solutions, len(NAMES)),
        rtol=1e-5,
    )
    # a task absent everywhere, or whose update is zero, gets 0 (never NaN)
    assert task_relative_errors(solutions, len(NAMES) + 1)[-1] == 0.0


def test_bundle_planner_and_merge_agree_on_each_tasks_error(adapter_dirs):
    """The same definition, computed by four routes: solutions in memory, the bundle that
    `merge_collection` (and `hydraopt merge --json`) reports, the planner's prediction from
    its Grams (float64, no solve), and `hydraopt sweep`'s rows."""
    collection = hj.io.load_collection(adapter_dirs)
    plan = hj.plan_budget(collection, 0.4)
    solutions = {}
    for _, group in collection.iter_groups():
        solutions.update(hj.merge_adapters(group, plan.plans))
    expected = task_relative_errors(solutions, collection.num_tasks)
    assert np.all(expected > 1e-3)  # a lossy plan: the comparison means something
    bundle = hj.merge_collection(collection, plan.plans)
    np.testing.assert_allclose(list(bundle.task_relative_errors().values()), expected, rtol=1e-6)
    np.testing.assert_allclose(plan.task_relative_errors(), expected, rtol=1e-4)
    attributes = hj.planner.task_attributes_from_names(collection.names)
    rows = hj.planner.storage_sweep(
        collection, budgets=(0.4,), baselines=(), task_attributes=attributes
    )
    (row,) = [r for r in rows if r["family"] == "planner"]
    assert row["mean_relative_error"] == pytest.approx(float(np.mean(expected)), rel=1e-4)


@pytest.mark.slow
def test_demo_reports_the_same_task_error():
    import io

    from rich.console import Console

    from hydraopt_jax.cli.demo import demo_plans, run_demo

    rows = run_demo(Console(file=io.StringIO()), num_layers=1)
    arrays, names, attrs = synthetic_collection(num_layers=1, rank=16)
    plans = demo_plans(len(names), 16, attrs)
    assert [r["plan"] for r in rows] == [label for label, _, _ in plans]
    storage = [r["storage_ratio"] for r in rows]
    assert storage == sorted(storage, reverse=True)  # from "all kept" to "one adapter"
    for label in ("shared-a", "shared-a, j=r/4"):
        _, plan, solver = next(p for p in plans if p[0] == label)
        solutions = hj.merge_adapters(arrays, plan, solver)
        row = next(r for r in rows if r["plan"] == label)
        errors = task_relative_errors(solutions, len(names))
        assert row["mean_error"] == pytest.approx(float(np.mean(errors)), rel=1e-6)
        assert row["worst_error"] == pytest.approx(float(np.max(errors)), rel=1e-6)


def test_baselines_return_the_same_solution_type(rng):
    """Shared-basis baselines are Solutions with cores: their task factors reproduce their
    reported errors, they count their storage, and checkpoints and bundles take them."""
    A, B = random_collection(rng, num_tasks=4, rank=3, dtype=np.float32)
    for name, core in (("pca", "full"), ("joint_diag", "diagonal"), ("svd", None)):
        sol = hj.baselines.run_baseline(name, A, B, rank=3)
        assert isinstance(sol, hj.Solution) and sol.core == core
        errors = dense_task_errors({"m": (A, B)}, {"m": sol}, 4)
        np.testing.assert_allclose(sol.relative_error, errors, rtol=1e-4)
        per_task = {"full": 9, "diagonal": 3, None: 0}[core]
        assert sol.num_params == 3 * (20 + 16) + 4 * per_task


def test_factor_pair_multiplies_the_core_into_the_task_specific_side(rng):
    A, B = random_collection(rng, num_tasks=3, rank=4, dtype=np.float32)
    nested_a = hj.merge(A, B, SharingPlan.shared_a(3, 4).with_task_rank([1, 2, 3]))
    for t, j in enumerate((1, 2, 3)):
        a, b = nested_a.task_factors(t)
        assert a.shape == (j, 20) and b.shape == (16, j)
    nested_b = hj.merge(A, B, SharingPlan.shared_b(3, 4).with_task_rank(2))
    a, b = nested_b.task_factors(1)
    assert a.shape == (2, 20) and b.shape == (16, 2)
    np.testing.assert_allclose(
        dense_task_errors({"m": (A, B)}, {"m": nested_b}, 3), nested_b.relative_error, rtol=1e-4
    )
