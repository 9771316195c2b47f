"""The PyTorch side the testbeds share: reading an adapter, putting `{module: (A, B)}`
factors on a model's layers, and the LoRA fine-tuning setup. (torch is imported on use.)"""

from __future__ import annotations

import copy

import numpy as np

# Putting factors on a model's layers is the package's (`hydraopt_jax.io.torch`).
from hydraopt_jax.io.torch import lora_applied, lora_modules

__all__ = [
    "initial_lora_a",
    "load_adapter",
    "lora_applied",
    "lora_modules",
    "lora_training",
    "seeded_peft_model",
]


def load_adapter(path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A PEFT LoRA directory as `{module: (A [r, d_in], s B [d_out, r])}`, read by
    `hydraopt_jax.io` (the package's loader: PEFT's own scale and pattern rules)."""
    from hydraopt_jax.io import load_peft_adapter

    adapter = load_peft_adapter(path)
    return adapter.load_factors(list(adapter.modules))


def seeded_peft_model(base, lora_config: dict, seed: int):
    """A PEFT LoRA on a copy of `base`, created right after `torch.manual_seed(seed)`: the
    seed fixes the `lora_A` init (kaiming-uniform) and, in training, dropout; `lora_B`
    starts at 0."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(copy.deepcopy(base), LoraConfig(task_type="CAUSAL_LM", **lora_config))


def initial_lora_a(base, lora_config: dict, seed: int) -> dict[str, np.ndarray]:
    """`{module: A0}`: the `lora_A` PEFT initialises on `base` under `seed` (what training
    under that seed started from), module names without PEFT's prefix."""
    prefix, suffix = "base_model.model.", ".lora_A.default.weight"
    return {
        k[len(prefix) : -len(suffix)]: v.detach().numpy().copy()
        for k, v in seeded_peft_model(base, lora_config, seed).named_parameters()
        if k.endswith(suffix)
    }


def lora_training(base, lora_config: dict, seed: int, *, lr: float, weight_decay: float,
                  steps: int, warmup: int):  # fmt: skip
    """`(model, params, optimizer, scheduler)`: `seeded_peft_model`, AdamW and a linear
    warm-up then linear decay to 0 at `steps`."""
    import torch

    model = seeded_peft_model(base, lora_config, seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    return model, params, opt, sched
