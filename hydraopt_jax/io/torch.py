"""PyTorch state dicts in memory <-> `PeftAdapter` / bundle tasks (torch imported lazily).

```python
from peft import get_peft_model_state_dict
state_dict = get_peft_model_state_dict(model)
adapter = hj.io.from_torch_state_dict(state_dict, model.peft_config["default"])
state_dict = hj.io.to_torch_state_dict(adapter)            # the same tensors back, exactly
state_dict = hj.io.to_torch_state_dict(bundle, task="fr")  # a merged task, PEFT layout
with hj.io.torch.lora_applied(base_model, {module: (A, B)}):  # factors on a model's
    logits = base_model(input_ids).logits                     # layers, without PEFT
```
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

from ._files import AdapterError
from .export import export_peft_tensors
from .peft import PeftAdapter, adapter_from_tensors

__all__ = ["from_torch_state_dict", "lora_applied", "lora_modules", "to_torch_state_dict"]


def _torch():
    try:
        import torch
    except ImportError as err:  # torch is an optional dependency
        raise ImportError(
            "hydraopt_jax.io's PyTorch functions need PyTorch: pip install 'hydraopt-jax[torch]'"
        ) from err
    return torch


def _to_numpy(tensor) -> np.ndarray:
    torch = _torch()
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return tensor.numpy().copy()


def _to_torch(array: np.ndarray):
    torch = _torch()
    array = np.ascontiguousarray(array)
    if array.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def _config_dict(config) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        data = config.to_dict()
    elif dataclasses.is_dataclass(config):
        data = dataclasses.asdict(config)
    else:
        raise TypeError(f"config must be a LoraConfig or a dict, got {type(config).__name__}")
    # LoraConfig.to_dict() holds sets and enums; make it JSON-like as save_pretrained does.
    for key, value in list(data.items()):
        if isinstance(value, set):
            data[key] = sorted(value)
        elif hasattr(value, "value") and type(value).__module__.startswith("peft"):
            data[key] = value.value
    return data


def from_torch_state_dict(state_dict: Mapping, config, *, name: str = "adapter") -> PeftAdapter:
    """A `PeftAdapter` from a PEFT state dict held in memory.

    **Arguments:**

    - `state_dict`: `{key: torch.Tensor}` as `peft.get_peft_model_state_dict(model)` returns
      (keys `base_model.model.<module>.lora_A.weight`, ...; no adapter name).
    - `config`: the adapter's `peft.LoraConfig` or its `adapter_config.json` dict.
    - `name`: the task name.

    **Returns:** a `PeftAdapter` (copies of the tensors, original dtypes kept).
    """
    tensors = {key: _to_numpy(value) for key, value in state_dict.items()}
    return adapter_from_tensors(name, _config_dict(config), tensors, f"<state_dict {name}>")


def to_torch_state_dict(source, task: str | None = None, dtype=None) -> dict:
    """A PEFT-layout `{key: torch.Tensor}` state dict.

    **Arguments:**

    - `source`: a `PeftAdapter` (its raw tensors, exactly as read: the inverse of
      `from_torch_state_dict`) or a `Bundle` (then `task` names the merged task, exported
      with `r = lora_alpha = k` as `export_peft` writes it; see `export_peft_config`).
    - `task`: the task to export from a bundle.
    - `dtype`: output dtype for a bundle task (`"float32"`, `"bfloat16"`, `"float16"`).
    """
    from .bundle import Bundle

    if isinstance(source, PeftAdapter):
        keys = [k for spec in source.modules.values() for k in (spec.a_key, spec.b_key)]
        keys += list(source.carried_keys)
        return {key: _to_torch(value) for key, value in source.read_tensors(keys).items()}
    if isinstance(source, Bundle):
        if task is None:
            raise AdapterError(
                source.path or "<bundle>",
                f"to_torch_state_dict needs task= (one of {', '.join(source.tasks)})",
            )
        return {k: _to_torch(v) for k, v in export_peft_tensors(source, task, dtype).items()}
    raise TypeError(
        f"to_torch_state_dict: expected a PeftAdapter or a Bundle, got {type(source).__name__}"
    )


def lora_modules(model, lora: dict | None) -> Iterator[tuple[object, object, object]]:
    """`(module, A, B)` for each entry of `lora` `{name: (A [k, d_in], B [d_out, k])}`, as
    float32 torch tensors on the module's device, checked against the module's weight."""
    torch = _torch()

    modules = dict(model.named_modules())
    for name, (a, b) in (lora or {}).items():
        if name not in modules:
            raise KeyError(f"LoRA module {name!r} is not a module of the base model")
        weight = modules[name].weight
        a = torch.as_tensor(np.asarray(a, dtype=np.float32), device=weight.device)
        b = torch.as_tensor(np.asarray(b, dtype=np.float32), device=weight.device)
        if (b.shape[0], a.shape[1]) != tuple(weight.shape) or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"LoRA for {name}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit "
                f"weight {tuple(weight.shape)}"
            )
        yield modules[name], a, b


@contextlib.contextmanager
def lora_applied(model, lora: dict | None):
    """`model` with each listed module's output plus `x A^T B^T`, for the block.

    **Arguments**: `lora` `{module: (A [k, d_in], B [d_out, k])}` with the scale folded in.

    The branch is computed in float32 (autocast off). On a float32 model the sum stays
    float32 even where autocast made the layer's output bfloat16 (the update is not rounded
    to the activations' precision); on a model whose weights are in another dtype the sum is
    cast back to the output's dtype, as the next layer expects.
    """
    torch = _torch()

    handles = []

    def branch(a, b):
        def hook(module, args, output):
            with torch.autocast(output.device.type, enabled=False):
                total = output + (args[0].float() @ a.T) @ b.T
            return total if module.weight.dtype == torch.float32 else total.to(output.dtype)

        return hook

    try:
        for module, a, b in lora_modules(model, lora):
            handles.append(module.register_forward_hook(branch(a, b)))
        yield model
    finally:
        for h in handles:
            h.remove()
