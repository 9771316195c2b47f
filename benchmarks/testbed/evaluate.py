"""Evaluation harness: exact-match accuracy of the base model plus a (merged) LoRA.

A LoRA is given in factored form, `{module: (A [k, d_in], B [d_out, k])}` with the scale
already folded into `B`, where `module` is the PEFT module name without the
`base_model.model.` prefix (e.g. `model.layers.0.self_attn.q_proj`). The harness adds
`scale * B @ A` densely into a *copy* of the base weights (this is the harness, not the merge
engine) and decodes greedily on the task's held-out test set.

    from benchmarks.testbed import evaluate as E, model as M, tasks as T
    base = M.load_base_model()
    lora = E.load_adapter_factors("benchmarks/testbed/adapters/small_lr_same_seed/sort_L3")
    E.evaluate_task(base, T.task_from_name("sort_L3"), lora)   # ~1.0
"""

from __future__ import annotations

import copy
import json
import math
import pathlib

import numpy as np
import torch
from safetensors.numpy import load_file

from . import tasks as T

_PREFIX = "base_model.model."


def load_adapter_factors(
    adapter_dir: str | pathlib.Path,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read a PEFT LoRA directory into `{module: (A [r, d_in], B [d_out, r] * scale)}`.

    The scale is `lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`, honouring
    `rank_pattern` / `alpha_pattern`. Only plain linear LoRA tensors are accepted.
    """
    adapter_dir = pathlib.Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("use_dora"):
        raise ValueError(f"{adapter_dir}: DoRA adapters are not supported by the testbed")
    if config.get("fan_in_fan_out"):
        raise ValueError(f"{adapter_dir}: fan_in_fan_out adapters are not supported")
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise ValueError(f"{adapter_dir}: unexpected tensor {key!r}")
            continue
        module = key[: -len(".lora_A.weight")]
        b = tensors[module + ".lora_B.weight"]
        if module.startswith(_PREFIX):
            module = module[len(_PREFIX) :]
        r = a.shape[0]
        rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        if rank != r:
            raise ValueError(f"{adapter_dir}: {module} has rank {r}, config says {rank}")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        factors[module] = (a.astype(np.float32), (b * scale).astype(np.float32))
    return factors


def _pattern_value(pattern: dict, module: str, default):
    # PEFT matches pattern keys as suffixes of the module name
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
    return default


def apply_lora(base_model, lora: dict | None, scale: float = 1.0):
    """A copy of `base_model` with `W + scale * B @ A` written into every listed module."""
    model = copy.deepcopy(base_model).eval()
    if not lora:
        return model
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (a, b) in lora.items():
            if name not in modules:
                raise KeyError(f"LoRA module {name!r} is not a module of the base model")
            weight = modules[name].weight
            a = torch.as_tensor(np.asarray(a, dtype=np.float32))
            b = torch.as_tensor(np.asarray(b, dtype=np.float32))
            if (b.shape[0], a.shape[1]) != tuple(weight.shape) or a.shape[0] != b.shape[1]:
                raise ValueError(
                    f"LoRA for {name}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit "
                    f"weight {tuple(weight.shape)}"
                )
            weight += scale * (b @ a)
    return model


@torch.no_grad()
def greedy_accuracy(model, task: T.Task, inputs: list[tuple[int, ...]]) -> float:
    """Exact-match accuracy of greedy decoding (answer and EOS must match)."""
    model.eval()
    by_len: dict[int, list[tuple[int, ...]]] = {}
    for x in inputs:
        by_len.setdefault(len(x), []).append(x)
    correct = 0
    for n, xs in by_len.items():
        # equal prompt lengths: one batch, no padding, no attention mask needed
        prompts = torch.tensor([[T.BOS, task.task_token, *x, T.SEP] for x in xs])
        targets = [task.transform(list(x)) + [T.EOS] for x in xs]
        seq = prompts
        for _ in range(n + 1):
            logits = model(input_ids=seq, use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        gen = seq[:, prompts.shape[1] :].tolist()
        for g, y in zip(gen, targets, strict=True):
            correct += g[: len(y)] == y
    return correct / len(inputs)


def evaluate_task(
    base_model,
    task: T.Task | str,
    lora: dict[str, tuple[np.ndarray, np.ndarray]] | None,
    scale: float = 1.0,
    split: str = "test",
) -> float:
    """Exact-match accuracy on `task`'s held-out split of `base_model` + `scale * B @ A`.

    **Arguments**: `base_model` a `LlamaForCausalLM` (not modified); `task` a `Task` or a name;
    `lora` `{module: (A [k, d_in], B [d_out, k])}` with the LoRA scale folded into `B`, or
    `None` for the base model; `scale` an extra multiplier.
    **Returns**: accuracy in [0, 1].
    """
    if isinstance(task, str):
        task = T.task_from_name(task)
    model = apply_lora(base_model, lora, scale)
    return greedy_accuracy(model, task, T.heldout_inputs(task, split))


def load_collection(collection_dir: str | pathlib.Path) -> dict[str, dict]:
    """Every adapter of a collection folder: `{task_name: {module: (A, B * scale)}}`."""
    collection_dir = pathlib.Path(collection_dir)
    return {
        p.name: load_adapter_factors(p)
        for p in sorted(collection_dir.iterdir())
        if (p / "adapter_config.json").exists()
    }


def normalized_score(
    base_model,
    loras: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]],
    collection_dir: str | pathlib.Path,
) -> dict:
    """Paper-style score of (merged) per-task LoRAs against the collection's own LoRAs.

    `score = mean_t accuracy_t / own_accuracy_t`, with the own-LoRA accuracies read from the
    collection's `manifest.json`. **Arguments**: `loras` `{task_name: {module: (A, B)}}` (scale
    folded), e.g. the task factors of a merged solution. **Returns**
    `{"score": float, "accuracy": {task: float}, "relative": {task: float}}`.
    """
    manifest = json.loads((pathlib.Path(collection_dir) / "manifest.json").read_text())
    accuracy, relative = {}, {}
    for name, lora in loras.items():
        own = manifest["tasks"][name]["own_accuracy"]
        accuracy[name] = evaluate_task(base_model, name, lora)
        relative[name] = accuracy[name] / own
    return dict(score=float(np.mean(list(relative.values()))), accuracy=accuracy, relative=relative)
