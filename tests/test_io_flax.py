"""Flax NNX LoRAs in and out: NNX models -> the PEFT reader's collection -> merge -> back into
NNX, exact for `separate`, the solver's optimum for `shared-a`; malformed trees refused with
one line, as PEFT input is."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hydraopt_jax as hj
from hydraopt_jax.io import AdapterError
from hydraopt_jax.io.flax import bundle_param_tree, from_nnx, nnx_lora_params, to_nnx

D, RANK, TASKS = 12, 3, 4


class Block(nnx.Module):
    def __init__(self, rank: int, seed: int):
        rngs = nnx.Rngs(seed)
        self.q = nnx.LoRALinear(D, D, lora_rank=rank, rngs=rngs)
        self.k = nnx.LoRALinear(D, D // 2, lora_rank=rank, rngs=rngs)


class Model(nnx.Module):
    """Two blocks of LoRA linears (GQA-like `k` narrower than `q`); the base weights come
    from `seed` alone, the LoRA `B` factors from `task` (NNX initialises them at zero)."""

    def __init__(self, rank: int = RANK, seed: int = 0, task: int | None = None):
        self.layers = nnx.List([Block(rank, seed + i) for i in range(2)])
        if task is not None:
            rng = np.random.default_rng(task)
            for _, module in nnx.iter_modules(self):
                if isinstance(module, nnx.LoRA):
                    shape = module.lora_b.get_value().shape
                    module.lora_b.set_value(jnp.asarray(rng.normal(size=shape), jnp.float32))
                    a = module.lora_a.get_value()  # A near one shared init, as real LoRAs
                    module.lora_a.set_value(
                        a + 0.1 * jnp.asarray(rng.normal(size=a.shape), a.dtype)
                    )

    def __call__(self, x):
        h = x
        for block in self.layers:
            h = jnp.tanh(block.q(h)) + jnp.pad(block.k(h), ((0, 0), (0, D // 2)))
        return h


def _updates(model) -> dict[str, np.ndarray]:
    """DENSE REFERENCE: each LoRA's `dW = lora_b^T lora_a^T` (`[d_out, d_in]`)."""
    params = nnx_lora_params(model)
    return {m: (p["lora_a"] @ p["lora_b"]).T.astype(np.float64) for m, p in params.items()}


@pytest.fixture(scope="module")
def models():
    return {f"task{t}": Model(task=t) for t in range(TASKS)}


def test_nnx_loras_read_as_the_peft_readers_collection(models):
    collection = from_nnx(models)
    assert collection.names == tuple(models)
    assert sorted(collection.modules) == ["layers.0.k", "layers.0.q", "layers.1.k", "layers.1.q"]
    info = collection.modules["layers.0.k"]
    assert (info.d_in, info.d_out, info.ranks) == (D, D // 2, (RANK,) * TASKS)
    a, b = collection.adapters[2].load_factors(["layers.1.q"])["layers.1.q"]
    np.testing.assert_array_equal(b @ a, _updates(models["task2"])["layers.1.q"].astype(np.float32))


def test_separate_round_trip_is_exact(models, tmp_path):
    bundle = hj.merge_collection(from_nnx(models), "separate", out=tmp_path / "b")
    x = jnp.asarray(np.random.default_rng(9).normal(size=(5, D)), jnp.float32)
    for task, model in models.items():
        target = Model(rank=7, seed=0)  # same base weights; any LoRA rank is replaced
        to_nnx(target, hj.io.load_bundle(tmp_path / "b"), task)
        for name, update in _updates(target).items():
            np.testing.assert_allclose(update, _updates(model)[name], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(target(x), model(x), rtol=1e-5, atol=1e-5)
    assert bundle.storage_ratio == pytest.approx(1.0)


def test_shared_a_task_in_nnx_equals_the_solvers_optimum_and_the_dense_reference(models):
    collection = from_nnx(models)
    bundle = hj.merge_collection(collection, "shared-a", rank=RANK)
    solutions = {}
    for _, group in collection.iter_groups():
        solutions.update(hj.merge_adapters(group, hj.SharingPlan.shared_a(TASKS, RANK)))
    target = to_nnx(Model(seed=0), bundle, "task1")
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, D)), jnp.float32)
    for name, update in _updates(target).items():
        a_hat, b_hat = solutions[name].task_factors(1)
        np.testing.assert_allclose(update, np.float64(b_hat) @ np.float64(a_hat), atol=1e-5)
    # the model's outputs are those of the dense reference: base + dW_hat applied densely
    dense = Model(seed=0)
    for _, module in nnx.iter_modules(dense):
        if isinstance(module, nnx.LoRA):
            module.lora_b.set_value(jnp.zeros_like(module.lora_b.get_value()))
    h = x
    for i, block in enumerate(dense.layers):
        q = block.q(h) + h @ _updates(target)[f"layers.{i}.q"].T.astype(np.float32)
        k = block.k(h) + h @ _updates(target)[f"layers.{i}.k"].T.astype(np.float32)
        h = jnp.tanh(q) + jnp.pad(k, ((0, 0), (0, D // 2)))
    np.testing.assert_allclose(target(x), h, rtol=1e-5, atol=1e-5)


def test_parameter_trees_with_other_names(models):
    """An Orbax-restored parameter tree (plain nested dicts) with its own leaf names, and a
    mapping of its paths to the names the user wants."""
    tree = {
        "enc": {"0": {"wq": {"down": np.ones((D, 2), np.float32), "up": np.ones((2, D))}}},
    }
    collection = from_nnx({"t": tree}, a_key="down", b_key="up",
                          module_names={"enc.0.wq": "model.layers.0.q_proj"})  # fmt: skip
    assert list(collection.modules) == ["model.layers.0.q_proj"]
    a, b = collection.adapters[0].load_factors(["model.layers.0.q_proj"])["model.layers.0.q_proj"]
    np.testing.assert_array_equal(b @ a, np.full((D, D), 2.0, np.float32))


def test_a_bundle_as_a_parameter_tree(models):
    bundle = hj.merge_collection(from_nnx(models), "shared-a", rank=2)
    tree = bundle_param_tree(bundle)
    assert sorted(tree) == sorted(models)
    leaf = tree["task3"]["layers"]["1"]["k"]
    assert leaf["lora_a"].shape == (D, 2) and leaf["lora_b"].shape == (2, D // 2)
    a, b = bundle.modules["layers.1.k"].task_factors(3)
    np.testing.assert_array_equal(leaf["lora_a"] @ leaf["lora_b"], (b @ a).T)


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"q": {"lora_a": np.ones((4, 2))}}, "<nnx bad>: module q: lora_a without lora_b"),
        (
            {"q": {"lora_a": np.ones((4, 2)), "lora_b": np.ones((3, 4))}},
            r"<nnx bad>: module q: lora_a \[4, 2\] and lora_b \[3, 4\] do not fit",
        ),
        ({"q": {"kernel": np.ones((4, 4))}}, "<nnx bad>: no LoRA parameters"),
    ],
)
def test_malformed_trees_are_refused_with_one_line(tree, message):
    with pytest.raises(AdapterError, match=message) as err:
        from_nnx({"bad": tree})
    assert "\n" not in str(err.value)


def test_non_finite_factors_are_refused_when_read():
    tree = {"q": {"lora_a": np.ones((4, 2), np.float32), "lora_b": np.full((2, 4), np.nan)}}
    collection = from_nnx({"bad": tree})
    with pytest.raises(AdapterError, match=r"^<nnx bad>: tensor .*q.lora_B.* has NaN or Inf"):
        collection.load_group(list(collection.modules))


def test_to_nnx_refuses_a_model_without_the_modules(models):
    bundle = hj.merge_collection(from_nnx(models), "shared-a")

    class Other(nnx.Module):
        def __init__(self):
            self.v = nnx.LoRALinear(D, D, lora_rank=2, rngs=nnx.Rngs(0))

    with pytest.raises(AdapterError, match="has no nnx.LoRA in the model"):
        to_nnx(Other(), bundle, "task0")
