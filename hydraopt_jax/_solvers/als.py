"""Alternating least squares for any plan, in factored form.

Each half-step solves its factor exactly with the other fixed, so the loss never increases:

    Ah_g = (sum_{t in g} w_t Bh_t^T Bh_t)^+ (sum_{t in g} w_t (Bh_t^T B_t) A_t)
    Bh_j = (sum_{t in j} w_t B_t (A_t Ah_t^T)) (sum_{t in j} w_t Ah_t Ah_t^T)^+

Every term is a `k x k` or `k x r` Gram times an original factor. The loop is one
`lax.while_loop` that stops on relative decrease `< tol` or at `max_steps`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._loss import plan_loss
from .._plan import SharingPlan
from ._linalg import psd_solve_right

__all__ = ["als_update_a", "als_update_b", "run_descent_loop", "solve_als"]


def als_update_a(shared_b, A, B, weights, plan: SharingPlan):
    """Best `Ah [K_A, k, d_in]` for fixed `Bh`."""
    b_idx, a_idx = np.asarray(plan.b_group), np.asarray(plan.a_group)
    task_b = shared_b[b_idx]
    proj = jnp.einsum("tok,tor->tkr", task_b, B) * weights[:, None, None]  # [T, k, r]
    gram = jnp.einsum("jok,jol->jkl", shared_b, shared_b)[b_idx] * weights[:, None, None]
    gram = jax.ops.segment_sum(gram, a_idx, plan.num_a_groups)  # [K_A, k, k]
    rhs = jax.ops.segment_sum(
        jnp.einsum("tkr,trd->tkd", proj, A), a_idx, plan.num_a_groups
    )  # [K_A, k, d_in]
    solve = jax.vmap(lambda r, g: psd_solve_right(r.T, g).T)
    return solve(rhs, gram)


def als_update_b(shared_a, A, B, weights, plan: SharingPlan):
    """Best `Bh [K_B, d_out, k]` for fixed `Ah`."""
    b_idx, a_idx = np.asarray(plan.b_group), np.asarray(plan.a_group)
    task_a = shared_a[a_idx]
    proj = jnp.einsum("trd,tkd->trk", A, task_a) * weights[:, None, None]  # [T, r, k]
    gram = jnp.einsum("gkd,gld->gkl", shared_a, shared_a)[a_idx] * weights[:, None, None]
    gram = jax.ops.segment_sum(gram, b_idx, plan.num_b_groups)
    rhs = jax.ops.segment_sum(jnp.einsum("tor,trk->tok", B, proj), b_idx, plan.num_b_groups)
    return jax.vmap(psd_solve_right)(rhs, gram)


def run_descent_loop(step_fn, loss_fn, carry, max_steps: int, tol):
    """`lax.while_loop` of `carry -> step_fn(carry)` until the relative decrease of
    `loss_fn(carry)` is in `[0, tol)`, the loss is not finite, or `max_steps` is reached.

    Returns `(carry, loss, steps, converged)` with the lowest-loss `carry` seen (the start
    included): an exact ALS half-step cannot raise the loss, but its pseudo-inverse drops
    directions below float32's resolution of the Gram, and Adam may overshoot. A run whose
    loss became non-finite returns that iterate (the caller reports the divergence).
    """
    loss0 = loss_fn(carry)
    init = (
        carry,
        loss0,
        jnp.asarray(jnp.inf, loss0.dtype),
        jnp.asarray(0, jnp.int32),
        carry,
        loss0,
    )

    def rel_decrease(loss, prev):
        return (prev - loss) / jnp.maximum(jnp.abs(prev), jnp.finfo(loss.dtype).tiny)

    def cond(state):
        _, loss, prev, step, _, _ = state
        dec = rel_decrease(loss, prev)
        converged = (dec >= 0) & (dec < tol)
        return (step < max_steps) & ~converged & jnp.isfinite(loss) & (loss > 0)

    def body(state):
        carry, loss, _, step, best, best_loss = state
        carry = step_fn(carry)
        new_loss = loss_fn(carry)
        better = new_loss < best_loss  # False for NaN: a diverged step is never kept
        best = jax.tree_util.tree_map(lambda n, b: jnp.where(better, n, b), carry, best)
        return carry, new_loss, loss, step + 1, best, jnp.where(better, new_loss, best_loss)

    carry, loss, prev, steps, best, best_loss = jax.lax.while_loop(cond, body, init)
    dec = rel_decrease(loss, prev)
    converged = ((dec >= 0) & (dec < tol)) | (loss <= 0) | (steps < max_steps)
    # a diverged run (non-finite loss) returns its non-finite iterate, so that `merge`
    # reports the divergence instead of quietly handing back an earlier point
    diverged = ~jnp.isfinite(loss)
    best = jax.tree_util.tree_map(lambda c, b: jnp.where(diverged, c, b), carry, best)
    return best, jnp.where(diverged, loss, best_loss), steps, converged


def solve_als(shared_a, shared_b, A, B, weights, norms_sq, plan: SharingPlan, max_steps, tol):
    """ALS from `(shared_a, shared_b)`; returns `(shared_a, shared_b, steps, converged)`."""

    def step_fn(params):
        sa = als_update_a(params[1], A, B, weights, plan)
        return sa, als_update_b(sa, A, B, weights, plan)

    def loss_fn(params):
        return plan_loss(params[0], params[1], A, B, weights, norms_sq, plan)

    (sa, sb), _, steps, converged = run_descent_loop(
        step_fn, loss_fn, (shared_a, shared_b), max_steps, tol
    )
    return sa, sb, steps, converged
