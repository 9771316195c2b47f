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

import numpy as np
import torch

from ..quality.torch_lora import load_adapter as load_adapter_factors  # noqa: F401 (API)
from ..quality.torch_lora import lora_modules
from . import tasks as T

_PREFIX = "base_model.model."


def apply_lora(base_model, lora: dict | None, scale: float = 1.0):
    """A copy of `base_model` with `W + scale * B @ A` written into every listed module."""
    model = copy.deepcopy(base_model).eval()
    if not lora:
        return model
    with torch.no_grad():
        for module, a, b in lora_modules(model, lora):
            module.weight += scale * (b @ a)
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
