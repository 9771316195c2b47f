"""The merge engine against dense float64 numpy references (issue 2's acceptance list)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hydraopt_jax as hj
from hydraopt_jax import RESULTS, SharingPlan
from tests.helpers.references import (
    dense_optimum,
    random_collection,
    relative_weights,
)


def test_weights_array_and_uniform_enter_the_objective(rng):
    A, B = random_collection(rng, num_tasks=4)
    plan = SharingPlan.shared_a(4, 2)
    w = np.array([1.0, 2.0, 0.5, 0.0])
    sol = hj.merge(A, B, plan, weights=w)
    np.testing.assert_allclose(sol.weights, w)
    assert float(sol.loss) / dense_optimum(A, B, plan, w) <= 1.0001
    uniform = hj.merge(A, B, plan, weights="uniform")
    assert float(uniform.loss) / dense_optimum(A, B, plan, np.ones(4)) <= 1.0001


def test_negative_weights_and_absent_tasks_are_refused_with_their_cause(rng):
    A, B = random_collection(rng, num_tasks=3)
    with pytest.raises(ValueError, match="weights must be finite and non-negative"):
        hj.merge(A, B, SharingPlan.shared_a(3), weights=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match=r"task_ranks \[2, 0, 2\].*leave absent tasks out"):
        hj.merge(A, B, SharingPlan.shared_a(3), task_ranks=[2, 0, 2])


def test_a_zero_adapter_gets_zero_weight_and_finite_results(rng):
    A, B = random_collection(rng, num_tasks=4)
    B[2] = 0.0
    sol = hj.merge(A, B, SharingPlan.shared_a(4, 2))
    assert sol.weights[2] == 0.0
    assert np.all(np.isfinite(sol.shared_a)) and np.all(np.isfinite(sol.relative_error))


def test_non_finite_input_is_reported_not_silently_returned(rng):
    A, B = random_collection(rng, num_tasks=3)
    A[1, 0, 0] = np.nan
    with pytest.raises(FloatingPointError, match="non-finite"):
        hj.merge(A, B, SharingPlan.shared_a(3))
    sol = hj.merge(A, B, SharingPlan.shared_a(3), throw=False)
    assert sol.result == RESULTS.nonfinite


def test_bad_shapes_say_what_arrived(rng):
    A, B = random_collection(rng, num_tasks=3)
    with pytest.raises(ValueError, match=r"A \(3, 3, 20\) and B \(3, 16, 2\) disagree"):
        hj.merge(A, B[:, :, :2], SharingPlan.shared_a(3))
    with pytest.raises(ValueError, match="plan has 4 tasks but A has 3"):
        hj.merge(A, B, SharingPlan.shared_a(4))
    with pytest.raises(ValueError, match="solver must be"):
        hj.merge(A, B, SharingPlan.shared_a(3), solver="newton")


def test_activation_aware_exact_is_the_whitened_optimum(rng):
    A, B = random_collection(rng, num_tasks=4, d_in=12)
    x = rng.normal(size=(200, 12)) * rng.uniform(0.1, 3, size=12)
    cov = x.T @ x / 200
    plan = SharingPlan.shared_a(4, 2)
    sol = hj.merge(A, B, plan, activation_cov=cov)
    chol = np.linalg.cholesky(cov + 1e-6 * np.trace(cov) / 12 * np.eye(12))
    A_w = A @ chol
    w = relative_weights(A_w, B)
    optimum = dense_optimum(A_w, B, plan, w)
    achieved = hj.dense_loss_reference(A_w, B, sol.shared_a @ chol, sol.shared_b, plan, w)
    assert achieved / optimum <= 1.0001
    assert float(sol.loss) == pytest.approx(achieved, rel=1e-8)
    # It trades plain error for error where inputs are large: worse unwhitened, better whitened.
    plain = hj.merge(A, B, plan)
    plain_whitened = hj.dense_loss_reference(A_w, B, plain.shared_a @ chol, plain.shared_b, plan, w)
    assert achieved < plain_whitened


def test_activation_aware_adam_matches_its_exact_solution(rng):
    A, B = random_collection(rng, num_tasks=4, d_in=12)
    cov = np.diag(rng.uniform(0.1, 3, size=12))
    plan = SharingPlan.shared_a(4, 2)
    exact = hj.merge(A, B, plan, activation_cov=cov)
    adam = hj.merge(A, B, plan, "adam", activation_cov=cov, init="random", max_steps=3000)
    assert float(adam.loss) / float(exact.loss) <= 1.01


def test_second_call_with_same_shapes_does_not_recompile(rng):
    from hydraopt_jax._solve import solve_jit

    A, B = random_collection(rng, num_tasks=4, d_in=11, d_out=13)
    plan = SharingPlan.shared_a(4, 2)
    hj.merge(A, B, plan)
    before = solve_jit._cache_size()
    A2, B2 = random_collection(rng, num_tasks=4, d_in=11, d_out=13)
    hj.merge(A2, B2, plan)
    assert solve_jit._cache_size() == before


def test_learning_rate_sweep_does_not_recompile(rng):
    from hydraopt_jax._solve import solve_jit

    A, B = random_collection(rng, num_tasks=3, d_in=9, d_out=10)
    plan = SharingPlan.shared_a(3, 2)
    hj.merge(A, B, plan, "adam", learning_rate=1e-2, max_steps=5)
    before = solve_jit._cache_size()
    losses = [
        float(hj.merge(A, B, plan, "adam", learning_rate=lr, max_steps=5, init="random").loss)
        for lr in (1e-3, 3e-3, 3e-2)
    ]
    assert solve_jit._cache_size() == before + 1  # init="random" is one new static config
    assert len(set(losses)) == 3


def test_merge_works_under_jit_and_vmap_and_vmap_equals_a_loop(rng):
    plan = SharingPlan.shared_a(3, 2)
    modules = [random_collection(rng, num_tasks=3, d_in=9, d_out=8) for _ in range(4)]
    stack_a = jnp.stack([a for a, _ in modules])
    stack_b = jnp.stack([b for _, b in modules])

    batched = jax.jit(jax.vmap(lambda a, b: hj.merge(a, b, plan).loss))(stack_a, stack_b)
    looped = [float(hj.merge(a, b, plan).loss) for a, b in modules]
    np.testing.assert_allclose(batched, looped, rtol=1e-10)


def test_user_optax_transformation_is_accepted(rng):
    A, B = random_collection(rng, num_tasks=3)
    plan = SharingPlan.shared_a(3, 2)
    sol = hj.merge(A, B, plan, optax.sgd(0.1, momentum=0.9), init="random", max_steps=50)
    start = hj.merge(A, B, plan, "als", init="random", max_steps=0)
    assert float(sol.loss) < float(start.loss)
    assert int(sol.steps) <= 50


def test_iterative_solver_reports_max_steps(rng):
    A, B = random_collection(rng, num_tasks=3)
    sol = hj.merge(A, B, SharingPlan([0, 0, 1], [0, 1, 1], 2), "als", max_steps=1, tol=0.0)
    assert sol.result == RESULTS.max_steps_reached and sol.steps == 1


def test_merge_adapters_groups_by_shape_and_matches_merge(rng):
    plan = SharingPlan.shared_a(4, 2)
    collection = {}
    for i, (d_in, d_out) in enumerate([(9, 8), (9, 8), (9, 5), (9, 8)]):
        collection[f"layer{i}"] = random_collection(rng, num_tasks=4, d_in=d_in, d_out=d_out)
    solutions = hj.merge_adapters(collection, plan)
    assert list(solutions) == list(collection)
    for name, (A, B) in collection.items():
        alone = hj.merge(A, B, plan)
        np.testing.assert_allclose(solutions[name].loss, alone.loss, rtol=1e-6)
        np.testing.assert_allclose(solutions[name].relative_error, alone.relative_error, rtol=1e-5)


def test_merge_adapters_compiles_once_per_shape_signature(rng):
    from hydraopt_jax._solve import batched_solver

    plan = SharingPlan.full_merge(3, 2)
    collection = {f"m{i}": random_collection(rng, num_tasks=3, d_in=7, d_out=6) for i in range(5)}
    hj.merge_adapters(collection, plan)
    solver = batched_solver(
        tuple(sorted(["learning_rate", "tol", "max_steps"])),
        **dict(
            plan=plan,
            kind="exact",
            transformation=None,
            weights_mode="relative",
            init="relaxed",
            svd_method="auto",
        ),
    )
    assert solver._cache_size() == 1  # five modules, one shape: one compilation
    more = {f"n{i}": random_collection(rng, num_tasks=3, d_in=7, d_out=6) for i in range(2)}
    hj.merge_adapters(more, plan)
    assert solver._cache_size() == 2  # a batch of 2 is a new shape; a 3rd call of 2 is not
    hj.merge_adapters(more, plan)
    assert solver._cache_size() == 2


def test_mixed_ranks_and_absent_tasks(rng):
    A, B = random_collection(rng, num_tasks=4, rank=4)
    A[1, 2:] = 0.0  # task 1 has rank 2, zero-padded
    B[1, :, 2:] = 0.0
    ranks = (4, 2, 4, 0)  # task 3 is absent from this module
    A[3], B[3] = 0.0, 0.0
    sols = hj.merge_adapters({"m": (A, B, ranks)}, SharingPlan.shared_a(4))
    sol = sols["m"]
    assert sol.task_ids == (0, 1, 2) and sol.task_ranks == (4, 2, 4)
    assert sol.original_params == (4 + 2 + 4) * (20 + 16)
    alone = hj.merge(A[:3], B[:3], SharingPlan.shared_a(3))
    np.testing.assert_allclose(sol.loss, alone.loss, rtol=1e-6)


def test_per_module_plans_and_given_inits(rng):
    collection = {f"m{i}": random_collection(rng, num_tasks=4) for i in range(2)}
    plans = {"m0": SharingPlan.shared_a(4, 2), "m1": SharingPlan([0, 0, 1, 1], [0, 1, 0, 1], 2)}
    first = hj.merge_adapters(collection, plans, "als", max_steps=3, tol=0.0)
    assert first["m0"].shared_a.shape[0] == 1 and first["m1"].shared_a.shape[0] == 2
    init = {n: (s.shared_a, s.shared_b) for n, s in first.items()}
    resumed = hj.merge_adapters(collection, plans, "als", init=init, max_steps=3, tol=0.0)
    straight = hj.merge_adapters(collection, plans, "als", max_steps=6, tol=0.0)
    for n in collection:  # 3 + 3 steps from a checkpoint = 6 steps straight
        np.testing.assert_allclose(resumed[n].shared_a, straight[n].shared_a, rtol=1e-9, atol=1e-12)


def test_sharded_module_axis_equals_one_device(rng):
    from jax.sharding import Mesh

    devices = jax.devices()
    assert len(devices) == 4, "conftest asks XLA for 4 host devices"
    mesh = Mesh(np.array(devices), ("modules",))
    plan = SharingPlan.shared_a(4, 2)
    collection = {
        f"m{i}": random_collection(rng, num_tasks=4, d_in=9, d_out=8, dtype=np.float32)
        for i in range(6)  # 6 modules on 4 devices: padded to 8
    }
    single = hj.merge_adapters(collection, plan)
    sharded = hj.merge_adapters(collection, plan, mesh=mesh)
    for name in collection:
        np.testing.assert_allclose(sharded[name].shared_a, single[name].shared_a, atol=1e-6)
        np.testing.assert_allclose(sharded[name].loss, single[name].loss, rtol=1e-6)


@pytest.mark.parametrize("plan_name", ["shared_a", "full_merge", "shared_b"])
def test_sharded_module_and_task_axes_equal_one_device(rng, plan_name):
    from jax.sharding import Mesh

    devices = np.array(jax.devices()).reshape(2, 2)
    mesh = Mesh(devices, ("modules", "tasks"))  # 2 x 2: modules over one, tasks the other
    plan = SharingPlan.named(plan_name, 6, 3)
    collection = {
        f"m{i}": random_collection(rng, num_tasks=6, d_in=9, d_out=8, dtype=np.float32)
        for i in range(3)  # 3 modules on 2 shards: padded to 4
    }
    single = hj.merge_adapters(collection, plan)
    sharded = hj.merge_adapters(collection, plan, mesh=mesh)
    for name in collection:
        for field in ("shared_a", "shared_b", "relative_error"):
            np.testing.assert_allclose(
                getattr(sharded[name], field), getattr(single[name], field), atol=2e-5
            )
        np.testing.assert_allclose(sharded[name].loss, single[name].loss, rtol=1e-5)


def test_a_fresh_equal_optax_transformation_does_not_recompile(rng):
    """A user's optimiser is data, not a cache key: `optax.adam(1e-2)` built anew for every
    call compiles once; a different learning rate is a different program."""
    from hydraopt_jax._solve import solve_jit

    A, B = random_collection(rng, num_tasks=3, dtype=np.float32)
    plan = SharingPlan.shared_a(3, 2)
    hj.merge(A, B, plan, optax.adam(1e-2), max_steps=3)
    before = solve_jit._cache_size()
    hj.merge(A, B, plan, optax.adam(1e-2), max_steps=3)
    hj.merge(A, B, plan, optax.chain(optax.adam(1e-2)), max_steps=3)  # another structure
    assert solve_jit._cache_size() == before + 1
    hj.merge(A, B, plan, optax.chain(optax.adam(1e-2)), max_steps=3)
    hj.merge(A, B, plan, optax.adam(3e-2), max_steps=3)
    assert solve_jit._cache_size() == before + 2


def test_structural_key_tells_equal_from_different_transformations():
    from hydraopt_jax._solvers.optax_solver import StaticTransformation

    schedule = optax.linear_schedule(1e-2, 1e-3, 100)
    same = StaticTransformation(optax.adam(schedule))
    assert same == StaticTransformation(optax.adam(optax.linear_schedule(1e-2, 1e-3, 100)))
    assert hash(same) == hash(StaticTransformation(optax.adam(schedule)))
    assert same != StaticTransformation(optax.adam(optax.linear_schedule(1e-2, 1e-3, 99)))
    assert StaticTransformation(optax.sgd(0.1)) != StaticTransformation(optax.adam(0.1))
    assert StaticTransformation(optax.adam(0.1, b1=0.8)) != StaticTransformation(optax.adam(0.1))


@pytest.mark.parametrize("solver", ["adam", "user"])
def test_continuing_an_optax_run_from_its_solution_equals_running_on(rng, solver):
    """The optimiser state comes back in `Solution.state`: 20 + 20 steps (continued from the
    first run's solution) give the factors of 40 steps; restarting Adam's moments does not."""
    A, B = random_collection(rng, num_tasks=4, dtype=np.float32)
    plan = SharingPlan.shared_a(4, 2)
    tx = "adam" if solver == "adam" else optax.adam(optax.linear_schedule(1e-2, 1e-3, 40))
    run = dict(tol=0.0)
    full = hj.merge(A, B, plan, tx, max_steps=40, init="random", **run)
    half = hj.merge(A, B, plan, tx, max_steps=20, init="random", **run)
    assert half.state is not None and int(half.steps) == 20
    rest = hj.merge(A, B, plan, tx, max_steps=20, init=half, **run)
    np.testing.assert_allclose(rest.shared_a, full.shared_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rest.shared_b, full.shared_b, rtol=1e-5, atol=1e-6)
    restarted = hj.merge(A, B, plan, tx, max_steps=20, init=(half.shared_a, half.shared_b), **run)
    assert np.max(np.abs(np.asarray(restarted.shared_a) - np.asarray(full.shared_a))) > 1e-3
