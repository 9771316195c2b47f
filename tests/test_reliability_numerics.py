"""Robust numerics against dense float64 references: bf16 / fp16 inputs are solved in
float32; zero adapters, identical adapters, rank-deficient and badly scaled factors (update
norms 1e-6 to 1e6 in one collection) give finite results whose exact-solver loss equals the
dense optimum within 1e-4 relative; results are bitwise deterministic run to run."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from test_reliability_helpers import bundle_arrays, write_adapter

import hydraopt_jax as hj
from hydraopt_jax.cli import main

T, R, D_IN, D_OUT, K = 5, 4, 20, 16, 3
PLANS = ("shared_a", "shared_b", "full_merge", "separate")


# ----------------------------------------------------------------------------- reference
def dense_optimum(A, B, plan: str, k: int, weighting: str = "relative") -> tuple[float, float]:
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
    best, total = dense_optimum(A, B, plan, k, weighting)
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
    best, _ = dense_optimum(A32, B32, "shared_a", K)
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
