"""The merge engine against dense float64 numpy references (issue 2's acceptance list)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_collection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hydraopt_jax as hj
from hydraopt_jax import RESULTS, SharingPlan
from hydraopt_jax._loss import (
    plan_gram_errors,
    plan_loss,
    plan_residual_norms_sq,
    task_norms_sq,
)
from hydraopt_jax._solvers._linalg import gram_factor

# ----------------------------------------------------------------------------- references


def dense_updates(A, B):
    return np.einsum("tor,trd->tod", np.asarray(B, np.float64), np.asarray(A, np.float64))


def relative_weights(A, B):
    return 1.0 / np.sum(dense_updates(A, B) ** 2, axis=(1, 2))


def dense_optimum(A, B, plan: SharingPlan, weights):
    """The optimum of a nesting plan from dense SVDs (Eckart-Young on stacked group means)."""
    dense, w = dense_updates(A, B), np.asarray(weights, np.float64)
    if not plan.b_nested_in_a:  # shared-B family: transpose everything
        assert plan.a_nested_in_b
        plan = SharingPlan(plan.b_group, plan.a_group, plan.rank)
        dense = np.swapaxes(dense, 1, 2)
    k = plan.rank
    total = sum(w[t] * np.sum(dense[t] ** 2) for t in range(plan.num_tasks))
    captured = 0.0
    for a_members in plan.groups("a"):
        blocks = []
        for b_members in plan.groups("b"):
            if b_members[0] not in a_members:
                continue
            wj = sum(w[t] for t in b_members)
            if wj == 0:
                continue
            mean = sum(w[t] * dense[t] for t in b_members) / wj
            blocks.append(np.sqrt(wj) * mean)
        s = np.linalg.svd(np.concatenate(blocks, axis=0), compute_uv=False)
        captured += np.sum(s[:k] ** 2)
    return total - captured


NESTING_PLANS = {
    "shared_a": lambda T, k: SharingPlan.shared_a(T, k),
    "shared_b": lambda T, k: SharingPlan.shared_b(T, k),
    "full_merge": lambda T, k: SharingPlan.full_merge(T, k),
    "a_groups_b_per_task": lambda T, k: SharingPlan([t % 2 for t in range(T)], list(range(T)), k),
    "b_groups_inside_a_groups": lambda T, k: SharingPlan(
        [t % 2 for t in range(T)], [t % 4 for t in range(T)], k
    ),
    "b_groups_a_per_task": lambda T, k: SharingPlan(list(range(T)), [t % 2 for t in range(T)], k),
}

# ----------------------------------------------------------------------------- optimality


@pytest.mark.parametrize("plan_name", sorted(NESTING_PLANS))
@pytest.mark.parametrize("k", [2, 3, 7])
def test_exact_equals_the_dense_svd_optimum(rng, plan_name, k):
    A, B = random_collection(rng, num_tasks=6)
    plan = NESTING_PLANS[plan_name](6, k)
    sol = hj.merge(A, B, plan, "exact")
    optimum = dense_optimum(A, B, plan, relative_weights(A, B))
    dense_loss = hj.dense_loss_reference(
        A, B, sol.shared_a, sol.shared_b, plan, relative_weights(A, B)
    )
    assert dense_loss / optimum <= 1.0001
    assert float(sol.loss) == pytest.approx(dense_loss, rel=1e-9)
    assert sol.result == RESULTS.successful and sol.steps == 0


@pytest.mark.parametrize(
    "plan_name", ["shared_a", "shared_b", "full_merge", "b_groups_inside_a_groups"]
)
def test_iterative_solvers_reach_the_optimum_from_a_random_start(rng, plan_name):
    A, B = random_collection(rng, num_tasks=6)
    plan = NESTING_PLANS[plan_name](6, 2)
    optimum = dense_optimum(A, B, plan, relative_weights(A, B))
    als = hj.merge(A, B, plan, "als", init="random", max_steps=1000, tol=1e-12)
    adam = hj.merge(A, B, plan, "adam", init="random", max_steps=3000)
    assert float(als.loss) / optimum <= 1.001
    assert float(adam.loss) / optimum <= 1.01


def test_separate_reconstructs_every_task_exactly(rng):
    A, B = random_collection(rng, num_tasks=5)
    sol = hj.merge(A, B, SharingPlan.separate(5))
    assert np.max(sol.relative_error) < 1e-12
    for t in range(5):
        a_hat, b_hat = sol.task_factors(t)
        np.testing.assert_allclose(b_hat @ a_hat, dense_updates(A, B)[t], atol=1e-12)
    assert sol.storage_ratio == 1.0


def test_separate_is_exact_in_float32_too(rng):
    A, B = random_collection(rng, num_tasks=5, dtype=np.float32)
    sol = hj.merge(A, B, SharingPlan.separate(5))
    assert sol.shared_a.dtype == jnp.float32
    # the QR-based residual reports float32 round-off, not the Gram identity's sqrt(eps)
    assert np.max(sol.relative_error) < 1e-5


@pytest.mark.parametrize("solver", ["exact", "als"])
@pytest.mark.parametrize("plan_name", ["separate", "shared_a", "shared_b"])
def test_lossless_plans_keep_directions_three_decades_below_the_largest(rng, plan_name, solver):
    """Each update has singular values [1, 1e-3]: a lossless plan (every task kept, or a
    shared factor of rank T r) must keep the weak direction, not round it away."""
    num_tasks, r, d = 2, 2, 8
    weak = np.diag([1.0, 1e-3])
    A = np.stack([weak @ np.linalg.qr(rng.normal(size=(d, r)))[0].T for _ in range(num_tasks)])
    B = np.stack([np.linalg.qr(rng.normal(size=(d, r)))[0] for _ in range(num_tasks)])
    A, B = A.astype(np.float32), B.astype(np.float32)
    plan = SharingPlan.named(plan_name, num_tasks, num_tasks * r if plan_name != "separate" else r)
    sol = hj.merge(A, B, plan, solver)
    assert np.max(np.asarray(sol.relative_error)) < 1e-5  # was 1e-3: the weak direction lost
    dense = np.einsum("tor,trd->tod", B.astype(np.float64), A.astype(np.float64))
    for t in range(num_tasks):
        a_hat, b_hat = (np.asarray(x, np.float64) for x in sol.task_factors(t))
        assert np.linalg.norm(b_hat @ a_hat - dense[t]) < 1e-5 * np.linalg.norm(dense[t])


def test_gram_factor_is_the_r_of_a_qr_up_to_row_signs_even_for_dependent_columns(rng):
    x = rng.normal(size=(2, 30, 6)) * np.logspace(-3, 3, 6)
    x[1, :, 3] = x[1, :, 1]  # a repeated column
    x[1, :, 4] = 0.0  # a zero column
    factor = np.asarray(gram_factor(jnp.asarray(x)))
    assert np.allclose(np.tril(factor, -1), 0.0)
    # F^T F = x^T x up to the relative n eps ridge on the diagonal
    gram = np.einsum("...mi,...mj->...ij", x, x)
    np.testing.assert_allclose(np.swapaxes(factor, 1, 2) @ factor, gram, rtol=1e-13, atol=1e-12)
    r = np.linalg.qr(x[0], mode="r")
    np.testing.assert_allclose(np.abs(factor[0]), np.abs(r), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("plan_name", ["shared_a", "shared_b"])
def test_exact_in_float32_survives_adapters_whose_factors_have_rank_one(rng, plan_name):
    """B_t of rank 1 (dependent columns) at d_out = 2048: the Gram's float32 rounding exceeds
    the Cholesky ridge and the factorisation fails; the solver must fall back, not return
    NaN."""
    T, r, d = 4, 3, 2048
    A = rng.normal(size=(T, r, 24))
    B = rng.normal(size=(T, d, 1)) @ rng.normal(size=(T, 1, r))
    if plan_name == "shared_b":
        A, B = np.swapaxes(B, 1, 2), np.swapaxes(A, 1, 2)
    plan = NESTING_PLANS[plan_name](T, 2)
    sol = hj.merge(A.astype(np.float32), B.astype(np.float32), plan)
    assert int(sol.result) == int(RESULTS.successful)
    w = relative_weights(A, B)
    achieved = hj.dense_loss_reference(A, B, sol.shared_a, sol.shared_b, plan, w)
    assert achieved / dense_optimum(A, B, plan, w) <= 1.001


@pytest.mark.parametrize("plan_name", ["shared_a", "full_merge", "b_groups_inside_a_groups"])
def test_exact_in_float32_is_optimal_when_task_norms_span_six_decades(rng, plan_name):
    """Relative weights give a task with ||B|| 1e-3 the same say as one with 1e3: the small
    Gram factor must keep each task's relative accuracy (a ridge scaled to the largest task
    would erase the small ones)."""
    A, B = random_collection(rng, num_tasks=8, rank=4, d_in=40, d_out=48, drift=1.0)
    B = B * np.logspace(-3, 3, 8)[:, None, None]
    plan = NESTING_PLANS[plan_name](8, 3)
    sol = hj.merge(A.astype(np.float32), B.astype(np.float32), plan)
    w = relative_weights(A, B)
    achieved = hj.dense_loss_reference(A, B, sol.shared_a, sol.shared_b, plan, w)
    assert achieved / dense_optimum(A, B, plan, w) <= 1.0001


@pytest.mark.parametrize("weighting", ["relative", "uniform"])
def test_full_merge_is_the_truncated_svd_of_the_weighted_mean(rng, weighting):
    A, B = random_collection(rng, num_tasks=4)
    k = 3
    sol = hj.merge(A, B, SharingPlan.full_merge(4, k), weights=weighting)
    w = relative_weights(A, B) if weighting == "relative" else np.ones(4)
    mean = np.einsum("t,tod->od", w, dense_updates(A, B)) / w.sum()
    u, s, vt = np.linalg.svd(mean)
    truncated = (u[:, :k] * s[:k]) @ vt[:k]
    np.testing.assert_allclose(sol.shared_b[0] @ sol.shared_a[0], truncated, atol=1e-10)


def test_rank_above_the_adapters_rank_is_a_valid_point(rng):
    A, B = random_collection(rng, num_tasks=4, rank=3)
    k1 = hj.merge(A, B, SharingPlan.shared_a(4, 3))
    k2 = hj.merge(A, B, SharingPlan.shared_a(4, 6))
    assert k2.shared_a.shape == (1, 6, A.shape[2])
    assert float(k2.loss) < float(k1.loss)
    big = hj.merge(A, B, SharingPlan.shared_a(4, 12))  # 12 = T r: every task fits exactly
    assert np.max(big.relative_error) < 1e-10


def test_grouped_plan_without_closed_form_needs_an_iterative_solver(rng):
    A, B = random_collection(rng, num_tasks=4)
    plan = SharingPlan([0, 0, 1, 1], [0, 1, 0, 1], rank=2)
    with pytest.raises(ValueError, match="no closed form.*als"):
        hj.merge(A, B, plan, "exact")
    als = hj.merge(A, B, plan, "als", max_steps=2000, tol=1e-13)
    lbfgs = hj.merge(A, B, plan, "lbfgs", max_steps=2000)
    best = min(float(als.loss), float(lbfgs.loss))
    assert float(als.loss) / best <= 1.001 and float(lbfgs.loss) / best <= 1.001


def test_als_never_increases_the_loss(rng):
    A, B = random_collection(rng, num_tasks=6)
    plan = SharingPlan([0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 1, 2], rank=2)
    from hydraopt_jax._merge import _solve_jit

    hj.merge(A, B, plan, "als", init="random", max_steps=0, tol=0.0)
    before = _solve_jit._cache_size()
    losses = [
        float(hj.merge(A, B, plan, "als", init="random", max_steps=n, tol=0.0).loss)
        for n in range(0, 12)
    ]
    assert _solve_jit._cache_size() == before  # max_steps is traced: no recompilation
    assert all(b <= a * (1 + 1e-12) for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------- weights


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


# ----------------------------------------------------------------------------- loss


def test_factored_loss_equals_the_dense_loss(rng):
    A, B = random_collection(rng, num_tasks=5, rank=3)
    plan = SharingPlan([0, 0, 1, 1, 1], [0, 1, 0, 1, 2], rank=4)
    shared_a = rng.normal(size=(2, 4, 20))
    shared_b = rng.normal(size=(3, 16, 4))
    w = rng.uniform(0.5, 2, size=5)
    norms = task_norms_sq(A, B)
    factored = plan_loss(shared_a, shared_b, A, B, w, norms, plan)
    dense = hj.dense_loss_reference(A, B, shared_a, shared_b, plan, w)
    assert float(factored) == pytest.approx(dense, rel=1e-12)


def test_factored_gradient_matches_finite_differences(rng):
    A, B = random_collection(rng, num_tasks=4, rank=2, d_in=7, d_out=5)
    plan = SharingPlan([0, 0, 1, 1], [0, 1, 2, 3], rank=3)
    params = (rng.normal(size=(2, 3, 7)), rng.normal(size=(4, 5, 3)))
    w = rng.uniform(0.5, 2, size=4)
    norms = task_norms_sq(A, B)

    def f(p):
        return plan_loss(p[0], p[1], A, B, w, norms, plan)

    grads = jax.grad(f)(params)
    eps = 1e-6
    for which in (0, 1):
        for _ in range(5):
            idx = tuple(rng.integers(0, n) for n in params[which].shape)
            bumped = [np.array(p, copy=True) for p in params]
            bumped[which][idx] += eps
            up = float(f(tuple(bumped)))
            bumped[which][idx] -= 2 * eps
            down = float(f(tuple(bumped)))
            assert grads[which][idx] == pytest.approx((up - down) / (2 * eps), rel=1e-6, abs=1e-8)


def test_reported_error_is_accurate_where_the_gram_identity_cancels(rng):
    A, B = random_collection(rng, num_tasks=3, dtype=np.float32)
    plan = SharingPlan.separate(3)
    sol = hj.merge(A, B, plan)
    gram = plan_gram_errors(A, B, sol.shared_a, sol.shared_b, plan, task_norms_sq(A, B))
    # The Gram identity is only good to ~eps * ||dW||^2; the reported residual is far smaller.
    assert np.all(
        np.asarray(sol.relative_error) ** 2 < 1e-3 * np.abs(np.asarray(gram)).max() + 1e-10
    )


@pytest.mark.parametrize("plan_name", sorted(NESTING_PLANS))
def test_gram_errors_against_group_factors_equal_the_qr_residuals(rng, plan_name):
    A, B = random_collection(rng, num_tasks=6, d_out=24)
    plan = NESTING_PLANS[plan_name](6, 2)
    shared_a = rng.normal(size=(plan.num_a_groups, 2, A.shape[2]))
    shared_b = rng.normal(size=(plan.num_b_groups, B.shape[1], 2))
    gram = plan_gram_errors(A, B, shared_a, shared_b, plan, task_norms_sq(A, B))
    qr = plan_residual_norms_sq(A, B, shared_a, shared_b, plan)
    np.testing.assert_allclose(gram, qr, rtol=1e-12)


def test_reported_errors_of_merges_are_accurate_whether_tasks_are_close_or_far(rng):
    """One shape group, two modules: a merge of dissimilar tasks (large residuals, the cheap
    Gram form) and one of near-identical tasks (residuals ~1e-6 of the update, where the Gram
    form loses ~10% in float32): both report float32 residuals within 1e-3 of float64 dense
    ones (dissimilar: 1e-5)."""
    A_far, B_far = random_collection(rng, num_tasks=4, drift=1.0)
    A_near = np.repeat(A_far[:1], 4, axis=0) + 1e-3 * rng.normal(size=A_far.shape)
    B_near = np.repeat(B_far[:1], 4, axis=0)
    plan = SharingPlan.full_merge(4, 3)
    collection = {
        "far": (A_far.astype(np.float32), B_far.astype(np.float32)),
        "near": (A_near.astype(np.float32), B_near.astype(np.float32)),
    }
    for name, sol in hj.merge_adapters(collection, plan, weights="uniform").items():
        A, B = (np.asarray(x, np.float64) for x in collection[name])
        dense = dense_updates(A, B)
        merged = np.asarray(sol.shared_b[0], np.float64) @ np.asarray(sol.shared_a[0], np.float64)
        residual = np.sum((dense - merged) ** 2, axis=(1, 2))
        norms = np.sum(dense**2, axis=(1, 2))
        reported = np.asarray(sol.relative_error, np.float64) ** 2 * norms
        assert np.all(residual < 1e-5 * norms) if name == "near" else np.all(residual > norms / 4)
        rtol = 1e-3 if name == "near" else 1e-5
        np.testing.assert_allclose(reported, residual, rtol=rtol, err_msg=name)


def test_residual_method_is_one_real_branch_across_the_module_vmap():
    """The Gram-or-QR choice of `reported_residuals` is made once for all modules of a shape
    group (a `case` in the program), not per module (a select would compute both)."""
    from hydraopt_jax import _merge

    plan = SharingPlan.full_merge(4, 2)
    statics, traced = _merge._solver_arguments(
        plan, "exact", None, "uniform", 10, 1e-6, "relaxed", "auto", jnp.float32
    )
    solve = _merge._batched_solver(tuple(sorted(traced)), **statics)
    A = jax.ShapeDtypeStruct((3, 4, 3, 20), jnp.float32)
    B = jax.ShapeDtypeStruct((3, 4, 16, 3), jnp.float32)
    assert "stablehlo.case" in solve.lower(A, B, traced).as_text()


# ----------------------------------------------------------------------------- activation-aware


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


# ----------------------------------------------------------------------------- JAX behaviour


def test_second_call_with_same_shapes_does_not_recompile(rng):
    from hydraopt_jax._merge import _solve_jit

    A, B = random_collection(rng, num_tasks=4, d_in=11, d_out=13)
    plan = SharingPlan.shared_a(4, 2)
    hj.merge(A, B, plan)
    before = _solve_jit._cache_size()
    A2, B2 = random_collection(rng, num_tasks=4, d_in=11, d_out=13)
    hj.merge(A2, B2, plan)
    assert _solve_jit._cache_size() == before


def test_learning_rate_sweep_does_not_recompile(rng):
    from hydraopt_jax._merge import _solve_jit

    A, B = random_collection(rng, num_tasks=3, d_in=9, d_out=10)
    plan = SharingPlan.shared_a(3, 2)
    hj.merge(A, B, plan, "adam", learning_rate=1e-2, max_steps=5)
    before = _solve_jit._cache_size()
    losses = [
        float(hj.merge(A, B, plan, "adam", learning_rate=lr, max_steps=5, init="random").loss)
        for lr in (1e-3, 3e-3, 3e-2)
    ]
    assert _solve_jit._cache_size() == before + 1  # init="random" is one new static config
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


# ----------------------------------------------------------------------------- no d_out x d_in


def _all_shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield getattr(var.aval, "shape", ())
        for param in eqn.params.values():
            subs = param if isinstance(param, (list, tuple)) else [param]
            for sub in subs:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_shapes(inner)


@pytest.mark.parametrize(
    "solver, plan",
    [
        ("exact", SharingPlan.shared_a(3, 2)),
        ("exact", SharingPlan.shared_b(3, 2)),
        ("exact", SharingPlan.full_merge(3, 2)),
        ("exact", SharingPlan.separate(3, 2)),
        ("als", SharingPlan([0, 0, 1], [0, 1, 1], 2)),
        ("adam", SharingPlan([0, 0, 1], [0, 1, 1], 2)),
        ("lbfgs", SharingPlan([0, 0, 1], [0, 1, 1], 2)),
    ],
)
def test_no_solver_forms_a_d_out_by_d_in_array(solver, plan):
    d_in, d_out = 29, 31  # primes that appear in no other dimension
    A = jnp.ones((3, 2, d_in))
    B = jnp.ones((3, d_out, 2))
    for svd_method in ("direct", "randomized"):
        jaxpr = jax.make_jaxpr(
            lambda a, b, m=svd_method: hj.merge(a, b, plan, solver, svd_method=m, max_steps=3)
        )(A, B)
        for shape in _all_shapes(jaxpr.jaxpr):
            assert not (d_in in shape and d_out in shape), f"{solver}: array of shape {shape}"


# ----------------------------------------------------------------------------- randomized


def test_randomized_subspace_iteration_matches_the_direct_solution(rng):
    A, B = random_collection(rng, num_tasks=40, rank=4, d_in=60, d_out=50)
    plan = SharingPlan.full_merge(40, 6)
    direct = hj.merge(A, B, plan, svd_method="direct")
    randomized = hj.merge(A, B, plan, svd_method="randomized")
    assert float(randomized.loss) / float(direct.loss) <= 1.0001
    shared = hj.merge(A, B, SharingPlan.shared_a(40, 6), svd_method="randomized")
    optimum = dense_optimum(A, B, SharingPlan.shared_a(40, 6), relative_weights(A, B))
    assert float(shared.loss) / optimum <= 1.0001


# ----------------------------------------------------------------------------- properties


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    num_tasks=st.integers(1, 5),
    rank=st.integers(1, 3),
    k=st.integers(1, 5),
    data=st.data(),
)
def test_exact_is_optimal_for_any_nesting_plan(num_tasks, rank, k, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    A, B = random_collection(rng, num_tasks=num_tasks, rank=rank, d_in=9, d_out=8)
    a_labels = data.draw(st.lists(st.integers(0, 2), min_size=num_tasks, max_size=num_tasks))
    # B-groups refine A-groups: label B by (A-label, extra label)
    extra = data.draw(st.lists(st.integers(0, 1), min_size=num_tasks, max_size=num_tasks))
    plan = SharingPlan.from_labels(a_labels, list(zip(a_labels, extra, strict=True)), rank=k)
    if data.draw(st.booleans()):
        plan = SharingPlan(plan.b_group, plan.a_group, k)  # the shared-B family
    sol = hj.merge(A, B, plan)
    w = relative_weights(A, B)
    optimum = dense_optimum(A, B, plan, w)
    achieved = hj.dense_loss_reference(A, B, sol.shared_a, sol.shared_b, plan, w)
    assert achieved <= optimum * 1.0001 + 1e-9 * num_tasks
    assert sol.shared_a.shape == (plan.num_a_groups, k, 9)
    assert sol.shared_b.shape == (plan.num_b_groups, 8, k)
    assert sol.relative_error.shape == (num_tasks,)


# ----------------------------------------------------------------------------- many modules


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
    from hydraopt_jax._merge import _batched_solver

    plan = SharingPlan.full_merge(3, 2)
    collection = {f"m{i}": random_collection(rng, num_tasks=3, d_in=7, d_out=6) for i in range(5)}
    hj.merge_adapters(collection, plan)
    solver = _batched_solver(
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
