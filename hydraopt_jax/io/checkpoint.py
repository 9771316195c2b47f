"""Save and restore `Solution` pytrees with Orbax (`orbax.checkpoint`).

A checkpoint directory holds `arrays/` (an Orbax `StandardCheckpointer` checkpoint of the
Solution's arrays: factors, cores, metrics, and the solver state as a list of its arrays) and
`solution.json` (its static fields: plan, task ranks, task ids, kind of cores, and a SHA-256
of the arrays, checked on restore). A restored solution's `state` is that list of arrays;
`merge(..., init=solution)` continues the solver from it.
It is written atomically like every other output of `hydraopt_jax.io`.

```python
hj.io.save_solution("ckpt/q_proj", sol)
sol = hj.io.restore_solution("ckpt/q_proj")
hj.io.save_solution("ckpt/all", {"model.layers.0.self_attn.q_proj": sol, ...})
```
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np

from .._plan import SharingPlan
from .._solution import Solution
from ._files import AdapterError, atomic_dir, read_json, write_json

__all__ = ["read_checkpoint_extra", "restore_solution", "save_solution", "solutions_equal"]

_ARRAYS = (
    "shared_a",
    "shared_b",
    "loss",
    "relative_error",
    "task_sq_norms",
    "weights",
    "steps",
    "result",
)
_META = "solution.json"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)


def _static(sol: Solution) -> dict:
    return {
        "plan": sol.plan.to_dict(),
        "task_ranks": [int(r) for r in sol.task_ranks],
        "task_ids": [int(t) for t in sol.task_ids],
        "core": sol.core,
        "state_leaves": len(jax.tree_util.tree_leaves(sol.state)),
    }


def _arrays(sol: Solution) -> dict:
    """The arrays of `sol` as an Orbax tree: the fields, `cores` when present, and the
    solver state's leaves as `state_0`, `state_1`, ... (Orbax keeps no Python structure)."""
    tree = {f: getattr(sol, f) for f in _ARRAYS}
    if sol.cores is not None:
        tree["cores"] = sol.cores
    for i, leaf in enumerate(jax.tree_util.tree_leaves(sol.state)):
        tree[f"state_{i}"] = leaf
    return tree


def _digest(tree: dict, _legacy: bool = False) -> str:
    """SHA-256 of every array's dtype, shape and bytes, in a fixed order: `restore_solution`
    checks it, so damaged array files are refused instead of resumed from. (Version 1
    checkpoints hashed the fields in their declaration order.)"""
    legacy = ("shared_a", "shared_b", "loss", "relative_error", "weights", "steps", "result")
    h = hashlib.sha256()
    for item in sorted(tree):
        for field in legacy if _legacy else sorted(tree[item]):
            x = np.ascontiguousarray(np.asarray(tree[item][field]))
            h.update(f"{item}/{field}:{x.dtype.str}:{x.shape};".encode())
            h.update(x.tobytes())
    return h.hexdigest()


def _is_checkpoint(path: Path) -> bool:
    return (path / _META).is_file() and (path / "arrays").is_dir()


def save_solution(
    path, solution: Solution | Mapping[str, Solution], *, extra: Mapping | None = None
) -> Path:
    """Write a `Solution` (or `{name: Solution}`) to `path`, replacing an older checkpoint.

    The arrays are stored exactly (dtype and shape kept); `restore_solution` gives them back.
    `extra`: a JSON-serialisable mapping stored alongside (`read_checkpoint_extra`), written
    in the same atomic step as the arrays.
    """
    import orbax.checkpoint as ocp

    single = isinstance(solution, Solution)
    items = {"solution": solution} if single else dict(solution)
    for name, sol in items.items():
        if not isinstance(sol, Solution):
            raise TypeError(f"save_solution: {name!r} is a {type(sol).__name__}, not a Solution")
    # Orbax keys become path components: index the items instead of using their names.
    tree = {f"item{i}": _arrays(sol) for i, sol in enumerate(items.values())}
    meta = {
        "format_version": FORMAT_VERSION,
        "single": single,
        "names": list(items),
        "static": [_static(sol) for sol in items.values()],
        "extra": dict(extra or {}),
        "sha256": _digest(tree),
    }
    path = Path(path)
    with atomic_dir(path, replaceable=_is_checkpoint, what="a hydraopt Solution checkpoint") as tmp:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save((tmp / "arrays").absolute(), tree)
            checkpointer.wait_until_finished()
        write_json(tmp / _META, meta)
    return path


def _read_meta(path: Path) -> dict:
    if not _is_checkpoint(path):
        raise AdapterError(path, f"not a Solution checkpoint (expected {_META} and arrays/)")
    meta = read_json(path / _META)
    if not isinstance(meta, dict) or meta.get("format_version") not in READ_VERSIONS:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise AdapterError(path / _META, f"format_version {version!r}")
    return meta


def read_checkpoint_extra(path) -> dict:
    """The `extra` mapping given to `save_solution` (empty if none)."""
    return dict(_read_meta(Path(path)).get("extra") or {})


def restore_solution(path) -> Solution | dict[str, Solution]:
    """Read a checkpoint written by `save_solution`."""
    import orbax.checkpoint as ocp

    path = Path(path)
    meta = _read_meta(path)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            tree = checkpointer.restore((path / "arrays").absolute())
    except Exception as err:  # orbax raises many kinds on damaged checkpoints
        raise AdapterError(
            path / "arrays", f"cannot restore the Orbax checkpoint ({' '.join(str(err).split())})"
        ) from None
    expected = meta.get("sha256")
    if expected is not None and _digest(tree, _legacy=meta["format_version"] == 1) != expected:
        raise AdapterError(
            path / "arrays", "damaged checkpoint: its arrays do not match their digest"
        )
    out = {}
    for i, (name, static) in enumerate(zip(meta["names"], meta["static"], strict=True)):
        arrays = tree[f"item{i}"]
        fields = {f: arrays[f] for f in _ARRAYS if f in arrays}
        if "task_sq_norms" not in fields:  # version 1: not stored; 1 / weight if relative
            w = np.asarray(arrays["weights"])
            fields["task_sq_norms"] = np.where(w > 0, 1.0 / np.where(w > 0, w, 1.0), 0.0)
        num_state = int(static.get("state_leaves", 0))
        out[name] = Solution(
            **fields,
            cores=arrays.get("cores"),
            state=[arrays[f"state_{j}"] for j in range(num_state)] or None,
            plan=SharingPlan.from_dict(static["plan"]),
            task_ranks=tuple(static["task_ranks"]),
            task_ids=tuple(static["task_ids"]),
            core=static.get("core"),
        )
    return out["solution"] if meta["single"] else out


def solutions_equal(a: Solution, b: Solution) -> bool:
    """Exact equality of two Solutions (arrays, dtypes, static fields; the solver state
    compared by its arrays)."""
    if (a.plan, a.task_ranks, a.task_ids, a.core) != (b.plan, b.task_ranks, b.task_ids, b.core):
        return False
    x_tree, y_tree = _arrays(a), _arrays(b)
    if set(x_tree) != set(y_tree):
        return False
    for f in x_tree:
        x, y = np.asarray(x_tree[f]), np.asarray(y_tree[f])
        if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y):
            return False
    return True
