"""Checkpoints of a long `hydraopt merge` run, for `--resume`.

Iterative solves (`als`, `adam`, `lbfgs`) run in *chunks* of `--checkpoint-every N` steps:
each chunk restarts the solver from the factors the previous chunk returned (for ALS that is
the same as running on; Adam's moments and L-BFGS's memory restart each chunk). An
uninterrupted run is chunked the same way, so a resumed run ends with bitwise the same
factors (on the same machine and backend).

After every chunk of every *unit* (a shape group, or one module sub-batch of it when the
memory guard splits the group) the current factors are saved with Orbax next to the output:

```
OUT.hydraopt-ckpt/
  manifest.json            # format version, input fingerprint, each group's unit split
  units/g0003b01/          # save_solution({module: Solution}, extra={steps_done, done, ...})
```

`Solution.steps` there counts all steps taken so far. A unit marked `complete` is skipped
on resume. The fingerprint holds a SHA-256 of every adapter's `adapter_config.json` and
`adapter_model.safetensors` bytes, the resolved plan, and the flags that change the factors
(solver, steps, weighting, rank, names, checkpoint interval) and a SHA-256 of the input
covariances of an activation-aware merge (`--calibration`); `--resume` refuses a
checkpoint whose fingerprint differs and says which part changed. The directory is removed
once the bundle is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from ._files import AdapterError, kill_point, read_json

__all__ = ["CHECKPOINT_SUFFIX", "RunCheckpoint", "arrays_sha256", "checkpoint_dir", "fingerprint"]

CHECKPOINT_SUFFIX = ".hydraopt-ckpt"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_HASH_BLOCK = 1 << 22


def checkpoint_dir(out) -> Path:
    """`OUT.hydraopt-ckpt`, beside the output directory."""
    out = Path(out)
    return out.parent / f"{out.name}{CHECKPOINT_SUFFIX}"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _json_sha256(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def arrays_sha256(arrays: Mapping[str, object]) -> str:
    """One SHA-256 over named arrays (names, shapes, float32 bytes), for a fingerprint's
    flags: a resumed run must use the same statistics (e.g. input covariances)."""
    import numpy as np

    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(np.asarray(arrays[name], dtype=np.float32))
        digest.update(f"{name}:{list(value.shape)};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def fingerprint(collection, plan: Mapping, flags: Mapping) -> dict:
    """What a checkpoint must match to be resumed: input bytes, plan, solver flags.

    `collection`: an `AdapterCollection` read from directories; `plan`: the resolved plan
    (JSON-able); `flags`: the flags that change the factors (JSON-able).
    """
    inputs = {}
    for adapter in collection.adapters:
        files = {}
        if adapter.path is not None:
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                files[name] = _file_sha256(Path(adapter.path) / name)
        else:
            files["config"] = _json_sha256(adapter.config)
        inputs[adapter.name] = files
    return {
        "version": FORMAT_VERSION,
        "tasks": list(collection.names),
        "inputs": inputs,
        "plan": _json_sha256(plan),
        "flags": dict(flags),
    }


def _difference(old: Mapping, new: Mapping) -> str | None:
    """A short description of the first way `old` and `new` fingerprints differ."""
    if old.get("version") != new.get("version"):
        return f"checkpoint format {old.get('version')!r}, this hydraopt writes {FORMAT_VERSION}"
    if old.get("tasks") != new.get("tasks"):
        return (
            f"made from tasks {', '.join(map(str, old.get('tasks') or []))}, "
            f"not {', '.join(new['tasks'])}"
        )
    for task, files in new["inputs"].items():
        before = (old.get("inputs") or {}).get(task) or {}
        for name, digest in files.items():
            if before.get(name) != digest:
                return f"made from different inputs ({task}: {name} changed)"
    if old.get("plan") != new.get("plan"):
        return "made with a different plan"
    old_flags, new_flags = old.get("flags") or {}, new["flags"]
    for key in sorted(set(old_flags) | set(new_flags)):
        if old_flags.get(key) == new_flags.get(key):
            continue
        if key == "calibration":  # a digest of the input covariances
            if old_flags.get(key) is None:
                return "made without input covariances (--calibration), this run with them"
            if new_flags.get(key) is None:
                return "made with input covariances (--calibration), this run without them"
            return "made with other input covariances (--calibration)"
        return (
            f"made with different flags (--{key.replace('_', '-')} "
            f"{old_flags.get(key)!r}, now {new_flags.get(key)!r})"
        )
    return None


class RunCheckpoint:
    """The checkpoint directory of one `hydraopt merge` run (created at the first save)."""

    def __init__(self, path: Path, print_: Mapping, manifest: dict | None = None):
        self.path = Path(path)
        self.fingerprint = dict(print_)
        self.manifest = manifest or {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "batches": {},
        }
        self.resumed = manifest is not None
        self.saves = 0

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, out, print_: Mapping, *, resume: bool, part: str | None = None) -> RunCheckpoint:
        """The run's checkpoint: an existing one if `resume` (after checking it), else new.
        `part`: a sub-directory of one process of a multi-process run.

        Raises `AdapterError` (naming the checkpoint) if one exists and `resume` is false,
        or if it cannot be read or was made from other inputs, plan or flags.
        """
        path = checkpoint_dir(out) if part is None else checkpoint_dir(out) / part
        if not path.exists():
            return cls(path, print_)
        if not resume:
            raise AdapterError(
                path,
                "a checkpoint of an interrupted run exists; pass --resume to continue it, or "
                "delete it to start over",
            )
        manifest_file = path / MANIFEST
        try:
            manifest = read_json(manifest_file)
            if not isinstance(manifest, dict) or not isinstance(manifest.get("fingerprint"), dict):
                raise ValueError("no fingerprint")
            if not isinstance(manifest.get("batches", {}), dict):
                raise ValueError("batches is not an object")
        except AdapterError as err:
            raise AdapterError(
                path, f"unreadable checkpoint ({MANIFEST}: {err.message}); delete it to start over"
            ) from None
        except ValueError as err:
            raise AdapterError(
                path,
                f"unreadable checkpoint ({MANIFEST}: {' '.join(str(err).split())}); delete it "
                "to start over",
            ) from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise AdapterError(
                path,
                f"checkpoint format_version {manifest.get('format_version')!r}; this hydraopt "
                f"reads {FORMAT_VERSION}; delete it to start over",
            )
        diff = _difference(manifest["fingerprint"], print_)
        if diff is not None:
            raise AdapterError(
                path,
                f"cannot resume: checkpoint {diff}; rerun with the original inputs and flags, "
                "or delete it to start over",
            )
        manifest.setdefault("batches", {})
        return cls(path, print_, manifest)

    # ------------------------------------------------------------------ manifest
    def _write_manifest(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{MANIFEST}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / MANIFEST)

    def batches(self, group: str) -> list[tuple[str, ...]] | None:
        """The unit split of a group, as recorded when it started (None if not started)."""
        found = self.manifest["batches"].get(group)
        return None if found is None else [tuple(b) for b in found]

    def set_batches(self, group: str, batches: Sequence[Sequence[str]]) -> None:
        if self.manifest["batches"].get(group) == [list(b) for b in batches]:
            return
        self.manifest["batches"][group] = [list(b) for b in batches]
        self._write_manifest()

    # ------------------------------------------------------------------ units
    def _unit_dir(self, unit: str) -> Path:
        return self.path / "units" / unit

    def load_unit(self, unit: str):
        """`(solutions, extra)` saved for `unit`, or `None` if it has not been saved."""
        from .checkpoint import _is_checkpoint, read_checkpoint_extra, restore_solution

        path = self._unit_dir(unit)
        if not self.resumed or not _is_checkpoint(path):
            return None
        try:
            return restore_solution(path), read_checkpoint_extra(path)
        except AdapterError as err:
            raise AdapterError(
                self.path, f"damaged checkpoint ({err}); delete it to start over"
            ) from None

    def save_unit(self, unit: str, solutions: Mapping, extra: Mapping) -> None:
        from .checkpoint import save_solution

        if not (self.path / MANIFEST).is_file():
            self._write_manifest()
        (self.path / "units").mkdir(parents=True, exist_ok=True)
        save_solution(self._unit_dir(unit), dict(solutions), extra=extra)
        self.saves += 1
        kill_point(f"chunk:{self.saves}")  # test hook: die after the K-th checkpoint

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
