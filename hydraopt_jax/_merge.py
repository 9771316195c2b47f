"""`merge` (one module) and `merge_adapters` (many modules, one compilation per shape)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from ._host import stack_modules, unstack
from ._loss import adapter_task_weights, check_factor_shapes, working_dtype
from ._plan import SharingPlan
from ._solution import RESULTS, Solution, factor_shapes
from ._solve import (
    PER_MODULE,
    batched_solver,
    is_traced,
    solve_jit,
    solver_arguments,
)

if TYPE_CHECKING:
    from ._solve import SolverLike

__all__ = ["SolverError", "merge", "merge_adapters"]


class SolverError(FloatingPointError):
    """A solve produced NaN or Inf (the inputs are finite: the solver diverged)."""


def _check_factors(A, B, plan: SharingPlan, where: str = "") -> None:
    at = f"merge ({where})" if where else "merge"
    check_factor_shapes(A, B, at)
    if plan.num_tasks != A.shape[0]:
        raise ValueError(f"{at}: plan has {plan.num_tasks} tasks but A has {A.shape[0]}")


def _raise_on_failure(sol: Solution, where: str = "") -> None:
    codes = np.unique(np.asarray(sol.result))
    bad = [c for c in codes if c == RESULTS.nonfinite]
    if bad:
        at = f" on {where}" if where else ""
        raise SolverError(f"merge{at}: {RESULTS.message(bad[0])}")


def _start(init) -> tuple[str | tuple, Any]:
    """`(init for solver_arguments, solver state)` from `merge`'s `init` argument."""
    if isinstance(init, Solution):
        factors = (init.shared_a, init.shared_b)
        if init.cores is not None:
            factors = (*factors, init.cores)
        return factors, init.state
    return init, None


def _check_init(factors, plan: SharingPlan, d_in: int, d_out: int, where: str = "") -> None:
    """A given start must have the plan's shapes (`factor_shapes`): `(shared_a, shared_b)`,
    or with nested ranks also its `cores` (a start of two arrays gives only the shared
    factor; the per-task parts start from their exact best inside it)."""
    at = f"merge ({where})" if where else "merge"
    expect = factor_shapes(plan, "nested" if plan.nested else None, d_in, d_out)
    names = ("shared_a", "shared_b", "cores")
    takes = "(shared_a, shared_b)" + (" or (shared_a, shared_b, cores)" if plan.nested else "")
    if len(factors) not in ((2, 3) if plan.nested else (2,)):
        raise ValueError(f"{at}: init holds {len(factors)} arrays; this plan takes {takes}")
    if plan.nested and len(factors) == 2:  # only the shared factor is used
        checked = ("shared_a",) if plan.nested_side == "b" else ("shared_b",)
    else:
        checked = names[: len(factors)]
    for name in checked:
        found = tuple(np.shape(factors[names.index(name)]))
        if found != expect[name]:
            raise ValueError(
                f"{at}: init {name} has shape {list(found)}; the plan (rank {plan.rank}"
                + (f", task ranks up to {max(plan.task_rank)}" if plan.nested else "")
                + f") needs {list(expect[name])}"
            )


def _solution(arrays: Mapping, plan, task_ranks, task_ids) -> Solution:
    return Solution(
        **arrays,
        plan=plan,
        task_ranks=tuple(task_ranks),
        task_ids=tuple(task_ids),
        core="nested" if plan.nested else None,
    )


# ---------------------------------------------------------------------------- public API
def merge(
    A,
    B,
    plan: SharingPlan,
    solver: SolverLike = "exact",
    *,
    weights: str | Any = "relative",
    max_steps: int | None = None,
    tol: float | None = None,
    learning_rate: float | None = None,
    init: str | tuple | Solution = "relaxed",
    activation_cov=None,
    svd_method: str = "auto",
    task_ranks: Sequence[int] | None = None,
    task_ids: Sequence[int] | None = None,
    throw: bool = True,
) -> Solution:
    """Fit shared and task-specific factors of one module.

    Minimises `sum_t w_t ||B_t A_t - Bh[b_group[t]] Ah[a_group[t]]||_F^2` in factored form
    (with nested ranks, each task's factor of rank `j_t` inside its shared one).

    **Arguments:**

    - `A`: `[T, r, d_in]`; `B`: `[T, d_out, r]`, with each task's LoRA scale folded into `B`.
      Mixed ranks: zero-pad to the largest.
    - `plan`: a `SharingPlan`; `plan.rank=None` means `k = r`.
    - `solver`: `"exact"` (closed form; plans whose groups nest; for nested ranks the exact
      top-`k` shared factor with each task's exact best factor inside it), `"als"` (any
      plan; refines nested ranks), `"adam"`, `"lbfgs"`, or any
      `optax.GradientTransformation` (compared by structure: an equal one built again does
      not recompile).
    - `weights`: `"relative"` (`1/||dW_t||^2`, default), `"uniform"` or an array `[T]`
      (`merge_adapters` and `merge_collection` also take `"adapter"`:
      `_loss.adapter_task_weights`, relative to each task's whole adapter).
    - `max_steps`, `tol`: iterative solvers stop when the relative decrease of the loss falls
      below `tol` or after `max_steps` steps.
    - `learning_rate`: for `"adam"` (default 1e-2, in units of the parameters' RMS); traced,
      so a sweep over it does not recompile.
    - `init`: iterative solvers start from `"relaxed"` (the closed form of the plan with one
      side made task-specific, default), `"random"`, given `(shared_a, shared_b)`, or a
      previous `Solution`, whose solver state (Optax's moments) the run continues.
    - `activation_cov`: optional `[d_in, d_in]` input covariance `E[x x^T]`; the objective
      becomes `||(dW_t - dW_hat_t) L||_F^2` with `C = L L^T`, and `loss`/`relative_error` are
      reported in that metric.
    - `svd_method`: `"auto"`, `"direct"` (small Gram) or `"randomized"` (subspace iteration on
      the implicit operator, for large `T r`).
    - `task_ranks`: each task's true rank, for storage accounting (default `r` for all).
    - `throw`: raise `SolverError` (a `FloatingPointError`) on non-finite results (outside
      of `jit`/`vmap`); with `throw=False` inspect `Solution.result` instead.

    **Returns:** a `Solution`.

    **Example:**

    ```python
    sol = hj.merge(A, B, hj.SharingPlan.shared_a(num_tasks=A.shape[0]))
    print(sol.storage_ratio, sol.relative_error)
    ```
    """
    A, B = jnp.asarray(A), jnp.asarray(B)
    _check_factors(A, B, plan)
    dtype = working_dtype(A, B)
    A, B = A.astype(dtype), B.astype(dtype)
    num_tasks, r = A.shape[0], A.shape[1]
    plan = plan.resolved(r)
    init, state = _start(init)
    statics, traced = solver_arguments(
        plan, solver, learning_rate, weights, max_steps, tol, init, svd_method, dtype
    )
    if not isinstance(weights, str):
        traced["weights"] = jnp.asarray(weights, dtype)
        if not is_traced(traced["weights"]):
            w = np.asarray(traced["weights"])
            if not (np.all(np.isfinite(w)) and np.all(w >= 0)):
                raise ValueError(f"weights must be finite and non-negative, got {w.tolist()}")
    if task_ranks is not None and any(int(k) < 1 for k in task_ranks):
        raise ValueError(
            f"task_ranks {list(task_ranks)}: every task given to merge must be present (rank "
            ">= 1); leave absent tasks out, as merge_adapters does for ranks of 0"
        )
    if activation_cov is not None:
        traced["cov"] = jnp.asarray(activation_cov, dtype)
    if statics["init"] == "given":
        _check_init(init, plan, A.shape[2], B.shape[1])
        traced["init"] = tuple(jnp.asarray(x, dtype) for x in init)
    if state is not None and statics["kind"] == "optax":
        traced["state"] = state
    arrays = solve_jit(A, B, traced, **statics)
    sol = _solution(
        arrays,
        plan,
        task_ranks if task_ranks is not None else (r,) * num_tasks,
        task_ids if task_ids is not None else range(num_tasks),
    )
    if throw and not is_traced(sol.loss):
        _raise_on_failure(sol)
    return sol


def _unpack_entry(name: str, value) -> tuple[jax.Array, jax.Array, tuple[int, ...]]:
    if not isinstance(value, (tuple, list)) or len(value) not in (2, 3):
        raise ValueError(f"module {name!r}: expected (A, B) or (A, B, ranks); got {type(value)}")
    A, B = np.asarray(value[0]) if not isinstance(value[0], jax.Array) else value[0], value[1]
    B = np.asarray(B) if not isinstance(B, jax.Array) else B
    ranks = tuple(int(x) for x in value[2]) if len(value) == 3 else (A.shape[1],) * A.shape[0]
    if len(ranks) != A.shape[0]:
        raise ValueError(f"module {name!r}: {len(ranks)} ranks for {A.shape[0]} tasks")
    return A, B, ranks


def _module_init(init, name: str):
    """One module's start from `merge_adapters`' `init` mapping."""
    if name not in init:
        raise ValueError(f"merge_adapters: init has no factors for module {name!r}")
    return _start(init[name])


def merge_adapters(
    collection: Mapping[str, tuple],
    plan: SharingPlan | Mapping[str, SharingPlan],
    solver: SolverLike = "exact",
    *,
    weights: str | Any = "relative",
    max_steps: int | None = None,
    tol: float | None = None,
    learning_rate: float | None = None,
    init: str | Mapping[str, tuple | Solution] = "relaxed",
    activation_covs: Mapping[str, Any] | None = None,
    svd_method: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
    progress: Callable[[str, int], None] | None = None,
    throw: bool = True,
) -> dict[str, Solution]:
    """Merge many modules held in memory; modules with equal shapes are solved by one
    vmapped, jitted call. (To stream an `io.AdapterCollection` from disk group by group,
    with a memory guard and checkpoints, use `hydraopt_jax.merge_collection`.)

    **Arguments:**

    - `collection`: `{module: (A [T, r, d_in], B [T, d_out, r])}` or
      `{module: (A, B, ranks)}` over all `T` tasks of the collection; `ranks[t] = 0` marks a
      task absent from that module (its factors are left out of that module's problem).
    - `plan`: one `SharingPlan` over the `T` tasks, or `{module: SharingPlan}`.
    - `init`: `"relaxed"`, `"random"`, or `{module: (shared_a, shared_b) | Solution}` to
      continue iterative solves (e.g. from a checkpoint); every module must then be given.
    - `activation_covs`: optional `{module: [d_in, d_in]}` input covariances.
    - `mesh`: optional `jax.sharding.Mesh`; the module axis of each shape group is sharded
      over its first axis (padded to a multiple of its size) and, if the mesh has a second
      axis whose size divides the number of tasks, the task axis over that one (for large
      `T`: per-task products and Gram sums are split, XLA adds the reductions). Results equal
      one device's.
    - `progress`: called as `progress(description, num_modules)` after each shape group.
    - `weights`: as in `merge`, or `"adapter"`: each task's error relative to its whole
      adapter's update (`1 / sum_m ||dW_{m,t}||^2` on every module, whitened under
      `activation_covs`), so that the summed loss is `sum_t err_t^2`.
    - the rest as in `merge`.

    **Returns:** `{module: Solution}`; each Solution's `task_ids` lists the tasks present.

    The number of compilations equals the number of distinct (shapes, tasks present, plan)
    signatures, not the number of modules.
    """
    if not isinstance(collection, Mapping):
        raise TypeError(
            f"merge_adapters takes {{module: (A, B[, ranks])}}, got {type(collection).__name__}; "
            "stream an io.AdapterCollection with hydraopt_jax.merge_collection"
        )
    groups: dict[tuple, list[tuple[str, Any, Any, tuple[int, ...]]]] = {}
    for name, value in collection.items():
        A, B, ranks = _unpack_entry(name, value)
        if isinstance(plan, Mapping) and name not in plan:
            raise ValueError(f"module {name!r} has no plan in the per-module plan mapping")
        module_plan = plan[name] if isinstance(plan, Mapping) else plan
        _check_factors(A, B, module_plan, where=name)
        present = tuple(t for t, rank in enumerate(ranks) if rank > 0)
        if not present:
            continue
        sub_plan = module_plan.restrict(present).resolved(max(ranks))
        has_cov = activation_covs is not None and name in activation_covs
        key = (A.shape, B.shape, present, sub_plan, has_cov)
        groups.setdefault(key, []).append((name, A, B, ranks))
    if isinstance(weights, str) and weights == "adapter":  # one array for every module
        weights = adapter_task_weights(
            (m for members in groups.values() for m in members), activation_covs
        )

    out: dict[str, Solution] = {}
    for (a_shape, b_shape, present, sub_plan, has_cov), members in groups.items():
        names = [m[0] for m in members]
        idx = np.asarray(present)
        dtype = jnp.float32
        given = "relaxed"
        states = None
        if not isinstance(init, str):
            starts = [_module_init(init, n) for n in names]
            for n, (factors, _) in zip(names, starts, strict=True):
                _check_init(factors, sub_plan, a_shape[2], b_shape[1], where=n)
            given = starts[0][0]
            states = [s for _, s in starts]
        statics, traced = solver_arguments(
            sub_plan, solver, learning_rate, weights, max_steps, tol,
            init if isinstance(init, str) else given, svd_method, dtype,
        )  # fmt: skip
        # The group's factors held once (see `_host`); tasks are subset only when some are
        # absent from the module.
        take = None if len(present) == a_shape[0] else (lambda x, i=idx: x[i])
        stack_a = stack_modules([m[1] for m in members], dtype, take)
        stack_b = stack_modules([m[2] for m in members], dtype, take)
        if not isinstance(weights, str):
            traced["weights"] = jnp.asarray(weights, dtype)[idx]
        if has_cov:
            traced["cov"] = jnp.stack([jnp.asarray(activation_covs[n], dtype) for n in names])
        if statics["init"] == "given":
            traced["init"] = tuple(
                jnp.stack([jnp.asarray(s[0][i], dtype) for s in starts]) for i in range(len(given))
            )
            if statics["kind"] == "optax" and all(s is not None for s in states):
                traced["state"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)
        solve = batched_solver(tuple(sorted(traced)), **statics)
        if mesh is None:
            arrays = solve(stack_a, stack_b, traced)
        else:
            arrays = _solve_sharded(solve, mesh, stack_a, stack_b, traced)
        del stack_a, stack_b
        fields = {k: v for k, v in arrays.items() if v is not None and k != "state"}
        per_module = {k: unstack(v) for k, v in fields.items()}
        module_states = _split_state(arrays.get("state"), len(members))
        del arrays, fields
        for i, (name, _, _, ranks) in enumerate(members):
            module_arrays = {k: v[i] for k, v in per_module.items()}
            module_arrays["state"] = module_states[i]
            sol = _solution(module_arrays, sub_plan, [ranks[t] for t in present], present)
            if throw:
                _raise_on_failure(sol, where=name)
            out[name] = sol
        if progress is not None:
            progress(
                f"{len(members)} x {a_shape[1:]}->{b_shape[1]} ({sub_plan.name})", len(members)
            )
    return {name: out[name] for name in collection if name in out}


def _split_state(state, num: int) -> list:
    """A batched solver state split into one per module (`None`s when there is none)."""
    if state is None:
        return [None] * num
    return [jax.tree_util.tree_map(lambda x, i=i: x[i], state) for i in range(num)]


def _solve_sharded(solve, mesh, stack_a, stack_b, traced):
    """Run a vmapped solve with its module axis sharded over the mesh's first axis and, when
    the mesh has a second axis that divides the number of tasks, the task axis over that one.

    The module axis is padded (repeating the last module) to a multiple of the first axis's
    size, and the padding is dropped from the results. Sharding the task axis splits every
    per-task product and Gram accumulation over the second axis (XLA inserts the reductions);
    the results are those of one device.
    """
    from jax.sharding import NamedSharding, PartitionSpec

    axis = mesh.axis_names[0]
    size = mesh.shape[axis]
    num, num_tasks = stack_a.shape[:2]
    pad = (-num) % size
    task_axis = None
    if len(mesh.axis_names) > 1 and num_tasks % mesh.shape[mesh.axis_names[1]] == 0:
        task_axis = mesh.axis_names[1]

    def place(x, per_module: bool, per_task: bool = False):
        if not per_module:
            return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
        if pad:
            x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)], axis=0)
        spec = PartitionSpec(axis, task_axis) if per_task else PartitionSpec(axis)
        return jax.device_put(x, NamedSharding(mesh, spec))

    traced = {
        key: jax.tree_util.tree_map(lambda x, k=key: place(x, k in PER_MODULE), value)
        for key, value in traced.items()
    }
    arrays = solve(place(stack_a, True, True), place(stack_b, True, True), traced)
    return jax.tree_util.tree_map(lambda x: x[:num], arrays)
