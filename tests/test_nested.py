"""Nested ranks: a shared factor of rank `k` with, per task, a rank-`j_t` factor inside it.

Against a dense float64 reference of the nested objective; the ordering it must respect
(per-task truncation at rank `j` <= nested `(k, j)` <= shared at rank `j`, all in one
weighted loss); storage; `j_t = k` is the plain plan; bundles, plan files and PEFT export."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hydraopt_jax as hj
from hydraopt_jax import SharingPlan
from tests.helpers.references import dense_updates, random_collection, relative_weights


def dense_nested_start(A, B, plan: SharingPlan, weights) -> float:
    """DENSE REFERENCE of the closed-form start (shared-A side, one A-group): `Ah` = the top-k
    right singular vectors of the stacked `sqrt(w_t) dW_t`, then each task's best rank-`j_t`
    factor inside `Ah`'s span (truncated SVD of `dW_t Ah^T`). Returns the weighted loss."""
    dense, w, k = dense_updates(A, B), np.asarray(weights, np.float64), plan.rank
    stacked = np.concatenate([np.sqrt(w[t]) * dense[t] for t in range(len(w))], axis=0)
    ah = np.linalg.svd(stacked, full_matrices=False)[2][:k]
    loss = 0.0
    for t, j in enumerate(plan.task_rank):
        u, s, vt = np.linalg.svd(dense[t] @ ah.T, full_matrices=False)
        approx = (u[:, :j] * s[:j]) @ vt[:j] @ ah
        loss += w[t] * np.sum((dense[t] - approx) ** 2)
    return loss


def dense_loss(A, B, sol, weights) -> float:
    dense, total, weights = dense_updates(A, B), 0.0, np.asarray(weights, np.float64)
    for t in range(A.shape[0]):
        a, b = (np.asarray(x, np.float64) for x in sol.task_factors(t))
        total += weights[t] * np.sum((dense[t] - b @ a) ** 2)
    return total


def test_closed_form_start_equals_the_dense_reference(rng):
    A, B = random_collection(rng, num_tasks=5, rank=4, d_in=30, d_out=18)
    plan = SharingPlan.shared_a(5, 6).with_task_rank([1, 2, 3, 2, 1])
    sol = hj.merge(A, B, plan)
    w = relative_weights(A, B)
    assert sol.core == "nested" and int(sol.steps) == 0
    np.testing.assert_allclose(float(sol.loss), dense_nested_start(A, B, plan, w), rtol=1e-8)
    np.testing.assert_allclose(float(sol.loss), dense_loss(A, B, sol, w), rtol=1e-8)
    dense = dense_updates(A, B)
    for t in range(5):
        a, b = (np.asarray(x, np.float64) for x in sol.task_factors(t))
        error = np.linalg.norm(dense[t] - b @ a) / np.linalg.norm(dense[t])
        np.testing.assert_allclose(float(sol.relative_error[t]), error, rtol=1e-7)


@pytest.mark.parametrize("side", ["a", "b"])
def test_als_and_adam_refine_the_start_and_agree_with_the_dense_loss(rng, side):
    A, B = random_collection(rng, num_tasks=6, rank=4, d_in=24, d_out=20, drift=0.6)
    base = SharingPlan.shared_a(6, 5) if side == "a" else SharingPlan.shared_b(6, 5)
    plan = base.with_task_rank(2)
    w = relative_weights(A, B)
    start = hj.merge(A, B, plan)
    als = hj.merge(A, B, plan, "als", max_steps=300, tol=1e-12)
    adam = hj.merge(A, B, plan, "adam", max_steps=3000, tol=1e-12, init=start)
    for sol in (start, als, adam):
        np.testing.assert_allclose(float(sol.loss), dense_loss(A, B, sol, w), rtol=1e-7)
    assert float(als.loss) < float(start.loss) * (1 - 1e-4)  # refinement pays here
    assert float(adam.loss) <= float(start.loss)
    assert float(adam.loss) <= float(als.loss) * 1.01  # both find (about) the same optimum


def test_als_never_increases_the_loss(rng):
    A, B = random_collection(rng, num_tasks=5, rank=3, drift=0.8)
    plan = SharingPlan.from_labels([0, 0, 1, 1, 1], None, 4).with_task_rank([1, 2, 1, 2, 1])
    losses = [float(hj.merge(A, B, plan, "als", max_steps=n, tol=-1.0).loss) for n in range(6)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(losses, losses[1:], strict=False))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_tasks=st.integers(2, 6),
    r=st.integers(1, 4),
    extra=st.integers(0, 4),
    j=st.integers(1, 4),
    side=st.sampled_from("ab"),
    seed=st.integers(0, 2**16),
)
@pytest.mark.slow
def test_nested_sits_between_truncation_and_sharing_at_rank_j(num_tasks, r, extra, j, side, seed):
    """Per-task truncation at rank `j` <= nested `(k, j)` <= shared at rank `j`: the top-`j`
    shared subspace lies inside the top-`k` one, and truncation is the unrestricted optimum."""
    j = min(j, r)
    k = j + extra
    rng = np.random.default_rng(seed)
    A, B = random_collection(rng, num_tasks=num_tasks, rank=r, d_in=14, d_out=11, drift=0.5)
    shared = SharingPlan.shared_a if side == "a" else SharingPlan.shared_b
    truncation = float(hj.merge(A, B, SharingPlan.separate(num_tasks, j)).loss)
    nested = float(hj.merge(A, B, shared(num_tasks, k).with_task_rank(j)).loss)
    sharing = float(hj.merge(A, B, shared(num_tasks, j)).loss)
    scale = float(num_tasks)  # the loss at zero, with relative weights
    assert truncation <= nested + 1e-9 * scale
    assert nested <= sharing + 1e-9 * scale


def test_task_rank_equal_to_k_is_the_plain_plan(rng):
    A, B = random_collection(rng, num_tasks=4, rank=3)
    plain = hj.merge(A, B, SharingPlan.shared_a(4, 3))
    same = hj.merge(A, B, SharingPlan.shared_a(4, 3).with_task_rank(3))
    assert same.core is None and same.cores is None and same.plan == plain.plan
    np.testing.assert_array_equal(same.shared_a, plain.shared_a)
    np.testing.assert_array_equal(same.shared_b, plain.shared_b)


def test_storage_counts_the_shared_factor_once_and_each_tasks_inner_factor():
    plan = SharingPlan.shared_a(4, 16).with_task_rank([1, 2, 2, 4])
    assert plan.num_params(576, 192) == 16 * 576 + 9 * (192 + 16)
    mirror = SharingPlan.shared_b(4, 16).with_task_rank(2)
    assert mirror.num_params(576, 192) == 192 * 16 + 8 * (576 + 16)
    assert plan.name == "shared_a+nested" and plan.nested_side == "b"
    assert mirror.nested_side == "a"


@pytest.mark.parametrize("with_cov", [False, True])
def test_own_ranks_are_each_tasks_truncation_whatever_the_solver(rng, with_cov):
    """`separate` with a rank per task (`own_ranks`): each task's best rank-`j_t`
    approximation (a dense SVD here, in the activation metric with a covariance), stored at
    `sum_t j_t (d_in + d_out)`; iterative solvers give the same closed form."""
    A, B = random_collection(rng, num_tasks=4, rank=6)
    js = (1, 3, 6, 2)
    plan = SharingPlan.separate(4, 6).with_task_rank(js)
    assert plan.own_ranks and not plan.nested and plan.nested_side is None
    assert plan.name == "separate+ranks" and plan.num_params(20, 14) == 12 * 34
    d_in = A.shape[2]
    cov = None
    half = np.eye(d_in)
    if with_cov:
        x = rng.normal(size=(3 * d_in, d_in))
        cov = x.T @ x / len(x)
        half = np.linalg.cholesky(hj._loss.regularized_covariance(cov, np))
    expected = []
    for t, j in enumerate(js):
        s = np.linalg.svd(B[t] @ A[t] @ half, compute_uv=False)
        expected.append(np.sqrt(np.sum(s[j:] ** 2) / np.sum(s**2)))
    for solver in ("exact", "als", "adam"):
        sol = hj.merge(A, B, plan, solver, activation_cov=cov)
        assert sol.core is None and sol.num_params == plan.num_params(d_in, B.shape[1])
        np.testing.assert_allclose(sol.relative_error, expected, rtol=1e-5, atol=1e-7)
        for t, j in enumerate(js):
            a, b = sol.task_factors(t)
            assert a.shape == (j, d_in) and b.shape == (B.shape[1], j)
    same = hj.merge(A, B, SharingPlan.separate(4, 6).with_task_rank(6))
    assert not same.plan.own_ranks and same.plan == SharingPlan.separate(4, 6)


def test_bad_nested_plans_are_refused_with_what_arrived():
    with pytest.raises(ValueError, match=r"task_rank \[3, 9\] exceeds the shared rank 4"):
        SharingPlan.shared_a(2, 4).with_task_rank([3, 9])
    with pytest.raises(ValueError, match="one side with a factor per task"):
        SharingPlan.full_merge(3, 4).with_task_rank(2)
    with pytest.raises(ValueError, match="one integer >= 1 per task"):
        SharingPlan.shared_a(3, 4).with_task_rank([1, 2])


def test_merge_adapters_leaves_absent_tasks_out_of_nested_plans(rng):
    A, B = random_collection(rng, num_tasks=4, rank=3, dtype=np.float32)
    ranks = (3, 0, 2, 3)
    A[1], B[1] = 0, 0
    plan = SharingPlan.shared_a(4, 5).with_task_rank([2, 1, 1, 2])
    sols = hj.merge_adapters({"m": (A, B, ranks)}, plan)
    sol = sols["m"]
    assert sol.task_ids == (0, 2, 3) and sol.plan.task_rank == (2, 1, 2)
    np.testing.assert_allclose(
        float(sol.loss), dense_loss(A[[0, 2, 3]], B[[0, 2, 3]], sol, sol.weights), rtol=1e-5
    )


def test_plan_files_carry_nested_ranks():
    from hydraopt_jax.planner import plans_from_config

    tasks = ["qa_fr", "qa_de", "chat_fr"]
    spec = {"a": "shared", "rank": 8, "task_rank": {"qa_*": 2}}
    plan = plans_from_config(spec, tasks, ["m"])
    assert plan.task_rank == (2, 2, 8) and plan.rank == 8
    assert plans_from_config(
        {"a": "shared", "rank": 8, "task_rank": 3}, tasks, ["m"]
    ).task_rank == (3, 3, 3)
    from hydraopt_jax.io import AdapterError

    with pytest.raises(AdapterError, match="exceeds the shared rank 8"):
        plans_from_config({"a": "shared", "rank": 8, "task_rank": 9}, tasks, ["m"])
    with pytest.raises(AdapterError, match="needs one side with a factor per task|one side"):
        plans_from_config({"a": "shared", "b": "shared", "rank": 8, "task_rank": 2}, tasks, ["m"])


@pytest.mark.parametrize("side", ["a", "b", "own"])
def test_export_gives_peft_adapters_of_rank_j_exact_against_the_bundle(tmp_path, side):
    """A nested bundle exported: each task's adapter has rank `j_t` (`lora_A = V_t^T Ah`,
    `lora_B = U_t`, or the mirror image; its own truncation for `own_ranks`), PEFT loads
    it, and its deltas equal the bundle's reconstruction; `bfloat16` export works too."""
    from hydraopt_jax.io import export_peft, load_bundle, load_collection, load_peft_adapter
    from tests.helpers.peft_models import (
        as_update,
        llama_adapters,
        peft_deltas,
        rel_err,
        tiny_llama,
    )

    collection = load_collection(llama_adapters())
    shared = {"a": SharingPlan.shared_a, "b": SharingPlan.shared_b, "own": SharingPlan.separate}
    plan = shared[side](collection.num_tasks, 4).with_task_rank([1, 2, 3])
    bundle = hj.merge_collection(collection, plan, out=tmp_path / "bundle")
    back = load_bundle(tmp_path / "bundle")
    cores = {m.core for m in back.modules.values()}
    # (a module only one task adapts keeps that task's own truncation: no cores)
    assert cores == {None} if side == "own" else cores == {None, "nested"}
    export_peft(back, tmp_path / "peft")
    for t, task in enumerate(collection.names):
        config = json.loads((tmp_path / "peft" / task / "adapter_config.json").read_text())
        adapter = load_peft_adapter(tmp_path / "peft" / task)
        for spec in adapter.modules.values():
            assert spec.rank == [1, 2, 3][t]
        deltas = peft_deltas(tiny_llama(), tmp_path / "peft" / task)
        for name, (delta, fan, kind) in deltas.items():
            module = bundle.modules[name]
            a, b = module.task_factors(module.task_ids.index(t))
            assert rel_err(as_update(delta, fan, kind), b.astype(np.float64) @ a) < 1e-6
        assert config["r"] == config["lora_alpha"] == [1, 2, 3][t]
    export_peft(back, tmp_path / "bf16", dtype="bfloat16")
    deltas = peft_deltas(tiny_llama(), tmp_path / "bf16" / collection.names[2])
    module = bundle.modules[next(iter(deltas))]
    a, b = module.task_factors(module.task_ids.index(2))
    delta, fan, kind = next(iter(deltas.values()))
    assert rel_err(as_update(delta, fan, kind), b.astype(np.float64) @ a) < 2e-2


@pytest.mark.parametrize("side", ["a", "b", "own"])
def test_bundles_store_uneven_task_ranks_packed_without_padding(tmp_path, side):
    """In memory per-task factors are padded to `j_max`; the file packs them task by task
    (`"packed": true`), so it holds exactly `num_params` values per module; a version-2
    bundle (padded) still reads the same, and a packed tensor of the wrong size is refused."""
    from safetensors.numpy import load_file, save_file

    from hydraopt_jax.io import AdapterError, load_bundle, load_collection
    from hydraopt_jax.io._files import read_safetensors_header
    from tests.helpers.peft_models import llama_adapters

    collection = load_collection(llama_adapters())
    shared = {"a": SharingPlan.shared_a, "b": SharingPlan.shared_b, "own": SharingPlan.separate}
    plan = shared[side](collection.num_tasks, 4).with_task_rank([1, 3, 2])
    bundle = hj.merge_collection(collection, plan, out=tmp_path / "bundle")
    meta = json.loads((tmp_path / "bundle" / "hydraopt.json").read_text())
    header = read_safetensors_header(tmp_path / "bundle" / "factors.safetensors")
    packed = [name for name, m in meta["modules"].items() if m.get("packed")]
    assert meta["format_version"] == 3 and packed  # (a module one task adapts has one rank)
    for name, m in meta["modules"].items():
        mine = [shape for key, (shape, _) in header.items() if key.startswith(f"modules/{name}/")]
        stored = sum(int(np.prod(shape)) for shape in mine)
        assert stored == m["num_params"] == bundle.modules[name].num_params
    back = load_bundle(tmp_path / "bundle")
    for name, module in bundle.modules.items():
        for key in ("shared_a", "shared_b", "cores"):
            np.testing.assert_array_equal(getattr(back.modules[name], key), getattr(module, key))
    # the same bundle as version 2 wrote it: padded, no "packed"
    tensors = load_file(str(tmp_path / "bundle" / "factors.safetensors"))
    for name in packed:
        for key in ("shared_a", "shared_b", "cores"):
            if getattr(bundle.modules[name], key) is not None:
                tensors[f"modules/{name}/{key}"] = np.asarray(getattr(bundle.modules[name], key))
        del meta["modules"][name]["packed"]
    meta["format_version"] = 2
    old = tmp_path / "old"
    old.mkdir()
    save_file(tensors, str(old / "factors.safetensors"))
    (old / "hydraopt.json").write_text(json.dumps(meta))
    again = load_bundle(old)
    for name, module in bundle.modules.items():
        np.testing.assert_array_equal(again.modules[name].shared_b, module.shared_b)
        assert again.task_relative_errors() == back.task_relative_errors()
    # a packed tensor (2-D: task by task along its rank axis) cut short
    tensors = load_file(str(tmp_path / "bundle" / "factors.safetensors"))
    key = next(k for k, x in tensors.items() if k.startswith("modules/") and x.ndim == 2)
    tensors[key] = tensors[key][:-1, :-1]
    save_file(tensors, str(tmp_path / "bundle" / "factors.safetensors"))
    with pytest.raises(AdapterError, match=r"hydraopt.json: malformed .*packed \w+ has shape"):
        load_bundle(tmp_path / "bundle")


def test_own_ranks_are_padded_to_their_largest_task_rank_not_to_k(rng):
    A, B = random_collection(rng, num_tasks=3, rank=6)
    sol = hj.merge(A, B, SharingPlan.separate(3, 6).with_task_rank([1, 2, 1]))
    assert sol.plan.rank == 2 and sol.shared_a.shape == (3, 2, A.shape[2])
    assert sol.shared_b.shape == (3, B.shape[1], 2) and sol.num_params == 4 * (20 + 16)
    same = hj.merge(A, B, SharingPlan.separate(3, 6).with_task_rank([2, 2, 2]))
    assert same.plan == SharingPlan.separate(3, 2)  # every task at one rank: a plain plan


@pytest.mark.parametrize("plan", [SharingPlan.shared_a(4, 12), SharingPlan.shared_b(4, 24)])
def test_a_shared_rank_above_the_shared_sides_dimension_keeps_the_plans_shapes(rng, plan):
    """`k` above `d_in` (shared A) or `d_out` (shared B): the shared factor keeps `k` rows
    (zero beyond the dimension), as the plain plan does, and the fit is still exact."""
    A, B = random_collection(rng, num_tasks=4, rank=3, d_in=10, d_out=20)
    nested = plan.with_task_rank([1, 2, 2, 3])
    sol = hj.merge(A, B, nested)
    expect = hj._solution.factor_shapes(sol.plan, "nested", 10, 20)
    assert {"shared_a": sol.shared_a.shape, "shared_b": sol.shared_b.shape,
            "cores": sol.cores.shape} == expect  # fmt: skip
    w = relative_weights(A, B)
    np.testing.assert_allclose(float(sol.loss), dense_loss(A, B, sol, w), rtol=1e-8)
    truncation = hj.merge(A, B, SharingPlan.separate(4, 3).with_task_rank([1, 2, 2, 3]))
    assert float(sol.loss) <= float(truncation.loss) * (1 + 1e-8)  # k >= every rank: no loss


def test_a_start_of_other_shapes_is_refused_and_a_shared_factor_alone_is_a_start(rng):
    A, B = random_collection(rng, num_tasks=3, rank=4)
    two = hj.merge(A, B, SharingPlan.shared_a(3, 6).with_task_rank(2))
    three = SharingPlan.shared_a(3, 6).with_task_rank(3)
    with pytest.raises(
        ValueError, match=r"init shared_b has shape \[3, 16, 2\].*needs \[3, 16, 3\]"
    ):
        hj.merge(A, B, three, "adam", init=two)
    with pytest.raises(ValueError, match="init holds 3 arrays; this plan takes"):
        hj.merge(A, B, SharingPlan.shared_a(3, 6), "adam", init=two)
    with pytest.raises(ValueError, match=r"\(m\): init shared_a has shape"):
        hj.merge_adapters({"m": (A, B)}, three, "als", init={"m": (two.shared_a[:, :5], None)})
    # (shared_a, shared_b) of any shared-A solution at rank k: its shared factor starts the run
    start = hj.merge(A, B, three)
    plain = hj.merge(A, B, SharingPlan.shared_a(3, 6))
    tiny = hj.merge(A, B, three, "adam", init=(plain.shared_a, plain.shared_b), max_steps=1,
                    learning_rate=1e-12)  # fmt: skip
    np.testing.assert_allclose(float(tiny.loss), float(start.loss), rtol=1e-6)


def test_padding_beyond_a_tasks_rank_is_not_fitted_whatever_the_transformation(rng):
    """An Optax transformation that moves zero-gradient entries (here: gradient noise) cannot
    put anything in the padding: the objective ignores it and the solve zeroes it, so the
    reported loss is that of the factors every consumer uses (`task_factors`)."""
    import optax

    A, B = random_collection(rng, num_tasks=4, rank=4)
    plan = SharingPlan.shared_b(4, 6).with_task_rank([1, 3, 2, 3])
    tx = optax.chain(optax.add_noise(0.01, 0.55, 0), optax.adam(1e-2))
    sol = hj.merge(A, B, plan, tx, max_steps=300)
    np.testing.assert_allclose(
        float(sol.loss), dense_loss(A, B, sol, relative_weights(A, B)), rtol=1e-6
    )
    for t, j in enumerate(plan.task_rank):
        group = sol.plan.a_group[t]
        assert not np.any(np.asarray(sol.shared_a)[group, j:]) and not np.any(sol.cores[t][:, j:])


def test_task_ranks_all_equal_to_k_count_as_the_plain_plan_and_arrays_are_accepted():
    plan = SharingPlan.shared_a(4, 8)
    assert plan.with_task_rank(8).num_params(16, 12) == plan.num_params(16, 12) == 8 * 16 + 4 * 96
    assert plan.with_task_rank(np.array([1, 2, 2, 8])).task_rank == (1, 2, 2, 8)
