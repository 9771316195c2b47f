"""Gradient descent on the factored loss with any `optax.GradientTransformation`.

The paper's gradient formulation, and the hook for custom objectives. Parameters are
optimised in units of their group's initial RMS and the loss in units of `sum_t w_t ||dW_t||^2`,
so one learning rate suits any width and any adapter norm. One jitted `lax.while_loop`; the
learning rate of the named solvers is a traced array, so a sweep does not recompile.

A user's transformation is data, not a cache key: `StaticTransformation` compares two
transformations by their structure (code and closed-over values, recursively), so a fresh
`optax.adam(1e-2)` built for every call compiles once. The optimiser state comes back with
the result (`state`), and a run started from it continues it: Adam's moments and step count
carry over, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .als import run_descent_loop

__all__ = [
    "StaticTransformation",
    "named_transformation",
    "solve_optax",
    "structural_key",
]

# Arrays closed over by a transformation are compared by value up to this many elements, by
# identity beyond (a schedule table, say; comparing it would cost more than a recompile).
_ARRAY_KEY_MAX_ELEMENTS = 1 << 16


def structural_key(obj, _seen: frozenset = frozenset()):
    """A hashable key equal for structurally equal callables and containers.

    Functions compare by code object, defaults and closed-over values (recursively);
    `functools.partial` by function, arguments and keywords; tuples, lists and dicts by their
    items; small arrays by dtype, shape and bytes; other hashable objects by value; anything
    else by identity. Two transformations with equal keys compute the same thing.
    """
    if id(obj) in _seen:  # a closure that refers to itself
        return ("cycle", id(obj))
    seen = _seen | {id(obj)}
    if isinstance(obj, types.FunctionType):
        cells = tuple(
            structural_key(c.cell_contents, seen) if _cell_full(c) else ("empty",)
            for c in obj.__closure__ or ()
        )
        return (
            "function",
            obj.__code__,
            structural_key(obj.__defaults__, seen),
            structural_key(obj.__kwdefaults__, seen),
            cells,
        )
    if isinstance(obj, functools.partial):
        return (
            "partial",
            structural_key(obj.func, seen),
            structural_key(obj.args, seen),
            structural_key(obj.keywords, seen),
        )
    if isinstance(obj, (tuple, list)):
        return (type(obj), tuple(structural_key(x, seen) for x in obj))
    if isinstance(obj, dict):
        return (
            type(obj),
            tuple(sorted((repr(k), structural_key(v, seen)) for k, v in obj.items())),
        )
    if isinstance(obj, (np.ndarray, jax.Array)) and not isinstance(obj, jax.core.Tracer):
        if obj.size <= _ARRAY_KEY_MAX_ELEMENTS:
            host = np.asarray(obj)
            return ("array", host.dtype.str, host.shape, host.tobytes())
        return ("id", id(obj))
    try:
        hash(obj)
    except TypeError:
        return ("id", id(obj))
    return (type(obj), obj)


def _cell_full(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


class StaticTransformation:
    """An Optax transformation as a static `jit` argument: hashed and compared by
    `structural_key`, so equal transformations built separately share one compilation."""

    def __init__(self, tx: optax.GradientTransformation):
        self.tx = tx
        self._key = structural_key(tx)
        self._hash = hash(self._key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, StaticTransformation) and self._key == other._key

    def __repr__(self) -> str:
        return f"StaticTransformation({self.tx!r})"


def named_transformation(name: str, learning_rate) -> optax.GradientTransformationExtraArgs:
    """`"adam"` (learning rate injected as a traced hyperparameter) or `"lbfgs"`."""
    if name == "adam":
        return optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate)
    if name == "lbfgs":
        return optax.lbfgs(learning_rate=None)  # zoom line search picks the step
    raise ValueError(f"unknown optax solver name {name!r}; expected 'adam' or 'lbfgs'")


def _group_rms(x):
    """RMS of each group's factor, `[K, 1, 1]`: groups of one collection may differ in norm by
    many orders of magnitude, so one scale for all of them would make Adam's steps wrong-sized."""
    rms = jnp.sqrt(jnp.mean(x * x, axis=(-2, -1), keepdims=True))
    return jnp.where(rms > 0, rms, 1.0)


def solve_optax(
    tx: optax.GradientTransformation, params: tuple, loss_fn, max_steps, tol, state=None
):
    """Optax descent on `loss_fn(params)` from `params` (a tuple of `[K, m, n]` factors),
    continuing `state` when given (a previous run's: any pytree whose leaves are the
    parameter scales, one per factor, then the optimiser state's leaves).

    Each factor is optimised in units of its groups' RMS at the start (kept in the state, so
    that a continued run uses the same units). Returns `(params, steps, converged, state)`.
    """
    tx = optax.with_extra_args_support(tx)
    num = len(params)
    if state is None:
        scales = tuple(jax.lax.stop_gradient(_group_rms(p)) for p in params)
    else:
        scales = tuple(jax.tree_util.tree_leaves(state)[:num])
    scaled = tuple(p / s for p, s in zip(params, scales, strict=True))
    with jax.numpy_dtype_promotion("standard"):
        opt_state = tx.init(scaled)
    if state is not None:
        leaves = jax.tree_util.tree_leaves(state)[num:]
        treedef = jax.tree_util.tree_structure(opt_state)
        if len(leaves) != treedef.num_leaves:
            raise ValueError(
                f"solver state has {len(leaves)} optimiser arrays; this optimiser keeps "
                f"{treedef.num_leaves}: continue a run with the optimiser that made it"
            )
        fresh = jax.tree_util.tree_leaves(opt_state)
        opt_state = jax.tree_util.tree_unflatten(
            treedef, [jnp.asarray(x, y.dtype) for x, y in zip(leaves, fresh, strict=True)]
        )

    def scaled_loss(ps):
        return loss_fn(tuple(p * s for p, s in zip(ps, scales, strict=True)))

    def step_fn(carry):
        ps, opt_state = carry
        value, grad = jax.value_and_grad(scaled_loss)(ps)
        # Optax mixes its int32 step count with float64 parameters (bias correction): its
        # updates are traced under standard promotion even where a user asked for strict.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(
                grad, opt_state, ps, value=value, grad=grad, value_fn=scaled_loss
            )
            return optax.apply_updates(ps, updates), opt_state

    (scaled, opt_state), _, steps, converged = run_descent_loop(
        step_fn, lambda carry: scaled_loss(carry[0]), (scaled, opt_state), max_steps, tol
    )
    params = tuple(p * s for p, s in zip(scaled, scales, strict=True))
    return params, steps, converged, (scales, opt_state)
