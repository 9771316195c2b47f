"""Ordering of independent LAPACK calls inside one XLA CPU program.

jaxlib 0.10's batched CPU LAPACK kernels (QR, SVD, eigh) split their batch over XLA's
intra-op thread pool and block the calling pool thread until it is done. When two such calls
are ready at once, each can occupy a pool thread and wait for work queued behind the other:
on a 2-core machine (a 2-thread pool) the program then never returns. Reproduced here with
the QR that forms `Q` and the SVD of `R` in one closed form: a full merge of 16 modules at
d = 2048 hung every time (gdb: both pool threads in `jax::ParallelBatchMap` ->
`BlockingCounter::Wait`, nothing else running).

`after(x, *deps)` makes the call that consumes `x` wait for `deps` with a real data
dependency (`x + 0 * isnan(dep)`: XLA does not fold a floating-point multiply by zero, and
`isnan` keeps a NaN in `dep` from reaching `x`). `jax.lax.optimization_barrier` is not
enough: its outputs alias its inputs, and XLA's CPU runtime orders kernels by the buffers
they touch. Every pair of independent LAPACK calls
in this package goes through `after`; use it on the *small* input of the second call (the
add writes a copy of `x`).
"""

from __future__ import annotations

import jax.numpy as jnp


def after(x, *deps):
    """`x`, computed only once every array in `deps` is (numerically unchanged, and never
    NaN because of a NaN in `deps`: the dependency goes through `isnan`, 0 or 1)."""
    if not deps:
        return x
    zero = jnp.zeros((), x.dtype)
    for dep in deps:
        zero = zero + jnp.zeros((), x.dtype) * jnp.isnan(jnp.ravel(dep)[0]).astype(x.dtype)
    return x + zero
