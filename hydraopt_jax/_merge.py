"""`merge` (one module) and `merge_adapters` (many modules, one compilation per shape)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from ._host import stack_modules, unstack
from ._lapack import after
from ._loss import (
    all_finite,
    check_factor_shapes,
    plan_loss,
    relative_errors,
    reported_residuals,
    task_norms_sq,
    task_weights,
)
from ._plan import SharingPlan
from ._solution import RESULTS, Solution
from ._solvers.als import als_update_a, als_update_b, solve_als
from ._solvers.exact import solve_exact

__all__ = ["merge", "merge_adapters"]

if TYPE_CHECKING:  # optax is imported only when an Optax solver runs (0.3 s of start-up)
    import optax

    SolverLike = str | optax.GradientTransformation
# Learning rates of the named Optax solvers (`_solvers/optax_solver.named_transformation`).
DEFAULT_LEARNING_RATE = {"adam": 1e-2, "lbfgs": 1.0}
DEFAULT_MAX_STEPS = {"als": 200, "optax": 2000}
DEFAULT_TOL = {"als": 1e-7, "optax": 1e-9}
# Whitening ridge, relative to the mean eigenvalue of the activation covariance.
COV_RIDGE = 1e-6


# ---------------------------------------------------------------------------- initialisation
def _initial_factors(
    A, B, weights, norms_sq, plan: SharingPlan, k: int, init, svd_method, deps=(), axis_name=None
):
    """Starting point of the iterative solvers: `"relaxed"`, `"random"` or `(Ah, Bh)`.

    `deps`, `axis_name`: as in `solve_exact`."""
    if isinstance(init, tuple):
        return jnp.asarray(init[0], A.dtype), jnp.asarray(init[1], A.dtype)
    if init == "random":
        shared_a = jax.random.normal(
            jax.random.PRNGKey(0), (plan.num_a_groups, k, A.shape[2]), A.dtype
        ) / jnp.sqrt(A.shape[2])
        return shared_a, als_update_b(shared_a, A, B, weights, plan)
    if init != "relaxed":
        raise ValueError(f"init must be 'relaxed', 'random' or (shared_a, shared_b); got {init!r}")
    if plan.has_closed_form:
        return solve_exact(A, B, weights, plan, k, svd_method, deps, axis_name)
    # Relax one side to task-specific (a closed form), then fit the real groups of the
    # other side by one least-squares half-step; keep whichever relaxation fits better.
    everyone = tuple(range(plan.num_tasks))
    relaxed_a = SharingPlan(plan.a_group, everyone, k)
    sa_1, _ = solve_exact(A, B, weights, relaxed_a, k, svd_method, deps, axis_name)
    sb_1 = als_update_b(sa_1, A, B, weights, plan)
    # the second relaxation's LAPACK calls wait for the first's (see `_lapack`)
    relaxed_b = SharingPlan(everyone, plan.b_group, k)
    _, sb_2 = solve_exact(A, B, weights, relaxed_b, k, svd_method, (sb_1,), axis_name)
    sa_2 = als_update_a(sb_2, A, B, weights, plan)
    first_better = plan_loss(sa_1, sb_1, A, B, weights, norms_sq, plan) <= plan_loss(
        sa_2, sb_2, A, B, weights, norms_sq, plan
    )
    return jnp.where(first_better, sa_1, sa_2), jnp.where(first_better, sb_1, sb_2)


# ---------------------------------------------------------------------------- the solve
def _whitening(cov, dtype):
    """Cholesky factor `L` of `cov + ridge I` (`cov = E[x x^T]`, `[d_in, d_in]`)."""
    cov = jnp.asarray(cov, dtype)
    d = cov.shape[-1]
    ridge = COV_RIDGE * jnp.trace(cov) / d + jnp.finfo(dtype).tiny
    return jnp.linalg.cholesky(0.5 * (cov + cov.T) + ridge * jnp.eye(d, dtype=dtype))


def _solve_impl(
    A,
    B,
    traced: dict,
    *,
    plan: SharingPlan,
    kind,
    transformation,
    weights_mode,
    init,
    svd_method,
    module_axis=None,
):
    """One module, pure and traceable: returns the arrays of a `Solution`.

    `module_axis`: the name of the `vmap` axis over modules, if any: `reported_residuals` and
    the exact solver's `gram_factor` choose their method once across it.

    `traced` holds the array arguments: `learning_rate`, `tol`, `max_steps`, and optionally
    `weights` [T], `cov` [d_in, d_in] and `init` (shared_a, shared_b).
    """
    k = plan.rank
    cov = traced.get("cov")
    deps = ()
    if cov is not None:
        # ||(dW - dW_hat) L||_F with C = L L^T: solve on A L, map Ah back by L^{-1}.
        chol = _whitening(cov, A.dtype)
        A = A @ chol
        deps = (chol,)  # the solve's LAPACK calls wait for this Cholesky (see `_lapack`)
    weights = task_weights(A, B, traced["weights"] if weights_mode == "array" else weights_mode)
    norms_sq = task_norms_sq(A, B)

    if kind == "exact":
        shared_a, shared_b = solve_exact(A, B, weights, plan, k, svd_method, deps, module_axis)
        steps, converged = jnp.asarray(0, jnp.int32), jnp.asarray(True)
    else:
        if init == "given":
            shared_a, shared_b = traced["init"]
            if cov is not None:
                shared_a = shared_a @ chol
        else:
            shared_a, shared_b = _initial_factors(
                A, B, weights, norms_sq, plan, k, init, svd_method, deps, module_axis
            )
        max_steps, tol = traced["max_steps"], traced["tol"]
        if kind == "als":
            shared_a, shared_b, steps, converged = solve_als(
                shared_a, shared_b, A, B, weights, norms_sq, plan, max_steps, tol
            )
        else:
            from ._solvers.optax_solver import named_transformation, solve_optax

            tx = transformation
            if isinstance(tx, str):
                tx = named_transformation(tx, traced["learning_rate"])
            shared_a, shared_b, steps, converged = solve_optax(
                tx, shared_a, shared_b, A, B, weights, norms_sq, plan, max_steps, tol
            )

    residual = reported_residuals(A, B, shared_a, shared_b, plan, norms_sq, module_axis)
    loss = jnp.sum(weights * residual)
    rel = relative_errors(residual, norms_sq)
    if cov is not None:
        # Ah L = Ah_w  <=>  L^T Ah^T = Ah_w^T
        shared_a = jax.vmap(  # after the residual's QRs (see `_lapack`)
            lambda a: jax.scipy.linalg.solve_triangular(chol.T, a.T, lower=False).T
        )(after(shared_a, residual))
    finite = all_finite(shared_a) & all_finite(shared_b) & jnp.isfinite(loss) & all_finite(norms_sq)
    result = jnp.where(
        finite,
        jnp.where(converged, RESULTS.successful, RESULTS.max_steps_reached),
        RESULTS.nonfinite,
    ).astype(jnp.int32)
    return shared_a, shared_b, loss, rel, weights, steps.astype(jnp.int32), result


_STATIC = ("plan", "kind", "transformation", "weights_mode", "init", "svd_method")
_solve_jit = jax.jit(_solve_impl, static_argnames=_STATIC)

_MODULE_AXIS = "modules"
# Traced arguments that differ per module (mapped by vmap); the rest are shared.
_PER_MODULE = ("cov", "init")


@functools.cache
def _batched_solver(traced_keys: tuple[str, ...], **static) -> Callable:
    """One jitted solve vmapped over a leading module axis, per static configuration and
    set of traced arguments (jit's own cache then keys on shapes)."""
    in_axes = (0, 0, {key: 0 if key in _PER_MODULE else None for key in traced_keys})
    solve = functools.partial(_solve_impl, **static, module_axis=_MODULE_AXIS)
    return jax.jit(jax.vmap(solve, in_axes=in_axes, axis_name=_MODULE_AXIS))


# ---------------------------------------------------------------------------- arguments
def _resolve_solver(solver: SolverLike, learning_rate):
    """`(kind, transformation, learning_rate)` from a solver name or an Optax transformation."""
    if isinstance(solver, str):
        if solver in ("exact", "als"):
            return solver, None, 0.0
        if solver in DEFAULT_LEARNING_RATE:
            lr = DEFAULT_LEARNING_RATE[solver] if learning_rate is None else learning_rate
            return "optax", solver, lr
    else:
        import optax

        if isinstance(solver, optax.GradientTransformation):
            return "optax", solver, 0.0
    raise ValueError(
        f"solver must be 'exact', 'als', 'adam', 'lbfgs' or an optax.GradientTransformation; "
        f"got {solver!r}"
    )


def _check_factors(A, B, plan: SharingPlan, where: str = "") -> None:
    at = f"merge ({where})" if where else "merge"
    check_factor_shapes(A, B, at)
    if plan.num_tasks != A.shape[0]:
        raise ValueError(f"{at}: plan has {plan.num_tasks} tasks but A has {A.shape[0]}")


def _solver_arguments(
    plan, solver, learning_rate, weights, max_steps, tol, init, svd_method, dtype
):
    """`(statics, traced)`: the static configuration and the shared traced arguments."""
    kind, transformation, lr = _resolve_solver(solver, learning_rate)
    key = "als" if kind == "als" else "optax"
    if not isinstance(init, str):
        init = "given"
    elif init not in ("relaxed", "random"):
        raise ValueError(f"init must be 'relaxed', 'random' or (shared_a, shared_b); got {init!r}")
    statics = dict(
        plan=plan,
        kind=kind,
        transformation=transformation,
        weights_mode=weights if isinstance(weights, str) else "array",
        init=init,
        svd_method=svd_method,
    )
    max_steps = DEFAULT_MAX_STEPS[key] if max_steps is None else max_steps
    if not _is_traced(max_steps) and int(max_steps) < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    traced = dict(
        learning_rate=jnp.asarray(lr, dtype),
        tol=jnp.asarray(DEFAULT_TOL[key] if tol is None else tol, dtype),
        max_steps=jnp.asarray(max_steps, jnp.int32),
    )
    return statics, traced


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _raise_on_failure(sol: Solution, where: str = "") -> None:
    codes = np.unique(np.asarray(sol.result))
    bad = [c for c in codes if c == RESULTS.nonfinite]
    if bad:
        at = f" on {where}" if where else ""
        raise FloatingPointError(f"merge{at}: {RESULTS.message(bad[0])}")


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
    init: str | tuple = "relaxed",
    activation_cov=None,
    svd_method: str = "auto",
    task_ranks: Sequence[int] | None = None,
    task_ids: Sequence[int] | None = None,
    throw: bool = True,
) -> Solution:
    """Fit shared and task-specific factors of one module.

    Minimises `sum_t w_t ||B_t A_t - Bh[b_group[t]] Ah[a_group[t]]||_F^2` in factored form.

    **Arguments:**

    - `A`: `[T, r, d_in]`; `B`: `[T, d_out, r]`, with each task's LoRA scale folded into `B`.
      Mixed ranks: zero-pad to the largest.
    - `plan`: a `SharingPlan`; `plan.rank=None` means `k = r`.
    - `solver`: `"exact"` (closed form; plans whose groups nest), `"als"` (any plan),
      `"adam"`, `"lbfgs"`, or any `optax.GradientTransformation`.
    - `weights`: `"relative"` (`1/||dW_t||^2`, default), `"uniform"` or an array `[T]`.
    - `max_steps`, `tol`: iterative solvers stop when the relative decrease of the loss falls
      below `tol` or after `max_steps` steps.
    - `learning_rate`: for `"adam"` (default 1e-2, in units of the parameters' RMS); traced,
      so a sweep over it does not recompile.
    - `init`: iterative solvers start from `"relaxed"` (the closed form of the plan with one
      side made task-specific, default), `"random"`, or a given `(shared_a, shared_b)`.
    - `activation_cov`: optional `[d_in, d_in]` input covariance `E[x x^T]`; the objective
      becomes `||(dW_t - dW_hat_t) L||_F^2` with `C = L L^T`, and `loss`/`relative_error` are
      reported in that metric.
    - `svd_method`: `"auto"`, `"direct"` (thin QR + SVD) or `"randomized"` (subspace iteration
      on the implicit operator, for large `T r`).
    - `task_ranks`: each task's true rank, for storage accounting (default `r` for all).
    - `throw`: raise `FloatingPointError` on non-finite results (outside of `jit`/`vmap`);
      with `throw=False` inspect `Solution.result` instead.

    **Returns:** a `Solution`.

    **Example:**

    ```python
    sol = hj.merge(A, B, hj.SharingPlan.shared_a(num_tasks=A.shape[0]))
    print(sol.storage_ratio, sol.relative_error)
    ```
    """
    A, B = jnp.asarray(A), jnp.asarray(B)
    _check_factors(A, B, plan)
    dtype = jnp.promote_types(jnp.promote_types(A.dtype, B.dtype), jnp.float32)
    A, B = A.astype(dtype), B.astype(dtype)
    num_tasks, r = A.shape[0], A.shape[1]
    plan = plan if plan.rank is not None else plan.with_rank(r)
    statics, traced = _solver_arguments(
        plan, solver, learning_rate, weights, max_steps, tol, init, svd_method, dtype
    )
    if not isinstance(weights, str):
        traced["weights"] = jnp.asarray(weights, dtype)
        if not _is_traced(traced["weights"]):
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
        traced["init"] = (jnp.asarray(init[0], dtype), jnp.asarray(init[1], dtype))
    arrays = _solve_jit(A, B, traced, **statics)
    sol = Solution(
        *arrays,
        plan=plan,
        task_ranks=tuple(task_ranks) if task_ranks is not None else (r,) * num_tasks,
        task_ids=tuple(task_ids) if task_ids is not None else tuple(range(num_tasks)),
    )
    if throw and not _is_traced(sol.loss):
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


def merge_adapters(
    collection: Mapping[str, tuple],
    plan: SharingPlan | Mapping[str, SharingPlan],
    solver: SolverLike = "exact",
    *,
    weights: str | Any = "relative",
    max_steps: int | None = None,
    tol: float | None = None,
    learning_rate: float | None = None,
    init: str | Mapping[str, tuple] = "relaxed",
    activation_covs: Mapping[str, Any] | None = None,
    svd_method: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
    progress: Callable[[str, int], None] | None = None,
    throw: bool = True,
) -> dict[str, Solution]:
    """Merge many modules; modules with equal shapes are solved by one vmapped, jitted call.

    **Arguments:**

    - `collection`: `{module: (A [T, r, d_in], B [T, d_out, r])}` or
      `{module: (A, B, ranks)}` over all `T` tasks of the collection; `ranks[t] = 0` marks a
      task absent from that module (its factors are left out of that module's problem).
    - `plan`: one `SharingPlan` over the `T` tasks, or `{module: SharingPlan}`.
    - `init`: `"relaxed"`, `"random"`, or `{module: (shared_a, shared_b)}` to continue
      iterative solves (e.g. from a checkpoint); every module must then be given.
    - `activation_covs`: optional `{module: [d_in, d_in]}` input covariances.
    - `mesh`: optional `jax.sharding.Mesh`; the module axis of each shape group is sharded
      over its first axis (padded to a multiple of its size) and, if the mesh has a second
      axis whose size divides the number of tasks, the task axis over that one (for large
      `T`: per-task products and Gram sums are split, XLA adds the reductions). Results equal
      one device's.
    - `progress`: called as `progress(description, num_modules)` after each shape group.
    - the rest as in `merge`.

    **Returns:** `{module: Solution}`; each Solution's `task_ids` lists the tasks present.

    The number of compilations equals the number of distinct (shapes, tasks present, plan)
    signatures, not the number of modules.
    """
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
        sub_plan = module_plan.restrict(present)
        if sub_plan.rank is None:
            sub_plan = sub_plan.with_rank(max(ranks))
        has_cov = activation_covs is not None and name in activation_covs
        key = (A.shape, B.shape, present, sub_plan, has_cov)
        groups.setdefault(key, []).append((name, A, B, ranks))

    out: dict[str, Solution] = {}
    for (a_shape, b_shape, present, sub_plan, has_cov), members in groups.items():
        names = [m[0] for m in members]
        idx = np.asarray(present)
        dtype = jnp.float32
        statics, traced = _solver_arguments(
            sub_plan, solver, learning_rate, weights, max_steps, tol, init, svd_method, dtype
        )
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
            missing = [n for n in names if n not in init]
            if missing:
                raise ValueError(f"merge_adapters: init has no factors for modules {missing}")
            traced["init"] = tuple(
                jnp.stack([jnp.asarray(init[n][i], dtype) for n in names]) for i in (0, 1)
            )
        solve = _batched_solver(tuple(sorted(traced)), **statics)
        if mesh is None:
            arrays = solve(stack_a, stack_b, traced)
        else:
            arrays = _solve_sharded(solve, mesh, stack_a, stack_b, traced)
        del stack_a, stack_b
        per_module = list(zip(*(unstack(x) for x in arrays), strict=True))
        del arrays
        for i, (name, _, _, ranks) in enumerate(members):
            sol = Solution(
                *per_module[i],
                plan=sub_plan,
                task_ranks=tuple(ranks[t] for t in present),
                task_ids=present,
            )
            if throw:
                _raise_on_failure(sol, where=name)
            out[name] = sol
        if progress is not None:
            progress(
                f"{len(members)} x {a_shape[1:]}->{b_shape[1]} ({sub_plan.name})", len(members)
            )
    return {name: out[name] for name in collection if name in out}


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
        key: jax.tree_util.tree_map(lambda x, k=key: place(x, k in _PER_MODULE), value)
        for key, value in traced.items()
    }
    arrays = solve(place(stack_a, True, True), place(stack_b, True, True), traced)
    return tuple(x[:num] for x in arrays)
