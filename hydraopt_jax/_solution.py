"""The `Solution` pytree every solver and baseline returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ._plan import SharingPlan, original_params

__all__ = ["RESULTS", "Solution"]


def static_field():
    """A dataclass field that is pytree metadata (hashable, static under `jit`), not a leaf."""
    return dataclasses.field(metadata={"static": True})


def pytree_dataclass(cls):
    """A frozen dataclass registered as a JAX pytree: fields made with `static_field()` are
    metadata, the others leaves; `.replace(**changes)` returns an updated copy. (What
    `flax.struct.dataclass` does, without importing flax: 0.3 s of every command's start.)"""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    jax.tree_util.register_dataclass(
        cls,
        data_fields=[f.name for f in fields if not f.metadata.get("static")],
        meta_fields=[f.name for f in fields if f.metadata.get("static")],
    )
    cls.replace = lambda self, **changes: dataclasses.replace(self, **changes)
    return cls


class RESULTS:
    """Result codes stored in `Solution.result` (an int32 array, so vmap-friendly)."""

    successful = 0
    max_steps_reached = 1  # iterative solver stopped at max_steps before reaching tol
    nonfinite = 2  # a NaN or Inf appeared in the inputs or the iterates

    _messages = {
        0: "successful",
        1: "stopped at max_steps before the relative decrease fell below tol",
        2: "non-finite values (NaN or Inf) in the inputs or the iterates",
    }

    @classmethod
    def message(cls, code: int) -> str:
        return cls._messages.get(int(code), f"unknown result code {int(code)}")


class StoredFactors:
    """Storage accounting and batching shared by `Solution` and `baselines.CoreSolution`.

    Subclasses provide `d_in`, `d_out`, `num_params` and the static `task_ranks`.
    """

    @property
    def original_params(self) -> int:
        """Parameters of the original adapters: `sum_t r_t (d_in + d_out)`."""
        return original_params(self.task_ranks, self.d_in, self.d_out)

    @property
    def storage_ratio(self) -> float:
        return self.num_params / self.original_params

    def num_bytes(self, dtype=jnp.float32) -> int:
        """Stored bytes in `dtype`."""
        return self.num_params * np.dtype(dtype).itemsize

    def index(self, i: int):
        """Element `i` of a solution batched over a leading (module) axis."""
        return jax.tree_util.tree_map(lambda x: x[i], self)


@pytree_dataclass
class Solution(StoredFactors):
    """Shared and task-specific factors of one module, with their quality and cost.

    Task `t` (local index into `task_ids`) is reconstructed as
    `shared_b[plan.b_group[t]] @ shared_a[plan.a_group[t]]`.

    **Fields:**

    - `shared_a`: `[K_A, k, d_in]`; `shared_b`: `[K_B, d_out, k]`.
    - `loss`: the weighted objective `sum_t w_t ||dW_t - dW_hat_t||_F^2` (scalar).
    - `relative_error`: `||dW_t - dW_hat_t||_F / ||dW_t||_F` per task, `[T]`; free of the Gram
      identity's cancellation: an exact reconstruction reports float32 round-off, ~1e-7
      (`_loss.reported_residuals`).
    - `weights`: the task weights `w_t` used, `[T]`.
    - `steps`: iterations taken (0 for closed forms); `result`: a `RESULTS` code.
    - `plan`, `task_ranks`, `task_ids` (static): the plan, each task's original rank, and
      the global index of each task (a module may lack some tasks of the collection).
    """

    shared_a: jax.Array
    shared_b: jax.Array
    loss: jax.Array
    relative_error: jax.Array
    weights: jax.Array
    steps: jax.Array
    result: jax.Array
    plan: SharingPlan = static_field()
    task_ranks: tuple[int, ...] = static_field()
    task_ids: tuple[int, ...] = static_field()

    @property
    def rank(self) -> int:
        return self.shared_a.shape[-2]

    @property
    def d_in(self) -> int:
        return self.shared_a.shape[-1]

    @property
    def d_out(self) -> int:
        return self.shared_b.shape[-2]

    @property
    def num_tasks(self) -> int:
        return self.plan.num_tasks

    def task_factors(self, t: int) -> tuple[jax.Array, jax.Array]:
        """`(A_t_hat [k, d_in], B_t_hat [d_out, k])` for local task index `t`."""
        return self.shared_a[..., self.plan.a_group[t], :, :], self.shared_b[
            ..., self.plan.b_group[t], :, :
        ]

    @property
    def num_params(self) -> int:
        """Stored parameters: `K_A k d_in + K_B d_out k` (a group's factor counted once)."""
        return self.plan.num_params(self.d_in, self.d_out, self.rank)


def stack_solutions(solutions: Sequence[Solution]) -> Solution:
    """Stack same-shaped Solutions on a new leading axis (inverse of `Solution.index`)."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *solutions)


def task_relative_errors(solutions, num_tasks: int) -> np.ndarray:
    """Each task's relative error over many modules: the RMS of its per-module errors.

    `solutions` is `{module: Solution}` (as from `merge_adapters`); tasks absent from a
    module are skipped there; a task present nowhere gets NaN.
    """
    total = np.zeros(num_tasks)
    count = np.zeros(num_tasks)
    for sol in solutions.values():
        err = np.asarray(sol.relative_error, np.float64)
        for local, t in enumerate(sol.task_ids):
            total[t] += err[local] ** 2
            count[t] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sqrt(total / count)


def collection_storage(solutions) -> tuple[int, int]:
    """`(num_params, original_params)` summed over the modules of `{module: Solution}`."""
    return (
        sum(s.num_params for s in solutions.values()),
        sum(s.original_params for s in solutions.values()),
    )
