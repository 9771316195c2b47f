"""Bundle: exact round trip, atomic writes, refusal to clobber, contiguous safetensors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hydraopt_jax.io import AdapterError, is_bundle, load_bundle, save_bundle, write_safetensors
from hydraopt_jax.io._files import read_safetensors
from tests.helpers.peft_models import gpt2_adapter, hand_bundle, llama_adapters


def test_transposed_views_are_written_in_logical_order(tmp_path):
    import ml_dtypes

    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    views = {
        "t": base.T,  # Fortran-ordered view
        "strided": base[:, ::2],
        "t_bf16": base.astype(ml_dtypes.bfloat16).T,
        "t3": np.arange(60, dtype=np.float16).reshape(3, 4, 5).transpose(2, 0, 1),
    }
    assert not views["t"].flags["C_CONTIGUOUS"]
    write_safetensors(tmp_path / "x.safetensors", views)
    back = read_safetensors(tmp_path / "x.safetensors", list(views))
    for key, value in views.items():
        assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bundle_round_trip_is_exact(tmp_path, dtype):
    collection, solutions, bundle = hand_bundle(llama_adapters(), dtype=dtype)
    save_bundle(bundle, tmp_path / "out")
    assert is_bundle(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind
    back = load_bundle(tmp_path / "out")
    assert back.tasks == collection.names == bundle.tasks
    assert back.dtype == dtype and back.base_model == bundle.base_model
    assert set(back.modules) == set(solutions)
    for name, module in back.modules.items():
        ref = bundle.modules[name]
        assert module.shared_a.dtype == ref.shared_a.dtype
        assert np.array_equal(module.shared_a, ref.shared_a)
        assert np.array_equal(module.shared_b, ref.shared_b)
        if dtype == "float32":
            assert np.array_equal(module.shared_a, np.asarray(solutions[name].shared_a))
        assert module.plan == solutions[name].plan
        assert module.task_ids == solutions[name].task_ids
        assert module.task_ranks == solutions[name].task_ranks
        assert module.relative_error == ref.relative_error
        assert (module.kind, module.d_in, module.d_out) == (ref.kind, ref.d_in, ref.d_out)
    assert back.task_configs == bundle.task_configs
    carried = back.carried["qa_fr"]["base_model.model.lm_head.weight"]
    assert np.array_equal(carried, bundle.carried["qa_fr"]["base_model.model.lm_head.weight"])
    assert back.to_json() == bundle.to_json()
    meta = json.loads((tmp_path / "out" / "hydraopt.json").read_text())
    assert meta["format_version"] == 3 and meta["solver"] == "hand"
    m = meta["modules"]["model.layers.0.self_attn.k_proj"]
    assert (m["kind"], m["d_in"], m["d_out"], m["task_ids"], m["task_ranks"]) == (
        "linear",
        32,
        16,
        [0, 1],
        [4, 8],
    )
    assert meta["task_configs"]["qa_fr"]["modules_to_save"] == ["lm_head"]


def test_embedding_bundle_round_trip(tmp_path):
    _, _, bundle = hand_bundle([gpt2_adapter()])
    save_bundle(bundle, tmp_path / "b")
    back = load_bundle(tmp_path / "b")
    assert back.modules["transformer.wte"].kind == "embedding"
    assert back.task_configs["gpt2_task"]["fan_in_fan_out"] is True


def test_task_relative_errors_weight_modules_by_their_norm():
    _, _, bundle = hand_bundle(llama_adapters())
    errs = bundle.task_relative_errors()
    for t, name in enumerate(bundle.tasks):
        num = den = 0.0
        for m in bundle.modules.values():
            if t in m.task_ids:
                i = m.task_ids.index(t)
                num += m.relative_error[i] ** 2 * m.task_sq_norms[i]
                den += m.task_sq_norms[i]
        assert errs[name] == pytest.approx(np.sqrt(num / den))


def test_overwrites_a_bundle_but_refuses_anything_else(tmp_path):
    _, _, bundle = hand_bundle(llama_adapters())
    save_bundle(bundle, tmp_path / "out")
    save_bundle(bundle, tmp_path / "out")  # replacing a bundle is fine
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(AdapterError, match="not a hydraopt bundle"):
        save_bundle(bundle, other)
    assert (other / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    save_bundle(bundle, empty)
    assert is_bundle(empty)


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import hydraopt_jax.io.bundle as bundle_io

    _, _, bundle = hand_bundle(llama_adapters())

    def boom(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(bundle_io, "write_json", boom)
    with pytest.raises(AdapterError, match=r"out: cannot be written \(disk full\)"):
        save_bundle(bundle, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_load_bundle_refuses_bad_input(tmp_path):
    with pytest.raises(AdapterError, match="no such bundle"):
        load_bundle(tmp_path / "nope")
    _, _, bundle = hand_bundle(llama_adapters())
    save_bundle(bundle, tmp_path / "out")
    meta_file = tmp_path / "out" / "hydraopt.json"
    meta = json.loads(meta_file.read_text())
    meta["format_version"] = 99
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="format_version"):
        load_bundle(tmp_path / "out")
    meta["format_version"] = 1
    meta["modules"]["model.layers.0.self_attn.k_proj"]["rank"] = 5
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(AdapterError) as err:
        load_bundle(tmp_path / "out")
    assert "factors.safetensors" in str(err.value) and "k_proj" in str(err.value)


def test_add_solutions_refuses_nan():
    import jax.numpy as jnp

    collection, solutions, bundle = hand_bundle(llama_adapters())
    groups = {}
    for _, group in collection.iter_groups():
        groups.update(group)
    name = "model.layers.0.self_attn.q_proj"
    bad = solutions[name].replace(shared_a=jnp.full_like(solutions[name].shared_a, jnp.nan))
    with pytest.raises(ValueError, match="non-finite"):
        bundle.add_solutions(groups, {name: bad}, {name: "linear"})


def test_reported_errors_are_those_of_the_stored_dtype(tmp_path):
    """In bfloat16 the bundle reports the error of the rounded factors it stores."""
    from hydraopt_jax import SharingPlan, merge_adapters
    from hydraopt_jax.io import Bundle, load_collection

    collection = load_collection(llama_adapters())
    groups = {}
    for _, group in collection.iter_groups():
        groups.update(group)
    solutions = merge_adapters(groups, SharingPlan.separate(collection.num_tasks))
    kinds = {n: i.kind for n, i in collection.modules.items()}
    reported = {}
    for dtype in ("float32", "bfloat16"):
        bundle = Bundle.empty(collection, dtype=dtype)
        bundle.add_solutions(groups, solutions, kinds)
        reported[dtype] = bundle
    for name, module in reported["bfloat16"].modules.items():
        a_all, b_all, _ = groups[name]
        dense_err = []
        for local, t in enumerate(module.task_ids):
            a, b = np.asarray(a_all[t], np.float64), np.asarray(b_all[t], np.float64)
            ah = module.shared_a[module.plan.a_group[local]].astype(np.float64)
            bh = module.shared_b[module.plan.b_group[local]].astype(np.float64)
            dense_err.append(np.linalg.norm(b @ a - bh @ ah) / np.linalg.norm(b @ a))
        np.testing.assert_allclose(module.relative_error, dense_err, rtol=1e-3, atol=1e-7)
        assert min(dense_err) > 1e-4  # bfloat16 rounding, not the float32 fit's ~1e-7
        assert max(reported["float32"].modules[name].relative_error) < 1e-5


def test_version_1_bundles_still_load(tmp_path):
    """A bundle written before cores and nested ranks existed (format 1: no `core` key, no
    `cores` tensors) loads, exports and reports exactly as the same bundle in format 2."""
    from hydraopt_jax.io import export_peft

    _, _, bundle = hand_bundle(llama_adapters())
    save_bundle(bundle, tmp_path / "v2")
    meta = json.loads((tmp_path / "v2" / "hydraopt.json").read_text())
    meta["format_version"] = 1
    for module in meta["modules"].values():
        del module["core"]
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "hydraopt.json").write_text(json.dumps(meta))
    (tmp_path / "v1" / "factors.safetensors").write_bytes(
        (tmp_path / "v2" / "factors.safetensors").read_bytes()
    )
    old, new = load_bundle(tmp_path / "v1"), load_bundle(tmp_path / "v2")
    assert old.task_relative_errors() == new.task_relative_errors()
    for name, module in new.modules.items():
        assert np.array_equal(old.modules[name].shared_a, module.shared_a)
        assert old.modules[name].core is None and old.modules[name].cores is None
    export_peft(old, tmp_path / "peft_v1")
    export_peft(new, tmp_path / "peft_v2")
    for task in new.tasks:
        a = (tmp_path / "peft_v1" / task / "adapter_model.safetensors").read_bytes()
        assert a == (tmp_path / "peft_v2" / task / "adapter_model.safetensors").read_bytes()
