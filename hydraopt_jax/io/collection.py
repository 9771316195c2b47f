"""A collection of PEFT adapters (one per task) on one base model, read group by group."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .._host import aligned_zeros
from ._files import AdapterError, check_task_name, kill_point
from .peft import PeftAdapter, load_peft_adapter

__all__ = ["AdapterCollection", "ModuleInfo", "collection_from_adapters", "load_collection"]


@dataclasses.dataclass(frozen=True)
class ModuleInfo:
    """A module across the collection: kind, shape, and each task's rank (0 = absent)."""

    name: str
    kind: str
    d_in: int
    d_out: int
    ranks: tuple[int, ...]

    @property
    def shape_key(self) -> tuple[str, int, int]:
        return (self.kind, self.d_in, self.d_out)

    @property
    def task_ids(self) -> tuple[int, ...]:
        return tuple(t for t, r in enumerate(self.ranks) if r > 0)


@dataclasses.dataclass
class AdapterCollection:
    """Several adapters (one per task) on one base model, read group by group.

    `modules` lists every adapted module with its shape and per-task ranks; modules with
    equal `(kind, d_in, d_out)` form a *shape group*, and `iter_groups()` yields one group's
    `{module: (A [T, r_max, d_in], B [T, d_out, r_max], ranks)}` at a time (float32, scale
    folded into B, zero-padded, absent tasks all zero) — the input of `merge_adapters`.
    """

    adapters: tuple[PeftAdapter, ...]
    modules: dict[str, ModuleInfo]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.adapters)

    @property
    def num_tasks(self) -> int:
        return len(self.adapters)

    @property
    def base_model(self) -> str | None:
        for adapter in self.adapters:
            if adapter.base_model:
                return adapter.base_model
        return None

    def shape_groups(self) -> dict[tuple[str, int, int], tuple[str, ...]]:
        groups: dict[tuple[str, int, int], list[str]] = {}
        for info in self.modules.values():
            groups.setdefault(info.shape_key, []).append(info.name)
        return {k: tuple(v) for k, v in groups.items()}

    def load_group(
        self, names: Sequence[str]
    ) -> dict[str, tuple[np.ndarray, np.ndarray, tuple[int, ...]]]:
        """The merge input for `names` (modules of one shape), padded to their max rank.

        The factors of all `names` live in one aligned, read-only `[M, T, ...]` buffer per
        side, of which each module's arrays are views: `merge_adapters` then solves the group
        without copying it (see `hydraopt_jax._host`).
        """
        infos = [self.modules[n] for n in names]
        r_max = max(max(i.ranks) for i in infos)
        d_in, d_out = infos[0].d_in, infos[0].d_out
        if any((i.d_in, i.d_out) != (d_in, d_out) for i in infos):
            raise ValueError(f"load_group: modules {list(names)} do not all have one shape")
        stack_a = aligned_zeros((len(names), self.num_tasks, r_max, d_in))
        stack_b = aligned_zeros((len(names), self.num_tasks, d_out, r_max))
        slot = {n: i for i, n in enumerate(names)}
        for t, adapter in enumerate(self.adapters):
            present = [n for n in names if n in adapter.modules]
            for n, (a, b) in adapter.load_factors(present).items():
                r = a.shape[0]
                stack_a[slot[n], t, :r] = a
                stack_b[slot[n], t, :, :r] = b
            kill_point("load")  # test hook: die mid-load (see `_files.kill_point`)
        stack_a.flags.writeable = False
        stack_b.flags.writeable = False
        return {n: (stack_a[i], stack_b[i], infos[i].ranks) for i, n in enumerate(names)}

    def iter_groups(self) -> Iterator[tuple[tuple[str, int, int], dict]]:
        """Yield `(shape_key, group_collection)` for each shape group, loading lazily."""
        for key, names in self.shape_groups().items():
            yield key, self.load_group(names)

    def iter_modules(self) -> Iterator[tuple[str, np.ndarray, np.ndarray, tuple[int, ...]]]:
        """Yield `(name, A, B, ranks)` for every module, group by group, one module loaded at
        a time (memory: one module's factors, whatever the size of its shape group), each
        padded to its own largest rank."""
        for names in self.shape_groups().values():
            for name in names:
                ((a, b, ranks),) = self.load_group([name]).values()
                yield name, a, b, ranks


def load_collection(dirs: Sequence, names: Sequence[str] | None = None) -> AdapterCollection:
    """Open several PEFT adapter directories as one collection of tasks.

    Task names come from the directory names, or from `names` (same length, unique).
    Tasks may target different modules; a module adapted by several tasks must have the
    same kind and `(d_in, d_out)` in each (else `AdapterError` naming both files).
    """
    dirs = [Path(d) for d in dirs]
    if not dirs:
        raise AdapterError(".", "no adapter directories given")
    if names is None:
        names = [d.resolve().name for d in dirs]
    else:
        names = list(names)
        if len(names) != len(dirs):
            raise AdapterError(
                dirs[0], f"{len(names)} task names given for {len(dirs)} adapter directories"
            )
    seen: dict[str, Path] = {}
    for name, d in zip(names, dirs, strict=False):
        check_task_name(name, d)
        if name in seen:
            raise AdapterError(
                d,
                f"duplicate task name {name!r} (also {seen[name]}); give distinct names with "
                "--names",
            )
        seen[name] = d
    adapters = tuple(load_peft_adapter(d, name) for d, name in zip(dirs, names, strict=False))
    return collection_from_adapters(adapters)


def collection_from_adapters(adapters) -> AdapterCollection:
    """An `AdapterCollection` of `PeftAdapter`s (one per task, distinct names): each module
    adapted by several tasks must have the same kind and `(d_in, d_out)` in each."""
    adapters = tuple(adapters)
    modules: dict[str, ModuleInfo] = {}
    owner: dict[str, PeftAdapter] = {}
    ranks: dict[str, list[int]] = {}
    for t, adapter in enumerate(adapters):
        for mod, spec in adapter.modules.items():
            if mod not in modules:
                modules[mod] = ModuleInfo(mod, spec.kind, spec.d_in, spec.d_out, ())
                owner[mod] = adapter
                ranks[mod] = [0] * len(adapters)
            first = modules[mod]
            if (first.kind, first.d_in, first.d_out) != (spec.kind, spec.d_in, spec.d_out):
                raise AdapterError(
                    adapter.weights_file,
                    f"module {mod} is {spec.kind} with (d_in, d_out) = ({spec.d_in}, {spec.d_out}) "
                    f"but {owner[mod].weights_file} has {first.kind} ({first.d_in}, "
                    f"{first.d_out}); "
                    "adapters must share one base model",
                )
            ranks[mod][t] = spec.rank
    modules = {m: dataclasses.replace(i, ranks=tuple(ranks[m])) for m, i in modules.items()}
    return AdapterCollection(adapters, modules)
