"""A testbed collection read through `hydraopt_jax.io` (the one PEFT loader)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "Collection",
    "adapters_digest",
    "load_collection",
    "recorded_entry",
    "tensors_sha256",
]


@dataclasses.dataclass
class Collection:
    """The factors of one collection (or a subset of its tasks), stacked per module.

    `A[m]`: `[T, r_max, d_in]`, `B[m]`: `[T, d_out, r_max]` with each task's LoRA scale
    folded into `B`; `scales[m]`: `[T]`, that scale; `ranks[m]`: each task's rank (0 =
    absent); `adapters[t]`: task `t`'s own factors `{module: (A, s B)}`; `checksums[t]`:
    `tensors_sha256` of the adapter file read (what was scored, whatever a manifest says).
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
    checksums: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def digest(self) -> str | None:
        """`adapters_digest` of the tasks read: one name for this set of adapters (None
        without checksums)."""
        return adapters_digest(self.checksums) if self.checksums else None

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
    checksums = {t: tensors_sha256(path / t) for t in tasks}
    own = {t: _own_accuracy(path / t, manifest["tasks"][t], checksums[t]) for t in tasks}
    return Collection(
        name=path.name, path=path, tasks=tasks, modules=modules, A=A, B=B, scales=scales,
        ranks=ranks, own_accuracy=own, adapters=adapters,
        task_attributes=[attributes(t) for t in tasks], checksums=checksums,
    )  # fmt: skip


def _own_accuracy(adapter_dir: pathlib.Path, row: dict, checksum: str) -> float:
    """The own accuracy the manifest records for *these* tensors (`recorded_entry`)."""
    return float(recorded_entry(adapter_dir, row, checksum)["own_accuracy"])


def recorded_entry(adapter_dir: pathlib.Path, row: dict, checksum: str) -> dict:
    """What the manifest records of the tensors with `checksum` (own accuracy, seconds,
    seed, ...): the row, or its `regenerated` entry (a retrained adapter, other bits); a row
    without a checksum (the tiny testbed's) is taken as it is. ValueError naming the folder
    when neither matches."""
    regenerated = row.get("regenerated", {})
    if regenerated.get("sha256") == checksum:
        return regenerated
    if row.get("sha256", checksum) == checksum:
        return row
    raise ValueError(
        f"{adapter_dir}: its tensors match neither the manifest's checksum nor a regenerated "
        "one (an adapter written but not recorded: retrain it with train.py)"
    )


def tensors_sha256(path: pathlib.Path) -> str:
    """SHA-256 over the tensors (names, dtypes, shapes, bytes, sorted by name) of a safetensors
    file, or of a PEFT adapter folder's: unchanged by the file's metadata or tensor order."""
    from safetensors.numpy import load_file

    path = pathlib.Path(path)
    file = path / "adapter_model.safetensors" if path.is_dir() else path
    h = hashlib.sha256()
    for key, value in sorted(load_file(str(file)).items()):
        h.update(f"{key}|{value.dtype}|{value.shape}|".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    return h.hexdigest()


def adapters_digest(checksums: Mapping[str, str]) -> str:
    """16 hex digits naming a set of adapters: a SHA-256 over `task:tensors_sha256` lines,
    sorted by task (so a manifest's recorded checksums name the set they were taken of)."""
    text = "".join(f"{t}:{checksums[t]}\n" for t in sorted(checksums))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
