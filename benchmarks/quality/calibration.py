"""Calibration statistics for the output-aware methods, on training-distribution batches
(never held-out data): `E[x x^T]` of each adapted module's input in the *base* model (the
activation-aware objective), and each module's output sensitivity (Fisher module weights)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["input_covariances", "output_sensitivities"]


def input_covariances(model, modules: Sequence[str], batches: Iterable) -> dict[str, np.ndarray]:
    """`{module: E[x x^T]}` (float32) over the non-padding positions of `batches`.

    `batches`: `(input_ids, attention_mask)` pairs of torch tensors `[n, L]`; each is run
    through `model` and every module's input rows where the mask is 1 are accumulated in
    float64."""
    import torch

    named = dict(model.named_modules())
    sums: dict[str, np.ndarray] = {}
    keep: list[np.ndarray] = []

    def hook(name):
        def fn(_module, inputs):
            x = inputs[0].detach().double().numpy().reshape(-1, inputs[0].shape[-1])[keep[0]]
            sums[name] = sums.get(name, 0.0) + x.T @ x

        return fn

    handles = []
    count = 0
    try:
        for m in modules:  # appended one by one: a failure leaves none registered
            handles.append(named[m].register_forward_pre_hook(hook(m)))
        with torch.no_grad():
            for ids, mask in batches:
                keep[:] = [np.asarray(mask).reshape(-1).astype(bool)]
                model(input_ids=ids, attention_mask=mask, use_cache=False)
                count += int(keep[0].sum())
    finally:
        for h in handles:
            h.remove()
    return {m: (s / count).astype(np.float32) for m, s in sums.items()}


def output_sensitivities(
    model, modules: Sequence[str], task_batches: Iterable[tuple[Mapping, tuple]]
) -> dict[str, float]:
    """`{module: w_m}`, mean 1: how much each module's output error costs the task losses,
    for the planner's `module_weights` (a module counts by what its errors do downstream,
    not by its relative error alone).

    For each task, its own LoRA on `model` and its batch `(input_ids, attention_mask,
    labels)` (labels -100 outside the answers): `f = sum ||dL/dy_m||^2 / (n d_out)` (the
    mean squared gradient of the summed answer cross-entropy `L` with respect to the
    module's output `y_m`, over the `n` unpadded positions) and `u = sum ||dW_m x||^2` (the
    energy of the LoRA's own output change). `f u` is the second-order loss increase of a
    whole-update-sized error in an isotropic-Fisher approximation. Each task's `f u` are
    divided by their sum over modules (each task counts equally, as under the planner's
    `relative` task weights: its answer length or loss scale does not), then averaged over
    tasks; `w_m` is that mean over its mean across modules. The planner's loss of a module
    is its relative output error, so `w_m` times it approximates the Fisher-weighted output
    error when tasks distribute their sensitivity over modules alike. A module a task does
    not adapt contributes 0 for that task."""
    import torch

    from .torch_lora import lora_applied

    named = dict(model.named_modules())
    per_task: dict[str, list[float]] = {m: [] for m in modules}
    outputs, inputs = {}, {}  # of the current task's forward pass

    def hook(name):
        def fn(_module, args, out):
            out.retain_grad()  # the LoRA branch adds to it: the same gradient
            outputs[name], inputs[name] = out, args[0].detach()

        return fn

    params = list(model.parameters())
    trainable = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        for lora, (ids, mask, labels) in task_batches:
            handles = []
            try:  # registered before the LoRA branches: each hook sees the base output
                for m in modules:
                    handles.append(named[m].register_forward_hook(hook(m)))
                with lora_applied(model, lora):
                    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                    logits = model(
                        inputs_embeds=embeds, attention_mask=mask, use_cache=False
                    ).logits
                    loss = torch.nn.functional.cross_entropy(
                        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                        ignore_index=-100, reduction="sum",
                    )  # fmt: skip
                    loss.backward()
            finally:
                for h in handles:
                    h.remove()
            keep = torch.as_tensor(mask).bool()
            task = {}
            for m in modules:
                if m not in lora:  # the task does not adapt this module
                    task[m] = 0.0
                    continue
                g, x = outputs[m].grad[keep].double(), inputs[m][keep].double()
                a, b = (torch.as_tensor(np.asarray(f, dtype=np.float64)) for f in lora[m])
                u = float((((x @ a.T) @ b.T) ** 2).sum())
                task[m] = float((g**2).sum()) / (g.shape[0] * g.shape[1]) * u
            total = sum(task.values())
            for m in modules:  # each task counts equally, as under `relative` task weights
                per_task[m].append(task[m] / total if total > 0 else 0.0)
    finally:  # the model is left as it was given
        for p, flag in zip(params, trainable, strict=True):
            p.requires_grad_(flag)
    weights = {m: float(np.mean(v)) for m, v in per_task.items()}
    mean = float(np.mean(list(weights.values())))
    if not mean > 0:
        raise ValueError("output sensitivities: every module's weight is 0 (no LoRA update?)")
    return {m: w / mean for m, w in weights.items()}
