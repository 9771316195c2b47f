"""Host buffers that JAX can use in place: the memory side of `merge_adapters`.

On the CPU backend `jax.device_put` of a NumPy array aligned to 64 bytes aliases its memory
instead of copying it, and `np.asarray` of a CPU `jax.Array` is a view. A shape group of
`M` modules x `T` tasks is the largest thing a merge holds, so these helpers keep it in memory
once: the loader (`io.peft.AdapterCollection.load_group`) fills one aligned, read-only
`[M, T, ...]` buffer per factor and hands out per-module views of it; `stack_modules`
recognises such views and returns the whole buffer without a copy; `unstack` splits the
batched results the same way. (On accelerators `device_put` copies to the device anyway.)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

ALIGN = 64  # bytes: what XLA's CPU client needs to use a host buffer in place


def aligned_zeros(shape: Sequence[int], dtype=np.float32) -> np.ndarray:
    """A zero-filled C-contiguous array whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.zeros(nbytes + ALIGN, np.uint8)  # calloc: pages are touched when written
    offset = (-raw.ctypes.data) % ALIGN
    return raw[offset : offset + nbytes].view(dtype).reshape(tuple(shape))


def _root(x: np.ndarray) -> np.ndarray:
    while isinstance(x.base, np.ndarray):
        x = x.base
    return x


def stacked_view(arrays: Sequence[np.ndarray]) -> np.ndarray | None:
    """The `[M, ...]` array of which `arrays` are the consecutive elements, or `None`.

    Only read-only, C-contiguous views of one buffer qualify (what `load_group` returns):
    JAX may then read that memory while an asynchronous solve runs, and nobody writes it.
    """
    first = arrays[0]
    if not all(
        isinstance(a, np.ndarray)
        and not a.flags.writeable
        and a.flags.c_contiguous
        and a.dtype == first.dtype
        and a.shape == first.shape
        for a in arrays
    ):
        return None
    root = _root(first)
    start = first.ctypes.data
    if any(
        _root(a) is not root or a.ctypes.data != start + i * first.nbytes
        for i, a in enumerate(arrays)
    ):
        return None
    offset = start - root.ctypes.data
    if offset < 0 or offset + len(arrays) * first.nbytes > root.nbytes:
        return None
    view = np.ndarray(
        (len(arrays),) + first.shape, first.dtype, buffer=root, offset=offset
    )  # fmt: skip
    view.flags.writeable = False
    return view


def stack_modules(arrays: Sequence, dtype, take=None) -> jax.Array:
    """`jnp.stack(arrays)` as a device array, holding the data once where possible.

    `take` (optional) maps each array before stacking (e.g. the tasks present). Views of one
    loader buffer are used in place; anything else is copied once into an aligned buffer,
    which `device_put` then aliases on CPU (`jnp.asarray` would copy again).
    """
    if take is None and np.dtype(dtype) == getattr(arrays[0], "dtype", None):
        view = stacked_view(arrays)
        if view is not None:
            return jax.device_put(view)
    parts = (np.asarray(a) if take is None else take(np.asarray(a)) for a in arrays)
    first = next(parts)
    out = aligned_zeros((len(arrays),) + first.shape, dtype)
    out[0] = first
    for i, part in enumerate(parts, start=1):
        out[i] = part
    out.flags.writeable = False
    return jax.device_put(out)


def unstack(x: jax.Array) -> list[jax.Array]:
    """`[x[0], x[1], ...]`; on CPU as views of `x`'s buffer (slicing would copy each)."""
    devices = x.devices()
    if len(devices) == 1 and next(iter(devices)).platform == "cpu":
        host = np.asarray(x)
        device = next(iter(devices))
        return [jax.device_put(host[i], device) for i in range(x.shape[0])]
    return [x[i] for i in range(x.shape[0])]
