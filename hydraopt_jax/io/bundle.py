"""The HydraOpt bundle: `OUT/hydraopt.json` + `OUT/factors.safetensors`.

`hydraopt.json` (format version 3) holds

```
{"format_version": 3, "tasks": [names], "base_model": str | null, "dtype": "float32",
 "solver": ..., "plan": <how the plan was chosen>, "num_params", "original_params",
 "storage_ratio",
 "modules": {module: {"kind": "linear" | "embedding", "d_in", "d_out", "rank": k,
             "task_ids": [global task index], "task_ranks": [r_t], "plan": {"a_group",
             "b_group", "rank"[, "task_rank"]} (over the module's tasks),
             "core": null | "nested" | "full" | "diagonal", ["packed": true,]
             "relative_error": [...],
             "task_sq_norms": [||dW_t||_F^2], "loss", "steps", "result",
             "num_params", "original_params"}},
 "task_configs": {task: original adapter_config.json},
 "carried": {task: [tensor keys kept verbatim]}}
```

and `factors.safetensors` the tensors `modules/<module>/shared_a` `[K_A, k_a, d_in]`,
`modules/<module>/shared_b` `[K_B, d_out, k_b]` (a task-specific factor is a group of one),
`modules/<module>/cores` `[T_m, k_b, k_a]` when the module has cores (nested ranks, or a
shared-basis baseline; see `hydraopt_jax.Solution`) and `carried/<task>/<key>`
(`modules_to_save` etc., original dtype). Per-task factors whose tasks' ranks differ are
stored packed (`"packed": true`; `bundle_module`): the file holds the parameters the
storage counts, without padding. Version 2 bundles (padded, never packed) and version 1
bundles (no cores, no `core` key) are read as well. The directory is written atomically;
an existing output that is not a bundle is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .._loss import plan_residual_norms_sq
from .._plan import SharingPlan
from .._solution import plain_factors, task_relative_errors
from ._files import (
    AdapterError,
    atomic_dir,
    check_task_name,
    dtype_name,
    read_json,
    read_safetensors,
    read_safetensors_header,
    to_dtype,
    write_json,
    write_safetensors,
)
from .bundle_module import META_NAME, BundleModule, module_from_json, module_tensors

__all__ = [
    "FORMAT_VERSION",
    "Bundle",
    "BundleModule",
    "check_bundle_output",
    "is_bundle",
    "load_bundle",
    "save_bundle",
]

FORMAT_VERSION = 3
READ_VERSIONS = (1, 2, 3)
FACTORS_NAME = "factors.safetensors"


@functools.partial(jax.jit, static_argnames=("plan", "core"))
def _stored_errors_sq(A, B, stored_a, stored_b, stored_cores, plan: SharingPlan, core):
    """`||B_t A_t - dW_hat_t||_F^2` per task for the factors as stored (rounded to the
    bundle's dtype, widened back to float32 exactly): the core's QR residuals, accurate to
    round-off of `||dW_t||`."""
    f32 = jnp.float32
    cores = None if stored_cores is None else stored_cores.astype(f32)
    sa, sb, plain = plain_factors(stored_a.astype(f32), stored_b.astype(f32), cores, plan, core)
    return plan_residual_norms_sq(A.astype(f32), B.astype(f32), sa, sb, plain)


@dataclasses.dataclass
class Bundle:
    """Everything `hydraopt export` needs: factors, plans, task configs, carried tensors."""

    tasks: tuple[str, ...]
    modules: dict[str, BundleModule]
    task_configs: dict[str, dict]
    carried: dict[str, dict[str, np.ndarray]]
    base_model: str | None = None
    dtype: str = "float32"
    meta: dict = dataclasses.field(default_factory=dict)
    path: Path | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def empty(
        cls, collection, *, dtype="float32", meta: Mapping | None = None, carried: bool = True
    ) -> Bundle:
        """A bundle for `collection` (an `AdapterCollection`) with no modules yet.

        Carried tensors (`modules_to_save`, ...) are read here, once (not with
        `carried=False`: a part of a multi-process merge holds modules only).
        """
        tensors = {}
        for adapter in collection.adapters:
            tensors[adapter.name] = (
                adapter.read_tensors(adapter.carried_keys)
                if carried and adapter.carried_keys
                else {}
            )
        return cls(
            tasks=collection.names,
            modules={},
            task_configs={a.name: dict(a.config) for a in collection.adapters},
            carried=tensors,
            base_model=collection.base_model,
            dtype=dtype_name(to_dtype(dtype)),
            meta=dict(meta or {}),
        )

    def add_solutions(self, group: Mapping, solutions: Mapping, kinds: Mapping[str, str]) -> None:
        """Add merged modules: `group` is the merge input, `solutions` its `Solution`s.

        Raises `ValueError` if a solution holds NaN or Inf, or overflows the stored dtype.
        """
        dtype = to_dtype(self.dtype)
        for name, sol in solutions.items():
            a_all, b_all, ranks = group[name]
            arrays = {
                "shared_a": np.asarray(sol.shared_a, dtype=np.float32),
                "shared_b": np.asarray(sol.shared_b, dtype=np.float32),
            }
            if sol.cores is not None:
                arrays["cores"] = np.asarray(sol.cores, dtype=np.float32)
            if not all(np.all(np.isfinite(x)) for x in arrays.values()):
                raise ValueError(f"module {name}: the solver returned non-finite factors")
            with np.errstate(over="ignore", invalid="ignore"):  # float32: the result itself
                stored = {key: x.astype(dtype, copy=False) for key, x in arrays.items()}
            if not all(np.all(np.isfinite(x)) for x in stored.values()):
                biggest = float(max(np.max(np.abs(x)) for x in arrays.values()))
                raise ValueError(
                    f"module {name}: a factor value ({biggest:.3g}) overflows {self.dtype}; "
                    "store as bfloat16 or float32"
                )
            task_ids = tuple(int(t) for t in sol.task_ids)
            sq_norms = tuple(float(x) for x in np.asarray(sol.task_sq_norms, np.float64))
            relative_error = tuple(float(e) for e in np.asarray(sol.relative_error))
            loss = float(np.asarray(sol.loss))
            if dtype != np.float32:  # report what is stored, not the float32 fit
                ids = np.asarray(task_ids)
                errors_sq = np.asarray(
                    _stored_errors_sq(
                        a_all[ids], b_all[ids], stored["shared_a"], stored["shared_b"],
                        stored.get("cores"), sol.plan, sol.core,
                    ),
                    np.float64,
                )  # fmt: skip
                relative_error = tuple(
                    math.sqrt(e / n) if n > 0 else 0.0
                    for e, n in zip(errors_sq, sq_norms, strict=True)
                )
                loss = float(np.dot(np.asarray(sol.weights, np.float64), errors_sq))
            self.modules[name] = BundleModule(
                name=name,
                kind=kinds[name],
                d_in=int(sol.d_in),
                d_out=int(sol.d_out),
                task_ids=task_ids,
                task_ranks=tuple(int(ranks[t]) for t in task_ids),
                plan=sol.plan,
                shared_a=stored["shared_a"],
                shared_b=stored["shared_b"],
                relative_error=relative_error,
                task_sq_norms=sq_norms,
                loss=loss,
                steps=int(np.asarray(sol.steps)),
                result=int(np.asarray(sol.result)),
                cores=stored.get("cores"),
                core=sol.core,
            )

    # ------------------------------------------------------------------ queries
    def task_index(self, task: str) -> int:
        if task not in self.tasks:
            raise AdapterError(
                self.path or "<bundle>",
                f"unknown task {task!r}; the bundle has {', '.join(self.tasks)}",
            )
        return self.tasks.index(task)

    @property
    def num_params(self) -> int:
        return sum(m.num_params for m in self.modules.values())

    @property
    def original_params(self) -> int:
        return sum(m.original_params for m in self.modules.values())

    @property
    def storage_ratio(self) -> float:
        return self.num_params / max(self.original_params, 1)

    def task_relative_errors(self) -> dict[str, float]:
        """Per task, the relative error of its whole update (all modules at once), as
        `hydraopt_jax.task_relative_errors` defines it."""
        errors = task_relative_errors(self.modules, len(self.tasks))
        return {t: float(e) for t, e in zip(self.tasks, errors, strict=True)}

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "tasks": list(self.tasks),
            "base_model": self.base_model,
            "dtype": self.dtype,
            **{k: v for k, v in self.meta.items() if k not in _RESERVED},
            "num_params": self.num_params,
            "original_params": self.original_params,
            "storage_ratio": self.storage_ratio,
            "modules": {name: m.to_json() for name, m in self.modules.items()},
            "task_configs": self.task_configs,
            "carried": {t: list(v) for t, v in self.carried.items()},
        }


_RESERVED = {
    "format_version",
    "tasks",
    "base_model",
    "dtype",
    "num_params",
    "original_params",
    "storage_ratio",
    "modules",
    "task_configs",
    "carried",
}


def is_bundle(path) -> bool:
    """`path` is a directory holding a `hydraopt.json` with a `format_version`."""
    meta = Path(path) / META_NAME
    if not meta.is_file():
        return False
    try:
        return "format_version" in read_json(meta)
    except (AdapterError, TypeError):
        return False


def check_bundle_output(out) -> Path:
    """`out` as a `Path` if a bundle may be written there (absent, an empty directory, or a
    bundle), else `AdapterError(out)`: nothing else is ever overwritten."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and (is_bundle(out) or not any(out.iterdir()))):
        raise AdapterError(out, "exists and is not a hydraopt bundle; refusing to overwrite it")
    return out


def save_bundle(bundle: Bundle, out_dir) -> Path:
    """Write `bundle` to `out_dir` atomically (temporary sibling directory, fsync, rename).

    An existing `out_dir` is replaced only if it is empty or a bundle.
    """
    tensors = {}
    for name, module in bundle.modules.items():
        tensors.update(module_tensors(name, module))
    for task, carried in bundle.carried.items():
        for key, value in carried.items():
            tensors[f"carried/{task}/{key}"] = value
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, replaceable=is_bundle, what="a hydraopt bundle", hook="write") as tmp:
        write_safetensors(
            tmp / FACTORS_NAME,
            tensors,
            {"format": "hydraopt", "format_version": str(FORMAT_VERSION)},
        )
        write_json(tmp / META_NAME, bundle.to_json())
    bundle.path = out_dir
    return out_dir


def load_bundle(path) -> Bundle:
    """Read a bundle directory written by `save_bundle` (or `hydraopt merge`)."""
    path = Path(path)
    meta_file, factors_file = path / META_NAME, path / FACTORS_NAME
    if not path.is_dir():
        raise AdapterError(path, "no such bundle directory")
    if not meta_file.is_file():
        raise AdapterError(meta_file, "missing; not a hydraopt bundle")
    meta = read_json(meta_file)
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version not in READ_VERSIONS:
        raise AdapterError(
            meta_file,
            f"format_version is {version!r}; this hydraopt reads versions "
            f"{', '.join(map(str, READ_VERSIONS))}",
        )
    header = read_safetensors_header(factors_file)
    tensors = read_safetensors(factors_file, list(header))
    try:
        tasks, modules, task_configs, carried, dtype = _parse_meta(meta, tensors, meta_file)
    except AdapterError:
        raise
    except KeyError as err:
        raise AdapterError(meta_file, f"bundle is incomplete: missing {err}") from None
    except (TypeError, ValueError, AttributeError, IndexError, RecursionError) as err:
        cause = " ".join(str(err).split()) or type(err).__name__
        raise AdapterError(meta_file, f"malformed bundle ({cause})") from None
    for name, module in modules.items():
        factors = [module.shared_a, module.shared_b]
        if module.cores is not None:
            factors.append(module.cores)
        if not all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in factors):
            raise AdapterError(factors_file, f"module {name}: the factors hold NaN or Inf")
    if tensors:
        raise AdapterError(
            factors_file, f"unexpected tensors {sorted(tensors)[:3]} not described by {META_NAME}"
        )
    return Bundle(
        tasks=tasks,
        modules=modules,
        task_configs=task_configs,
        carried=carried,
        base_model=meta.get("base_model"),
        dtype=dtype,
        meta={k: v for k, v in meta.items() if k not in _RESERVED},
        path=path,
    )


def _parse_meta(meta: dict, tensors: dict, meta_file: Path):
    """`(tasks, modules, task_configs, carried, dtype)` from `hydraopt.json`, popping the
    tensors it describes; raises `AdapterError` / `KeyError` / `TypeError` on bad content."""
    factors_file = meta_file.parent / FACTORS_NAME
    tasks = meta["tasks"]
    if not isinstance(tasks, list):
        raise TypeError(f"tasks must be a list of names, got {type(tasks).__name__}")
    tasks = tuple(check_task_name(t, meta_file) for t in tasks)
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"duplicate task names in tasks {list(tasks)}")
    dtype = dtype_name(to_dtype(meta.get("dtype", "float32")))
    task_configs = meta.get("task_configs", {})
    if not isinstance(task_configs, dict) or any(
        not isinstance(task_configs.get(t), dict) for t in tasks
    ):
        raise ValueError("task_configs must hold one adapter config (an object) per task")
    for key in ("modules", "carried"):
        if not isinstance(meta.get(key, {}), dict):
            raise TypeError(f"{key} must be an object, got {type(meta[key]).__name__}")
    modules = {}

    def pop(key):
        if key not in tensors:
            raise AdapterError(factors_file, f"missing tensor {key} that {META_NAME} describes")
        return tensors.pop(key)

    for name, m in meta["modules"].items():
        modules[name] = module_from_json(name, m, pop, len(tasks), meta_file, factors_file)
    carried = {t: {} for t in tasks}
    for task, keys in meta.get("carried", {}).items():
        if task not in carried:
            raise ValueError(f"carried tensors of unknown task {task!r}")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise TypeError(f"carried[{task!r}] must be a list of tensor names")
        for key in keys:
            carried[task][key] = pop(f"carried/{task}/{key}")
    return tasks, modules, task_configs, carried, dtype
