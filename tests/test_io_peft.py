"""PEFT loader: factors and scales against PEFT's own `get_delta_weight`, refusals, groups."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from hydraopt_jax.io import AdapterError, get_pattern_key, load_collection, load_peft_adapter
from hydraopt_jax.io._files import read_safetensors, write_safetensors
from tests.helpers.peft_models import (
    LLAMA_TASKS,
    as_update,
    gpt2_adapter,
    llama_adapters,
    make_adapter,
    peft_deltas,
    rel_err,
    tiny_gpt2,
    tiny_llama,
)


def _check_against_peft(adapter_dir, base):
    adapter = load_peft_adapter(adapter_dir)
    reference = peft_deltas(base, adapter_dir)
    assert set(adapter.modules) == set(reference)
    factors = adapter.load_factors(list(adapter.modules))
    for name, (a, b) in factors.items():
        assert a.dtype == np.float32 and b.dtype == np.float32
        delta, fan_in_fan_out, kind = reference[name]
        assert adapter.modules[name].kind == kind
        mine = b.astype(np.float64) @ a.astype(np.float64)
        assert rel_err(mine, as_update(delta, fan_in_fan_out, kind)) < 1e-6, name
    return adapter


@pytest.mark.parametrize("task", list(LLAMA_TASKS))
def test_llama_factors_match_peft_delta_weight(task):
    path = dict(zip(LLAMA_TASKS, llama_adapters(), strict=False))[task]
    adapter = _check_against_peft(path, tiny_llama())
    assert adapter.name == task
    if task == "chat_de":  # rsLoRA with rank_pattern and alpha_pattern
        q1 = adapter.modules["model.layers.1.self_attn.q_proj"]
        assert (q1.rank, q1.scale) == (2, pytest.approx(16 / np.sqrt(2)))
        v0 = adapter.modules["model.layers.0.self_attn.v_proj"]
        assert (v0.rank, v0.alpha, v0.scale) == (8, 3.0, pytest.approx(3 / np.sqrt(8)))
        k0 = adapter.modules["model.layers.0.self_attn.k_proj"]
        assert (k0.d_in, k0.d_out) == (32, 16)  # grouped-query attention
    if task == "qa_fr":
        assert "model.layers.0.mlp.down_proj" in adapter.modules
        assert adapter.carried_keys == ("base_model.model.lm_head.weight",)
        assert adapter.modules_to_save == ["lm_head"]


def test_gpt2_fan_in_fan_out_and_embedding_match_peft():
    adapter = _check_against_peft(gpt2_adapter(), tiny_gpt2())
    assert adapter.fan_in_fan_out
    wte = adapter.modules["transformer.wte"]
    assert (wte.kind, wte.d_in, wte.d_out) == ("embedding", 50, 32)
    c_attn = adapter.modules["transformer.h.0.attn.c_attn"]
    assert (c_attn.d_in, c_attn.d_out) == (32, 96)


@pytest.mark.parametrize(
    "patterns,key",
    [
        (["q_proj"], "model.layers.0.self_attn.q_proj"),
        (["layers.1.self_attn.q_proj", "q_proj"], "model.layers.1.self_attn.q_proj"),
        (["layers.1.self_attn.q_proj"], "model.layers.11.self_attn.q_proj"),
        (["proj"], "model.layers.0.self_attn.q_proj"),
        ([r".*\.(q|v)_proj"], "model.layers.0.self_attn.v_proj"),
        (["^model.layers.0.mlp.up_proj"], "model.layers.0.mlp.up_proj"),
    ],
)
def test_pattern_key_is_peft_rule(patterns, key):
    from peft.utils.other import get_pattern_key as peft_get_pattern_key

    assert get_pattern_key(patterns, key) == peft_get_pattern_key(patterns, key)


def test_bfloat16_adapter_loads_as_float32(tmp_path):
    src = llama_adapters()[0]
    dst = tmp_path / "bf16_task"
    shutil.copytree(src, dst)
    import ml_dtypes

    tensors = read_safetensors(
        src / "adapter_model.safetensors", load_peft_adapter(src).tensor_dtypes
    )
    write_safetensors(
        dst / "adapter_model.safetensors",
        {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()},
    )
    adapter = load_peft_adapter(dst)
    name = "model.layers.0.self_attn.q_proj"
    a, b = adapter.load_factors([name])[name]
    spec = adapter.modules[name]
    a_ref = tensors[spec.a_key].astype(ml_dtypes.bfloat16).astype(np.float32)
    assert a.dtype == np.float32 and np.array_equal(a, a_ref)
    b_ref = tensors[spec.b_key].astype(ml_dtypes.bfloat16).astype(np.float32) * np.float32(
        spec.scale
    )
    assert np.array_equal(b, b_ref)


# --------------------------------------------------------------------------- refusals


def _copy_with(tmp_path, extra=None, drop=(), config_update=None, name="bad"):
    src = llama_adapters()[0]
    dst = tmp_path / name
    shutil.copytree(src, dst)
    tensors = read_safetensors(
        src / "adapter_model.safetensors", load_peft_adapter(src).tensor_dtypes
    )
    tensors = {k: v for k, v in tensors.items() if not any(d in k for d in drop)}
    tensors.update(extra or {})
    write_safetensors(dst / "adapter_model.safetensors", tensors)
    if config_update:
        config = json.loads((dst / "adapter_config.json").read_text())
        config.update(config_update)
        (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def _one_line(err: AdapterError, *needles):
    text = str(err)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, text


def test_refuses_dora_made_by_peft(tmp_path):
    path = make_adapter(
        tiny_llama(), tmp_path / "dora", 0, r=2, target_modules=["q_proj"], use_dora=True
    )
    with pytest.raises(AdapterError) as err:
        load_peft_adapter(path)
    _one_line(err.value, "adapter_config.json", "DoRA")
    config = json.loads((path / "adapter_config.json").read_text())
    config["use_dora"] = False  # the tensor itself is refused too
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError) as err:
        load_peft_adapter(path)
    _one_line(err.value, "adapter_model.safetensors", "lora_magnitude_vector", "DoRA")


def test_refuses_lora_bias(tmp_path):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"
    path = _copy_with(tmp_path, extra={key: np.zeros(32, np.float32)})
    with pytest.raises(AdapterError) as err:
        load_peft_adapter(path)
    _one_line(err.value, str(path / "adapter_model.safetensors"), key, "bias")
    path = _copy_with(tmp_path, config_update={"lora_bias": True}, name="bad2")
    with pytest.raises(AdapterError) as err:
        load_peft_adapter(path)
    _one_line(err.value, "adapter_config.json", "lora_bias")


def test_refuses_unknown_tensor_and_missing_factor(tmp_path):
    key = "base_model.model.model.layers.0.mlp.extra.weight"
    path = _copy_with(tmp_path, extra={key: np.zeros((2, 2), np.float32)})
    with pytest.raises(AdapterError) as err:
        load_peft_adapter(path)
    _one_line(err.value, str(path / "adapter_model.safetensors"), key, "unknown tensor")
    path = _copy_with(tmp_path, drop=("layers.0.self_attn.k_proj.lora_B",), name="bad2")
    with pytest.raises(AdapterError) as err:
        load_peft_adapter(path)
    _one_line(err.value, "model.layers.0.self_attn.k_proj", "no LoRA B")


def test_refuses_rank_disagreeing_with_config(tmp_path):
    path = _copy_with(tmp_path, config_update={"r": 3})
    with pytest.raises(AdapterError) as err:
        load_peft_adapter(path)
    _one_line(err.value, "rank 4", "r=3")


def test_refuses_nan_when_loading_the_group(tmp_path):
    key = "base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"
    bad = np.full((4, 32), np.nan, np.float32)
    path = _copy_with(tmp_path, extra={key: bad})
    adapter = load_peft_adapter(path)  # header only: fine
    with pytest.raises(AdapterError) as err:
        adapter.load_factors(["model.layers.1.self_attn.o_proj"])
    _one_line(err.value, key, "NaN")


def test_refuses_bad_files(tmp_path):
    with pytest.raises(AdapterError) as err:
        load_peft_adapter(tmp_path / "missing")
    _one_line(err.value, "missing", "no such adapter directory")
    path = _copy_with(tmp_path)
    (path / "adapter_model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(AdapterError) as err:
        load_peft_adapter(path)
    _one_line(err.value, "adapter_model.safetensors", "safetensors")
    (path / "adapter_config.json").write_text("{broken")
    with pytest.raises(AdapterError) as err:
        load_peft_adapter(path)
    _one_line(err.value, "adapter_config.json", "JSON")


# --------------------------------------------------------------------------- collections


def test_collection_modules_ranks_and_shape_groups():
    dirs = llama_adapters()
    col = load_collection(dirs)
    assert col.names == tuple(LLAMA_TASKS)
    q1 = col.modules["model.layers.1.self_attn.q_proj"]
    assert q1.ranks == (4, 2, 2) and q1.task_ids == (0, 1, 2)
    k0 = col.modules["model.layers.0.self_attn.k_proj"]
    assert (k0.d_in, k0.d_out, k0.ranks) == (32, 16, (4, 8, 0))
    assert col.modules["model.layers.0.mlp.gate_proj"].ranks == (0, 0, 2)
    groups = col.shape_groups()
    assert set(groups) == {
        ("linear", 32, 32),
        ("linear", 32, 16),
        ("linear", 32, 48),
        ("linear", 48, 32),
    }
    assert len(groups[("linear", 32, 16)]) == 4  # k and v of both layers
    flat = {name: value for _key, group in col.iter_groups() for name, value in group.items()}
    # iter_modules: the same modules, group by group, one at a time: each padded to its own
    # largest rank (a group pads to the group's), the same factors
    modules = list(col.iter_modules())
    assert [(n, r) for n, _, _, r in modules] == [(n, r) for n, (_, _, r) in flat.items()]
    for n, a, b, r in modules:
        ga, gb, _ = flat[n]
        assert a.shape[1] == b.shape[2] == max(r) <= ga.shape[1]
        np.testing.assert_array_equal(a, ga[:, : max(r)])
        np.testing.assert_array_equal(b, gb[:, :, : max(r)])
        assert not ga[:, max(r) :].any()
    seen = set()
    for _key, group in col.iter_groups():
        for name, (a, b, ranks) in group.items():
            seen.add(name)
            info = col.modules[name]
            assert ranks == info.ranks and a.dtype == np.float32 and b.dtype == np.float32
            assert a.shape[::2] == (3, info.d_in) and b.shape[:2] == (3, info.d_out)
            for t, r in enumerate(ranks):
                assert not a[t, r:].any() and not b[t, :, r:].any()  # zero padding, absent = 0
                if r:
                    ref_a, ref_b = col.adapters[t].load_factors([name])[name]
                    assert np.array_equal(a[t, :r], ref_a) and np.array_equal(b[t, :, :r], ref_b)
    assert seen == set(col.modules)


def test_collection_reads_only_the_group(monkeypatch):
    import hydraopt_jax.io.peft as peft_io

    col = load_collection(llama_adapters())
    asked = []
    original = peft_io.read_safetensors

    def spy(path, keys):
        asked.append(list(keys))
        return original(path, keys)

    monkeypatch.setattr(peft_io, "read_safetensors", spy)
    col.load_group(["model.layers.0.self_attn.k_proj"])
    flat = [k for keys in asked for k in keys]
    assert flat and all("layers.0.self_attn.k_proj" in k for k in flat)


def test_collection_names_and_mismatch(tmp_path):
    dirs = llama_adapters()
    col = load_collection(dirs, names=["a", "b", "c"])
    assert col.names == ("a", "b", "c")
    with pytest.raises(AdapterError, match="duplicate task name"):
        load_collection(dirs, names=["a", "a", "c"])
    with pytest.raises(AdapterError, match="duplicate task name"):
        load_collection([dirs[0], dirs[0]])
    wide = make_adapter(tiny_llama(hidden=48), tmp_path / "wide", 3, r=2, target_modules=["q_proj"])
    with pytest.raises(AdapterError) as err:
        load_collection([dirs[0], wide])
    _one_line(
        err.value,
        str(wide / "adapter_model.safetensors"),
        str(dirs[0] / "adapter_model.safetensors"),
        "q_proj",
    )


def test_refuses_inits_that_rewrite_the_base_model(tmp_path):
    path = _copy_with(tmp_path, config_update={"init_lora_weights": "pissa_niter_4"})
    with pytest.raises(AdapterError) as err:
        load_peft_adapter(path)
    _one_line(err.value, "adapter_config.json", "pissa_niter_4", "modified base model")
