"""Write merged tasks back as standard PEFT adapters (`hydraopt export`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._files import (
    AdapterError,
    atomic_dir,
    dtype_name,
    read_json,
    to_dtype,
    write_json,
    write_safetensors,
)
from .peft import CONFIG_NAME, PREFIX, WEIGHTS_NAME

__all__ = ["EXPORT_MARKER", "export_peft", "export_peft_config", "export_peft_tensors"]


def _task_modules(bundle, task: str) -> list[tuple[str, np.ndarray, np.ndarray, str]]:
    """`(module, A_hat [j, d_in], B_hat [d_out, j], kind)` for every module of `task`
    (`j` = the task's rank there: `k`, or `j_t` for nested ranks)."""
    t = bundle.task_index(task)
    out = []
    for name, module in bundle.modules.items():
        if t not in module.task_ids:
            continue
        a, b = module.task_factors(module.task_ids.index(t))
        out.append((name, a, b, module.kind))
    return out


def export_peft_config(bundle, task: str) -> dict:
    """The `adapter_config.json` of `task`'s exported adapter: `r = lora_alpha = k` (the
    task's rank `j_t` for nested ranks).

    The task's original config is kept (target modules, `fan_in_fan_out`,
    `modules_to_save`, base model, task type, ...); only the rank fields change. Modules
    whose `k` differs from the most common one get exact `rank_pattern` / `alpha_pattern`
    entries (escaped full names, so PEFT's regex matches only that module).
    """
    modules = _task_modules(bundle, task)
    config = dict(bundle.task_configs[task])
    ks = [a.shape[0] for _, a, _, _ in modules]
    k = max(set(ks), key=lambda v: (ks.count(v), -v))
    pattern = {re.escape(name): a.shape[0] for name, a, _, _ in modules if a.shape[0] != k}
    pattern = dict(
        sorted(pattern.items(), key=lambda kv: -len(kv[0]))
    )  # longest (most specific) first
    config.update(
        r=int(k),
        lora_alpha=int(k),
        use_rslora=False,
        rank_pattern=dict(pattern),
        alpha_pattern=dict(pattern),
        use_dora=False,
        init_lora_weights=True,
        inference_mode=True,
    )
    return config


def export_peft_tensors(bundle, task: str, dtype=None) -> dict[str, np.ndarray]:
    """The PEFT-layout tensors of `task`'s exported adapter (carried tensors included)."""
    dtype = to_dtype(dtype if dtype is not None else bundle.dtype)
    tensors = {}
    for name, a, b, kind in _task_modules(bundle, task):
        if kind == "embedding":
            keys = (f"{PREFIX}{name}.lora_embedding_A", f"{PREFIX}{name}.lora_embedding_B")
        else:
            keys = (f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight")
        tensors[keys[0]] = np.asarray(a).astype(dtype)
        tensors[keys[1]] = np.asarray(b).astype(dtype)
    tensors.update(bundle.carried.get(task, {}))
    return tensors


EXPORT_MARKER = ".hydraopt-export.json"
"""Written at the root of every export: only a directory holding it (and nothing but the
task directories it lists) is replaced by a later export, never a user's own adapters."""


def _is_export_dir(path: Path) -> bool:
    try:
        tasks = set(read_json(path / EXPORT_MARKER)["tasks"])
    except (AdapterError, TypeError, KeyError):
        return False
    # (reading a marker that is a directory fails above: it must be a file)
    return all(p.name == EXPORT_MARKER or (p.is_dir() and p.name in tasks) for p in path.iterdir())


def export_peft(bundle, out_dir, task: str | Sequence[str] | None = None, dtype=None) -> list[Path]:
    """Write one standard PEFT adapter directory per task: `out_dir/<task>/`.

    `lora_A = shared_a[a_group[t]]`, `lora_B = shared_b[b_group[t]]`, `r = lora_alpha = k`
    (scale 1; with nested ranks `lora_A = V_t^T Ah`, `lora_B = U_t` of rank `j_t`, or the
    mirror image), the task's own target modules; loadable by `peft.PeftModel.from_pretrained`
    with no code of ours. Written atomically (temporary sibling directory, then rename);
    an existing `out_dir` is replaced only if it is empty or a previous export (it holds
    the `.hydraopt-export.json` marker and only the task directories that lists).

    **Arguments:**

    - `bundle`: a `Bundle` or a bundle directory.
    - `out_dir`: the directory to create.
    - `task`: a task name or list of names; all tasks by default.
    - `dtype`: `"float32"`, `"bfloat16"` or `"float16"`; default: the bundle's dtype.

    **Returns:** the adapter directories written.
    """
    from .bundle import Bundle, load_bundle

    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    if dtype is not None:
        dtype = dtype_name(to_dtype(dtype))
    tasks = (
        list(bundle.tasks) if task is None else ([task] if isinstance(task, str) else list(task))
    )
    tasks = list(dict.fromkeys(tasks))  # a task named twice is written once
    for name in tasks:
        bundle.task_index(name)  # raises on unknown names before anything is written
    out_dir = Path(out_dir)
    with atomic_dir(
        out_dir,
        replaceable=_is_export_dir,
        what="a hydraopt export (one PEFT adapter per task)",
        hook="write",
    ) as tmp:
        for name in tasks:
            sub = tmp / name
            sub.mkdir()
            write_json(sub / CONFIG_NAME, export_peft_config(bundle, name))
            write_safetensors(
                sub / WEIGHTS_NAME, export_peft_tensors(bundle, name, dtype), {"format": "pt"}
            )
        write_json(tmp / EXPORT_MARKER, {"format": "hydraopt-export", "tasks": tasks})
    return [out_dir / name for name in tasks]
