"""Flax NNX layers that serve a bundle: a base `nnx.Linear` plus every task's merged LoRA,
applied to a batch of mixed tasks by `lora_apply`. (Importing this module needs flax; the
rest of `hydraopt_jax.serve` does not.)

```python
served = hj.serve.prepare(hj.io.load_bundle("OUT"))
model = hj.serve.nnx.wrap_nnx(model, served)          # every adapted nnx.Linear wrapped
hj.serve.nnx.set_task_ids(model, jnp.array([[0], [3]])) # one task per sequence of the batch
y = model(x)                                            # x [2, seq, d]: two tasks at once
```
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax.numpy as jnp
from flax import nnx

from ._apply import ServedBundle, lora_apply, prepare

__all__ = ["MultiTaskLoRALinear", "set_task_ids", "wrap_nnx"]


class MultiTaskLoRALinear(nnx.Module):
    """`base(x) + lora_apply(bundle, module, x, task_ids)`: a base `nnx.Linear` serving every
    task of a bundle at once. The task of each row is `self.task_ids` (an `nnx.Variable`,
    set for a whole model with `set_task_ids`), broadcast over `x`'s leading axes."""

    def __init__(self, base: nnx.Linear, served: ServedBundle, module: str):
        self.base = base
        self.served = nnx.Variable(served)  # the bundle's factors, held once
        self.module = module
        self.task_ids = nnx.Variable(jnp.zeros((1,), jnp.int32))

    def __call__(self, x, **kwargs):
        ids = self.task_ids.get_value()
        ids = ids.reshape(ids.shape + (1,) * (x.ndim - 1 - ids.ndim))
        update = lora_apply(self.served.get_value(), self.module, x, ids)
        return self.base(x, **kwargs) + update.astype(x.dtype)


def _path_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def wrap_nnx(model, bundle, module_names: Mapping[str, str] | Callable[[str], str] | None = None):
    """Replace every `nnx.Linear` of `model` that the bundle adapts by a
    `MultiTaskLoRALinear`, in place; returns `model`.

    `module_names`: maps a layer's dotted path in `model` (e.g. `layers.0.attn.q`) to the
    bundle's module name, as a mapping or a function (default: the same name). Layers with
    no bundle module are left as they are; a model with none is refused.
    """
    served = bundle if isinstance(bundle, ServedBundle) else prepare(bundle)
    if module_names is None:
        rename = lambda name: name  # noqa: E731
    elif callable(module_names):
        rename = module_names
    else:
        rename = lambda name: module_names.get(name, name)  # noqa: E731
    targets = [
        (path, module, rename(_path_name(path)))
        for path, module in nnx.iter_modules(model)
        if path and type(module) is nnx.Linear
    ]
    wrapped = 0
    for path, module, name in targets:
        if name in served.modules:
            parent = model
            for part in path[:-1]:
                parent = parent[part] if isinstance(part, int) else getattr(parent, part)
            layer = MultiTaskLoRALinear(module, served, name)
            if isinstance(path[-1], int):
                parent[path[-1]] = layer
            else:
                setattr(parent, path[-1], layer)
            wrapped += 1
    if not wrapped:
        raise ValueError(
            f"no nnx.Linear of the model matches a bundle module (bundle modules: "
            f"{', '.join(sorted(served.modules)[:3])}, ...); pass module_names"
        )
    return model


def set_task_ids(model, task_ids) -> None:
    """Set the task of every row (or of every sequence: shape `[batch, 1]`) for all
    `MultiTaskLoRALinear` layers of `model`."""
    ids = jnp.asarray(task_ids, jnp.int32)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, MultiTaskLoRALinear):
            module.task_ids.set_value(ids)
