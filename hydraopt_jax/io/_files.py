"""File plumbing shared by every writer in `hydraopt_jax.io`: errors, safetensors, atomic dirs.

Every safetensors file the package writes goes through `write_safetensors`, which makes
each tensor C-contiguous first: `safetensors.numpy.save_file` (seen with 0.8.0) stores a
non-C-contiguous array in *memory* order under its logical shape, so a transposed view
comes back scrambled with no error. Every output directory is written by `atomic_dir`:
files go into a temporary sibling directory, are fsynced, and the directory is renamed
into place, so a crash never leaves a half-written output. Temporary siblings are named
`.<out>.tmp-<pid>-*` (and `.<out>.old-<pid>-*` while replacing); a later write to the same
`out` removes those whose process is gone (left behind by a SIGKILL).

`kill_point(name)` is a test hook: when the environment variable `HYDRAOPT_TEST_KILL_AT`
equals `name`, the process kills itself with SIGKILL there (with
`HYDRAOPT_TEST_KILL_MODE=interrupt` it raises `KeyboardInterrupt` instead). It is how the
crash-safety tests stop `hydraopt merge` while loading (`load`), solving (`solve`), after a
checkpoint (`chunk:K`) or while writing (`write`). Never set it outside tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

__all__ = [
    "AdapterError",
    "DTYPES",
    "LazyTensor",
    "lazy_safetensors",
    "map_safetensors",
    "atomic_dir",
    "check_output_path",
    "check_task_name",
    "kill_point",
    "read_json",
    "read_yaml",
    "tensor_bytes_read",
    "remove_empty_dirs",
    "write_error",
    "read_safetensors_header",
    "to_dtype",
    "write_json",
    "write_safetensors",
]

DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
"""Storage dtypes accepted for bundles and exported adapters."""


class AdapterError(ValueError):
    """A bad input or output file. `str(err)` is one line: `PATH: cause`.

    **Arguments:**

    - `path`: the file or directory at fault.
    - `message`: what arrived and what was expected.
    """

    def __init__(self, path, message: str):
        self.path = str(path)
        self.message = " ".join(str(message).split())  # one line, always
        super().__init__(f"{self.path}: {self.message}")

    def __reduce__(self):
        return (type(self), (self.path, self.message))


def check_task_name(name, where) -> str:
    """`name` if it can name a task (a directory of an export), else `AdapterError(where)`."""
    if (
        not isinstance(name, str)
        or not name
        or "/" in name
        or "\\" in name
        or "\0" in name
        or name in (".", "..")
    ):
        raise AdapterError(where, f"invalid task name {name!r}: it must be a non-empty file name")
    if name.startswith(".hydraopt"):
        raise AdapterError(
            where, f"invalid task name {name!r}: names starting with .hydraopt are reserved"
        )
    return name


def check_output_path(out) -> list[Path]:
    """Check, before any work, that `out` can be created: `AdapterError(out)` if the nearest
    existing directory above it is a file or refuses a new entry. Returns the directories
    above `out` that do not exist yet, deepest first (see `remove_empty_dirs`)."""
    out = Path(out)
    missing = []
    probe = out.parent  # relative stays relative: the message names what the user typed
    try:  # exists() / is_dir() raise on EACCES
        while not (probe.exists() or probe.is_symlink()) and probe != probe.parent:
            missing.append(probe)
            probe = probe.parent
        if not probe.is_dir():
            raise AdapterError(out, f"cannot be created: {probe} is not a directory")
        os.rmdir(tempfile.mkdtemp(prefix=".hydraopt-probe-", dir=probe))
    except OSError as err:
        raise write_error(out, err) from None
    return missing


def write_error(path, err: OSError) -> AdapterError:
    """The one-line error for an `OSError` met while creating or writing the output `path`."""
    return AdapterError(path, f"cannot be written ({err.strerror or _one_line(err)})")


def remove_empty_dirs(dirs) -> None:
    """Remove those of `dirs` that are (still) empty, deepest first: what a failed command
    created on the way to its outputs."""
    for d in sorted(set(map(Path, dirs)), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()


def to_dtype(name) -> np.dtype:
    """`"float32" | "bfloat16" | "float16"` (or a numpy dtype of those) -> numpy dtype."""
    if isinstance(name, str):
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
        return DTYPES[name]
    dtype = np.dtype(name)
    if dtype not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype}; expected one of {', '.join(DTYPES)}")
    return dtype


def dtype_name(dtype) -> str:
    dtype = np.dtype(dtype)
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    return str(dtype)


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor `write_safetensors` fetches only when it writes it (`get()`), so that a file
    larger than memory can be written one tensor at a time."""

    shape: tuple[int, ...]
    dtype: np.dtype
    get: Callable[[], np.ndarray]


_SAFETENSORS_DTYPES = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}


_NUMPY_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}


def lazy_safetensors(path) -> dict[str, LazyTensor]:
    """Every tensor of a safetensors file as a `LazyTensor` (read when fetched)."""
    header = read_safetensors_header(path)
    out = {}
    for key, (shape, dtype) in header.items():
        if dtype not in _NUMPY_DTYPES:
            raise AdapterError(path, f"tensor {key} has dtype {dtype}, not readable here")
        out[key] = LazyTensor(
            shape, _NUMPY_DTYPES[dtype], lambda k=key: read_safetensors(path, [k])[k]
        )
    return out


def map_safetensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only memory map: arrays that occupy
    memory only as far as they are read."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    out = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        dtype = _NUMPY_DTYPES[entry["dtype"]]
        shape = tuple(entry["shape"])
        if end == begin:
            out[key] = np.zeros(shape, dtype)
            continue
        out[key] = np.memmap(path, dtype=dtype, mode="r", offset=8 + size + begin, shape=shape)
    return out


def write_safetensors(
    path, tensors: Mapping[str, np.ndarray | LazyTensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write `tensors` to `path` in the safetensors format, one tensor at a time.

    The only safetensors writer in the package. Each tensor is written C-contiguous (see the
    module docstring); a `LazyTensor` is fetched just before it is written and released
    after, so the writer holds one tensor, not the file. Fsyncs the file before returning.
    """
    entries, header, offset = [], {}, 0
    for key, value in tensors.items():
        if isinstance(value, LazyTensor):
            shape, dtype, get = tuple(value.shape), np.dtype(value.dtype), value.get
        else:
            array = np.asarray(value)
            shape, dtype, get = array.shape, array.dtype, (lambda a=array: a)
        if dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"write_safetensors: {key} has dtype {dtype}, not storable")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        entries.append((key, shape, dtype, get))
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for key, shape, dtype, get in entries:
            # Not `np.ascontiguousarray` alone: it keeps 0-d arrays and views of C-contiguous
            # memory as they are, which is fine; what matters is that the bytes are in C order.
            array = np.ascontiguousarray(get())
            if array.shape != shape or array.dtype != dtype:
                raise ValueError(
                    f"write_safetensors: {key} is {array.dtype}{list(array.shape)}, "
                    f"announced {dtype}{list(shape)}"
                )
            f.write(array.reshape(-1).view(np.uint8).data)
            del array
        f.flush()
        os.fsync(f.fileno())


def write_file_atomically(path: Path, write) -> None:
    """`write(tmp_path)`, then rename onto `path`; nothing is left behind on failure."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent
        )
        os.close(fd)
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise write_error(path, err) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path):
    """The parsed content of the JSON file `path`, or `AdapterError(path)` saying why not."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except RecursionError:
        raise AdapterError(path, "not valid JSON (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise AdapterError(path, f"not valid JSON ({_one_line(err)})") from None


def read_yaml(path, what: str = "plan file"):
    """A YAML file parsed safely; `AdapterError(path)` if missing, unreadable or invalid."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise AdapterError(path, f"no such {what}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise AdapterError(path, "not valid YAML (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise AdapterError(path, f"not valid YAML ({_one_line(err)})") from None


def write_json(path, data) -> None:
    """Write `data` as indented JSON and fsync it."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def read_safetensors_header(path) -> dict[str, tuple[tuple[int, ...], str]]:
    """`{key: (shape, dtype_string)}` from a safetensors file, without loading tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return {
                key: (tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype())
                for key in f.keys()
            }
    except FileNotFoundError:
        raise AdapterError(path, "file not found") from None
    except Exception as err:  # safetensors raises its own SafetensorError, or OSError
        raise AdapterError(path, f"not a readable safetensors file ({_one_line(err)})") from None


_TENSOR_BYTES_READ = [0]


def tensor_bytes_read() -> int:
    """Bytes of tensor data this process has read from safetensors files so far (a process
    of a multi-process merge reads only its own modules' factors)."""
    return _TENSOR_BYTES_READ[0]


def read_safetensors(path, keys) -> dict[str, np.ndarray]:
    """Load only `keys` from a safetensors file (lazily, via `safe_open`)."""
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(str(path), framework="np") as f:
            for key in keys:
                out[key] = f.get_tensor(key)
                _TENSOR_BYTES_READ[0] += out[key].nbytes
    except Exception as err:
        raise AdapterError(path, f"cannot read tensors ({_one_line(err)})") from None
    return out


def _one_line(err) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _fsync_file(path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


KILL_ENV = "HYDRAOPT_TEST_KILL_AT"


def kill_point(name: str) -> None:
    """Test hook (see the module docstring): die here if `HYDRAOPT_TEST_KILL_AT == name`."""
    if os.environ.get(KILL_ENV) != name:
        return
    if os.environ.get("HYDRAOPT_TEST_KILL_MODE") == "interrupt":
        raise KeyboardInterrupt(f"{KILL_ENV}={name}")
    os.kill(os.getpid(), signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_siblings(out) -> list[Path]:
    """Remove `.<out>.tmp-<pid>-*` / `.<out>.old-<pid>-*` left by processes that are gone."""
    out = Path(out)
    parent = out.absolute().parent
    removed = []
    if not parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for path in parent.glob(f".{glob_escape(out.name)}.{kind}-*"):
            pid = path.name[len(f".{out.name}.{kind}-") :].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


@contextlib.contextmanager
def atomic_dir(
    out, *, replaceable: Callable[[Path], bool], what: str, hook: str | None = None
) -> Iterator[Path]:
    """Yield a temporary sibling directory of `out`; on success rename it to `out`.

    An existing `out` is replaced only if it is an empty directory or `replaceable(out)`
    holds (e.g. "is a hydraopt bundle"); otherwise `AdapterError` before anything is
    written. On any exception the temporary directory is removed and `out` is untouched.
    Temporary siblings left by killed processes are removed first. `hook`: a
    `kill_point` name checked after the contents are written, before the rename.
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir() or not (not any(out.iterdir()) or replaceable(out)):
            raise AdapterError(out, f"exists and is not {what}; refusing to overwrite it")
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=parent))
    except OSError as err:
        raise write_error(out, err) from None
    try:
        yield tmp
        if hook is not None:
            kill_point(hook)
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        for sub in [tmp, *[d for d in tmp.rglob("*") if d.is_dir()]]:
            _fsync_dir(sub)
        if out.exists():
            old = parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        _fsync_dir(parent)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(out, err) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
