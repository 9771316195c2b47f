"""Flax NNX LoRAs in and out: `nnx.LoRA` / `nnx.LoRALinear` parameters <-> collections,
bundle tasks back into a model (flax is imported only when a model or `State` is given).

An NNX LoRA holds `lora_a [d_in, r]` and `lora_b [r, d_out]` and computes `x @ lora_a @
lora_b` (no alpha scale), so a task's update is `B A` with `A = lora_a^T`, `B = lora_b^T`.
A module's name is the dotted path of the layer the LoRA belongs to in the parameter tree
(`layers.0.attn.q` for `layers/0/attn/q/lora/lora_a`: an `nnx.LoRALinear`'s inner `lora`
is dropped). Trees whose names differ give the two leaf names (`a_key`, `b_key`) and a
`module_names` mapping (or function) from those paths to the names they want.

```python
collection = hj.io.flax.from_nnx({"fr_qa": model_fr, "de_qa": model_de})
bundle = hj.merge_collection(collection, "shared-a")
hj.io.flax.to_nnx(model, bundle, "fr_qa")     # the merged task's factors in the model
```
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ._files import AdapterError
from .collection import AdapterCollection, collection_from_adapters
from .peft import PREFIX, PeftAdapter, adapter_from_tensors

__all__ = ["bundle_param_tree", "from_nnx", "nnx_lora_params", "to_nnx"]

Names = Mapping[str, str] | Callable[[str], str] | None


def _loaded_nnx():
    """`flax.nnx` if flax is imported (an NNX model or State means it is), else `None`."""
    if "flax" not in sys.modules:
        return None
    from flax import nnx

    return nnx


def _value(leaf):
    """The array of an NNX `Variable` (or the leaf itself)."""
    return leaf.get_value() if hasattr(leaf, "get_value") else leaf


def _flatten(tree, prefix=()) -> dict[tuple, Any]:
    """`{path: leaf}` of a nested mapping / list tree (NNX `State` included)."""
    nnx = _loaded_nnx()
    if nnx is not None and isinstance(tree, nnx.State):
        return {(*prefix, *p): _value(v) for p, v in nnx.to_flat_state(tree)}
    if isinstance(tree, Mapping):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, (*prefix, key)))
        return out
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "shape"):
        out = {}
        for i, value in enumerate(tree):
            out.update(_flatten(value, (*prefix, i)))
        return out
    return {prefix: _value(tree)}


def _as_tree(source):
    """A flat `{path: array}` from an NNX module, an `nnx.State` or a parameter tree."""
    nnx = _loaded_nnx()
    if isinstance(source, (Mapping, list, tuple)) or (
        nnx is not None and isinstance(source, nnx.State)
    ):
        return _flatten(source)
    if nnx is not None and isinstance(source, nnx.Module):
        return _flatten(nnx.state(source, nnx.Param))
    raise TypeError(
        f"expected an NNX model, an nnx.State or a parameter tree, got {type(source).__name__}"
    )


def _rename(module_names: Names) -> Callable[[str], str]:
    if module_names is None:
        return lambda name: name
    if callable(module_names):
        return module_names
    return lambda name: module_names.get(name, name)


def nnx_lora_params(source, *, a_key="lora_a", b_key="lora_b", module_names: Names = None,
                    where: str = "<nnx>") -> dict[str, dict[str, np.ndarray]]:  # fmt: skip
    """`{module: {"lora_a": [d_in, r], "lora_b": [r, d_out]}}` found in `source` (an NNX
    model, its `State`, or a parameter tree), named as the module docstring says. Raises
    `AdapterError(where)` for a factor without its partner or a tree with no LoRA."""
    flat = _as_tree(source)
    rename = _rename(module_names)
    found: dict[str, dict[str, np.ndarray]] = {}
    for path, leaf in flat.items():
        if not path or path[-1] not in (a_key, b_key):
            continue
        layer = path[:-1]
        if layer and layer[-1] == "lora":  # nnx.LoRALinear keeps its LoRA in `.lora`
            layer = layer[:-1]
        name = rename(".".join(str(p) for p in layer))
        side = "lora_a" if path[-1] == a_key else "lora_b"
        found.setdefault(name, {})[side] = np.asarray(leaf)
    if not found:
        raise AdapterError(where, f"no LoRA parameters ({a_key} / {b_key}) in the tree")
    for name, sides in found.items():
        for side, key in (("lora_a", a_key), ("lora_b", b_key)):
            if side not in sides:
                other = b_key if side == "lora_a" else a_key
                raise AdapterError(where, f"module {name}: {other} without {key}")
    return found


def _adapter(name: str, source, **options) -> PeftAdapter:
    where = f"<nnx {name}>"
    params = nnx_lora_params(source, where=where, **options)
    tensors, ranks = {}, {}
    for module, sides in params.items():
        a, b = sides["lora_a"], sides["lora_b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise AdapterError(
                where,
                f"module {module}: lora_a {list(a.shape)} and lora_b {list(b.shape)} do not "
                "fit; expected [d_in, r] and [r, d_out]",
            )
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
        ranks[module] = int(a.shape[1])
    r = max(ranks.values())
    # no alpha in NNX LoRAs: lora_alpha = r everywhere (scale 1), exact rank_pattern entries
    pattern = {_escape(m): k for m, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ranks}),
        "base_model_name_or_path": None,
    }
    return adapter_from_tensors(name, config, tensors, where)


def _escape(name: str) -> str:
    import re

    return re.escape(name)


def from_nnx(models, names=None, *, a_key="lora_a", b_key="lora_b",
             module_names: Names = None) -> AdapterCollection:  # fmt: skip
    """The LoRAs of NNX models as the collection the PEFT reader makes.

    **Arguments:**

    - `models`: `{task: model or State or parameter tree}`, a list of them, or one.
    - `names`: task names for a list (default `task0`, `task1`, ...).
    - `a_key`, `b_key`, `module_names`: for trees named differently (module docstring).

    **Returns:** an `AdapterCollection` (`merge_collection`, `plan_budget` take it). Bad
    trees (a factor without its partner, mismatched ranks, NaN or Inf) are refused with the
    one-line `AdapterError`s PEFT input gets.
    """
    if isinstance(models, Mapping) and not _looks_like_tree(models):
        items = list(models.items())
    elif isinstance(models, (list, tuple)):
        items = list(zip(names or [f"task{i}" for i in range(len(models))], models, strict=True))
    else:
        items = [((names or ["task0"])[0], models)]
    options = dict(a_key=a_key, b_key=b_key, module_names=module_names)
    return collection_from_adapters(_adapter(str(n), m, **options) for n, m in items)


def _looks_like_tree(mapping: Mapping) -> bool:
    """A single parameter tree (rather than `{task: model}`): a LoRA leaf is reachable
    without passing through one of its values being a model."""
    return any(
        path and path[-1] in ("lora_a", "lora_b") and len(path) == 1 for path in _flatten(mapping)
    )


def to_nnx(model, bundle, task: str, *, a_key="lora_a", b_key="lora_b",
           module_names: Names = None):  # fmt: skip
    """Write one merged task of `bundle` into the LoRA parameters of an NNX `model` (in
    place; returns `model`): `lora_a = A_hat^T`, `lora_b = B_hat^T`, of the task's rank in
    the bundle (`k`, or `j_t` for nested ranks); NNX LoRAs take any rank. Every bundle
    module of the task must have a LoRA in the model (`module_names` maps the model's paths
    to the bundle's names), else `AdapterError`."""
    import jax.numpy as jnp
    from flax import nnx

    t = bundle.task_index(task)
    rename = _rename(module_names)
    targets = {}
    for path, module in nnx.iter_modules(model):
        lora = module.lora if isinstance(module, nnx.LoRALinear) else module
        if isinstance(lora, nnx.LoRA) and path:
            targets[rename(".".join(str(p) for p in path))] = lora
    for name, module in bundle.modules.items():
        if t not in module.task_ids:
            continue
        if name not in targets:
            raise AdapterError(
                bundle.path or "<bundle>",
                f"module {name} of task {task!r} has no nnx.LoRA in the model (model LoRAs: "
                f"{', '.join(sorted(targets)[:3])}, ...); pass module_names",
            )
        a_hat, b_hat = module.task_factors(module.task_ids.index(t))
        lora = targets[name]
        dtype = getattr(lora, a_key).get_value().dtype
        getattr(lora, a_key).set_value(jnp.asarray(a_hat.T, dtype))
        getattr(lora, b_key).set_value(jnp.asarray(b_hat.T, dtype))
    return model


def bundle_param_tree(bundle) -> dict[str, dict]:
    """Every task of a bundle as an NNX-style parameter tree:
    `{task: {module path parts...: {"lora_a": [d_in, j], "lora_b": [j, d_out]}}}`."""
    out: dict[str, dict] = {}
    for t, task in enumerate(bundle.tasks):
        tree: dict = {}
        for name, module in bundle.modules.items():
            if t not in module.task_ids:
                continue
            a_hat, b_hat = module.task_factors(module.task_ids.index(t))
            node = tree
            for part in name.split("."):
                node = node.setdefault(part, {})
            node["lora_a"], node["lora_b"] = a_hat.T.copy(), b_hat.T.copy()
        out[task] = tree
    return out
