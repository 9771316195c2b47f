"""One merged module of a bundle: its factors, plan and errors, and its JSON / tensor form
(shared by bundles and the parts of a multi-process merge).

**Packed factors.** In memory a module's per-task factors are padded to the largest task
rank `j_max` (one array per side, as `Solution` holds them). Where the tasks' ranks differ
(nested ranks or `own_ranks` with uneven `j_t`), the file stores each per-task array packed:
task by task, its first `j_t` rank slices concatenated along the rank axis (`[sum_t j_t, d]`
for a `[T, j_max, d]` array, `[d, sum_t j_t]` for `[T, d, j_max]`), and the module's JSON
says `"packed": true`. So the file holds exactly the parameters the storage counts
(`SharingPlan.num_params`), not the padding."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from .._plan import SharingPlan
from .._solution import CORE_KINDS, factor_pair, factor_shapes, stored_params
from ._files import AdapterError

__all__ = ["BundleModule", "module_arrays", "module_from_json", "module_tensors"]

META_NAME = "hydraopt.json"


def _num(x):
    x = float(x)
    return x if math.isfinite(x) else None


@dataclasses.dataclass
class BundleModule:
    """The merged factors of one module and how well they reconstruct each task."""

    name: str
    kind: str
    d_in: int
    d_out: int
    task_ids: tuple[int, ...]
    task_ranks: tuple[int, ...]
    plan: SharingPlan
    shared_a: np.ndarray  # [K_A, k_a, d_in] in the bundle dtype
    shared_b: np.ndarray  # [K_B, d_out, k_b]
    relative_error: tuple[float, ...]
    task_sq_norms: tuple[float, ...]
    loss: float = float("nan")
    steps: int = 0
    result: int = 0
    cores: np.ndarray | None = None  # [T_m, k_b, k_a]
    core: str | None = None

    @property
    def rank(self) -> int:
        """The shared rank `k`."""
        return int(self.plan.rank)

    @property
    def num_params(self) -> int:
        return stored_params(self.plan, self.core, self.d_in, self.d_out)

    @property
    def packed(self) -> bool:
        """Its file form packs per-task factors of uneven ranks (module docstring)."""
        return bool(_ragged(self.plan, self.core))

    def task_factors(self, local: int) -> tuple[np.ndarray, np.ndarray]:
        """`(A_hat [j, d_in], B_hat [d_out, j])` of the module's task `local` in float32."""
        f32 = np.float32
        cores = None if self.cores is None else np.asarray(self.cores, f32)
        a, b = factor_pair(
            np.asarray(self.shared_a, f32), np.asarray(self.shared_b, f32), cores,
            self.plan, self.core, local,
        )  # fmt: skip
        return np.ascontiguousarray(a), np.ascontiguousarray(b)

    @property
    def original_params(self) -> int:
        return int(sum(self.task_ranks)) * (self.d_in + self.d_out)

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "d_in": self.d_in,
            "d_out": self.d_out,
            "rank": self.rank,
            "task_ids": list(self.task_ids),
            "task_ranks": list(self.task_ranks),
            "plan": self.plan.to_dict(),
            "core": self.core,
            **({"packed": True} if self.packed else {}),
            "relative_error": [_num(e) for e in self.relative_error],
            "task_sq_norms": [_num(e) for e in self.task_sq_norms],
            "loss": _num(self.loss),
            "steps": int(self.steps),
            "result": int(self.result),
            "num_params": self.num_params,
            "original_params": self.original_params,
        }


def _ragged(plan: SharingPlan, core: str | None) -> dict[str, tuple[int, np.ndarray]]:
    """`{array: (rank axis, rank of each leading index)}` of the per-task arrays padded to
    `j_max` whose tasks' ranks differ (empty when nothing is padded)."""
    if plan.task_rank is None or len(set(plan.task_rank)) == 1:
        return {}
    j = np.asarray(plan.task_rank)
    by_a, by_b = j[np.argsort(plan.a_group)], j[np.argsort(plan.b_group)]  # group -> its task
    if plan.own_ranks:
        return {"shared_a": (1, by_a), "shared_b": (2, by_b)}
    if core != "nested":
        return {}
    if plan.nested_side == "b":  # U_t [d_out, j_t] per B-group of one, V_t^T [j_t, k] by task
        return {"shared_b": (2, by_b), "cores": (1, j)}
    return {"shared_a": (1, by_a), "cores": (2, j)}


def _pack(x: np.ndarray, axis: int, ranks: np.ndarray) -> np.ndarray:
    """`[G, j_max, d]` -> `[sum j_g, d]` (axis 1), `[G, d, j_max]` -> `[d, sum j_g]` (axis 2)."""
    x = np.asarray(x)
    if axis == 1:
        return np.concatenate([x[g, :j] for g, j in enumerate(ranks)], axis=0)
    return np.concatenate([x[g, :, :j] for g, j in enumerate(ranks)], axis=1)


def _unpack(x: np.ndarray, axis: int, ranks: np.ndarray) -> np.ndarray:
    """The inverse of `_pack`: zero padding to `j_max` restored."""
    x = np.asarray(x)
    j_max, offsets = int(ranks.max()), np.concatenate([[0], np.cumsum(ranks)])
    d = x.shape[1] if axis == 1 else x.shape[0]
    out = np.zeros((len(ranks), j_max, d) if axis == 1 else (len(ranks), d, j_max), x.dtype)
    for g, j in enumerate(ranks):
        if axis == 1:
            out[g, :j] = x[offsets[g] : offsets[g] + j]
        else:
            out[g, :, :j] = x[:, offsets[g] : offsets[g] + j]
    return out


def module_tensors(name: str, module: BundleModule) -> dict[str, np.ndarray]:
    """The tensors of `module` under their bundle keys (`modules/<name>/shared_a`, ...), as
    the file holds them (per-task arrays of uneven ranks packed: module docstring)."""
    arrays = {"shared_a": module.shared_a, "shared_b": module.shared_b, "cores": module.cores}
    ragged = _ragged(module.plan, module.core)
    return {
        f"modules/{name}/{key}": _pack(x, *ragged[key]) if key in ragged else x
        for key, x in arrays.items()
        if x is not None
    }


def module_arrays(name: str, plan: SharingPlan, core: str | None, packed: bool, get) -> dict:
    """`{"shared_a", "shared_b", "cores"}` of a module in memory (padded to `j_max`) from
    its tensors, read with `get(key)` (`cores` None when the module has none); `packed`: the
    file's layout (module docstring; bundles before format 3 are never packed)."""
    ragged = _ragged(plan, core) if packed else {}
    if packed and not ragged:
        raise ValueError(f"module {name}: packed factors, but its plan has one rank per task")
    out = {"cores": None}
    for key in ("shared_a", "shared_b", "cores") if core is not None else ("shared_a", "shared_b"):
        x = get(f"modules/{name}/{key}")
        if key in ragged:
            axis, ranks = ragged[key]
            if x.ndim != 2 or x.shape[axis - 1] != int(ranks.sum()):
                raise ValueError(
                    f"module {name}: packed {key} has shape {list(x.shape)}, expected "
                    f"{int(ranks.sum())} rank slices on axis {axis - 1}"
                )
            x = _unpack(x, axis, ranks)
        out[key] = x
    return out


def module_from_json(name: str, m: dict, pop, num_tasks: int, meta_file, factors_file):
    """A `BundleModule` from its `hydraopt.json` entry `m`, its tensors taken with
    `pop(key)`; raises `AdapterError` / `KeyError` / `TypeError` / `ValueError` on bad
    content (shapes that do not fit the plan, task ids out of range, ...)."""
    plan = SharingPlan.from_dict({**m["plan"], "rank": m["rank"]})
    core = m.get("core")
    if core not in CORE_KINDS or (core == "nested") != plan.nested:
        raise ValueError(f"module {name}: core {core!r} does not fit its plan")
    packed = m.get("packed", False)
    if not isinstance(packed, bool):
        raise TypeError(f"module {name}: packed must be true or false, got {packed!r}")
    arrays = module_arrays(name, plan, core, packed, pop)
    a, b, cores = arrays["shared_a"], arrays["shared_b"], arrays["cores"]
    expect = factor_shapes(plan, core, m["d_in"], m["d_out"])
    found = {"shared_a": a.shape, "shared_b": b.shape,
             "cores": None if cores is None else cores.shape}  # fmt: skip
    if any(tuple(found[k]) != expect[k] for k in found if expect[k] is not None):
        raise AdapterError(
            factors_file,
            f"module {name}: shapes {_shapes(found)}, expected {_shapes(expect)} from {META_NAME}",
        )
    task_ids = tuple(int(t) for t in m["task_ids"])
    if plan.num_tasks != len(task_ids) or any(not 0 <= t < num_tasks for t in task_ids):
        raise AdapterError(
            meta_file,
            f"module {name}: task_ids {list(task_ids)} do not fit the plan or the "
            f"{num_tasks} tasks",
        )
    for field in ("task_ranks", "relative_error", "task_sq_norms"):
        if field in m and len(m[field]) != len(task_ids):
            raise ValueError(
                f"module {name}: {field} has {len(m[field])} entries for {len(task_ids)} tasks"
            )
    if m["kind"] not in ("linear", "embedding"):
        raise ValueError(f"module {name}: unknown kind {m['kind']!r}")
    return BundleModule(
        name=name,
        kind=m["kind"],
        d_in=int(m["d_in"]),
        d_out=int(m["d_out"]),
        task_ids=task_ids,
        task_ranks=tuple(int(r) for r in m["task_ranks"]),
        plan=plan,
        shared_a=a,
        shared_b=b,
        relative_error=tuple(float("nan") if e is None else float(e) for e in m["relative_error"]),
        task_sq_norms=tuple(
            float("nan") if e is None else float(e) for e in m.get("task_sq_norms", [])
        ),
        loss=float("nan") if m.get("loss") is None else float(m["loss"]),
        steps=int(m.get("steps", 0)),
        result=int(m.get("result", 0)),
        cores=cores,
        core=core,
    )


def _shapes(shapes: Mapping) -> str:
    return ", ".join(f"{k} {list(v)}" for k, v in shapes.items() if v is not None)
