"""A testbed collection read through `hydraopt_jax.io` (the one PEFT loader)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["Collection", "load_collection"]


@dataclasses.dataclass
class Collection:
    """The factors of one collection (or a subset of its tasks), stacked per module.

    `A[m]`: `[T, r_max, d_in]`, `B[m]`: `[T, d_out, r_max]` with each task's LoRA scale
    folded into `B`; `scales[m]`: `[T]`, that scale; `ranks[m]`: each task's rank (0 =
    absent); `adapters[t]`: task `t`'s own factors `{module: (A, s B)}`.
    """

    name: str
    path: pathlib.Path
    tasks: list[str]
    modules: list[str]
    A: dict[str, np.ndarray]
    B: dict[str, np.ndarray]
    scales: dict[str, np.ndarray]
    ranks: dict[str, tuple[int, ...]]
    own_accuracy: dict[str, float]
    adapters: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]
    task_attributes: list[dict[str, str]]

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def rank(self) -> int:
        """The adapters' (largest) rank `r`."""
        return max(max(r) for r in self.ranks.values())

    def factors(self) -> dict[str, tuple[np.ndarray, np.ndarray, tuple[int, ...]]]:
        """`{module: (A, B, ranks)}`, the input of `merge_adapters`."""
        return {m: (self.A[m], self.B[m], self.ranks[m]) for m in self.modules}

    def attributes(self) -> list[dict[str, str]]:
        """One `{attribute: value}` per task (e.g. application, language)."""
        return self.task_attributes


def load_collection(
    path: pathlib.Path,
    tasks: Sequence[str] | None = None,
    *,
    order: Callable[[str], int],
    attributes: Callable[[str], dict[str, str]],
) -> Collection:
    """Every adapter of a collection folder (or `tasks`), in `order`, read by
    `hydraopt_jax.io.load_collection`; own accuracies from its `manifest.json`."""
    from hydraopt_jax.io import load_collection as load_peft_collection

    path = pathlib.Path(path)
    manifest = json.loads((path / "manifest.json").read_text())
    available = [p.name for p in path.iterdir() if (p / "adapter_config.json").exists()]
    tasks = list(available if tasks is None else tasks)
    missing = sorted(set(tasks) - set(available))
    if missing:
        raise FileNotFoundError(f"{path}: no adapter for task(s) {', '.join(missing)}")
    tasks = sorted(tasks, key=order)
    peft = load_peft_collection([path / t for t in tasks], tasks)
    A, B, ranks = {}, {}, {}
    for module, a, b, r in peft.iter_modules():
        A[module], B[module], ranks[module] = a, b, tuple(r)
    modules = sorted(A)
    scales = {
        m: np.asarray(
            [a.modules[m].scale if m in a.modules else 0.0 for a in peft.adapters], np.float32
        )
        for m in modules
    }
    adapters = {a.name: a.load_factors(list(a.modules)) for a in peft.adapters}
    own = {t: float(manifest["tasks"][t]["own_accuracy"]) for t in tasks}
    return Collection(
        name=path.name, path=path, tasks=tasks, modules=modules, A=A, B=B, scales=scales,
        ranks=ranks, own_accuracy=own, adapters=adapters,
        task_attributes=[attributes(t) for t in tasks],
    )  # fmt: skip
