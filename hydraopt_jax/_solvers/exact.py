"""Closed-form optimum for plans whose groups nest (the shared-A and shared-B families).

Shared-A family (every B-group lies inside one A-group; `shared_a`, `full_merge`,
`separate` and A-per-language with B-per-task are all members):

1. A B-group `j` with tasks `t in j` needs one `Bh_j`; for a fixed `Ah` the best is the
   weighted mean, so `sum_{t in j} w_t ||B_t A_t - Bh_j Ah||^2 = W_j ||M_j - Bh_j Ah||^2 +
   const` with `M_j = sum_t w_t B_t A_t / W_j`. `M_j` stays factored as
   `[w_t B_t / W_j]_t @ [A_t]_t` (a "virtual task" of rank `|j| r`).
2. For an A-group `g` with virtual tasks `j` (now each with its own `Bh_j`) the optimum `Ah_g`
   spans the top-`k` right singular vectors of the stacked `[sqrt(W_j) F_j A_j]_j`, with
   `F_j^T F_j = B_j^T B_j` (a triangular factor of the small Gram, as R of a QR of `B_j`), and
   `Bh_j = M_j Ah_g^T` (Eckart-Young; Ah has orthonormal rows).

The shared-B family is the same problem transposed. Nothing of size `d_out x d_in` is formed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._loss import map_task_chunks
from .._plan import SharingPlan
from ._linalg import (
    OVERSAMPLE,
    gather_padded,
    gram_factor,
    padded_members,
    top_eigvecs_randomized,
    top_right_singular_vectors,
    use_randomized,
)

__all__ = ["solve_exact"]


def _virtual_tasks(A, B, weights, plan: SharingPlan):
    """Collapse each B-group into one task: its weighted mean update, kept factored.

    Returns `A_v [K_B, n r, d_in]`, `B_v [K_B, d_out, n r]` (the members' raw factors,
    side by side), `coef [K_B, n r]` (each member's `w_t / W_j`, repeated over its `r`
    columns: `M_j = B_v diag(coef) A_v`), `W [K_B]` and, for each B-group, its A-group.
    The weights stay in `coef` and act on small matrices only: when every B-group is one
    task in order (shared-A, separate) `A_v` and `B_v` are reshapes of the inputs, and the
    solve holds no scaled copy of either factor.
    """
    members = plan.groups("b")
    idx = padded_members(members, dummy=plan.num_tasks)  # [K_B, n]
    num_b, width = idx.shape
    r = A.shape[1]
    w_ext = gather_padded(weights, idx)  # [K_B, n]
    group_weight = jnp.sum(w_ext, axis=1)
    coef = w_ext / jnp.where(group_weight > 0, group_weight, 1.0)[:, None]
    a_v = gather_padded(A, idx).reshape(num_b, width * r, A.shape[2])
    b_v = jnp.moveaxis(gather_padded(B, idx), 1, 2).reshape(num_b, B.shape[1], width * r)
    a_of_b = tuple(plan.a_group[m[0]] for m in members)
    return a_v, b_v, jnp.repeat(coef, r, axis=1), group_weight, a_of_b


def _group_subspaces(a_v, b_v, scale, a_of_b, k: int, svd_method: str, deps=(), axis_name=None):
    """`Ah [K_A, k, d_in]`: per A-group, the top-k right singular subspace of the stacked
    `[F_j A_j]`, where `F_j^T F_j = S_j B_v_j^T B_v_j S_j`, `S_j = diag(scale_j)` (`scale`
    carries `coef sqrt(W_j)`)."""
    num_virtual, r_v, d_in = a_v.shape
    groups = [[] for _ in range(max(a_of_b) + 1)]
    for j, g in enumerate(a_of_b):
        groups[g].append(j)
    idx = padded_members(groups, dummy=num_virtual)  # [K_A, m]
    rows = idx.shape[1] * r_v

    if use_randomized(rows, k, svd_method):
        a_g = gather_padded(a_v, idx)  # [K_A, m, r_v, d_in]
        b_g = gather_padded(b_v, idx)  # [K_A, m, d_out, r_v]
        s_g = gather_padded(scale, idx)  # [K_A, m, r_v]
        d_out = b_v.shape[1]
        # The operator needs S_j B_j^T B_j S_j. Its Gram [m, r_v, r_v] is formed once when
        # that is smaller than applying B_j to a sketch ([m, d_out, k + p]) at every step.
        use_gram = r_v * r_v <= d_out * (k + OVERSAMPLE)

        def one_group(a_m, b_m, s_m):
            m = a_m.shape[0]
            a_2d = a_m.reshape(m * r_v, d_in)  # one GEMM each way, no batched copies
            if use_gram:
                gram = map_task_chunks(
                    lambda b, s: jnp.einsum("mor,mos->mrs", b, b) * (s[:, :, None] * s[:, None, :]),
                    b_m,
                    s_m,
                    row_elements=d_out * r_v,
                )

                def inner(y):
                    return jnp.einsum("mrs,msp->mrp", gram, y)
            else:

                def inner(y):
                    y = jnp.einsum("mor,mrp->mop", b_m, y * s_m[:, :, None])
                    return jnp.einsum("mor,mop->mrp", b_m, y) * s_m[:, :, None]

            def gram_apply(x):  # sum_j A_j^T S_j B_j^T B_j S_j A_j x, all factored
                y = inner((a_2d @ x).reshape(m, r_v, -1))
                # (y^T A)^T, not A^T y: XLA would materialise a transposed copy of A
                return (y.reshape(m * r_v, -1).T @ a_2d).T

            return top_eigvecs_randomized(gram_apply, d_in, k, a_v.dtype, deps)

        if idx.shape[0] == 1:  # one A-group: no vmap (XLA would relayout a_g for it)
            return one_group(a_g[0], b_g[0], s_g[0])[None]
        return jax.vmap(one_group)(a_g, b_g, s_g)

    # F^T F = B^T B gives (F S)^T (F S) = S B^T B S: scaling columns scales F's columns.
    tri = gram_factor(b_v, deps, axis_name) * scale[:, None, :]  # [J, r_v, r_v]
    stacked = jnp.einsum("jsr,jrd->jsd", tri, a_v)
    stacked = gather_padded(stacked, idx)  # [K_A, m, s, d_in]
    stacked = stacked.reshape(idx.shape[0], -1, d_in)
    return jax.vmap(lambda s: top_right_singular_vectors(s, k))(stacked)


def _solve_shared_a_family(
    A, B, weights, plan: SharingPlan, k: int, svd_method: str, deps=(), axis_name=None
):
    a_v, b_v, coef, group_weight, a_of_b = _virtual_tasks(A, B, weights, plan)
    scale = coef * jnp.sqrt(group_weight)[:, None]
    shared_a = _group_subspaces(a_v, b_v, scale, a_of_b, k, svd_method, deps, axis_name)
    # Bh_j = M_j Ah^T = B_j diag(coef_j) (A_j Ah^T): the projection of each B-group's mean.
    if len(set(a_of_b)) == 1:  # one A-group: no [K_B, k, d_in] broadcast of Ah
        proj = jnp.einsum("jrd,kd->jrk", a_v, shared_a[a_of_b[0]])
    else:
        proj = jnp.einsum("jrd,jkd->jrk", a_v, shared_a[np.asarray(a_of_b)])
    proj = proj * coef[:, :, None]
    shared_b = jnp.einsum("jor,jrk->jok", b_v, proj)
    return shared_a, shared_b


def _swap_sides(plan: SharingPlan) -> SharingPlan:
    return SharingPlan(plan.b_group, plan.a_group, plan.rank)


def solve_exact(
    A, B, weights, plan: SharingPlan, k: int, svd_method: str = "auto", deps=(), axis_name=None
):
    """`(shared_a [K_A, k, d_in], shared_b [K_B, d_out, k])` minimising the weighted loss.

    `deps`: arrays whose LAPACK calls must finish before this solve's start (`_lapack.after`);
    `axis_name`: the `vmap` axis over modules, if any (see `_linalg.gram_factor`).
    Raises `ValueError` for plans without a closed form (both sides grouped, neither nesting
    in the other); use the `"als"` or an Optax solver for those.
    """
    if plan.b_nested_in_a:
        return _solve_shared_a_family(A, B, weights, plan, k, svd_method, deps, axis_name)
    if plan.a_nested_in_b:
        # Transposed problem: dW_t^T = A_t^T B_t^T, so B-groups play the role of A-groups.
        sa_t, sb_t = _solve_shared_a_family(
            jnp.swapaxes(B, 1, 2),
            jnp.swapaxes(A, 1, 2),
            weights,
            _swap_sides(plan),
            k,
            svd_method,
            deps,
            axis_name,
        )
        return jnp.swapaxes(sb_t, 1, 2), jnp.swapaxes(sa_t, 1, 2)
    raise ValueError(
        f"plan {plan.to_dict()} has no closed form: its A-groups and B-groups do not nest "
        "(each B-group inside one A-group, or the reverse); use solver='als' or an Optax solver"
    )
