"""Fast checks of the quality testbed: task generators, adapter loading, evaluation."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from benchmarks.testbed import tasks as T

ROOT = pathlib.Path(__file__).resolve().parents[1]

COLLECTION = ROOT / "benchmarks" / "testbed" / "adapters" / "small_lr_same_seed"
ADAPTER_TASK = "sort_L3"


def test_grid_names_and_indices():
    grid = T.all_tasks()
    assert len(grid) == 40
    assert [t.name for t in grid[:2]] == ["copy_L0", "copy_L1"]
    assert grid[-1].name == "dedup_L7"
    assert [t.index for t in grid] == list(range(40))
    assert all(T.task_from_name(t.name) == t for t in grid)
    with pytest.raises(ValueError):
        T.task_from_name("sort_L9")


def test_alphabets_are_disjoint_and_fit_the_vocab():
    letters = np.concatenate([T.alphabet(l) for l in range(T.NUM_LANGUAGES)])
    assert len(set(letters.tolist())) == letters.size
    assert letters.min() > max(T.PRETRAIN_TOKEN.values()) and letters.max() < T.VOCAB_SIZE


def test_transforms_are_correct():
    rng = np.random.default_rng(0)
    for lang in range(T.NUM_LANGUAGES):
        for x in T.sample_inputs(lang, 50, rng):
            x = list(x)
            assert T.TRANSFORMS["copy"](x) == x
            assert T.TRANSFORMS["reverse"](T.TRANSFORMS["reverse"](x)) == x
            s = T.TRANSFORMS["sort"](x)
            assert s == sorted(s) and sorted(s) == sorted(x)
            shifted = T.TRANSFORMS["shift"](x)
            assert set(shifted) <= set(T.alphabet(lang).tolist())
            # shifting ALPHABET_SIZE times is the identity; unshift undoes shift
            y = x
            for _ in range(T.ALPHABET_SIZE):
                y = T.TRANSFORMS["shift"](y)
            assert y == x and T.TRANSFORMS["unshift"](shifted) == x
            d = T.TRANSFORMS["dedup"](x)
            assert len(d) == len(set(x)) and d == sorted(set(x), key=x.index)
    assert T.TRANSFORMS["dedup"]([5, 3, 5, 5, 2, 3]) == [5, 3, 2]
    assert T.TRANSFORMS["shift"]([T.alphabet(2)[-1]]) == [T.alphabet(2)[0]]


def test_generation_is_deterministic_and_splits_disjoint():
    task = T.task_from_name("reverse_L5")
    test, val = T.heldout_inputs(task, "test"), T.heldout_inputs(task, "val")
    assert test == T.heldout_inputs(task, "test") and len(test) == T.NUM_TEST
    assert len(set(test)) == len(test) and not set(test) & set(val)
    a, b = T.TrainStream([task], 256, seed=3), T.TrainStream([task], 256, seed=3)
    heldout = set(test) | set(val)
    for _ in range(5):
        (ia, la, ma), (ib, lb, mb) = a.next_batch(), b.next_batch()
        assert (ia == ib).all() and (la == lb).all() and (ma == mb).all()
        for row, labels in zip(ia, la, strict=True):
            sep = int(np.where(row == T.SEP)[0][0])
            x = tuple(int(t) for t in row[2:sep])
            assert x not in heldout
            answer = [int(t) for t in labels[labels != -100]]
            assert answer == task.transform(list(x)) + [T.EOS]


def _adapter_dir() -> pathlib.Path:
    path = COLLECTION / ADAPTER_TASK
    if not (path / "adapter_model.safetensors").exists():
        pytest.skip(f"no committed adapter at {path}")
    return path


@pytest.fixture(scope="module")
def base_model():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from benchmarks.testbed import model as M

    torch.set_num_threads(1)
    return M.load_base_model(pretrain_if_missing=False)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_load_adapter_factors_folds_the_scale_like_peft(base_model):
    import copy

    import torch
    from peft import PeftModel

    from benchmarks.testbed.evaluate import load_adapter_factors

    path = _adapter_dir()
    factors = load_adapter_factors(path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base_model), str(path))
    checked = 0
    for name, module in peft_model.base_model.model.named_modules():
        if not hasattr(module, "get_delta_weight") or "default" not in getattr(
            module, "lora_A", {}
        ):
            continue
        a, b = factors[name]
        with torch.no_grad():
            expected = module.get_delta_weight("default").numpy()
        np.testing.assert_allclose(b @ a, expected, rtol=1e-5, atol=1e-7)
        checked += 1
    assert checked == len(factors) > 0
    config = json.loads((path / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    assert scale != 1.0  # otherwise the check above would not see a missing fold


def test_evaluation_reproduces_the_manifest(base_model):
    from benchmarks.testbed.evaluate import evaluate_task, load_adapter_factors

    path = _adapter_dir()
    manifest = json.loads((COLLECTION / "manifest.json").read_text())
    entry = manifest["tasks"][ADAPTER_TASK]
    own = evaluate_task(base_model, ADAPTER_TASK, load_adapter_factors(path))
    assert own == pytest.approx(entry["own_accuracy"], abs=1e-9) and own > 0.9
    assert evaluate_task(base_model, ADAPTER_TASK, None) == pytest.approx(
        entry["base_accuracy"], abs=1e-9
    )


def test_subspace_overlap_limits():
    from benchmarks.quality.overlap import mean_pairwise_overlap
    from hydraopt_jax import subspace_overlap

    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4))
    mixed = x @ rng.normal(size=(4, 4))  # same column space, different basis
    assert subspace_overlap(x, mixed) == pytest.approx(1.0)
    eye = np.eye(32)
    assert subspace_overlap(eye[:, :4], eye[:, 4:8]) == pytest.approx(0.0)
    assert subspace_overlap(eye[:, :4], eye[:, 2:6]) == pytest.approx(0.5)
    a = rng.normal(size=(4, 32))
    f1 = {"m": (a, rng.normal(size=(16, 4)))}
    f2 = {"m": (2 * a, rng.normal(size=(16, 4)))}
    out = mean_pairwise_overlap([f1, f2])
    assert out["a"] == pytest.approx(1.0) and 0 < out["b"] < 1
    assert out["a_random"] == pytest.approx(4 / 32) and out["b_random"] == pytest.approx(4 / 16)


def test_mean_pairwise_overlap_is_the_mean_over_pairs():
    """Bases computed once per task give the same means as `subspace_overlap` on each pair."""
    import itertools

    from benchmarks.quality.overlap import mean_pairwise_overlap
    from hydraopt_jax import subspace_overlap

    rng = np.random.default_rng(1)
    shared = rng.normal(size=(4, 32))
    tasks = [
        {m: (shared + 0.3 * rng.normal(size=(4, 32)), rng.normal(size=(16, 4))) for m in "pq"}
        for _ in range(4)
    ]
    out = mean_pairwise_overlap(tasks)
    for m in "pq":
        pairs = list(itertools.combinations(tasks, 2))
        a = np.mean([subspace_overlap(i[m][0].T, j[m][0].T) for i, j in pairs])
        b = np.mean([subspace_overlap(i[m][1], j[m][1]) for i, j in pairs])
        assert out["per_module"][m] == pytest.approx((a, b), rel=1e-12)
