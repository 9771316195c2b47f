"""Activation statistics for the activation-aware methods: `E[x x^T]` of each adapted
module's input in the *base* model, on training-distribution batches (never held-out data)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["input_covariances"]


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

    handles = [named[m].register_forward_pre_hook(hook(m)) for m in modules]
    count = 0
    try:
        with torch.no_grad():
            for ids, mask in batches:
                keep[:] = [np.asarray(mask).reshape(-1).astype(bool)]
                model(input_ids=ids, attention_mask=mask, use_cache=False)
                count += int(keep[0].sum())
    finally:
        for h in handles:
            h.remove()
    return {m: (s / count).astype(np.float32) for m, s in sums.items()}
