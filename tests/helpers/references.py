"""Dense float64 references and random collections: what the factored code is tested against.

Everything here builds `d_out x d_in` matrices on purpose; never use it outside tests."""

import numpy as np

from hydraopt_jax import SharingPlan


def dense_updates(A, B):
    return np.einsum("tor,trd->tod", np.asarray(B, np.float64), np.asarray(A, np.float64))


def relative_weights(A, B):
    return 1.0 / np.sum(dense_updates(A, B) ** 2, axis=(1, 2))


def dense_optimum(A, B, plan: SharingPlan, weights):
    """The optimum of a nesting plan from dense SVDs (Eckart-Young on stacked group means)."""
    dense, w = dense_updates(A, B), np.asarray(weights, np.float64)
    if not plan.b_nested_in_a:  # shared-B family: transpose everything
        assert plan.a_nested_in_b
        plan = SharingPlan(plan.b_group, plan.a_group, plan.rank)
        dense = np.swapaxes(dense, 1, 2)
    k = plan.rank
    total = sum(w[t] * np.sum(dense[t] ** 2) for t in range(plan.num_tasks))
    captured = 0.0
    for a_members in plan.groups("a"):
        blocks = []
        for b_members in plan.groups("b"):
            if b_members[0] not in a_members:
                continue
            wj = sum(w[t] for t in b_members)
            if wj == 0:
                continue
            mean = sum(w[t] * dense[t] for t in b_members) / wj
            blocks.append(np.sqrt(wj) * mean)
        s = np.linalg.svd(np.concatenate(blocks, axis=0), compute_uv=False)
        captured += np.sum(s[:k] ** 2)
    return total - captured


NESTING_PLANS = {
    "shared_a": lambda T, k: SharingPlan.shared_a(T, k),
    "shared_b": lambda T, k: SharingPlan.shared_b(T, k),
    "full_merge": lambda T, k: SharingPlan.full_merge(T, k),
    "a_groups_b_per_task": lambda T, k: SharingPlan([t % 2 for t in range(T)], list(range(T)), k),
    "b_groups_inside_a_groups": lambda T, k: SharingPlan(
        [t % 2 for t in range(T)], [t % 4 for t in range(T)], k
    ),
    "b_groups_a_per_task": lambda T, k: SharingPlan(list(range(T)), [t % 2 for t in range(T)], k),
}


def random_collection(rng, num_tasks=5, rank=3, d_in=20, d_out=16, drift=0.3, dtype=np.float64):
    """A, B with similar A factors (one shared init plus drift) and task norms spread over
    an order of magnitude: the situation HydraOpt is built for."""
    a0 = rng.normal(size=(1, rank, d_in))
    A = a0 + drift * rng.normal(size=(num_tasks, rank, d_in))
    B = rng.normal(size=(num_tasks, d_out, rank)) * rng.uniform(0.3, 3.0, size=(num_tasks, 1, 1))
    return A.astype(dtype), B.astype(dtype)
