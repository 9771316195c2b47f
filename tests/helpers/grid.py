"""A small application x language collection with known structure, as arrays and as PEFT
adapter directories (no torch): the planner and `hydraopt plan` tests use it."""

from __future__ import annotations

import json

import numpy as np

APPS, LANGS, RANK = ("chat", "qa"), ("fr", "de", "it"), 4


NAMES = [f"{a}_{b}" for a in APPS for b in LANGS]


ATTRS = [{"app": a, "lang": b} for a in APPS for b in LANGS]


def make_collection(seed=0, rank=RANK, ranks=None):
    """Two 'similar-A' modules (A near one shared init) and two 'dissimilar-A' modules
    (independent A per task), with B structured by application."""
    rng = np.random.default_rng(seed)
    t = len(NAMES)
    app = np.repeat(np.arange(len(APPS)), len(LANGS))
    out = {}
    for layer in range(2):
        for kind, (d_in, d_out), drift in (
            ("q_proj", (32, 32), 0.02),  # similar A
            ("k_proj", (32, 12), 0.02),  # similar A, d_out < d_in
            ("v_proj", (32, 32), None),  # dissimilar A
        ):
            a0 = rng.normal(size=(1, rank, d_in))
            if drift is None:
                a = rng.normal(size=(t, rank, d_in))
            else:
                a = a0 + drift * rng.normal(size=(t, rank, d_in))
            b = rng.normal(size=(len(APPS), d_out, rank))[app] + 0.7 * rng.normal(
                size=(t, d_out, rank)
            )
            out[f"model.layers.{layer}.self_attn.{kind}"] = (a, b)
    if ranks is not None:
        for name, (a, b) in out.items():
            a, b = a.copy(), b.copy()
            for i, r in enumerate(ranks):
                a[i, r:] = 0
                b[i, :, r:] = 0
            out[name] = (a, b, tuple(ranks))
    return out


def write_peft_dirs(root, collection, names=NAMES):
    """One PEFT LoRA adapter directory per task (lora_alpha = r: scale 1)."""
    from hydraopt_jax.io import write_safetensors

    dirs = []
    for t, name in enumerate(names):
        d = root / name
        d.mkdir(parents=True)
        tensors = {}
        for module, (a, b, *_) in collection.items():
            tensors[f"base_model.model.{module}.lora_A.weight"] = a[t].astype(np.float32)
            tensors[f"base_model.model.{module}.lora_B.weight"] = b[t].astype(np.float32)
        write_safetensors(d / "adapter_model.safetensors", tensors)
        config = {
            "peft_type": "LORA",
            "r": RANK,
            "lora_alpha": RANK,
            "target_modules": ["q_proj", "k_proj", "v_proj"],
            "base_model_name_or_path": "tiny",
        }
        (d / "adapter_config.json").write_text(json.dumps(config))
        dirs.append(d)
    return dirs
