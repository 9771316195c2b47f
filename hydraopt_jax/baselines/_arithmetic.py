"""Factor-wise merges as PEFT's `add_weighted_adapter` does them: linear, TIES, DARE, cat.

PEFT (`LoraModel._generalized_task_arithmetic_weighted_adapter`, peft 0.21) merges the A's and
the B's *separately* when all ranks are equal: with `c_t = w_t s_t` (merge weight times LoRA
scale) the A side gets the coefficients `sign(c_t) sqrt|c_t|` and the B side `sqrt|c_t|`, both
applied to the raw (unscaled) factors, and each side goes through the same entry-wise rule
(`peft.utils.merge_utils`). The merged adapter has `r = lora_alpha`, i.e. scale 1. `cat`
concatenates the factors instead (`A = [c_t A_t]`, `B = [B_t]`): the exact weighted sum, of
rank `T r`.

Everything here is entry-wise on factors of size `r x d_in` and `d_out x r`; no
`d_out x d_in` update is formed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._solution import Solution
from ._common import (
    check_density,
    check_inputs,
    merge_coefficients,
    one_adapter_solution,
    prune_counts,
    raw_factors,
    resolve_task_ranks,
    topk_mask,
)

__all__ = ["cat", "dare_linear", "dare_masks", "dare_ties", "linear", "magnitude_prune", "ties"]

DEFAULT_DENSITY = 0.2  # PEFT's documented example for ties / dare (model merging guide)
SIGN_METHODS = ("total", "frequency")


# ---------------------------------------------------------------------------- entry-wise rules
def _weighted_sum(x, coef):
    return jnp.einsum("t,t...->...", coef, x)


def _elect_and_merge(pruned, coef, sign_method: str):
    """PEFT's `calculate_majority_sign_mask` + `disjoint_merge` over the task axis 0.

    The sign is elected on the *unweighted* pruned tensors (as PEFT does), the merge averages
    the weighted entries that agree with it.
    """
    sign = jnp.sign(pruned)
    magnitude = jnp.sum(pruned if sign_method == "total" else sign, axis=0)
    majority = jnp.where(magnitude >= 0, 1.0, -1.0).astype(pruned.dtype)
    agree = sign == majority[None]
    weighted = pruned * coef.reshape((-1,) + (1,) * (pruned.ndim - 1))
    total = jnp.sum(jnp.where(agree, weighted, 0.0), axis=0)
    count = jnp.sum(agree, axis=0).astype(pruned.dtype)
    return total / jnp.maximum(count, 1.0)


def _merge_side(x, coef, counts, mask, density, *, combination: str, sign_method: str):
    """One side (all A's or all B's, raw, `[T, ...]`) merged by PEFT's rule `combination`."""
    if combination == "linear":
        return _weighted_sum(x, coef)
    if combination in ("ties", "magnitude_prune"):
        pruned = jnp.where(jax.vmap(topk_mask)(x, counts), x, 0.0)
    else:  # dare_*: random drop, rescaled by 1/density (PEFT's `random_pruning(rescale=True)`)
        pruned = jnp.where(mask, x, 0.0) / density
    if combination in ("magnitude_prune", "dare_linear"):
        return _weighted_sum(pruned, coef)
    return _elect_and_merge(pruned, coef, sign_method)


def dare_masks(key, A, B, density) -> tuple[jax.Array, jax.Array]:
    """The keep-masks `(mask_a [T, r, d_in], mask_b [T, d_out, r])` DARE draws from `key`.

    Each entry is kept with probability `density`, independently (PEFT's
    `torch.bernoulli(full_like(x, density))`): one uniform draw of `A.size + B.size` numbers
    from `key` (an int seed or a `jax.random` key), A's entries first, each kept when below
    `density`.
    """
    key = jax.random.PRNGKey(key) if isinstance(key, int) else key
    shape_a, shape_b = jnp.shape(A), jnp.shape(B)
    size_a = int(np.prod(shape_a))
    draw = jax.random.uniform(key, (size_a + int(np.prod(shape_b)),))
    keep = draw < density
    return keep[:size_a].reshape(shape_a), keep[size_a:].reshape(shape_b)


def _factorwise_impl(
    A, B, coef, scales, counts_a, counts_b, density, key, *, combination: str, sign_method: str
):
    """`(a [r, d_in], b [d_out, r])`: PEFT's factor-wise merge of the raw factors."""
    safe = jnp.where(scales != 0, scales, 1.0)
    b_raw = jnp.where((scales != 0)[:, None, None], B / safe[:, None, None], 0.0)
    c = coef * scales
    root = jnp.sqrt(jnp.abs(c))
    coef_a = jnp.where(c >= 0, root, -root)  # the sign goes on one side only
    coef_b = root
    if combination.startswith("dare"):
        mask_a, mask_b = dare_masks(key, A, B, density)
    else:
        mask_a = mask_b = None
    kw = dict(combination=combination, sign_method=sign_method)
    a = _merge_side(A, coef_a, counts_a, mask_a, density, **kw)
    b = _merge_side(b_raw, coef_b, counts_b, mask_b, density, **kw)
    return a, b


def _cat_impl(A, B, coef, scales):
    num_tasks, r, d_in = A.shape
    safe = jnp.where(scales != 0, scales, 1.0)
    b_raw = jnp.where((scales != 0)[:, None, None], B / safe[:, None, None], 0.0)
    a = (A * (coef * scales)[:, None, None]).reshape(num_tasks * r, d_in)
    b = jnp.moveaxis(b_raw, 0, 1).reshape(B.shape[1], num_tasks * r)
    return a, b


# ---------------------------------------------------------------------------- public API
def _check_rank(name: str, rank, r: int) -> None:
    if rank is not None and int(rank) != r:
        raise ValueError(
            f"{name} merges factor-wise, so its rank is the adapters' rank r={r}; got rank={rank}"
        )


def _factorwise(
    name, combination, A, B, *, weights, scales, density, sign_method, key, rank,
    task_ranks, task_ids,
) -> Solution:  # fmt: skip
    A, B = check_inputs(name, A, B)
    num_tasks, r, d_in = A.shape
    d_out = B.shape[1]
    _check_rank(name, rank, r)
    if sign_method not in SIGN_METHODS:
        raise ValueError(
            f"{name}: majority_sign_method must be 'total' or 'frequency'; got {sign_method!r}"
        )
    default = "one" if combination in ("ties", "dare_ties") else "mean"
    coef = merge_coefficients(name, weights, num_tasks, default, A.dtype)
    _, s = raw_factors(name, B, scales, A.dtype)
    ranks = resolve_task_ranks(task_ranks, num_tasks, r)
    if combination == "linear":
        density = 1.0
    else:
        density = check_density(name, density, allow_zero=not combination.startswith("dare"))
    counts_a = jnp.asarray(prune_counts(density, [rt * d_in for rt in ranks]))
    counts_b = jnp.asarray(prune_counts(density, [d_out * rt for rt in ranks]))
    key = jax.random.PRNGKey(key) if isinstance(key, int) else jnp.asarray(key)
    arrays = (coef, s, counts_a, counts_b, jnp.asarray(density, A.dtype), key)
    statics = dict(combination=combination, sign_method=sign_method)
    return one_adapter_solution(
        _factorwise_impl, A, B, arrays, statics, task_ranks=task_ranks, task_ids=task_ids
    )


def linear(A, B, *, weights=None, scales=None, rank=None, task_ranks=None, task_ids=None):
    """Task arithmetic, factor-wise as PEFT's `linear`: one adapter of the adapters' rank.

    `Ah = sum_t sign(c_t) sqrt|c_t| A_t`, `Bh = sum_t sqrt|c_t| B_raw_t`, `c_t = w_t s_t`.
    Cross terms `B_s A_t` make this only a rough approximation of `sum_t w_t dW_t` (exact when
    all `A_t` are equal); `cat` and `svd` are the exact counterparts.

    **Arguments:**

    - `A`: `[T, r, d_in]`; `B`: `[T, d_out, r]`, LoRA scale folded in, mixed ranks zero-padded.
    - `weights`: merge coefficients `w_t` `[T]`; default `1/T` (the mean adapter).
    - `scales`: the LoRA scale `s_t` already folded into `B` (`alpha/r`, or `alpha/sqrt(r)`
      with rsLoRA, per rank/alpha pattern). PEFT splits `w_t s_t` between the raw factors, so
      pass it to reproduce PEFT exactly; default: `B` is taken as a scale-1 adapter.
    - `rank`: must be `None` or `r` (a factor-wise merge keeps the rank).
    - `task_ranks`, `task_ids`: storage accounting and bookkeeping, as in `merge`.

    **Returns:** a `Solution` on `SharingPlan.full_merge(T, rank=r)`.

    **Example:**

    ```python
    sol = hj.baselines.linear(A, B, weights=[0.5, 0.5])
    a, b = sol.task_factors(0)
    ```
    """
    return _factorwise(
        "linear", "linear", A, B, weights=weights, scales=scales, density=None,
        sign_method="total", key=0, rank=rank, task_ranks=task_ranks, task_ids=task_ids,
    )  # fmt: skip


def ties(
    A, B, *, density=DEFAULT_DENSITY, weights=None, majority_sign_method="total", scales=None,
    rank=None, task_ranks=None, task_ids=None,
):  # fmt: skip
    """TIES-merging (Yadav et al. 2023), factor-wise as PEFT's `ties`.

    Per side: keep each task's `int(density * numel)` largest-magnitude entries, elect a sign
    per entry (`"total"`: sign of the sum; `"frequency"`: sign of the sign count), and average
    the weighted entries that agree. Coefficients split as in `linear`.

    **Arguments:** as `linear`, plus `density` (fraction kept, default 0.2) and
    `majority_sign_method`. `weights` default to 1 (the disjoint mean already averages).
    With mixed ranks, pass `task_ranks` so the kept count uses each task's true size.

    **Returns:** a `Solution` on `SharingPlan.full_merge(T, rank=r)`.
    """
    return _factorwise(
        "ties", "ties", A, B, weights=weights, scales=scales, density=density,
        sign_method=majority_sign_method, key=0, rank=rank, task_ranks=task_ranks,
        task_ids=task_ids,
    )  # fmt: skip


def magnitude_prune(
    A, B, *, density=DEFAULT_DENSITY, weights=None, scales=None, rank=None, task_ranks=None,
    task_ids=None,
):  # fmt: skip
    """Magnitude pruning then task arithmetic, factor-wise as PEFT's `magnitude_prune`.

    **Arguments:** as `ties` (no sign election; `weights` default to `1/T`).
    """
    return _factorwise(
        "magnitude_prune", "magnitude_prune", A, B, weights=weights, scales=scales,
        density=density, sign_method="total", key=0, rank=rank, task_ranks=task_ranks,
        task_ids=task_ids,
    )  # fmt: skip


def dare_linear(
    A, B, *, density=DEFAULT_DENSITY, weights=None, key=0, scales=None, rank=None,
    task_ranks=None, task_ids=None,
):  # fmt: skip
    """DARE (Yu et al. 2024) then task arithmetic, factor-wise as PEFT's `dare_linear`.

    Every entry of every factor is kept with probability `density` and rescaled by
    `1/density`; the masks are `dare_masks(key, A, B, density)` (deterministic for a given
    `key`, an int seed or a `jax.random` key). `weights` default to `1/T`.
    """
    return _factorwise(
        "dare_linear", "dare_linear", A, B, weights=weights, scales=scales, density=density,
        sign_method="total", key=key, rank=rank, task_ranks=task_ranks, task_ids=task_ids,
    )  # fmt: skip


def dare_ties(
    A, B, *, density=DEFAULT_DENSITY, weights=None, majority_sign_method="total", key=0,
    scales=None, rank=None, task_ranks=None, task_ids=None,
):  # fmt: skip
    """DARE's random drop and rescale, then TIES's sign election and disjoint mean, factor-wise
    as PEFT's `dare_ties`. `weights` default to 1. See `dare_linear` and `ties`."""
    return _factorwise(
        "dare_ties", "dare_ties", A, B, weights=weights, scales=scales, density=density,
        sign_method=majority_sign_method, key=key, rank=rank, task_ranks=task_ranks,
        task_ids=task_ids,
    )  # fmt: skip


def cat(A, B, *, weights=None, scales=None, rank=None, task_ranks=None, task_ids=None):
    """Concatenation, as PEFT's `cat`: `Ah = [c_1 A_1; ...; c_T A_T]`, `Bh = [B_raw_1 ... B_raw_T]`.

    `Bh Ah = sum_t w_t dW_t` exactly, at rank `T r` (no storage saved). `weights` default to
    `1/T`; `scales` only decide which factor carries the scale (as PEFT stores it).

    **Returns:** a `Solution` on `SharingPlan.full_merge(T, rank=T r)`.
    """
    A, B = check_inputs("cat", A, B)
    num_tasks, r, _ = A.shape
    if rank is not None and int(rank) != num_tasks * r:
        raise ValueError(f"cat has rank T r = {num_tasks * r}; got rank={rank}")
    coef = merge_coefficients("cat", weights, num_tasks, "mean", A.dtype)
    _, s = raw_factors("cat", B, scales, A.dtype)
    return one_adapter_solution(
        _cat_impl, A, B, (coef, s), {}, task_ranks=task_ranks, task_ids=task_ids
    )
