"""`hydraopt_jax.serve`: a bundle applied to a mixed batch of tasks equals applying each
task's adapter on its own, for every kind of plan, under `jit`, holding only the factors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hydraopt_jax as hj
from hydraopt_jax import SharingPlan
from hydraopt_jax.io import Bundle, BundleModule
from hydraopt_jax.serve import grouped_project, lora_apply, prepare

T, R, D_IN, D_OUT = 6, 4, 24, 20
PLANS = {
    "shared_a": SharingPlan.shared_a(T),
    "shared_b": SharingPlan.shared_b(T),
    "full_merge": SharingPlan.full_merge(T),
    "separate": SharingPlan.separate(T),
    "a_groups": SharingPlan.from_labels([0, 0, 1, 1, 2, 2], None),
    "b_groups": SharingPlan.from_labels(None, [0, 1, 0, 1, 0, 1]),
    "a_per_lang_b_per_app": SharingPlan.from_labels([0, 1, 0, 1, 0, 1], [0, 0, 1, 1, 2, 2]),
    "nested_a": SharingPlan.shared_a(T, 6).with_task_rank([1, 2, 3, 2, 1, 3]),
    "nested_b": SharingPlan.shared_b(T, 5).with_task_rank(2),
    "own_ranks": SharingPlan.separate(T, 4).with_task_rank([1, 4, 2, 3, 1, 2]),
}


def _bundle(rng, modules) -> Bundle:
    """A bundle of merged modules: `{name: (Solution, task_ids)}` over `T` tasks."""
    out = {}
    for name, (sol, task_ids) in modules.items():
        out[name] = BundleModule(
            name, "linear", sol.d_in, sol.d_out, tuple(task_ids), (R,) * len(task_ids),
            sol.plan, np.asarray(sol.shared_a), np.asarray(sol.shared_b),
            tuple(np.asarray(sol.relative_error)), tuple(np.asarray(sol.task_sq_norms)),
            cores=None if sol.cores is None else np.asarray(sol.cores), core=sol.core,
        )  # fmt: skip
    return Bundle(tasks=tuple(f"t{i}" for i in range(T)), modules=out, task_configs={}, carried={})


def _per_task(bundle: Bundle, module: str, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Each row through its own task's adapter (`B_hat A_hat x`), one task at a time."""
    m = bundle.modules[module]
    out = np.zeros((len(x), m.d_out))
    for n, t in enumerate(ids):
        if t in m.task_ids:
            a, b = m.task_factors(m.task_ids.index(t))
            out[n] = b.astype(np.float64) @ (a.astype(np.float64) @ x[n])
    return out


def _random(rng, num_tasks=T, rank=R):
    A = rng.normal(size=(num_tasks, rank, D_IN)).astype(np.float32)
    B = rng.normal(size=(num_tasks, D_OUT, rank)).astype(np.float32)
    return A, B


@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_mixed_batch_equals_each_task_on_its_own(rng, plan_name):
    A, B = _random(rng)
    plan = PLANS[plan_name]
    sol = hj.merge(A, B, plan, "exact" if plan.has_closed_form else "als", max_steps=5)
    bundle = _bundle(rng, {"m": (sol, range(T))})
    x = rng.normal(size=(53, D_IN)).astype(np.float32)
    ids = rng.integers(0, T, 53)
    served = prepare(bundle)
    y = jax.jit(lora_apply, static_argnames="module")(served, "m", x, ids)
    np.testing.assert_allclose(y, _per_task(bundle, "m", x, ids), rtol=2e-5, atol=2e-4)


def test_baseline_cores_absent_tasks_mixed_ranks_and_batched_inputs(rng):
    """A shared-basis baseline (per-task cores), a module some tasks lack, mixed ranks, and
    `[batch, seq, d]` inputs with one task per sequence."""
    A, B = _random(rng)
    A[2, 2:], B[2, :, 2:] = 0, 0  # task 2 has rank 2
    pca = hj.baselines.run_baseline("pca", A, B, rank=3)
    present = [0, 2, 3, 5]
    sub = hj.merge(A[present], B[present], SharingPlan.shared_a(4), task_ranks=[4, 2, 4, 4])
    bundle = _bundle(rng, {"pca": (pca, range(T)), "some": (sub, present)})
    served = prepare(bundle)
    x = rng.normal(size=(3, 7, D_IN)).astype(np.float32)
    seq_task = np.array([1, 2, 5])
    for module in ("pca", "some"):
        y = lora_apply(served, module, x, seq_task[:, None])
        assert y.shape == (3, 7, D_OUT)
        ref = _per_task(bundle, module, x.reshape(-1, D_IN), np.repeat(seq_task, 7))
        np.testing.assert_allclose(y.reshape(-1, D_OUT), ref, rtol=2e-5, atol=2e-4)
    # task 1 has no adapter on "some": its rows get no update
    assert np.all(np.asarray(lora_apply(served, "some", x, seq_task[:, None]))[0] == 0)


def test_memory_held_is_the_bundles_factors(rng):
    A, B = _random(rng, num_tasks=T)
    plans = {"sa": PLANS["shared_a"], "nested": PLANS["nested_a"], "grouped": PLANS["a_groups"]}
    bundle = _bundle(rng, {n: (hj.merge(A, B, p), range(T)) for n, p in plans.items()})
    served = prepare(bundle)
    for name, module in bundle.modules.items():
        stored = module.shared_a.size + module.shared_b.size
        stored += 0 if module.cores is None else module.cores.size
        assert served.modules[name].num_params == stored
        # no dense or per-task expanded factor: nothing larger than the shared factors
        biggest = max(x.size for x in jax.tree_util.tree_leaves(served.modules[name]))
        assert biggest <= max(module.shared_a.size, module.shared_b.size)
    per_task_adapters = T * R * (D_IN + D_OUT)
    assert served.modules["sa"].num_params < 0.6 * per_task_adapters


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 70),
    groups=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    skew=st.booleans(),
)
def test_grouped_project_equals_the_dense_reference(rows, groups, seed, skew):
    """Each group's factor applied to its rows, whatever the sizes (empty groups, one group
    with every row, chunks cut at group boundaries)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 9)).astype(np.float32)
    factors = rng.normal(size=(groups, 5, 9)).astype(np.float32)
    group = (rng.integers(0, 2, rows) if skew else rng.integers(0, groups, rows)) % groups
    out = grouped_project(jnp.asarray(x), jnp.asarray(factors), jnp.asarray(group, jnp.int32))
    ref = np.einsum("nkd,nd->nk", factors[group], x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)


def test_unknown_module_is_refused(rng):
    A, B = _random(rng)
    bundle = _bundle(rng, {"m": (hj.merge(A, B, PLANS["shared_a"]), range(T))})
    with pytest.raises(KeyError, match="module 'q' is not in the bundle"):
        lora_apply(bundle, "q", np.zeros((1, D_IN), np.float32), [0])


def test_nnx_model_serves_every_task_of_a_bundle_at_once(rng):
    """A Flax NNX model whose `nnx.Linear` layers are wrapped by `serve.nnx.wrap_nnx`: one
    forward pass of a batch of sequences of different tasks equals each sequence through its
    own task's adapter added to the base layers."""
    from flax import nnx

    from hydraopt_jax.serve.nnx import MultiTaskLoRALinear, set_task_ids, wrap_nnx

    class Model(nnx.Module):
        def __init__(self):
            self.q = nnx.Linear(D_IN, D_OUT, rngs=nnx.Rngs(0))
            self.o = nnx.Linear(D_OUT, D_IN, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.o(jnp.tanh(self.q(x)))

    A, B = _random(rng)
    A2 = rng.normal(size=(T, R, D_OUT)).astype(np.float32)
    B2 = rng.normal(size=(T, D_IN, R)).astype(np.float32)
    bundle = _bundle(rng, {
        "q": (hj.merge(A, B, PLANS["shared_a"]), range(T)),
        "o": (hj.merge(A2, B2, PLANS["nested_b"]), range(T)),
    })  # fmt: skip
    x = rng.normal(size=(3, 5, D_IN)).astype(np.float32)
    seq_task = np.array([4, 0, 4])
    reference = []
    for s, t in enumerate(seq_task):
        plain = Model()
        aq, bq = bundle.modules["q"].task_factors(t)
        ao, bo = bundle.modules["o"].task_factors(t)
        h = np.tanh(np.asarray(plain.q(x[s])) + x[s] @ aq.T @ bq.T)
        reference.append(np.asarray(plain.o(h)) + h @ ao.T @ bo.T)
    model = wrap_nnx(Model(), prepare(bundle))
    assert isinstance(model.q, MultiTaskLoRALinear) and isinstance(model.o, MultiTaskLoRALinear)
    set_task_ids(model, seq_task[:, None])
    np.testing.assert_allclose(model(x), np.stack(reference), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no nnx.Linear of the model matches"):
        wrap_nnx(Model(), prepare(bundle), module_names={"q": "x", "o": "y"})
