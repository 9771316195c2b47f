"""Memory guard of `hydraopt merge`: estimate a shape group's memory before allocating it.

A shape group's modules are stacked and solved by one vmapped call, so its peak memory
grows with the number of modules. Before solving, `plan_batches` compares the estimate with
the budget (`--max-memory`, or the memory the system reports available) and splits the group
into module sub-batches that fit (each is loaded, solved and released in turn: streaming).
A module that does not fit on its own raises `MemoryBudgetError` naming it and the flag.

The estimate for one module with `T` tasks present, padded rank `r`, shared rank `k`,
`K_A` / `K_B` shared factors, in float32 (4 bytes):

```
inputs      = T r (d_in + d_out)                 # A and B, host copy + device copy
outputs     = (K_A d_in + K_B d_out) k           # shared factors (+ gradients / ALS temps)
temporaries = min(T r, d_in)^2 + min(T r, d_out)^2   # thin QR / SVD / Gram matrices
bytes       = 4 * (INPUT_COPIES * inputs + OUTPUT_COPIES * outputs + temporaries)
```

with `INPUT_COPIES = 6` (host arrays, device stack, weighted / padded copies, the solver's
stacked `[T r, d]` matrices) and `OUTPUT_COPIES = 8` (iterates, previous iterates, Optax
moments, gradients) for the iterative solvers. The closed form (`exact=True`) keeps no
iterates and uses the loader's buffer in place, so it counts `EXACT_INPUT_COPIES = 3` (that
buffer, the stacked `[T r, d]` matrices, and one copy where tasks absent from a module are
left out or a device copies it) and `EXACT_OUTPUT_COPIES = 3` (the result, the bundle's
copy when it stores another dtype, one transient); measured on 1000 adapters at d = 4096
(shared-a), a module's solve held 1.0x its inputs and 1.3x its outputs. Both are
deliberately pessimistic: a plan that fits the estimate fits the machine
(`tests/test_io_memory.py` checks the estimate against XLA's own accounting). With an input
covariance (the activation-aware objective) a module adds `COVARIANCE_COPIES = 4`
`d_in x d_in` matrices to the temporaries (the covariance, its factor, the whitening map,
one transient) and the whitened copy of the A factors, `T r d_in`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

from ._files import AdapterError

__all__ = [
    "MemoryBudgetError",
    "available_memory",
    "estimate_module_bytes",
    "format_bytes",
    "parse_size",
    "plan_batches",
]

INPUT_COPIES = 6
OUTPUT_COPIES = 8
EXACT_INPUT_COPIES = 3
EXACT_OUTPUT_COPIES = 3
FLOAT_BYTES = 4
COVARIANCE_COPIES = 4
# Fraction of the reported available memory the guard lets one group use.
AVAILABLE_FRACTION = 0.8

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


class MemoryBudgetError(AdapterError):
    """One module needs more memory than the budget allows, even on its own (an
    `AdapterError` naming the module)."""

    def __init__(self, module: str, needed: int, budget: int, source: str):
        self.module, self.needed, self.budget, self.source = module, needed, budget, source
        self.cause = (
            f"needs about {format_bytes(needed)} to solve on its own but the memory budget is "
            f"{format_bytes(budget)} ({source}); raise --max-memory, free memory, or lower --rank"
        )
        super().__init__(module, self.cause)

    def __reduce__(self):
        return (type(self), (self.module, self.needed, self.budget, self.source))


def parse_size(text: str) -> int:
    """`"512MB"`, `"2GiB"`, `"1.5g"`, `"1000000"` -> bytes (decimal units, `*iB` binary)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(
            f"not a memory size: {text!r}; expected e.g. 512MB, 2GiB or a number of bytes"
        )
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not 1 <= value < 2**63:
        raise ValueError(f"memory size must be between 1 byte and 8 EiB, got {text!r}")
    return int(value)


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def available_memory() -> int:
    """Bytes the system reports available (psutil, else /proc/meminfo, else sysconf)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 2**63 - 1  # unknown: do not split


def budget(max_memory: int | None) -> tuple[int, str]:
    """`(bytes, source)`: `--max-memory` if given, else a fraction of available memory."""
    if max_memory is not None:
        return int(max_memory), f"--max-memory {format_bytes(int(max_memory))}"
    avail = available_memory()
    return int(avail * AVAILABLE_FRACTION), f"{AVAILABLE_FRACTION:.0%} of available memory"


def estimate_module_bytes(
    num_tasks: int, rank: int, d_in: int, d_out: int, k: int, num_a: int, num_b: int,
    *, exact: bool = False, covariance: bool = False,
) -> int:  # fmt: skip
    """Rough peak bytes of solving one module (see the module docstring); `exact`: the
    closed-form solver; `covariance`: with an input covariance (activation-aware)."""
    inputs = num_tasks * rank * (d_in + d_out)
    outputs = (num_a * d_in + num_b * d_out) * k
    tr = num_tasks * rank
    temporaries = min(tr, d_in) ** 2 + min(tr, d_out) ** 2
    copies_in, copies_out = (
        (EXACT_INPUT_COPIES, EXACT_OUTPUT_COPIES) if exact else (INPUT_COPIES, OUTPUT_COPIES)
    )
    if covariance:  # d_in x d_in matrices, and the whitened copy of the A factors
        temporaries += COVARIANCE_COPIES * d_in * d_in + num_tasks * rank * d_in
    return FLOAT_BYTES * (copies_in * inputs + copies_out * outputs + temporaries)


def plan_batches(
    names: Sequence[str], module_bytes: Mapping[str, int], limit: int, source: str
) -> list[tuple[str, ...]]:
    """Split `names` (in order) into consecutive sub-batches whose estimate fits `limit`.

    One batch if everything fits; raises `MemoryBudgetError` for a module that does not fit
    alone. Batches are as large as possible (greedy, order kept).
    """
    for name in names:
        if module_bytes[name] > limit:
            raise MemoryBudgetError(name, module_bytes[name], limit, source)
    batches: list[list[str]] = []
    used = 0
    for name in names:
        if batches and used + module_bytes[name] <= limit:
            batches[-1].append(name)
            used += module_bytes[name]
        else:
            batches.append([name])
            used = module_bytes[name]
    return [tuple(b) for b in batches]
