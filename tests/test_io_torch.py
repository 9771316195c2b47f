"""PyTorch state dicts in memory: exact round trips."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.peft_models import Quiet, hand_bundle, llama_adapters, tiny_llama

torch = pytest.importorskip("torch")

from hydraopt_jax.io import (  # noqa: E402
    export_peft,
    from_torch_state_dict,
    load_peft_adapter,
    to_torch_state_dict,
)


def _peft_state_dict(dtype=None):
    from peft import PeftModel, get_peft_model_state_dict

    with Quiet():
        model = PeftModel.from_pretrained(tiny_llama(), str(llama_adapters()[1]))
        if dtype is not None:
            model = model.to(dtype)
        return get_peft_model_state_dict(model), model.peft_config["default"]


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_state_dict_round_trip_is_exact(dtype):
    state_dict, config = _peft_state_dict(dtype)
    adapter = from_torch_state_dict(state_dict, config, name="chat_de")
    from_file = load_peft_adapter(llama_adapters()[1])
    assert adapter.modules == from_file.modules  # same ranks, alphas (patterns), rsLoRA scales
    back = to_torch_state_dict(adapter)
    assert set(back) == set(state_dict)
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    if dtype is None:
        names = list(adapter.modules)
        mine, ref = adapter.load_factors(names), from_file.load_factors(names)
        for name in names:
            assert np.array_equal(mine[name][0], ref[name][0])
            assert np.array_equal(mine[name][1], ref[name][1])


def test_config_as_dict_works_too():
    state_dict, config = _peft_state_dict()
    import json

    config_dict = json.loads((llama_adapters()[1] / "adapter_config.json").read_text())
    a = from_torch_state_dict(state_dict, config_dict)
    b = from_torch_state_dict(state_dict, config)
    assert a.modules == b.modules


def test_bundle_task_state_dict_equals_exported_files(tmp_path):
    from safetensors.torch import load_file

    _, _, bundle = hand_bundle(llama_adapters())
    export_peft(bundle, tmp_path / "peft")
    for task in bundle.tasks:
        sd = to_torch_state_dict(bundle, task)
        ref = load_file(str(tmp_path / "peft" / task / "adapter_model.safetensors"))
        assert set(sd) == set(ref)
        for key in ref:
            assert torch.equal(sd[key], ref[key]), key
