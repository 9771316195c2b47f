"""The parts of a multi-process merge: each process's solved modules, beside the output.

```
OUT.hydraopt-parts/
  part-0001-of-0004/   hydraopt.json (the modules' entries, the run's fingerprint) +
                       factors.safetensors (their tensors, bundle keys)
```

Every process writes its part atomically once its modules are solved; process 0 then reads
all of them and writes the bundle (`save_bundle`, atomically), and removes the parts. A part
is kept until then, so a run interrupted anywhere resumes (`resume=True`) without solving
again what a finished process wrote; a part made from other inputs, plan, flags or process
count is refused.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from pathlib import Path

from ._files import (
    AdapterError,
    atomic_dir,
    lazy_safetensors,
    read_json,
    write_json,
    write_safetensors,
)
from .bundle_module import META_NAME, BundleModule, module_from_json, module_tensors

__all__ = ["PARTS_SUFFIX", "load_part", "parts_dir", "remove_parts", "save_part", "wait_for_parts"]

PARTS_SUFFIX = ".hydraopt-parts"
FACTORS_NAME = "factors.safetensors"


def parts_dir(out) -> Path:
    """`OUT.hydraopt-parts`, beside the output directory."""
    out = Path(out)
    return out.parent / f"{out.name}{PARTS_SUFFIX}"


def _part_path(out, index: int, count: int) -> Path:
    return parts_dir(out) / f"part-{index:04d}-of-{count:04d}"


def _is_part(path: Path) -> bool:
    return (path / META_NAME).is_file() and (path / FACTORS_NAME).is_file()


def save_part(out, index: int, count: int, print_: Mapping, modules: Mapping[str, BundleModule]):
    """Write process `index`'s solved `modules` (atomically) as part `index` of `count`."""
    path = _part_path(out, index, count)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, module in modules.items():
        tensors.update(module_tensors(name, module))
    meta = {
        "part": index,
        "of": count,
        "fingerprint": dict(print_),
        "modules": {name: m.to_json() for name, m in modules.items()},
    }
    with atomic_dir(path, replaceable=_is_part, what="a hydraopt part") as tmp:
        write_safetensors(tmp / FACTORS_NAME, tensors, {"format": "hydraopt-part"})
        write_json(tmp / META_NAME, meta)
    return path


def load_part(out, index: int, count: int, print_: Mapping, num_tasks: int):
    """Part `index` of `count` as `{module: BundleModule}` whose factors are `LazyTensor`s
    (read when the bundle is written), or `None` if it is not written yet. `AdapterError`
    (naming the part) if it was made by another run."""
    path = _part_path(out, index, count)
    if not _is_part(path):
        return None
    meta_file, factors_file = path / META_NAME, path / FACTORS_NAME
    meta = read_json(meta_file)
    if not isinstance(meta, dict) or meta.get("fingerprint") != dict(print_):
        raise AdapterError(
            path,
            "a part of another run (other inputs, plan, flags or process count); delete "
            f"{parts_dir(out)} to start over",
        )
    tensors = lazy_safetensors(factors_file)  # fetched one at a time when the bundle is written

    def pop(key):
        if key not in tensors:
            raise AdapterError(factors_file, f"missing tensor {key} that {META_NAME} describes")
        return tensors.pop(key)

    try:
        return {
            name: module_from_json(name, m, pop, num_tasks, meta_file, factors_file)
            for name, m in meta["modules"].items()
        }
    except AdapterError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise AdapterError(meta_file, f"malformed part ({' '.join(str(err).split())})") from None


def wait_for_parts(out, count: int, timeout: float | None, poll: float = 0.2) -> None:
    """Block until all `count` parts exist (a run without a JAX distributed runtime);
    `AdapterError` after `timeout` seconds (`None`: wait as long as it takes)."""
    start = time.monotonic()
    while not all(_is_part(_part_path(out, i, count)) for i in range(count)):
        if timeout is not None and time.monotonic() - start > timeout:
            missing = [i for i in range(count) if not _is_part(_part_path(out, i, count))]
            raise AdapterError(
                parts_dir(out), f"parts {missing} of {count} not written after {timeout:g} s"
            )
        time.sleep(poll)


def remove_parts(out) -> None:
    shutil.rmtree(parts_dir(out), ignore_errors=True)
