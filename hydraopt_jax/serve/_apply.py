"""Apply a bundle's factors to a mixed batch of tasks, sharing what the plan shares.

For one module, row `n` of `x [n, d_in]` belongs to task `t_n` and gets

    y_n = B_{b(t_n)} C_{t_n} A_{a(t_n)} x_n            (C: the task's core, when there is one)

computed as: each A-group's projection `x A_g^T` once for the rows of that group (one GEMM
for the whole batch when the A factor is shared by all tasks), the small per-task cores
gathered per row (`k x k`), and each B-group applied once to its rows. "Once for its rows"
is a grouped GEMM: rows are sorted by group and cut into fixed-size chunks, every chunk
multiplied by its group's factor (a batched `[chunk, k] x [k, d]` product): each group's
factor is read once per chunk of its rows instead of once per row, as a per-row gather of
full adapters (S-LoRA / Punica) does. Memory held: the bundle's factors, never one dense or
per-task copy.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .._solution import pytree_dataclass, static_field

__all__ = ["ServedBundle", "ServedModule", "grouped_project", "lora_apply", "prepare"]

# Rows per chunk of the grouped product; few groups are applied densely (every group to
# every row, then a select): cheaper than sorting when there are this many groups or fewer.
CHUNK_ROWS = 16
DENSE_MAX_GROUPS = 4


@pytree_dataclass
class ServedModule:
    """One module of a bundle, on device, ready for `lora_apply`.

    `shared_a [K_A, k_a, d_in]`, `shared_b [K_B, d_out, k_b]`, `cores [T_m, k_b, k_a]` or
    `None` (as in `Solution`); `local [T]`: each bundle task's index among the module's tasks
    (-1: the task has no adapter on this module); `a_group`, `b_group [T_m]`: each local
    task's groups.
    """

    shared_a: jax.Array
    shared_b: jax.Array
    cores: jax.Array | None
    local: jax.Array
    a_group: jax.Array
    b_group: jax.Array
    core: str | None = static_field(default=None)

    @property
    def num_params(self) -> int:
        """Factor parameters held (the bundle's; index arrays not counted)."""
        sizes = [self.shared_a.size, self.shared_b.size]
        if self.cores is not None:
            sizes.append(self.cores.size)
        return int(sum(sizes))


@pytree_dataclass
class ServedBundle:
    """`{module: ServedModule}` for every module of a bundle (a pytree: pass it to `jit`)."""

    modules: dict[str, ServedModule]
    tasks: tuple[str, ...] = static_field()


def _served_module(module, num_tasks: int, dtype) -> ServedModule:
    local = np.full(num_tasks, -1, np.int32)
    local[list(module.task_ids)] = np.arange(len(module.task_ids), dtype=np.int32)
    cores = None if module.cores is None else jnp.asarray(module.cores, dtype)
    return ServedModule(
        shared_a=jnp.asarray(module.shared_a, dtype),
        shared_b=jnp.asarray(module.shared_b, dtype),
        cores=cores,
        local=jnp.asarray(local),
        a_group=jnp.asarray(np.asarray(module.plan.a_group, np.int32)),
        b_group=jnp.asarray(np.asarray(module.plan.b_group, np.int32)),
        core=module.core,
    )


def prepare(bundle, dtype=jnp.float32) -> ServedBundle:
    """A bundle (`io.Bundle` or a bundle directory) on device for `lora_apply`: its factors
    once each, in `dtype` (nested ranks keep their zero padding, which costs no work)."""
    if not hasattr(bundle, "modules"):
        from ..io import load_bundle

        bundle = load_bundle(bundle)
    modules = {
        name: _served_module(m, len(bundle.tasks), dtype) for name, m in bundle.modules.items()
    }
    return ServedBundle(modules=modules, tasks=tuple(bundle.tasks))


def grouped_project(x: jax.Array, factors: jax.Array, group: jax.Array) -> jax.Array:
    """`out[n] = factors[group[n]] @ x[n]` for `x [n, d]`, `factors [G, k, d]`: each group's
    factor applied once to its rows (one GEMM when `G == 1`; every group densely when `G` is
    small; otherwise a grouped GEMM over sorted, fixed-size row chunks)."""
    num_groups = factors.shape[0]
    if num_groups == 1:
        return x @ factors[0].T
    if num_groups <= DENSE_MAX_GROUPS:
        every = jnp.einsum("nd,gkd->ngk", x, factors)
        return jnp.take_along_axis(every, group[:, None, None], axis=1)[:, 0]
    n = x.shape[0]
    i32 = jnp.int32  # all index arithmetic in int32 (x64 or not)
    group = group.astype(i32)
    order = jnp.argsort(group).astype(i32)
    sorted_group = group[order]
    # chunk c covers sorted rows [starts[c], starts[c] + CHUNK_ROWS) of one group: at most
    # n / CHUNK_ROWS + G chunks in all (static), the unused ones empty
    sizes = jnp.bincount(group, length=num_groups).astype(i32)
    first = jnp.cumsum(sizes, dtype=i32) - sizes
    per_group = (sizes + CHUNK_ROWS - 1) // CHUNK_ROWS
    num_chunks = -(-n // CHUNK_ROWS) + num_groups
    chunk_ids = jnp.arange(num_chunks, dtype=i32)
    chunk_group = jnp.repeat(
        jnp.arange(num_groups, dtype=i32), per_group, total_repeat_length=num_chunks
    )
    chunk_first = jnp.cumsum(per_group, dtype=i32) - per_group
    within = chunk_ids - chunk_first[chunk_group]
    starts = first[chunk_group] + within * CHUNK_ROWS
    used = chunk_ids < jnp.sum(per_group, dtype=i32)
    rows = starts[:, None] + jnp.arange(CHUNK_ROWS, dtype=i32)[None, :]  # sorted positions
    valid = used[:, None] & (rows < n)
    valid = valid & (sorted_group[jnp.minimum(rows, n - 1)] == chunk_group[:, None])
    src = order[jnp.minimum(rows, n - 1)]  # original row of each chunk slot
    block = jnp.einsum("cmd,ckd->cmk", x[src], factors[chunk_group])
    block = jnp.where(valid[:, :, None], block, 0.0)
    out = jnp.zeros((n, factors.shape[1]), block.dtype)
    return out.at[src.reshape(-1)].add(block.reshape(-1, factors.shape[1]))


@partial(jax.jit, static_argnames="module")
def _apply(served: ServedBundle, module: str, x: jax.Array, task_ids: jax.Array) -> jax.Array:
    m = served.modules[module]
    local = m.local[task_ids.astype(jnp.int32)]
    present = local >= 0
    local = jnp.maximum(local, 0)
    h = grouped_project(x, m.shared_a, m.a_group[local])  # [n, k_a]
    if m.cores is not None:
        h = jnp.einsum("njk,nk->nj", m.cores[local], h)  # [n, k_b]
    y = grouped_project(h, m.shared_b, m.b_group[local])  # [n, d_out]
    return jnp.where(present[:, None], y, 0.0)


def lora_apply(bundle, module: str, x, task_ids) -> jax.Array:
    """Each row's `scale * B_t A_t x` from a bundle, for a batch of mixed tasks.

    **Arguments:**

    - `bundle`: a `ServedBundle` (`prepare(bundle)`; jit-friendly), an `io.Bundle` or a
      bundle directory (prepared on every call: prepare once when serving).
    - `module`: the module's name in the bundle (static).
    - `x`: `[..., d_in]`; `task_ids`: integer indices into `bundle.tasks`, of `x`'s leading
      shape or broadcastable to it (one id per sequence for `[batch, seq, d_in]` inputs:
      shape `[batch, 1]`).

    **Returns:** `[..., d_out]`: the LoRA updates' outputs (add them to the base layer's).
    A task without an adapter on `module` gets zeros. Each shared factor is applied once
    per batch (see the module docstring); pure and jittable.

    ```python
    served = hj.serve.prepare(hj.io.load_bundle("OUT"))
    y = base(x) + hj.serve.lora_apply(served, "model.layers.0.self_attn.q_proj", x, ids)
    ```
    """
    if not isinstance(bundle, ServedBundle):
        bundle = prepare(bundle)
    if module not in bundle.modules:
        raise KeyError(f"module {module!r} is not in the bundle ({len(bundle.modules)} modules)")
    x = jnp.asarray(x)
    lead = x.shape[:-1]
    ids = jnp.broadcast_to(jnp.asarray(task_ids, jnp.int32), lead).reshape(-1)
    y = _apply(bundle, module, x.reshape(-1, x.shape[-1]), ids)
    return y.reshape(*lead, y.shape[-1])
