"""The method grid and how each method merges a collection (through the package's API).

Methods (`method_grid`): `lora` (the own adapters); per-task truncation
`reference:truncate-r/2`, `-r/4`, ... (every adapter cut to a lower rank by its own SVD, no
sharing: a baseline HydraOpt's front must beat); HydraOpt's named plans (`hydraopt:...`,
the exact solver where a closed form exists, ALS otherwise; `+act`: activation-aware);
nested ranks in a shared factor (`hydraopt:shared-a@k=r,j=r/4`: one shared A of rank `r`,
every task a rank-`r/4` factor inside it); the planner's per-module plans under a budget
(`plan@B`; `+act`, `+size` for its other objectives, `+nested` when it may also choose
nested ranks, `+nested+act` both, `+task-ranks` when the tasks of a module may differ in
rank); rank sweeps; and every baseline of
`hydraopt_jax.baselines.BASELINES` (`baseline:<name>`) with fixed default hyperparameters
(nothing is tuned on test data).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from .collection import Collection

__all__ = ["BASELINE_PARAMS", "Grid", "Merged", "Method", "build_plan", "merge_method"]

# Fixed, untuned hyperparameters of the baselines. Density 0.5 for the entry-wise pruning
# merges (TIES / DARE / magnitude pruning), KnOTS with its reference defaults (TIES on the
# aligned blocks, density 0.2), merge weights at each method's published default (the mean for
# linear / DARE-linear / SVD, 1 for the TIES family, uniform task weights for joint).
DENSITY = 0.5
BASELINE_PARAMS: dict[str, dict] = {
    "linear": {},
    "cat": {},
    "ties": dict(density=DENSITY),
    "dare_linear": dict(density=DENSITY, key=0),
    "dare_ties": dict(density=DENSITY, key=0),
    "magnitude_prune": dict(density=DENSITY),
    "svd": {},
    "knots": {},
    "joint": {},
    "joint_diag": {},
    "pca": {},
}
# Factor-wise PEFT merges split `w_t s_t` between the raw factors: they need each task's scale.
FACTORWISE = ("linear", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune")
# The planner's module weighting from the testbed's output sensitivities (`+fisher`)
FISHER = "fisher"
# The task weighting relative to each task's whole adapter (`+adapter`)
ADAPTER = "adapter"
# The activation-aware planner with whole-adapter task weights (`+act+adapter`)
ACT_ADAPTER = "act+adapter"
# The nested planner with whole-adapter task weights and a rank per task in each module
# (`per_task_ranks`)
ADAPTER_TASK_RANKS = "adapter+task-ranks"
# The nested planner's other objectives: variant -> (name suffix, `Method` options).
NESTED_VARIANTS = {
    "act": ("+act", dict(activation=True)),
    ADAPTER: ("+adapter", dict(task_weighting=ADAPTER)),
    ACT_ADAPTER: ("+act+adapter", dict(activation=True, task_weighting=ADAPTER)),
    FISHER: ("+act+fisher", dict(activation=True, module_weighting=FISHER)),
    ADAPTER_TASK_RANKS: ("+adapter+task-ranks", dict(task_weighting=ADAPTER, per_task_ranks=True)),
}
# Baselines with a rank to choose, swept like HydraOpt's plans so that the comparison is fair.
BASELINE_SWEEP = ("joint", "pca")


@dataclasses.dataclass(frozen=True)
class Method:
    """One point of the chart.

    `kind`: `"lora"`, `"hydraopt"`, `"planner"` or `"baseline"`; `plan`: `shared_a`,
    `shared_b`, `full_merge`, `separate`, `a_per_lang`, `b_per_app` or `a_lang_b_app`;
    `rank_mult`: the merged rank as a multiple of `r` (`None`: the method's default);
    `task_rank_mult`: nested ranks `j = task_rank_mult r` inside the shared factor;
    `activation`: whiten by the modules' input covariances; `budget`, `module_weighting`
    (`"equal"`, `"size"`, or `"fisher"`: the testbed's output sensitivities), `nested`: the
    planner's arguments; `task_weighting`: the planner's and the merge's `weights`,
    `"relative"` (each task's error relative to its update, module by module) or `"adapter"`
    (relative to its whole adapter's update: `hydraopt_jax._loss.adapter_task_weights`);
    `per_task_ranks`: the planner may give each task of a module its own rank (its own
    truncation, or its nested rank in a shared factor).
    """

    name: str
    kind: str
    plan: str | None = None
    rank_mult: float | None = None
    solver: str = "exact"
    activation: bool = False
    baseline: str | None = None
    budget: float | None = None
    module_weighting: str = "equal"
    nested: bool = False
    task_rank_mult: float | None = None
    task_weighting: str = "relative"
    per_task_ranks: bool = False

    @property
    def objective(self) -> tuple:
        """What a planner row's options depend on besides the collection: the rows of one
        objective choose their plans from the same options (`_planner_options`)."""
        return (self.activation, self.module_weighting, self.nested, self.task_weighting,
                self.per_task_ranks)  # fmt: skip

    def rank(self, r: int) -> int | None:
        return _rank(self.rank_mult, r)

    def task_rank(self, r: int) -> int | None:
        return _rank(self.task_rank_mult, r)


def _rank(mult, r: int) -> int | None:
    return None if mult is None else max(1, int(round(mult * r)))


def rank_tag(mult: float) -> str:
    """`0.5 -> "r/2"`, `2 -> "2r"`."""
    tags = {0.0625: "r/16", 0.125: "r/8", 0.25: "r/4", 0.5: "r/2", 1.0: "r", 2.0: "2r", 4.0: "4r"}
    return tags.get(mult, f"{mult:g}r")


def budget_tag(budget: float) -> str:
    """`0.3 -> "0.30"`, `0.025 -> "0.025"`, `0.0625 -> "0.0625"`: two decimals, up to four
    where needed."""
    whole, frac = f"{budget:.4f}".split(".")
    return f"{whole}.{frac.rstrip('0').ljust(2, '0')}"


@dataclasses.dataclass(frozen=True)
class Grid:
    """Which methods a testbed runs. Budgets: the planner's storage budgets; `truncation`:
    per-task truncation ranks as multiples of `r`; `nested`: named nested plans as
    `(k, j)` multiples of `r` (shared A of rank `k r`, each task `j r` inside it);
    `nested_budgets`: the planner with nested ranks; `planner_variants`: its other objectives
    (`NESTED_VARIANTS`, and `"act"` / `"size"` without nested ranks too), run at
    `variant_budgets` (None: at every nested budget)."""

    planner_budgets: tuple[float, ...]
    quick_planner_budgets: tuple[float, ...] = (0.30,)
    truncation: tuple[float, ...] = (0.5, 0.25)
    nested: tuple[tuple[float, float], ...] = ()
    nested_budgets: tuple[float, ...] = ()
    planner_variants: tuple[str, ...] = ("act", "size")
    variant_budgets: tuple[float, ...] | None = None

    def methods(self, sweep: bool = True) -> list[Method]:
        """Every method, in a fixed order. `sweep` adds the planner's variants and the rank
        sweeps."""
        H = "hydraopt"
        grid = [Method("lora", "lora")]
        grid += [
            Method(f"reference:truncate-{rank_tag(m)}", "hydraopt", "separate", m)
            for m in self.truncation
        ]
        grid += [
            Method("hydraopt:shared-a", H, "shared_a", 1.0),
            Method("hydraopt:shared-b", H, "shared_b", 1.0),
            Method("hydraopt:full-merge", H, "full_merge", 1.0),
            Method("hydraopt:shared-a-2r", H, "shared_a", 2.0),
            Method("hydraopt:a-per-lang", H, "a_per_lang", 1.0),
            Method("hydraopt:b-per-app", H, "b_per_app", 1.0),
            Method("hydraopt:a-lang-b-app", H, "a_lang_b_app", 1.0, solver="als"),
            Method("hydraopt:shared-a+act", H, "shared_a", 1.0, activation=True),
            Method("hydraopt:full-merge+act", H, "full_merge", 1.0, activation=True),
        ]
        grid += [
            Method(f"hydraopt:shared-a@k={rank_tag(k)},j={rank_tag(j)}", H, "shared_a", k,
                   task_rank_mult=j)
            for k, j in self.nested
        ]  # fmt: skip
        budgets = self.planner_budgets if sweep else self.quick_planner_budgets
        grid += [Method(f"hydraopt:plan@{budget_tag(b)}", "planner", budget=b) for b in budgets]
        if sweep:
            if "act" in self.planner_variants:
                grid += [
                    Method(f"hydraopt:plan+act@{budget_tag(b)}", "planner", budget=b,
                           activation=True)
                    for b in self.planner_budgets
                ]  # fmt: skip
            if "size" in self.planner_variants:
                grid += [
                    Method(f"hydraopt:plan+size@{budget_tag(b)}", "planner", budget=b,
                           module_weighting="size")
                    for b in self.planner_budgets
                ]  # fmt: skip
        nested_budgets = self.nested_budgets if sweep else self.nested_budgets[:1]
        grid += [
            Method(f"hydraopt:plan+nested@{budget_tag(b)}", "planner", budget=b, nested=True)
            for b in nested_budgets
        ]
        if sweep:
            variant_budgets = self.nested_budgets if self.variant_budgets is None else (
                self.variant_budgets)  # fmt: skip
            grid += [
                Method(f"hydraopt:plan+nested{suffix}@{budget_tag(b)}", "planner", budget=b,
                       nested=True, **options)
                for variant, (suffix, options) in NESTED_VARIANTS.items()
                if variant in self.planner_variants
                for b in variant_budgets
            ]  # fmt: skip
            grid += [
                Method(f"hydraopt:shared-a@k={rank_tag(0.5)}", H, "shared_a", 0.5),
                Method(f"hydraopt:shared-a@k={rank_tag(4.0)}", H, "shared_a", 4.0),
            ]
            grid += [
                Method(f"hydraopt:full-merge@k={rank_tag(m)}", H, "full_merge", m)
                for m in (0.5, 2.0, 4.0)
            ]
        grid += [Method(f"baseline:{name}", "baseline", baseline=name) for name in BASELINE_PARAMS]
        if sweep:
            grid += [
                Method(f"baseline:{name}@k={rank_tag(m)}", "baseline", rank_mult=m, baseline=name)
                for name in BASELINE_SWEEP
                for m in (2.0,)  # at 4r their k x k cores per task cost more than the adapters
            ]
        return grid

    def by_name(self, names: Sequence[str] | None, sweep: bool = True) -> list[Method]:
        grid = self.methods(sweep=sweep)
        if names is None:
            return grid
        known = {m.name: m for m in self.methods(sweep=True)} | EXTRA_METHODS
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return [known[n] for n in names]


EXTRA_METHODS = {"hydraopt:separate": Method("hydraopt:separate", "hydraopt", "separate", 1.0)}


def build_plan(method: Method, coll: Collection):
    from hydraopt_jax import SharingPlan

    k = method.rank(coll.rank)
    n = coll.num_tasks
    if method.plan in ("shared_a", "shared_b", "full_merge", "separate"):
        plan = SharingPlan.named(method.plan, n, k)
    else:
        by = {
            "a_per_lang": dict(share_a_by="language"),
            "b_per_app": dict(share_b_by="application"),
            "a_lang_b_app": dict(share_a_by="language", share_b_by="application"),
        }[method.plan]
        plan = SharingPlan.from_attributes(coll.attributes(), rank=k, **by)
    j = method.task_rank(coll.rank)
    return plan if j is None else plan.with_task_rank(j)


@dataclasses.dataclass
class Merged:
    """A method's output: each task's factors, the storage, the reconstruction error."""

    loras: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]
    num_params: int
    original_params: int
    relative_error: dict[str, float]  # hydraopt_jax.task_relative_errors (whitened for +act)
    seconds: float
    # of `seconds`, the planner's options (0 when an earlier budget's were reused)
    options_seconds: float = 0.0
    # iterations of the iterative solves, over modules: (mean, max); (0, 0) for closed forms
    steps: tuple[float, int] = (0.0, 0)

    @property
    def storage_ratio(self) -> float:
        return self.num_params / self.original_params


def task_loras(coll: Collection, solutions: dict) -> dict[str, dict]:
    loras: dict[str, dict] = {t: {} for t in coll.tasks}
    for m, sol in solutions.items():
        for local, t in enumerate(sol.task_ids):
            a, b = sol.task_factors(local)
            # writable copies (torch warns on read-only buffers from jax)
            loras[coll.tasks[t]][m] = (np.array(a, np.float32), np.array(b, np.float32))
    return loras


# The planner's options of one collection per objective: every budget's plan is chosen from
# the same options (`plan_budget` = `collection_options` + `choose`), so they are computed
# once per run rather than once per budget.
# One entry at a time: `(collection, covariances, objective)` (held, so that their
# identities stay theirs) and the options.
_OPTIONS: list = [None, None]


def _planner_options(coll: Collection, method: Method, act: dict | None,
                     fisher: dict | None) -> tuple:  # fmt: skip
    from hydraopt_jax.planner import collection_options

    weights = fisher if method.module_weighting == FISHER else method.module_weighting
    key = _OPTIONS[0]
    objective = (weights, method.objective)
    if not (key and key[0] is coll and key[1] is act and key[2] == objective):
        _OPTIONS[:] = [None, None]  # free the previous options first (per-module curves)
        _OPTIONS[1] = collection_options(
            coll.factors(), task_names=coll.tasks, task_attributes=coll.attributes(),
            activation_covs=act, module_weights=weights, nested=method.nested,
            weights=method.task_weighting, per_task_ranks=method.per_task_ranks,
        )  # fmt: skip
        _OPTIONS[0] = (coll, act, objective)
    return _OPTIONS[1]


def merge_method(method: Method, coll: Collection, covs: dict | None = None,
                 fisher: dict | None = None) -> Merged:  # fmt: skip
    """Run `method` on every module of `coll` at once. `covs`: the input covariances of
    activation-aware methods; `fisher`: the module weights of `module_weighting="fisher"`."""
    from hydraopt_jax import merge_adapters, task_relative_errors

    start = time.perf_counter()
    if method.kind == "lora":
        loras = {t: dict(coll.adapters[t]) for t in coll.tasks}
        from hydraopt_jax._plan import original_params

        orig = sum(
            original_params(coll.ranks[m], coll.A[m].shape[2], coll.B[m].shape[1])
            for m in coll.modules
        )
        return Merged(loras, orig, orig, dict.fromkeys(coll.tasks, 0.0), 0.0)

    if method.activation and covs is None:
        raise ValueError(f"{method.name} needs activation covariances")
    if method.module_weighting == FISHER and fisher is None:
        raise ValueError(f"{method.name} needs output sensitivities")
    act = covs if method.activation else None
    options_seconds = 0.0
    if method.kind == "hydraopt":
        solutions = merge_adapters(
            coll.factors(), build_plan(method, coll), method.solver, activation_covs=act
        )
    elif method.kind == "planner":
        from hydraopt_jax.planner import choose

        t0 = time.perf_counter()
        options = _planner_options(coll, method, act, fisher)
        options_seconds = time.perf_counter() - t0
        chosen = choose(*options, method.budget)
        solutions = merge_adapters(
            coll.factors(), chosen.plans, activation_covs=act, weights=method.task_weighting,
        )  # fmt: skip
    elif method.kind == "baseline":
        from hydraopt_jax.baselines import run_baseline

        solutions = {}
        for m in coll.modules:
            present = [i for i, r in enumerate(coll.ranks[m]) if r > 0]
            extra = dict(BASELINE_PARAMS[method.baseline])
            if method.baseline in FACTORWISE:
                extra["scales"] = coll.scales[m][present]
            solutions[m] = run_baseline(
                method.baseline, coll.A[m][present], coll.B[m][present],
                rank=method.rank(coll.rank), task_ranks=[coll.ranks[m][i] for i in present],
                task_ids=present, **extra,
            )  # fmt: skip
    else:
        raise ValueError(f"unknown method kind {method.kind!r}")
    errors = task_relative_errors(solutions, coll.num_tasks)
    steps = [int(s.steps) for s in solutions.values()]
    return Merged(
        task_loras(coll, solutions),
        sum(int(s.num_params) for s in solutions.values()),
        sum(int(s.original_params) for s in solutions.values()),
        {t: float(e) for t, e in zip(coll.tasks, errors, strict=True)},
        time.perf_counter() - start,
        options_seconds,
        (float(np.mean(steps)) if steps else 0.0, max(steps, default=0)),
    )
