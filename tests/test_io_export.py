"""PEFT export: hand-built Solutions -> adapters PEFT loads, deltas equal Bh[b] @ Ah[a]."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hydraopt_jax.io import (
    EXPORT_MARKER,
    AdapterError,
    export_peft,
    load_bundle,
    load_peft_adapter,
    save_bundle,
)
from tests.helpers.peft_models import (
    LLAMA_TASKS,
    as_update,
    gpt2_adapter,
    hand_bundle,
    llama_adapters,
    peft_deltas,
    rel_err,
    tiny_gpt2,
    tiny_llama,
)


def _expected(bundle, task):
    t = bundle.tasks.index(task)
    out = {}
    for name, m in bundle.modules.items():
        if t in m.task_ids:
            i = m.task_ids.index(t)
            a = m.shared_a[m.plan.a_group[i]].astype(np.float64)
            b = m.shared_b[m.plan.b_group[i]].astype(np.float64)
            out[name] = b @ a
    return out


def _check_export(bundle, dirs, out, base_factory, tol=1e-6):
    for task in bundle.tasks:
        original = load_peft_adapter(next(p for p in dirs if p.name == task))
        exported = load_peft_adapter(out / task)
        assert set(exported.modules) == set(original.modules)
        assert exported.config["target_modules"] == original.config["target_modules"]
        assert exported.fan_in_fan_out == original.fan_in_fan_out
        deltas = peft_deltas(base_factory(), out / task)
        expected = _expected(bundle, task)
        assert set(deltas) == set(expected)
        for name, (delta, fan_in_fan_out, kind) in deltas.items():
            assert rel_err(as_update(delta, fan_in_fan_out, kind), expected[name]) < tol, name


def test_export_llama_loads_in_peft_with_exact_deltas(tmp_path):
    # per-module ranks: k differs across modules of one task -> rank_pattern in the export
    rank_of = lambda name: 5 if "k_proj" in name else (2 if "mlp" in name else 3)  # noqa: E731
    _, _, bundle = hand_bundle(llama_adapters(), rank_of=rank_of)
    written = export_peft(bundle, tmp_path / "peft")
    assert [p.name for p in written] == list(LLAMA_TASKS)
    _check_export(bundle, llama_adapters(), tmp_path / "peft", tiny_llama)
    config = json.loads((tmp_path / "peft" / "chat_fr" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 3 and config["use_rslora"] is False
    assert (
        set(config["rank_pattern"].values()) == {5}
        and config["rank_pattern"] == config["alpha_pattern"]
    )
    qa = load_peft_adapter(tmp_path / "peft" / "qa_fr")
    assert qa.carried_keys == ("base_model.model.lm_head.weight",)  # modules_to_save kept


def test_export_gpt2_fan_in_fan_out_and_embedding(tmp_path):
    _, _, bundle = hand_bundle([gpt2_adapter()], plan_name="separate")
    export_peft(bundle, tmp_path / "peft")
    _check_export(bundle, [gpt2_adapter()], tmp_path / "peft", tiny_gpt2)


def test_export_from_saved_bundle_in_bfloat16(tmp_path):
    import ml_dtypes

    _, _, bundle = hand_bundle(llama_adapters())
    save_bundle(bundle, tmp_path / "bundle")
    export_peft(tmp_path / "bundle", tmp_path / "peft", task="chat_de", dtype="bfloat16")
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == [EXPORT_MARKER, "chat_de"]
    adapter = load_peft_adapter(tmp_path / "peft" / "chat_de")
    assert set(adapter.tensor_dtypes.values()) == {"BF16"}
    name = "model.layers.0.self_attn.q_proj"
    a, _ = adapter.load_factors([name])[name]
    m = load_bundle(tmp_path / "bundle").modules[name]
    ref = m.shared_a[m.plan.a_group[1]].astype(ml_dtypes.bfloat16).astype(np.float32)
    assert np.array_equal(a, ref)


def test_export_refuses_unknown_task_and_foreign_directory(tmp_path):
    _, _, bundle = hand_bundle(llama_adapters())
    with pytest.raises(AdapterError, match="unknown task 'nope'"):
        export_peft(bundle, tmp_path / "peft", task="nope")
    assert not (tmp_path / "peft").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "file.txt").write_text("x")
    with pytest.raises(AdapterError, match="refusing to overwrite"):
        export_peft(bundle, foreign)
    export_peft(bundle, tmp_path / "peft")
    export_peft(bundle, tmp_path / "peft", task="qa_fr")  # a previous export is replaced
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == [EXPORT_MARKER, "qa_fr"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "peft"]


def test_export_never_replaces_a_directory_of_user_adapters(tmp_path):
    """A directory of adapter directories that no export wrote (no marker) is refused."""
    import shutil

    _, _, bundle = hand_bundle(llama_adapters())
    mine = tmp_path / "mine"
    shutil.copytree(llama_adapters()[0], mine / "chat_de")
    with pytest.raises(AdapterError, match="refusing to overwrite"):
        export_peft(bundle, mine, task="qa_fr")
    assert sorted(p.name for p in mine.iterdir()) == ["chat_de"]
    # an export plus a file the user added afterwards is no longer only an export either
    export_peft(bundle, tmp_path / "peft")
    (tmp_path / "peft" / "notes.txt").write_text("mine")
    with pytest.raises(AdapterError, match="refusing to overwrite"):
        export_peft(bundle, tmp_path / "peft")
    assert (tmp_path / "peft" / "notes.txt").read_text() == "mine"


def test_export_writes_a_task_named_twice_once(tmp_path):
    _, _, bundle = hand_bundle(llama_adapters())
    written = export_peft(bundle, tmp_path / "peft", task=["qa_fr", "qa_fr"])
    assert written == [tmp_path / "peft" / "qa_fr"]


def _edit_meta(bundle_dir, edit):
    meta_file = bundle_dir / "hydraopt.json"
    meta = json.loads(meta_file.read_text())
    edit(meta)
    meta_file.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "edit, cause",
    [
        (lambda m: m.update(tasks=["../evil", *m["tasks"][1:]]), "invalid task name '../evil'"),
        (lambda m: m.update(tasks=[m["tasks"][0]] * len(m["tasks"])), "duplicate task names"),
        (lambda m: m.update(tasks="abc"), "tasks must be a list"),
        (lambda m: m.update(tasks=[1, 2, 3]), "invalid task name 1"),
        (lambda m: m.update(dtype="int8"), "unknown dtype 'int8'"),
        (lambda m: m.update(task_configs={}), "one adapter config"),
        (lambda m: m.update(task_configs=[]), "one adapter config"),
        (lambda m: m.update(modules=[]), "modules must be an object"),
        (lambda m: m.update(carried=[]), "carried must be an object"),
        (lambda m: m.update(carried={"nobody": []}), "unknown task 'nobody'"),
        (lambda m: m.update(carried={m["tasks"][0]: "abc"}), "must be a list of tensor names"),
        (
            lambda m: m.update(tasks=[EXPORT_MARKER, *m["tasks"][1:]]),
            "names starting with .hydraopt are reserved",
        ),
        (
            lambda m: next(iter(m["modules"].values())).update(task_ranks=[1]),
            "task_ranks has 1 entries",
        ),
    ],
)
def test_malformed_bundle_metadata_is_refused_naming_the_file(tmp_path, edit, cause):
    _, _, bundle = hand_bundle(llama_adapters())
    save_bundle(bundle, tmp_path / "bundle")
    _edit_meta(tmp_path / "bundle", edit)
    with pytest.raises(AdapterError, match=cause) as err:
        export_peft(tmp_path / "bundle", tmp_path / "peft")
    assert err.value.path.endswith("hydraopt.json")
    assert not (tmp_path / "peft").exists() and not (tmp_path / "evil").exists()


def test_bundle_with_non_finite_factors_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    _, _, bundle = hand_bundle(llama_adapters())
    save_bundle(bundle, tmp_path / "bundle")
    factors = tmp_path / "bundle" / "factors.safetensors"
    tensors = load_file(str(factors))
    key = next(k for k in tensors if k.endswith("shared_a"))
    tensors[key][0, 0, 0] = np.nan
    save_file(tensors, str(factors))
    with pytest.raises(AdapterError, match="NaN or Inf"):
        export_peft(tmp_path / "bundle", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_a_tensor_missing_from_the_factors_file_is_blamed_on_it(tmp_path):
    _, _, bundle = hand_bundle(llama_adapters())
    save_bundle(bundle, tmp_path / "bundle")
    task = bundle.tasks[0]
    _edit_meta(tmp_path / "bundle", lambda m: m["carried"].update({task: ["lm_head.weight"]}))
    with pytest.raises(AdapterError, match=f"missing tensor carried/{task}/lm_head.weight") as err:
        load_bundle(tmp_path / "bundle")
    assert err.value.path.endswith("factors.safetensors")
