"""Classic merges, same inputs as `merge` (`A [T, r, d_in]`, `B [T, d_out, r]`, scale folded).

Every baseline returns a `Solution` on `SharingPlan.full_merge(T, rank=k)`; the methods with
a small per-task core (`joint`, `pca`) carry it in `cores` (`core="full"` or `"diagonal"`),
so `task_factors(t)`, `relative_error`, `num_params`, `storage_ratio`, bundles and checkpoints
treat them like any other solution. Their `loss` is always
`sum_t relative_error_t^2` (relative weights, stored in `weights`), whatever the method's own
merge coefficients, so losses compare across methods and with `merge`'s default.

```python
sol = hj.baselines.run_baseline("ties", A, B, density=0.2)
sol = hj.baselines.run_baseline("joint", A, B, rank=32, diagonal=True)
```
"""

from __future__ import annotations

from collections.abc import Callable

from ._arithmetic import cat as cat
from ._arithmetic import dare_linear as dare_linear
from ._arithmetic import dare_masks as dare_masks
from ._arithmetic import dare_ties as dare_ties
from ._arithmetic import linear as linear
from ._arithmetic import magnitude_prune as magnitude_prune
from ._arithmetic import ties as ties
from ._joint import joint as joint
from ._joint import pca as pca
from ._svd import knots as knots
from ._svd import svd as svd


def joint_diag(A, B, **kwargs):
    """`joint` with diagonal cores (`k` numbers per task)."""
    return joint(A, B, diagonal=True, **kwargs)


BASELINES: dict[str, Callable] = {
    "linear": linear,
    "cat": cat,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "magnitude_prune": magnitude_prune,
    "svd": svd,
    "knots": knots,
    "joint": joint,
    "joint_diag": joint_diag,
    "pca": pca,
}
"""Every baseline by name; each is `f(A, B, *, rank=None, weights=None, **params)`."""


def run_baseline(name: str, A, B, *, rank=None, weights=None, **params):
    """Run the baseline `name` (`-` or `_`, see `BASELINES`) on one module.

    **Arguments:**

    - `name`: one of `BASELINES`.
    - `A`: `[T, r, d_in]`; `B`: `[T, d_out, r]`, LoRA scale folded in, mixed ranks zero-padded.
    - `rank`: the merged rank `k` where the method has one to choose (`svd`, `knots`, `joint`,
      `pca`); factor-wise merges keep `r` and accept only `None` or `r`.
    - `weights`: per-task merge coefficients (`joint` also takes `"relative"`/`"uniform"`).
    - `params`: the method's own keywords (`density`, `key`, `scales`, `majority_sign_method`,
      `merge`, `diagonal`, `max_steps`, `tol`, `task_ranks`, `task_ids`).

    **Returns:** a `Solution`.
    """
    key = name.replace("-", "_")
    if key not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; expected one of {', '.join(BASELINES)}")
    return BASELINES[key](A, B, rank=rank, weights=weights, **params)
