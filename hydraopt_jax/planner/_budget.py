"""`plan_budget`: per-module plans under one storage budget, and its result types."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._loss import adapter_task_weights
from .._plan import SharingPlan
from .._solution import task_relative_errors
from ..io import AdapterCollection
from ._allocate import allocate
from ._attributes import groupings as make_groupings
from ._attributes import task_attributes_from_names
from ._curves import DEFAULT_RANK_MULTIPLIERS, ModuleStats, PlanOption, module_options, module_stats

__all__ = [
    "MODULE_WEIGHTINGS",
    "BudgetPlan",
    "ModuleChoice",
    "choose",
    "collection_options",
    "TruncationLevel",
    "per_task_truncation",
    "truncation_levels",
    "plan_budget",
]


@dataclasses.dataclass(frozen=True)
class ModuleChoice:
    """The planner's choice on one module, with the options it chose from."""

    module: str
    option: PlanOption
    plan: SharingPlan  # over all tasks of the collection
    original_params: int
    num_present: int
    options: tuple[PlanOption, ...] = dataclasses.field(repr=False)
    task_ids: tuple[int, ...] = ()
    task_sq_norms: tuple[float, ...] = ()  # ||dW_t||_F^2 per task present

    @property
    def relative_error(self) -> tuple[float, ...]:
        """Predicted relative error per task present (as `merge`'s exact solver reports it)."""
        return self.option.relative_error

    @property
    def storage_ratio(self) -> float:
        return self.option.num_params / self.original_params

    @property
    def rms_relative_error(self) -> float:
        """`sqrt(loss / n)`: the RMS relative error over the module's tasks (exact with the
        default relative weights and module weight 1)."""
        return math.sqrt(self.option.loss / max(self.num_present, 1))


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    """Per-module plans chosen under a global storage budget (see `plan_budget`)."""

    budget: float
    modules: dict[str, ModuleChoice]
    groupings: dict[str, tuple[int, ...]]
    method: str

    @property
    def plans(self) -> dict[str, SharingPlan]:
        """`{module: SharingPlan}` over all tasks: the input of `merge_adapters`."""
        return {m: c.plan for m, c in self.modules.items()}

    @property
    def num_params(self) -> int:
        return sum(c.option.num_params for c in self.modules.values())

    @property
    def original_params(self) -> int:
        return sum(c.original_params for c in self.modules.values())

    @property
    def storage_ratio(self) -> float:
        return self.num_params / self.original_params

    @property
    def loss(self) -> float:
        """Predicted total loss: the sum over modules of `merge`'s exact-solver loss."""
        return sum(c.option.loss for c in self.modules.values())

    @property
    def rms_relative_error(self) -> float:
        """Predicted RMS of the per-(module, task) relative errors (relative weights)."""
        pairs = sum(c.num_present for c in self.modules.values())
        return math.sqrt(self.loss / max(pairs, 1))

    def task_relative_errors(self) -> np.ndarray:
        """Each task's predicted relative error over all modules
        (`hydraopt_jax.task_relative_errors`, as `hydraopt merge` reports it)."""
        num_tasks = len(next(iter(self.groupings.values())))
        return task_relative_errors(self.modules, num_tasks)

    @property
    def mean_relative_error(self) -> float:
        """Predicted mean over tasks of `task_relative_errors()`."""
        return float(np.mean(self.task_relative_errors()))

    def summary(self) -> dict:
        return {
            m: {
                "plan": c.option.name,
                "a": c.option.a_by,
                "b": c.option.b_by,
                "rank": c.option.rank,
                # one j for every task, or one per task of the collection
                "task_rank": (
                    list(c.plan.task_rank)
                    if isinstance(c.option.task_rank, tuple)
                    else c.option.task_rank
                ),
                "num_params": c.option.num_params,
                "storage_ratio": c.storage_ratio,
                "loss": c.option.loss,
                "rms_relative_error": c.rms_relative_error,
            }
            for m, c in self.modules.items()
        }

    def to_yaml(self, task_names: Sequence[str], header: Sequence[str] = ()) -> str:
        """The plan file for `hydraopt merge --config` (`planner.planfile`): a `modules:`
        section naming every module exactly, each with both sides and its rank."""
        from .planfile import plan_file_text

        comments = {}
        for module, c in self.modules.items():
            opt = c.option
            comments[module] = (
                f"{opt.name} k={opt.rank}: {opt.num_params:,} params ({c.storage_ratio:.3f}), "
                f"RMS rel err {c.rms_relative_error:.4g}"
            )
        summary = (
            f"hydraopt plan: budget {self.budget:g}, storage ratio {self.storage_ratio:.4f} "
            f"({self.num_params:,} / {self.original_params:,} params), predicted mean relative "
            f"error {self.mean_relative_error:.4g}"
        )
        return plan_file_text(
            self.plans,
            task_names,
            self.groupings,
            {m: (c.option.a_by, c.option.b_by) for m, c in self.modules.items()},
            comments,
            header=[*header, summary],
        )


# --------------------------------------------------------------------------- entry point


def _iter_modules(collection):
    """`(name, A, B, ranks)` from `{module: (A, B[, ranks])}` or an `AdapterCollection`."""
    if isinstance(collection, AdapterCollection):
        yield from collection.iter_modules()
        return
    for name, value in collection.items():
        a, b = value[0], value[1]
        ranks = value[2] if len(value) > 2 else None
        yield name, a, b, ranks


MODULE_WEIGHTINGS = ("equal", "size")


def _resolve_module_weights(collection, module_weights):
    """`{module: weight}` (or None) from `None`, `"equal"`, `"size"` or a mapping.

    `"size"`: each module's loss times its size `d_in + d_out` over the mean size, so a
    module counts in proportion to its share of the adapters' parameters (under `"equal"`
    a small `k_proj` and a large `down_proj` weigh the same, and the allocation starves the
    large modules, whose loss falls less per stored parameter).
    """
    if module_weights is None or isinstance(module_weights, Mapping):
        return module_weights
    if module_weights not in MODULE_WEIGHTINGS:
        raise ValueError(
            f"module_weights must be {' or '.join(map(repr, MODULE_WEIGHTINGS))} or a mapping, "
            f"got {module_weights!r}"
        )
    if module_weights == "equal":
        return None
    if isinstance(collection, AdapterCollection):  # shapes without loading
        sizes = {m: info.d_in + info.d_out for m, info in collection.modules.items()}
    else:
        sizes = {m: np.shape(v[0])[-1] + np.shape(v[1])[-2] for m, v in collection.items()}
    mean = float(np.mean(list(sizes.values())))
    return {m: size / mean for m, size in sizes.items()}


def collection_options(
    collection,
    *,
    task_names: Sequence[str] | None = None,
    task_attributes: Sequence[Mapping[str, Any]] | str | None = "auto",
    attribute_pattern: str | None = None,
    rank_multipliers: Sequence[float] = DEFAULT_RANK_MULTIPLIERS,
    ranks: Sequence[int] | None = None,
    weights="relative",
    activation_covs: Mapping[str, Any] | None = None,
    module_weights: Mapping[str, float] | str | None = None,
    nested: bool = True,
    per_task_ranks: bool = False,
):
    """`(groupings, {module: (ModuleStats, [PlanOption])})` for a whole collection."""
    if isinstance(collection, AdapterCollection) and task_names is None:
        task_names = list(collection.names)
    module_weights = _resolve_module_weights(collection, module_weights)
    if isinstance(weights, str) and weights == "adapter":  # one array for every module
        weights = adapter_task_weights(_iter_modules(collection), activation_covs)
    options: dict[str, tuple[ModuleStats, list[PlanOption]]] = {}
    groupings = None
    for name, a, b, ranks_m in _iter_modules(collection):
        num_tasks = np.shape(a)[0]
        if groupings is None:
            if isinstance(task_attributes, str):
                attrs = (
                    task_attributes_from_names(task_names, attribute_pattern)
                    if task_names is not None
                    else None
                )
            else:
                attrs = task_attributes
            groupings = make_groupings(num_tasks, attrs)
        stats = module_stats(
            name,
            a,
            b,
            ranks_m,
            weights=weights,
            activation_cov=None if activation_covs is None else activation_covs.get(name),
        )
        if not stats.present:
            continue
        weight = 1.0 if module_weights is None else float(module_weights.get(name, 1.0))
        opts = module_options(
            stats, groupings, rank_multipliers=rank_multipliers, ranks=ranks,
            module_weight=weight, nested=nested, per_task_ranks=per_task_ranks,
        )  # fmt: skip
        # keep only what the allocation and the report need (the Grams can be large)
        stats = dataclasses.replace(stats, p=np.zeros((0, 0)), q=np.zeros((0, 0)))
        options[name] = (stats, opts)
    if groupings is None:
        raise ValueError("plan_budget: the collection has no modules")
    return groupings, options


def _budget_plan(groupings, options, budget: float, picks: Mapping[str, int], method: str):
    """The `BudgetPlan` of option `picks[m]` on every module `m` of `options`."""
    chosen = {}
    num_tasks = len(next(iter(groupings.values())))
    for m, i in picks.items():
        stats, opts = options[m]
        opt = opts[i]
        plan = SharingPlan.from_labels(groupings[opt.a_by], groupings[opt.b_by], opt.rank)
        if isinstance(opt.task_rank, tuple):  # one j per task present; absent ones are unused
            ranks = [min(opt.task_rank)] * num_tasks
            for t, j in zip(stats.present, opt.task_rank, strict=True):
                ranks[t] = j
            plan = plan.with_task_rank(ranks)
        elif opt.task_rank is not None:
            plan = plan.with_task_rank(opt.task_rank)
        assert plan.num_tasks == num_tasks
        chosen[m] = ModuleChoice(
            m,
            opt,
            plan,
            stats.original_params,
            len(stats.present),
            tuple(opts),
            tuple(stats.present),
            tuple(float(x) for x in stats.sq_norms),
        )
    return BudgetPlan(budget, chosen, dict(groupings), method)


def _separate(option) -> bool:
    """Every task (present on the module) keeps its own A and B, at one rank: truncation."""
    plan = option.plan
    return (
        option.task_rank is None
        and len(set(plan.a_group)) == plan.num_tasks
        and len(set(plan.b_group)) == plan.num_tasks
    )


@dataclasses.dataclass(frozen=True)
class TruncationLevel:
    """Per-task truncation at one rank fraction `f <= 1`: on each module, every task kept on
    its own (`separate`) at rank `j = max(1, round(f r))` (`r`: the module's LoRA rank)."""

    fraction: float
    picks: dict[str, int]  # module -> index of its separate option at that rank
    ranks: dict[str, int]  # module -> j

    @property
    def name(self) -> str:
        """`rank 2` when every module has the same `j`, else `k=0.125r`."""
        ranks = set(self.ranks.values())
        return f"rank {ranks.pop()}" if len(ranks) == 1 else f"k={self.fraction:g}r"


def truncation_levels(options) -> list[TruncationLevel]:
    """Every per-task truncation the options hold on all modules, by rank fraction.

    The fractions are those of the candidate ranks at or below each module's LoRA rank
    (`r/8, r/4, r/2, r` by default); a level is kept when every module has its `separate`
    option at that rank (found by the plan's structure, whatever the grouping is named: on
    a module where only some tasks are present, `separate` may coincide with an attribute
    grouping)."""
    base = {m: max(stats.ranks[t] for t in stats.present) for m, (stats, _) in options.items()}
    separate = {}  # module -> {rank: option index}
    fractions = set()
    for m, (_, opts) in options.items():
        separate[m] = {}
        for i, o in enumerate(opts):
            if _separate(o) and o.rank <= base[m]:
                separate[m].setdefault(o.rank, i)
                fractions.add(o.rank / base[m])
    levels = []
    for f in sorted(fractions):
        ranks = {m: min(base[m], max(1, round(f * base[m]))) for m in options}
        if all(ranks[m] in separate[m] for m in options):
            picks = {m: separate[m][ranks[m]] for m in options}
            if not levels or picks != levels[-1].picks:
                levels.append(TruncationLevel(f, picks, ranks))
    return levels


def per_task_truncation(
    groupings, options, max_storage: float, levels: Sequence[TruncationLevel] | None = None
) -> tuple[TruncationLevel, BudgetPlan] | None:
    """The reference a plan has to beat: per-task truncation with the largest storage
    `<= max_storage` among `truncation_levels(options)` (every task's own update cut to its
    best rank-`j` approximation on every module, as `merge --plan separate --rank J` does:
    a task whose own rank is below `j` is stored padded to `j`), in the same objective as
    the planner's options (the calibration's, when they were made with one): the level and
    its `BudgetPlan`. None when even the lowest level does not fit.

    `choose` at a budget never returns a higher loss than this at that budget (these levels
    are among its starting points); the comparison says how much sharing adds on top of
    rank reduction. `levels`: `truncation_levels(options)`, when the caller has them."""
    original = sum(stats.original_params for stats, _ in options.values())
    best = None
    for level in truncation_levels(options) if levels is None else levels:
        params = sum(options[m][1][i].num_params for m, i in level.picks.items())
        if params <= max_storage * original * (1 + 1e-12):
            best = level  # levels go up in rank, so in storage
    if best is None:
        return None
    return best, _budget_plan(groupings, options, max_storage, best.picks, "per-task truncation")


def choose(groupings, options, budget: float) -> BudgetPlan:
    """Allocate `budget` (a fraction of the original parameters) over `options`."""
    if not budget > 0:
        raise ValueError(
            f"budget must be > 0 (a fraction of the original parameters), got {budget}"
        )
    modules = list(options)
    original = sum(options[m][0].original_params for m in modules)
    capacity = budget * original * (1 + 1e-12)
    costs = [[o.num_params for o in options[m][1]] for m in modules]
    losses = [[o.loss for o in options[m][1]] for m in modules]
    # uniform selections: the same (A grouping, B grouping, rank label) on every module
    index = [{o.key: i for i, o in enumerate(options[m][1])} for m in modules]
    common = set(index[0]).intersection(*index[1:]) if index else set()
    seeds = [[idx[key] for idx in index] for key in sorted(common)]
    # and per-task truncation, which the keys miss where `separate` has another name
    seeds += [[level.picks[m] for m in modules] for level in truncation_levels(options)]
    try:
        choice, method = allocate(costs, losses, capacity, seeds=seeds)
    except ValueError as err:
        minimum = sum(min(c) for c in costs) / original
        raise ValueError(
            f"budget {budget:g} is below the smallest achievable storage ratio {minimum:.4g} "
            f"({err})"
        ) from None
    return _budget_plan(groupings, options, budget, dict(zip(modules, choice, strict=True)), method)


def plan_budget(
    collection,
    budget: float,
    *,
    task_names: Sequence[str] | None = None,
    task_attributes: Sequence[Mapping[str, Any]] | str | None = "auto",
    attribute_pattern: str | None = None,
    rank_multipliers: Sequence[float] = DEFAULT_RANK_MULTIPLIERS,
    ranks: Sequence[int] | None = None,
    weights="relative",
    activation_covs: Mapping[str, Any] | None = None,
    module_weights: Mapping[str, float] | str | None = None,
    nested: bool = True,
    per_task_ranks: bool = False,
) -> BudgetPlan:
    """Choose per module the shared side, task groups and rank under one storage budget.

    **Arguments:**

    - `collection`: `{module: (A [T, r, d_in], B [T, d_out, r])}` or `{module: (A, B,
      ranks)}` (scale folded into B; `ranks[t] = 0` marks a task absent from the module),
      or a `hydraopt_jax.io.AdapterCollection` (read one module at a time).
    - `budget`: stored parameters as a fraction of the original adapters' (e.g. `0.3`).
    - `task_names`: for attribute parsing and the YAML (default: the collection's names).
    - `task_attributes`: one `{attribute: value}` per task (tasks sharing a value may share
      a factor); `"auto"` parses them from `task_names` (see `task_attributes_from_names`,
      with `attribute_pattern`); `None` for no attribute groupings.
    - `rank_multipliers`: candidate ranks as multiples of each module's largest LoRA rank;
      `ranks`: extra absolute candidate ranks.
    - `weights`: task weights as in `merge` (`"relative"` default: each task counts equally
      within a module), or `"adapter"` (`_loss.adapter_task_weights`: each task's error
      relative to its whole adapter, so the total loss is `sum_t err_t^2` of the reported
      per-task errors, in the activation metric when `activation_covs` are given; module
      weights other than equal scale each module's term, so the identity then no longer
      holds).
    - `activation_covs`: optional `{module: E[x x^T]}`; losses are then measured on the
      layer's outputs (as `merge(..., activation_cov=...)`).
    - `module_weights`: `"equal"` (default: every module's relative loss counts the same),
      `"size"` (each module's loss times its `d_in + d_out` over the mean: a module counts
      in proportion to its share of the adapters' parameters), or `{module: weight}`.
    - `nested`: also offer nested ranks (a shared factor of rank `k` with every task at a
      rank `j < k` inside it, where the other side is task-specific); default on.
    - `per_task_ranks`: also let ranks differ between the tasks of a module: per-task
      truncation at a rank per task (`SharingPlan.own_ranks`) and, with `nested`, each
      shared factor with a nested rank `j_t <= k` per task (the per-task ranks a price on
      storage picks: `module_options`); default off.

    **Returns:** a `BudgetPlan`; `.plans` feeds `merge_adapters`, `.to_yaml(names)` writes a
    plan file for `hydraopt merge --config`.

    ```python
    bp = hj.plan_budget(collection, 0.3, task_names=names)
    solutions = hj.merge_adapters(collection, bp.plans)
    ```
    """
    groupings, options = collection_options(
        collection,
        task_names=task_names,
        task_attributes=task_attributes,
        attribute_pattern=attribute_pattern,
        rank_multipliers=rank_multipliers,
        ranks=ranks,
        weights=weights,
        activation_covs=activation_covs,
        module_weights=module_weights,
        nested=nested,
        per_task_ranks=per_task_ranks,
    )
    return choose(groupings, options, budget)
