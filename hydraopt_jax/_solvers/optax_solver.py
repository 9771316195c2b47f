"""Gradient descent on the factored loss with any `optax.GradientTransformation`.

The paper's gradient formulation, and the hook for custom objectives. Parameters are
optimised in units of their group's initial RMS and the loss in units of `sum_t w_t ||dW_t||^2`, so
one learning rate suits any width and any adapter norm. One jitted `lax.while_loop`; the
learning rate of the named solvers is a traced array, so a sweep does not recompile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from .._loss import plan_loss
from .._plan import SharingPlan
from .als import run_descent_loop

__all__ = ["named_transformation", "solve_optax"]


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
    tx: optax.GradientTransformation,
    shared_a,
    shared_b,
    A,
    B,
    weights,
    norms_sq,
    plan: SharingPlan,
    max_steps,
    tol,
):
    """Optax descent from `(shared_a, shared_b)`.

    Returns `(shared_a, shared_b, steps, converged)`.
    """
    tx = optax.with_extra_args_support(tx)
    a_scale = jax.lax.stop_gradient(_group_rms(shared_a))
    b_scale = jax.lax.stop_gradient(_group_rms(shared_b))
    total = jnp.sum(weights * norms_sq)
    total = jnp.where(total > 0, total, 1.0)

    def loss_fn(params):
        sa, sb = params
        return plan_loss(sa * a_scale, sb * b_scale, A, B, weights, norms_sq, plan) / total

    def step_fn(carry):
        params, opt_state = carry
        value, grad = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(
            grad, opt_state, params, value=value, grad=grad, value_fn=loss_fn
        )
        return optax.apply_updates(params, updates), opt_state

    params = (shared_a / a_scale, shared_b / b_scale)
    (params, _), _, steps, converged = run_descent_loop(
        step_fn, lambda carry: loss_fn(carry[0]), (params, tx.init(params)), max_steps, tol
    )
    return params[0] * a_scale, params[1] * b_scale, steps, converged
