"""The `Solution` pytree every solver and baseline returns, and the one per-task metric.

A solution stores, for one module, shared factors and (optionally) a small core per task:

    dW_hat_t = shared_b[b_group[t]] @ cores[t] @ shared_a[a_group[t]]      (cores: optional)

* plain plans: no cores (`dW_hat_t = Bh Ah`);
* nested ranks (`core="nested"`): the task-specific side holds each task's rank-`j_t` factor
  (padded to the largest `j`) and `cores[t]` the `j_t x k` coordinates inside the shared one;
* shared-basis baselines (`core="full"` / `"diagonal"`, e.g. `pca`, `joint`): one shared
  `U` and `V` and a full or diagonal `k x k` core per task.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ._plan import SharingPlan, original_params

__all__ = [
    "CORE_KINDS",
    "RESULTS",
    "Solution",
    "collection_storage",
    "factor_pair",
    "factor_shapes",
    "plain_factors",
    "stored_params",
    "stack_solutions",
    "task_relative_errors",
]

CORE_KINDS = (None, "nested", "full", "diagonal")


def static_field(**kwargs):
    """A dataclass field that is pytree metadata (hashable, static under `jit`), not a leaf."""
    return dataclasses.field(metadata={"static": True}, **kwargs)


def pytree_dataclass(cls):
    """A frozen, keyword-only dataclass registered as a JAX pytree: fields made with
    `static_field()` are metadata, the others leaves; `.replace(**changes)` returns an
    updated copy. (What `flax.struct.dataclass` does, without importing flax: 0.3 s of every
    command's start.)"""
    cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
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


@pytree_dataclass
class Solution:
    """Shared and task-specific factors of one module, with their quality and cost.

    Task `t` (local index into `task_ids`) is reconstructed as
    `shared_b[plan.b_group[t]] @ cores[t] @ shared_a[plan.a_group[t]]` (without `cores`
    when there are none); `task_factors(t)` gives it as one LoRA pair.

    **Fields:**

    - `shared_a`: `[K_A, k_a, d_in]`; `shared_b`: `[K_B, d_out, k_b]` (a task-specific factor
      is a group of one).
    - `cores`: `None`, or `[T, k_b, k_a]` (see the module docstring; `core` names the kind).
    - `loss`: the weighted objective `sum_t w_t ||dW_t - dW_hat_t||_F^2` (scalar).
    - `relative_error`: `||dW_t - dW_hat_t||_F / ||dW_t||_F` per task, `[T]`; free of the Gram
      identity's cancellation: an exact reconstruction reports float32 round-off, ~1e-7
      (`_loss.reported_residuals`).
    - `task_sq_norms`: `||dW_t||_F^2` per task, `[T]` (in the activation metric when the
      solve was activation-aware, like `relative_error`): the weights of
      `task_relative_errors` across modules.
    - `weights`: the task weights `w_t` used, `[T]`.
    - `steps`: iterations taken (0 for closed forms); `result`: a `RESULTS` code.
    - `state`: the iterative solver's state (Optax's optimiser state and parameter scales),
      or `None`; `merge(..., init=solution)` continues from it.
    - `plan`, `task_ranks`, `task_ids`, `core` (static): the plan (its `rank` resolved), each
      task's original rank, the global index of each task (a module may lack some tasks of
      the collection), and the kind of cores (`None`, `"nested"`, `"full"`, `"diagonal"`).
    """

    shared_a: jax.Array
    shared_b: jax.Array
    loss: jax.Array
    relative_error: jax.Array
    task_sq_norms: jax.Array
    weights: jax.Array
    steps: jax.Array
    result: jax.Array
    cores: jax.Array | None = None
    state: object = None
    plan: SharingPlan = static_field()
    task_ranks: tuple[int, ...] = static_field()
    task_ids: tuple[int, ...] = static_field()
    core: str | None = static_field(default=None)

    # ------------------------------------------------------------------ shapes
    @property
    def rank(self) -> int:
        """The shared rank `k`."""
        if self.plan.rank is not None:
            return self.plan.rank
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

    # ------------------------------------------------------------------ tasks
    def task_factors(self, t: int) -> tuple[jax.Array, jax.Array]:
        """`(A_t_hat [j, d_in], B_t_hat [d_out, j])` for local task index `t`: one LoRA pair
        with `B_t_hat A_t_hat = dW_hat_t`, of rank `j` = the task's rank (`k` for plain
        plans, `j_t` for nested ones, the core's size for shared-basis baselines)."""
        return factor_pair(self.shared_a, self.shared_b, self.cores, self.plan, self.core, t)

    # ------------------------------------------------------------------ storage
    @property
    def num_params(self) -> int:
        """Stored parameters: `K_A k d_in + K_B d_out k` (a group's factor counted once);
        nested ranks and baseline cores as documented in `SharingPlan.num_params` and the
        module docstring."""
        return stored_params(self.plan, self.core, self.d_in, self.d_out)

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

    def index(self, i: int) -> Solution:
        """Element `i` of a solution batched over a leading (module) axis."""
        return jax.tree_util.tree_map(lambda x: x[i], self)


def factor_shapes(plan: SharingPlan, core: str | None, d_in: int, d_out: int) -> dict:
    """`{"shared_a": shape, "shared_b": shape, "cores": shape | None}` of a solution with
    this plan (its rank resolved) and kind of cores."""
    k, num_tasks = plan.rank, plan.num_tasks
    num_a, num_b = plan.num_a_groups, plan.num_b_groups
    if core is None:
        return dict(shared_a=(num_a, k, d_in), shared_b=(num_b, d_out, k), cores=None)
    if core == "nested":
        j = max(plan.task_rank)
        if plan.nested_side == "b":
            return dict(
                shared_a=(num_a, k, d_in), shared_b=(num_b, d_out, j), cores=(num_tasks, j, k)
            )
        return dict(shared_a=(num_a, j, d_in), shared_b=(num_b, d_out, k), cores=(num_tasks, k, j))
    return dict(shared_a=(1, k, d_in), shared_b=(1, d_out, k), cores=(num_tasks, k, k))


def stored_params(plan: SharingPlan, core: str | None, d_in: int, d_out: int) -> int:
    """Parameters a solution of this plan and kind of cores stores: `plan.num_params` for
    plain and nested plans; shared `U`, `V` plus a full (`k^2`) or diagonal (`k`) core per
    task for the shared-basis baselines."""
    if core in (None, "nested"):
        return plan.num_params(d_in, d_out)
    k = plan.rank
    per_task = k * k if core == "full" else k
    return k * d_in + d_out * k + plan.num_tasks * per_task


def plain_factors(shared_a, shared_b, cores, plan: SharingPlan, core: str | None):
    """`(shared_a, shared_b, plan)` of a plain plan reconstructing the same updates: the
    cores multiplied into a per-task factor (for losses and residuals; `jax.numpy`)."""
    if cores is None:
        return shared_a, shared_b, plan
    num_tasks = plan.num_tasks
    if core == "nested":
        if plan.nested_side == "b":
            inv = np.argsort(np.asarray(plan.b_group))  # group g -> its task
            sb = jnp.einsum("goj,gjk->gok", shared_b, cores[inv])
            return shared_a, sb, plan.with_task_rank(None)
        inv = np.argsort(np.asarray(plan.a_group))
        sa = jnp.einsum("gkj,gjd->gkd", cores[inv], shared_a)
        return sa, shared_b, plan.with_task_rank(None)
    sb = jnp.einsum("ok,tkl->tol", shared_b[0], cores)
    return shared_a, sb, SharingPlan(plan.a_group, tuple(range(num_tasks)), plan.rank)


def factor_pair(shared_a, shared_b, cores, plan: SharingPlan, core: str | None, t: int):
    """Local task `t`'s reconstruction `shared_b[b(t)] @ cores[t] @ shared_a[a(t)]` as one
    LoRA pair `(A_t_hat [j, d_in], B_t_hat [d_out, j])` (JAX or NumPy arrays; leading batch
    axes allowed): the core is multiplied into the task-specific side, and nested ranks are
    cut to `j_t`. Used by `Solution.task_factors`, bundles, export and serving."""
    a = shared_a[..., plan.a_group[t], :, :]
    b = shared_b[..., plan.b_group[t], :, :]
    if cores is None:
        if plan.own_ranks:  # per-task truncation at a rank per task: drop the padding
            j = plan.task_rank[t]
            return a[..., :j, :], b[..., :, :j]
        return a, b
    c = cores[..., t, :, :]
    if core == "nested":
        j = plan.task_rank[t]
        if plan.nested_side == "b":  # U_t V_t^T Ah: A_t = V_t^T Ah, B_t = U_t
            return (c @ a)[..., :j, :], b[..., :, :j]
        return a[..., :j, :], (b @ c)[..., :, :j]  # Bh W_t Z_t^T
    return a, b @ c


def stack_solutions(solutions: Sequence[Solution]) -> Solution:
    """Stack same-shaped Solutions on a new leading axis (inverse of `Solution.index`)."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *solutions)


def task_relative_errors(modules: Iterable, num_tasks: int) -> np.ndarray:
    """Each task's relative error over many modules: the relative error of its whole update.

        err_t = sqrt( sum_m err_{m,t}^2 ||dW_{m,t}||^2 / sum_m ||dW_{m,t}||^2 )

    the relative Frobenius error of the concatenation of the task's module updates, so a
    module counts in proportion to its update (one with a tiny update cannot dominate). This
    is the one definition used by bundles, the planner, the commands and the testbeds.

    `modules`: items with `task_ids`, `relative_error` and `task_sq_norms` (`Solution`s, bundle
    modules, planner choices); a `{module: item}` mapping is taken by its values. A task
    absent everywhere, or with a zero update everywhere, gets 0.
    """
    if hasattr(modules, "values"):
        modules = modules.values()
    num = np.zeros(num_tasks)
    den = np.zeros(num_tasks)
    for m in modules:
        errors = np.asarray(m.relative_error, np.float64)
        norms = np.asarray(m.task_sq_norms, np.float64)
        for local, t in enumerate(m.task_ids):
            if math.isfinite(norms[local]) and norms[local] > 0:
                num[t] += errors[local] ** 2 * norms[local]
                den[t] += norms[local]
    return np.sqrt(np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0))


def collection_storage(solutions) -> tuple[int, int]:
    """`(num_params, original_params)` summed over the modules of `{module: Solution}`."""
    return (
        sum(s.num_params for s in solutions.values()),
        sum(s.original_params for s in solutions.values()),
    )
