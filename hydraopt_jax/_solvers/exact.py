"""Closed-form optimum for plans whose groups nest (the shared-A and shared-B families).

Shared-A family (every B-group lies inside one A-group; `shared_a`, `full_merge`,
`separate` and A-per-language with B-per-task are all members):

1. A B-group `j` with tasks `t in j` needs one `Bh_j`; for a fixed `Ah` the best is the
   weighted mean, so `sum_{t in j} w_t ||B_t A_t - Bh_j Ah||^2 = W_j ||M_j - Bh_j Ah||^2 +
   const` with `M_j = sum_t w_t B_t A_t / W_j`. `M_j` stays factored as
   `[w_t B_t / W_j]_t @ [A_t]_t` (a "virtual task" of rank `|j| r`).
2. For an A-group `g` with virtual tasks `j` (now each with its own `Bh_j`) the optimum `Ah_g`
   spans the top-`k` right singular vectors of the stacked `[sqrt(W_j) R_j A_j]_j`, with
   `B_j = Q_j R_j` (thin QR), and `Bh_j = M_j Ah_g^T` (Eckart-Young; Ah has orthonormal rows).

The shared-B family is the same problem transposed. Nothing of size `d_out x d_in` is formed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._plan import SharingPlan
from ._linalg import (
    gather_padded,
    padded_members,
    top_eigvecs_randomized,
    top_right_singular_vectors,
    use_randomized,
)

__all__ = ["solve_exact"]


def _virtual_tasks(A, B, weights, plan: SharingPlan):
    """Collapse each B-group into one task: its weighted mean update, kept factored.

    Returns `A_v [K_B, n r, d_in]`, `B_v [K_B, d_out, n r]`, `W [K_B]` and, for each B-group,
    its A-group.
    """
    members = plan.groups("b")
    idx = padded_members(members, dummy=plan.num_tasks)  # [K_B, n]
    num_b, width = idx.shape
    r = A.shape[1]
    w_ext = gather_padded(weights, idx)  # [K_B, n]
    group_weight = jnp.sum(w_ext, axis=1)
    coef = w_ext / jnp.where(group_weight > 0, group_weight, 1.0)[:, None]
    a_v = gather_padded(A, idx).reshape(num_b, width * r, A.shape[2])
    b_v = gather_padded(B, idx) * coef[:, :, None, None]  # [K_B, n, d_out, r]
    b_v = jnp.moveaxis(b_v, 1, 2).reshape(num_b, B.shape[1], width * r)
    a_of_b = tuple(plan.a_group[m[0]] for m in members)
    return a_v, b_v, group_weight, a_of_b


def _group_subspaces(a_v, b_scaled, a_of_b, k: int, svd_method: str):
    """`Ah [K_A, k, d_in]`: per A-group, the top-k right singular subspace of the stacked
    `[R_j A_j]` where `b_scaled_j = Q_j R_j` already carries `sqrt(W_j)`."""
    num_virtual, r_v, d_in = a_v.shape
    groups = [[] for _ in range(max(a_of_b) + 1)]
    for j, g in enumerate(a_of_b):
        groups[g].append(j)
    idx = padded_members(groups, dummy=num_virtual)  # [K_A, m]
    rows = idx.shape[1] * r_v

    if use_randomized(rows, k, svd_method):
        a_g = gather_padded(a_v, idx)  # [K_A, m, r_v, d_in]
        b_g = gather_padded(b_scaled, idx)  # [K_A, m, d_out, r_v]

        def one_group(a_m, b_m):
            def gram_apply(x):  # sum_j A_j^T B_j^T B_j A_j x, all factored
                y = jnp.einsum("mrd,dp->mrp", a_m, x)
                y = jnp.einsum("mor,mrp->mop", b_m, y)
                y = jnp.einsum("mor,mop->mrp", b_m, y)
                return jnp.einsum("mrd,mrp->dp", a_m, y)

            return top_eigvecs_randomized(gram_apply, d_in, k, a_v.dtype)

        return jax.vmap(one_group)(a_g, b_g)

    tri = jnp.linalg.qr(b_scaled, mode="r")  # [J, min(d_out, r_v), r_v]
    stacked = jnp.einsum("jsr,jrd->jsd", tri, a_v)
    stacked = gather_padded(stacked, idx)  # [K_A, m, s, d_in]
    stacked = stacked.reshape(idx.shape[0], -1, d_in)
    return jax.vmap(lambda s: top_right_singular_vectors(s, k))(stacked)


def _solve_shared_a_family(A, B, weights, plan: SharingPlan, k: int, svd_method: str):
    a_v, b_v, group_weight, a_of_b = _virtual_tasks(A, B, weights, plan)
    b_scaled = b_v * jnp.sqrt(group_weight)[:, None, None]
    shared_a = _group_subspaces(a_v, b_scaled, a_of_b, k, svd_method)
    # Bh_j = M_j Ah^T = B_j (A_j Ah^T): the projection of each B-group's mean update.
    proj = jnp.einsum("jrd,jkd->jrk", a_v, shared_a[np.asarray(a_of_b)])
    shared_b = jnp.einsum("jor,jrk->jok", b_v, proj)
    return shared_a, shared_b


def _swap_sides(plan: SharingPlan) -> SharingPlan:
    return SharingPlan(plan.b_group, plan.a_group, plan.rank)


def solve_exact(A, B, weights, plan: SharingPlan, k: int, svd_method: str = "auto"):
    """`(shared_a [K_A, k, d_in], shared_b [K_B, d_out, k])` minimising the weighted loss.

    Raises `ValueError` for plans without a closed form (both sides grouped, neither nesting
    in the other); use the `"als"` or an Optax solver for those.
    """
    if plan.b_nested_in_a:
        return _solve_shared_a_family(A, B, weights, plan, k, svd_method)
    if plan.a_nested_in_b:
        # Transposed problem: dW_t^T = A_t^T B_t^T, so B-groups play the role of A-groups.
        sa_t, sb_t = _solve_shared_a_family(
            jnp.swapaxes(B, 1, 2), jnp.swapaxes(A, 1, 2), weights, _swap_sides(plan), k, svd_method
        )
        return jnp.swapaxes(sb_t, 1, 2), jnp.swapaxes(sa_t, 1, 2)
    raise ValueError(
        f"plan {plan.to_dict()} has no closed form: its A-groups and B-groups do not nest "
        "(each B-group inside one A-group, or the reverse); use solver='als' or an Optax solver"
    )
