"""Synthetic LoRA collections that look like trained ones (for the demo, tests, benchmarks).

LoRA trainers initialise `A` from one seed (Kaiming-uniform) and `B` at zero; after a short,
small-learning-rate fine-tune, `A` stays near its initialisation while `B` carries what the
task learned. We mimic that: `A_t = A_0 + drift * noise_t` per module, and
`B_t = B_app + B_lang + noise`, so tasks of one application (or one language) share part of
their update.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["LLAMA_LIKE_SHAPES", "synthetic_collection"]

# A small Llama-like model with grouped-query attention: (d_in, d_out) per projection.
LLAMA_LIKE_SHAPES: Mapping[str, tuple[int, int]] = {
    "q_proj": (1024, 1024),
    "k_proj": (1024, 256),
    "v_proj": (1024, 256),
    "o_proj": (1024, 1024),
}


def synthetic_collection(
    num_apps: int = 5,
    num_langs: int = 8,
    *,
    num_layers: int = 2,
    shapes: Mapping[str, tuple[int, int]] = LLAMA_LIKE_SHAPES,
    rank: int = 16,
    a_drift: float = 0.1,
    b_structure: Sequence[float] = (1.0, 1.0, 0.5),
    scale: float = 2.0,
    seed: int = 0,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str], list[dict[str, str]]]:
    """`(collection, task_names, task_attributes)` for a grid of applications x languages.

    **Arguments:**

    - `num_apps`, `num_langs`: the task grid (`T = num_apps * num_langs`).
    - `num_layers`, `shapes`: modules `layers.{i}.{name}` with `(d_in, d_out)`.
    - `rank`: LoRA rank `r`; `scale`: `lora_alpha / r`, folded into `B`.
    - `a_drift`: how far each task's `A` moved from the shared init (relative).
    - `b_structure`: weights of the application part, the language part and the task's own
      part of `B`.

    **Returns:** `collection` maps module name to `(A [T, r, d_in], B [T, d_out, r])` float32;
    tasks are named `app{i}_lang{j}`.
    """
    rng = np.random.default_rng(seed)
    names, attrs = [], []
    for i in range(num_apps):
        for j in range(num_langs):
            names.append(f"app{i}_lang{j}")
            attrs.append({"application": f"app{i}", "language": f"lang{j}"})
    app = np.repeat(np.arange(num_apps), num_langs)
    lang = np.tile(np.arange(num_langs), num_apps)
    num_tasks = num_apps * num_langs
    w_app, w_lang, w_own = b_structure

    collection = {}
    for layer in range(num_layers):
        for name, (d_in, d_out) in shapes.items():
            bound = 1.0 / np.sqrt(d_in)  # Kaiming-uniform(a=sqrt(5)) as PEFT initialises A
            a_init = rng.uniform(-bound, bound, size=(1, rank, d_in))
            a = a_init + a_drift * rng.uniform(-bound, bound, size=(num_tasks, rank, d_in))
            b_scale = 0.02
            b = b_scale * (
                w_app * rng.normal(size=(num_apps, d_out, rank))[app]
                + w_lang * rng.normal(size=(num_langs, d_out, rank))[lang]
                + w_own * rng.normal(size=(num_tasks, d_out, rank))
            )
            collection[f"layers.{layer}.{name}"] = (
                a.astype(np.float32),
                (scale * b).astype(np.float32),
            )
    return collection, names, attrs
