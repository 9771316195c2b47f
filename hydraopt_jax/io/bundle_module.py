"""One merged module of a bundle: its factors, plan and errors, and its JSON / tensor form
(shared by bundles and the parts of a multi-process merge)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from .._plan import SharingPlan
from .._solution import CORE_KINDS, factor_pair, factor_shapes, stored_params
from ._files import AdapterError

__all__ = ["BundleModule", "module_from_json", "module_tensors"]

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
            "relative_error": [_num(e) for e in self.relative_error],
            "task_sq_norms": [_num(e) for e in self.task_sq_norms],
            "loss": _num(self.loss),
            "steps": int(self.steps),
            "result": int(self.result),
            "num_params": self.num_params,
            "original_params": self.original_params,
        }


def module_tensors(name: str, module: BundleModule) -> dict[str, np.ndarray]:
    """The tensors of `module` under their bundle keys (`modules/<name>/shared_a`, ...)."""
    out = {f"modules/{name}/shared_a": module.shared_a, f"modules/{name}/shared_b": module.shared_b}
    if module.cores is not None:
        out[f"modules/{name}/cores"] = module.cores
    return out


def module_from_json(name: str, m: dict, pop, num_tasks: int, meta_file, factors_file):
    """A `BundleModule` from its `hydraopt.json` entry `m`, its tensors taken with
    `pop(key)`; raises `AdapterError` / `KeyError` / `TypeError` / `ValueError` on bad
    content (shapes that do not fit the plan, task ids out of range, ...)."""
    a = pop(f"modules/{name}/shared_a")
    b = pop(f"modules/{name}/shared_b")
    plan = SharingPlan.from_dict({**m["plan"], "rank": m["rank"]})
    core = m.get("core")
    if core not in CORE_KINDS or (core == "nested") != plan.nested:
        raise ValueError(f"module {name}: core {core!r} does not fit its plan")
    cores = pop(f"modules/{name}/cores") if core is not None else None
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
