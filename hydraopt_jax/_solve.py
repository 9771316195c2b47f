"""One module's solve, pure and traceable, and the static/traced split of its arguments.

`solve_module` is written for one module; `merge` jits it, `merge_adapters` vmaps it over a
stack of same-shaped modules (`batched_solver`). What is static (the plan, the solver kind,
an Optax transformation, the weighting mode) keys the compilation; everything else (learning
rate, tolerance, step budget, weights, covariances, starting factors, solver state) is traced,
so changing it does not recompile.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from ._lapack import after
from ._loss import (
    all_finite,
    plan_loss,
    plan_objective,
    regularized_covariance,
    relative_errors,
    reported_residuals,
    task_norms_sq,
    task_weights,
)
from ._plan import SharingPlan
from ._solution import RESULTS, plain_factors
from ._solvers.als import als_update_a, als_update_b, solve_als
from ._solvers.exact import solve_exact
from ._solvers.nested import mask_padding, nested_objective, solve_nested, solve_nested_als

__all__ = [
    "DEFAULT_LEARNING_RATE",
    "DEFAULT_MAX_STEPS",
    "DEFAULT_TOL",
    "batched_solver",
    "default_max_steps",
    "resolve_solver",
    "solve_jit",
    "solve_module",
    "solver_arguments",
]

if TYPE_CHECKING:  # optax is imported only when an Optax solver runs (0.3 s of start-up)
    import optax

    SolverLike = str | optax.GradientTransformation

# Learning rates of the named Optax solvers (`_solvers/optax_solver.named_transformation`).
DEFAULT_LEARNING_RATE = {"adam": 1e-2, "lbfgs": 1.0}
DEFAULT_MAX_STEPS = {"als": 200, "optax": 2000}
DEFAULT_TOL = {"als": 1e-7, "optax": 1e-9}
SOLVER_NAMES = ("exact", "als", *DEFAULT_LEARNING_RATE)
# Compiled solvers kept per static configuration (plan, solver, traced-argument set); jit's
# own cache then keys on shapes. Bounded: a long sweep over plans does not grow without end.
COMPILE_CACHE_SIZE = 64


def default_max_steps(solver: str) -> int | None:
    """The step budget of a named solver (`None` for the exact one)."""
    if solver == "exact":
        return None
    return DEFAULT_MAX_STEPS["als" if solver == "als" else "optax"]


# ---------------------------------------------------------------------------- initialisation
def _initial_factors(
    A, B, weights, norms_sq, plan: SharingPlan, k: int, init, svd_method, deps=(), axis_name=None
):
    """Starting point of the iterative solvers: `"relaxed"` or `"random"`.

    `deps`, `axis_name`: as in `solve_exact`."""
    if init == "random":
        shared_a = jax.random.normal(
            jax.random.PRNGKey(0), (plan.num_a_groups, k, A.shape[2]), A.dtype
        ) / jnp.sqrt(A.shape[2])
        return shared_a, als_update_b(shared_a, A, B, weights, plan)
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


def _whitening(cov, dtype):
    """Cholesky factor `L` of the regularised `cov = E[x x^T]` (`[d_in, d_in]`)."""
    return jnp.linalg.cholesky(regularized_covariance(jnp.asarray(cov, dtype), jnp))


def _run_optax(transformation, traced, params, loss_fn):
    """`solve_optax` with the named transformation built from the traced learning rate."""
    from ._solvers.optax_solver import named_transformation, solve_optax

    tx = (
        named_transformation(transformation, traced["learning_rate"])
        if isinstance(transformation, str)
        else transformation.tx
    )
    return solve_optax(tx, params, loss_fn, traced["max_steps"], traced["tol"], traced.get("state"))


def _solve_nested(A, B, weights, norms_sq, plan, k, kind, transformation, traced, svd_method,
                  deps, axis_name, chol):  # fmt: skip
    """A nested plan: the closed-form start (`"exact"`), ALS from it or from a given start
    (`"als"`), or an Optax solver. Returns `(shared_a, shared_b, cores, steps, converged,
    state)`."""
    steps, converged, state = jnp.asarray(0, jnp.int32), jnp.asarray(True), None
    given = traced.get("init")
    if given is not None and chol is not None:
        given = (given[0] @ chol, *given[1:])
    start = None if given is None else given[0 if plan.nested_side == "b" else 1]  # shared
    if kind == "exact":
        sa, sb, cores = solve_nested(A, B, weights, norms_sq, plan, k, svd_method, deps, axis_name)
        return sa, sb, cores, steps, converged, state
    if kind == "als":
        return (
            *solve_nested_als(A, B, weights, norms_sq, plan, k, svd_method, deps, axis_name,
                              traced["max_steps"], traced["tol"], start),
            state,
        )  # fmt: skip
    if given is not None and len(given) == 3:
        params = tuple(given)
    else:  # the closed-form start, or a given shared factor with each task's exact part in it
        params = solve_nested(A, B, weights, norms_sq, plan, k, svd_method, deps, axis_name, start)
    params, steps, converged, state = _run_optax(
        transformation, traced, params, nested_objective(A, B, weights, norms_sq, plan)
    )
    return (*mask_padding(params, plan), steps, converged, state)


def _own_ranks(shared_a, shared_b, plan: SharingPlan):
    """Each task's rank-`k` optimum (groups of one, directions by decreasing energy) cut to
    its own rank `j_t`: its best rank-`j_t` approximation (Eckart-Young), zero-padded."""
    keep_a = np.zeros((plan.num_a_groups, plan.rank), bool)
    keep_b = np.zeros((plan.num_b_groups, plan.rank), bool)
    for t, j in enumerate(plan.task_rank):
        keep_a[plan.a_group[t], :j] = True
        keep_b[plan.b_group[t], :j] = True
    return (
        jnp.where(keep_a[:, :, None], shared_a, 0.0),
        jnp.where(keep_b[:, None, :], shared_b, 0.0),
    )


# ---------------------------------------------------------------------------- the solve
def solve_module(
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
) -> dict:
    """One module, pure and traceable: returns the array fields of a `Solution` as a dict.

    `module_axis`: the name of the `vmap` axis over modules, if any: `reported_residuals` and
    the exact solver's `gram_factor` choose their method once across it.

    `traced` holds the array arguments: `learning_rate`, `tol`, `max_steps`, and optionally
    `weights` [T], `cov` [d_in, d_in], `init` (shared_a, shared_b[, cores]) and `state` (a
    previous Optax run's solver state).
    """
    k = plan.rank
    cov = traced.get("cov")
    deps, chol = (), None
    if cov is not None:
        # ||(dW - dW_hat) L||_F with C = L L^T: solve on A L, map Ah back by L^{-1}.
        chol = _whitening(cov, A.dtype)
        A = A @ chol
        deps = (chol,)  # the solve's LAPACK calls wait for this Cholesky (see `_lapack`)
    weights = task_weights(A, B, traced["weights"] if weights_mode == "array" else weights_mode)
    norms_sq = task_norms_sq(A, B)
    state, cores = None, None
    steps, converged = jnp.asarray(0, jnp.int32), jnp.asarray(True)

    max_steps, tol = traced["max_steps"], traced["tol"]
    if plan.nested:
        shared_a, shared_b, cores, steps, converged, state = _solve_nested(
            A, B, weights, norms_sq, plan, k, kind, transformation, traced, svd_method, deps,
            module_axis, chol,
        )  # fmt: skip
        plain_a, plain_b, plain = plain_factors(shared_a, shared_b, cores, plan, "nested")
        residual = reported_residuals(A, B, plain_a, plain_b, plain, norms_sq, module_axis)
    else:
        if kind == "exact" or plan.own_ranks:  # own ranks: the closed form is the optimum
            shared_a, shared_b = solve_exact(A, B, weights, plan, k, svd_method, deps, module_axis)
            if plan.own_ranks:
                shared_a, shared_b = _own_ranks(shared_a, shared_b, plan)
        else:
            if init == "given":
                shared_a, shared_b = traced["init"][:2]
                if chol is not None:
                    shared_a = shared_a @ chol
            else:
                shared_a, shared_b = _initial_factors(
                    A, B, weights, norms_sq, plan, k, init, svd_method, deps, module_axis
                )
            if kind == "als":
                shared_a, shared_b, steps, converged = solve_als(
                    shared_a, shared_b, A, B, weights, norms_sq, plan, max_steps, tol
                )
            else:
                (shared_a, shared_b), steps, converged, state = _run_optax(
                    transformation, traced, (shared_a, shared_b),
                    plan_objective(A, B, weights, norms_sq, plan),
                )  # fmt: skip
        residual = reported_residuals(A, B, shared_a, shared_b, plan, norms_sq, module_axis)

    loss = jnp.sum(weights * residual)
    rel = relative_errors(residual, norms_sq)
    if cov is not None:
        # Ah L = Ah_w  <=>  L^T Ah^T = Ah_w^T
        shared_a = jax.vmap(  # after the residual's QRs (see `_lapack`)
            lambda a: jax.scipy.linalg.solve_triangular(chol.T, a.T, lower=False).T
        )(after(shared_a, residual))
    finite = all_finite(shared_a) & all_finite(shared_b) & jnp.isfinite(loss) & all_finite(norms_sq)
    if cores is not None:
        finite = finite & all_finite(cores)
    result = jnp.where(
        finite,
        jnp.where(converged, RESULTS.successful, RESULTS.max_steps_reached),
        RESULTS.nonfinite,
    ).astype(jnp.int32)
    return dict(
        shared_a=shared_a,
        shared_b=shared_b,
        cores=cores,
        loss=loss,
        relative_error=rel,
        task_sq_norms=norms_sq,
        weights=weights,
        steps=steps.astype(jnp.int32),
        result=result,
        state=state,
    )


_STATIC = ("plan", "kind", "transformation", "weights_mode", "init", "svd_method")
solve_jit = jax.jit(solve_module, static_argnames=_STATIC)

MODULE_AXIS = "modules"
# Traced arguments that differ per module (mapped by vmap); the rest are shared.
PER_MODULE = ("cov", "init", "state")


@functools.lru_cache(maxsize=COMPILE_CACHE_SIZE)
def batched_solver(traced_keys: tuple[str, ...], **static) -> Callable:
    """One jitted solve vmapped over a leading module axis, per static configuration and
    set of traced arguments (jit's own cache then keys on shapes)."""
    in_axes = (0, 0, {key: 0 if key in PER_MODULE else None for key in traced_keys})
    solve = functools.partial(solve_module, **static, module_axis=MODULE_AXIS)
    return jax.jit(jax.vmap(solve, in_axes=in_axes, axis_name=MODULE_AXIS))


# ---------------------------------------------------------------------------- arguments
def resolve_solver(solver: SolverLike, learning_rate):
    """`(kind, transformation, learning_rate)` from a solver name or an Optax transformation.

    A transformation comes back wrapped in `StaticTransformation` (compared by structure,
    so an equal one built again does not recompile)."""
    if isinstance(solver, str):
        if solver in ("exact", "als"):
            return solver, None, 0.0
        if solver in DEFAULT_LEARNING_RATE:
            lr = DEFAULT_LEARNING_RATE[solver] if learning_rate is None else learning_rate
            return "optax", solver, lr
    else:
        import optax

        if isinstance(solver, optax.GradientTransformation):
            from ._solvers.optax_solver import StaticTransformation

            return "optax", StaticTransformation(solver), 0.0
    raise ValueError(
        f"solver must be one of {', '.join(map(repr, SOLVER_NAMES))} or an "
        f"optax.GradientTransformation; got {solver!r}"
    )


def is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def solver_arguments(plan, solver, learning_rate, weights, max_steps, tol, init, svd_method, dtype):
    """`(statics, traced)`: the static configuration and the shared traced arguments."""
    kind, transformation, lr = resolve_solver(solver, learning_rate)
    key = "als" if kind == "als" else "optax"
    if not isinstance(init, str):
        init = "given"
    elif init not in ("relaxed", "random"):
        raise ValueError(
            f"init must be 'relaxed', 'random', a Solution or (shared_a, shared_b); got {init!r}"
        )
    statics = dict(
        plan=plan,
        kind=kind,
        transformation=transformation,
        weights_mode=weights if isinstance(weights, str) else "array",
        init=init,
        svd_method=svd_method,
    )
    max_steps = DEFAULT_MAX_STEPS[key] if max_steps is None else max_steps
    if not is_traced(max_steps) and int(max_steps) < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    traced = dict(
        learning_rate=_scalar(lr, dtype),
        tol=_scalar(DEFAULT_TOL[key] if tol is None else tol, dtype),
        max_steps=_scalar(max_steps, jnp.int32),
    )
    return statics, traced


def _scalar(x, dtype):
    """A solver's scalar argument: host numpy unless traced (`jnp.asarray` of a Python number
    compiles a conversion program on first use, ~20 ms each in a cold command)."""
    return jnp.asarray(x, dtype) if is_traced(x) else np.asarray(x, dtype)
