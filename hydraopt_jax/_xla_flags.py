"""XLA flags this package needs on CPU, applied before the first computation.

XLA's concurrency-optimised CPU scheduler runs independent LAPACK custom calls (QR, SVD,
eigh) concurrently; with jaxlib 0.10 on a 2-core machine that deadlocks: every thread waits
and the program never returns (seen here merging 1024-wide modules with two relaxed closed
forms in one jit; see also jax-ml/jax#39292 on jaxlib's LAPACK threading). The sequential
scheduler costs nothing measurable for our kernels, but it is not enough on its own: XLA's
CPU runtime still runs independent kernels at once, so the package also orders its LAPACK
calls by data dependencies (`_lapack.after`, with the reproducer in its docstring). A flag
the user set explicitly wins. XLA reads XLA_FLAGS when the CPU backend starts, so this must
run before any computation.

jaxlib's CPU LAPACK kernels call scipy's OpenBLAS, whose own threads fight XLA's for the
cores: one full merge of 4 small modules took 3-5 s with OpenBLAS threading and 28 ms with
`OPENBLAS_NUM_THREADS=1` (measured here on a loaded 2-core machine). We default it to 1
unless the user set it; it takes effect only if OpenBLAS has not been loaded yet.
"""

from __future__ import annotations

import os

CPU_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def apply_cpu_workarounds() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in CPU_FLAGS:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
