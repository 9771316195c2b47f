"""The solvers (exact, ALS, Optax) against the dense optimum of each plan's objective:
optimality, monotone ALS, float32 and half-precision inputs, determinism, and no dense
`d_out x d_in` array."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hydraopt_jax as hj
from hydraopt_jax import RESULTS, SharingPlan
from hydraopt_jax._solvers._linalg import gram_factor
from hydraopt_jax.cli import main
from tests.helpers.files import bundle_arrays, write_adapter
from tests.helpers.references import (
    NESTING_PLANS,
    dense_optimum,
    dense_updates,
    random_collection,
    relative_weights,
)

T, R, D_IN, D_OUT, K = 5, 4, 20, 16, 3


PLANS = ("shared_a", "shared_b", "full_merge", "separate")


# ----------------------------------------------------------------------------- reference
def named_plan_optimum(A, B, plan: str, k: int, weighting: str = "relative") -> tuple[float, float]:
    """`(loss*, total)`: the optimum of the plan's objective from dense float64 updates, and
    `sum_t w_t ||dW_t||^2` (the loss of predicting zero)."""
    dW = np.einsum("tor,tri->toi", np.asarray(B, np.float64), np.asarray(A, np.float64))
    norms = np.sum(dW**2, axis=(1, 2))
    if weighting == "relative":
        w = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0)
    else:
        w = np.ones(len(dW))
    total = float(np.sum(w * norms))

    def tail(m):
        s = np.linalg.svd(m, compute_uv=False)
        return float(np.sum(s[k:] ** 2))

    scaled = np.sqrt(w)[:, None, None] * dW
    if plan == "shared_a":  # one row space: stack the updates vertically
        return tail(scaled.reshape(-1, dW.shape[2])), total
    if plan == "shared_b":  # one column space: stack them side by side
        return tail(np.concatenate(list(scaled), axis=1)), total
    if plan == "separate":
        return float(sum(wt * tail(d) for wt, d in zip(w, dW, strict=True))), total
    # full merge: the best rank-k matrix for all tasks is the truncated weighted mean
    W = np.sum(w)
    mean = np.einsum("t,toi->oi", w, dW) / W
    spread = float(np.sum(w * np.sum((dW - mean) ** 2, axis=(1, 2))))
    return spread + W * tail(mean), total


def assert_optimal(loss, A, B, plan, k=K, weighting="relative"):
    best, total = named_plan_optimum(A, B, plan, k, weighting)
    loss = float(loss)
    assert np.isfinite(loss)
    if best > 1e-3 * total:
        assert abs(loss - best) <= 1e-4 * best, (plan, loss, best)
    else:  # (near) zero optimum: compare on the scale of the problem
        assert abs(loss - best) <= 1e-5 * total, (plan, loss, best, total)


# ----------------------------------------------------------------------------- collections
def _random(rng, num_tasks=T):
    A = rng.normal(size=(num_tasks, R, D_IN))
    B = rng.normal(size=(num_tasks, D_OUT, R))
    return A, B


def _zero(rng):
    A, B = _random(rng)
    A[1] = 0.0  # a zero A
    B[3] = 0.0  # a zero B
    return A, B


def _identical(rng):
    A, B = _random(rng, 1)
    return np.repeat(A, T, axis=0), np.repeat(B, T, axis=0)


def _rank_deficient(rng):
    A, B = _random(rng)
    A[:, 1:] = A[:, :1] * rng.normal(size=(T, R - 1, 1))  # every A has rank 1
    B[2, :, 2:] = 0.0  # task 2: rank <= 2 (and zero-padded columns)
    A[0] = A[4]  # two tasks share an A
    return A, B


def _badly_scaled(rng):
    A, B = _random(rng)
    scale = np.array([1e-6, 1e-3, 1.0, 1e3, 1e6])  # ||dW_t|| spans 12 orders of magnitude
    return A * np.sqrt(scale)[:, None, None], B * np.sqrt(scale)[:, None, None]


CASES = {
    "random": _random,
    "zero adapters": _zero,
    "identical adapters": _identical,
    "rank deficient": _rank_deficient,
    "badly scaled": _badly_scaled,
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("plan", PLANS)
def test_exact_solver_reaches_the_dense_optimum(case, plan):
    A, B = CASES[case](np.random.default_rng(1))
    A32, B32 = A.astype(np.float32), B.astype(np.float32)
    sol = hj.merge(A32, B32, hj.SharingPlan.named(plan, T, K), solver="exact")
    for field in ("shared_a", "shared_b", "loss", "relative_error", "weights"):
        assert np.all(np.isfinite(np.asarray(getattr(sol, field)))), field
    assert int(sol.result) == 0
    # compare with the optimum of the float32 inputs, upcast exactly
    assert_optimal(sol.loss, A32, B32, plan)
    # the reported loss is the loss of the returned factors
    pairs = [sol.task_factors(t) for t in range(T)]
    task_a = np.stack([np.asarray(a, np.float64) for a, _ in pairs])
    task_b = np.stack([np.asarray(b, np.float64) for _, b in pairs])
    dW = np.einsum("tor,tri->toi", B32.astype(np.float64), A32.astype(np.float64))
    fit = np.einsum("tok,tki->toi", task_b, task_a)
    w = np.asarray(sol.weights, np.float64)
    direct = float(np.sum(w * np.sum((dW - fit) ** 2, axis=(1, 2))))
    assert abs(direct - float(sol.loss)) <= 1e-4 * max(
        direct, 1e-5 * float(np.sum(w * np.sum(dW**2, axis=(1, 2))))
    )
    rel = np.asarray(sol.relative_error)
    nonzero = np.sum(dW**2, axis=(1, 2)) > 0  # a zero update reports its absolute error
    assert np.all(rel >= 0) and np.all(rel[nonzero] <= 1 + 1e-5)  # no worse than zero


@pytest.mark.parametrize("case", ["badly scaled", "zero adapters"])
def test_uniform_weights_on_extreme_collections(case):
    A, B = CASES[case](np.random.default_rng(2))
    A32, B32 = A.astype(np.float32), B.astype(np.float32)
    sol = hj.merge(A32, B32, hj.SharingPlan.shared_a(T, K), solver="exact", weights="uniform")
    assert np.all(np.isfinite(np.asarray(sol.shared_a)))
    assert_optimal(sol.loss, A32, B32, "shared_a", weighting="uniform")


def test_identical_adapters_merge_without_loss_at_full_rank():
    A, B = _identical(np.random.default_rng(3))
    A32, B32 = A.astype(np.float32), B.astype(np.float32)
    for plan in PLANS:
        sol = hj.merge(A32, B32, hj.SharingPlan.named(plan, T, R), solver="exact")
        assert float(np.max(np.asarray(sol.relative_error))) < 1e-5, plan


@pytest.mark.parametrize("case", ["badly scaled", "rank deficient", "zero adapters"])
def test_als_stays_finite_and_optimal(case):
    A, B = CASES[case](np.random.default_rng(4))
    A32, B32 = A.astype(np.float32), B.astype(np.float32)
    als = hj.merge(A32, B32, hj.SharingPlan.shared_a(T, K), solver="als", max_steps=20)
    assert np.all(np.isfinite(np.asarray(als.shared_a))) and int(als.result) in (0, 1)
    assert_optimal(als.loss, A32, B32, "shared_a")


@pytest.mark.parametrize(
    "case",
    [
        "badly scaled",
        "rank deficient",
        "zero adapters",
    ],
)
def test_adam_stays_finite_and_near_the_optimum(case):
    A, B = CASES[case](np.random.default_rng(4))
    A32, B32 = A.astype(np.float32), B.astype(np.float32)
    adam = hj.merge(A32, B32, hj.SharingPlan.shared_a(T, K), solver="adam", max_steps=20)
    assert np.all(np.isfinite(np.asarray(adam.shared_b)))
    best, _ = named_plan_optimum(A32, B32, "shared_a", K)
    assert float(adam.loss) <= 1.0001 * best + 1e-6  # starts at the optimum, stays there


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_half_precision_inputs_are_solved_in_float32(dtype):
    A, B = _random(np.random.default_rng(5))
    A16, B16 = A.astype(dtype), B.astype(dtype)
    sol = hj.merge(A16, B16, hj.SharingPlan.shared_a(T, K), solver="exact")
    assert np.asarray(sol.shared_a).dtype == np.float32 and np.asarray(sol.loss).dtype == np.float32
    # the optimum of the half-precision values themselves, upcast exactly
    assert_optimal(sol.loss, A16.astype(np.float64), B16.astype(np.float64), "shared_a")


def _loaded_factors(dirs):
    """`{module: (A [T, r, d_in], s B [T, d_out, r])}` in float64 from the files themselves."""
    from safetensors.numpy import load_file

    out = {}
    for t, d in enumerate(dirs):
        config = json.loads((d / "adapter_config.json").read_text())
        scale = config["lora_alpha"] / config["r"]
        tensors = load_file(str(d / "adapter_model.safetensors"))
        for key, value in tensors.items():
            module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            side = 0 if ".lora_A." in key else 1
            value = np.asarray(value, np.float64) * (scale if side else 1.0)
            out.setdefault(module, [[None] * len(dirs), [None] * len(dirs)])[side][t] = value
    return {m: (np.stack(a), np.stack(b)) for m, (a, b) in out.items()}


def test_cli_mixed_precision_and_scales_match_the_dense_optimum(tmp_path, capsys):
    """bf16, fp16 and fp32 adapters, with update norms from ~1e-6 to ~1e6, through the
    command: float32 factors, each module's loss the dense optimum; a rerun is bitwise equal."""
    modules = {"model.layers.0.q_proj": (20, 16)}
    specs = [
        (ml_dtypes.bfloat16, 1e-6),
        (np.float16, 1e-2),
        (np.float32, 1.0),
        (ml_dtypes.bfloat16, 1e2),
        (np.float32, 1e6),
    ]
    dirs = [
        write_adapter(tmp_path / f"t{i}", seed=i, modules=modules, dtype=dt, scale=sc)
        for i, (dt, sc) in enumerate(specs)
    ]
    argv = ["merge", *map(str, dirs), "--rank", str(K), "--json"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    first, second = bundle_arrays(tmp_path / "a"), bundle_arrays(tmp_path / "b")
    for key, value in first.items():
        assert value.dtype == np.float32 and np.all(np.isfinite(value))
        assert np.array_equal(value, second[key]), key  # deterministic, bitwise
    meta = json.loads((tmp_path / "a" / "hydraopt.json").read_text())
    for module, (A, B) in _loaded_factors(dirs).items():
        assert_optimal(meta["modules"][module]["loss"], A, B, "shared_a")


def test_solves_are_bitwise_deterministic():
    A, B = _badly_scaled(np.random.default_rng(6))
    A32, B32 = A.astype(np.float32), B.astype(np.float32)
    plan = hj.SharingPlan(a_group=(0, 0, 1, 1, 2), b_group=(0, 1, 1, 2, 2), rank=K)
    for solver in ("exact", "als"):
        use = hj.SharingPlan.shared_a(T, K) if solver == "exact" else plan
        one = hj.merge(A32, B32, use, solver=solver, max_steps=10)
        two = hj.merge(A32, B32, use, solver=solver, max_steps=10)
        for field in ("shared_a", "shared_b", "loss", "relative_error"):
            x, y = np.asarray(getattr(one, field)), np.asarray(getattr(two, field))
            assert np.array_equal(x, y) and np.all(np.isfinite(x)), (solver, field)


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
    from hydraopt_jax._solve import solve_jit

    hj.merge(A, B, plan, "als", init="random", max_steps=0, tol=0.0)
    before = solve_jit._cache_size()
    losses = [
        float(hj.merge(A, B, plan, "als", init="random", max_steps=n, tol=0.0).loss)
        for n in range(0, 12)
    ]
    assert solve_jit._cache_size() == before  # max_steps is traced: no recompilation
    assert all(b <= a * (1 + 1e-12) for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] < losses[0]


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


def test_randomized_subspace_iteration_matches_the_direct_solution(rng):
    A, B = random_collection(rng, num_tasks=40, rank=4, d_in=60, d_out=50)
    plan = SharingPlan.full_merge(40, 6)
    direct = hj.merge(A, B, plan, svd_method="direct")
    randomized = hj.merge(A, B, plan, svd_method="randomized")
    assert float(randomized.loss) / float(direct.loss) <= 1.0001
    shared = hj.merge(A, B, SharingPlan.shared_a(40, 6), svd_method="randomized")
    optimum = dense_optimum(A, B, SharingPlan.shared_a(40, 6), relative_weights(A, B))
    assert float(shared.loss) / optimum <= 1.0001


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
