"""`CoreSolution`: shared bases with a small per-task core (joint factorisation, PCA)."""

from __future__ import annotations

import jax

from .._solution import StoredFactors, pytree_dataclass, static_field

__all__ = ["CoreSolution"]


@pytree_dataclass
class CoreSolution(StoredFactors):
    """Shared bases `U`, `V` and one small core per task: `dW_hat_t = U core_t V`.

    The same reading surface as `Solution` (`task_factors`, `relative_error`, `num_params`,
    `storage_ratio`), so evaluation and export treat both alike through `task_factors`.

    **Fields:**

    - `shared_u`: `[d_out, k1]`; `shared_v`: `[k2, d_in]` (orthonormal columns / rows).
    - `cores`: `[T, k1, k2]` (diagonal matrices when `diagonal`).
    - `loss`: `sum_t ||dW_t - dW_hat_t||^2 / ||dW_t||^2` (scalar); `relative_error`: `[T]`;
      `weights`: the relative weights `1/||dW_t||^2` behind `loss`, `[T]`.
    - `steps`: iterations taken (0 for closed forms); `result`: a `RESULTS` code.
    - `method`, `diagonal`, `task_ranks`, `task_ids` (static).
    """

    shared_u: jax.Array
    shared_v: jax.Array
    cores: jax.Array
    loss: jax.Array
    relative_error: jax.Array
    weights: jax.Array
    steps: jax.Array
    result: jax.Array
    method: str = static_field()
    diagonal: bool = static_field()
    task_ranks: tuple[int, ...] = static_field()
    task_ids: tuple[int, ...] = static_field()

    @property
    def rank(self) -> int:
        return self.shared_v.shape[-2]

    @property
    def d_in(self) -> int:
        return self.shared_v.shape[-1]

    @property
    def d_out(self) -> int:
        return self.shared_u.shape[-2]

    @property
    def num_tasks(self) -> int:
        return self.cores.shape[-3]

    def task_factors(self, t: int) -> tuple[jax.Array, jax.Array]:
        """`(A_t_hat [k2, d_in], B_t_hat [d_out, k2])` = `(V, U @ core_t)`, a plain LoRA pair."""
        return self.shared_v, self.shared_u @ self.cores[..., t, :, :]

    @property
    def num_params(self) -> int:
        """`d_out k1 + k2 d_in + T k1 k2` (`T k` for diagonal cores)."""
        k1, k2 = self.shared_u.shape[-1], self.shared_v.shape[-2]
        per_task = min(k1, k2) if self.diagonal else k1 * k2
        return self.d_out * k1 + k2 * self.d_in + self.num_tasks * per_task
