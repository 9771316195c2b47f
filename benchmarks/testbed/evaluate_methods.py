"""Evaluation half of the quality testbed: every merge method, scored on the real tasks.

For one collection of trained PEFT LoRAs (`adapters/<regime>_<seed_variant>/`), every method
merges all modules at once; each task is then decoded with *its* merged factors
(`evaluate.evaluate_task`, exact match on the 256 held-out test inputs) and scored against
its own LoRA (the accuracy recorded in the collection's `manifest.json`):

    score          = mean_t  acc_merged(t) / acc_own(t)
    min_task_ratio = min_t   acc_merged(t) / acc_own(t)
    storage_ratio  = stored parameters (all modules) / sum_t r_t (d_in + d_out) (all modules)

Methods (`method_grid`): `lora` (the own adapters), `reference:truncate-r/2` and `-r/4` (every
adapter truncated to rank r/2 or r/4 by its own SVD: storage 0.5 / 0.25 without any sharing),
HydraOpt plans
(`hydraopt:...`, the exact solver where a closed form exists, ALS otherwise,
activation-aware variants `+act`, the planner's per-module plans `plan@<budget>`), a rank
sweep of `shared-a` and `full-merge`, and every baseline of `hydraopt_jax.baselines.BASELINES`
(`baseline:<name>`) with fixed default hyperparameters (`BASELINE_PARAMS`; nothing is tuned on
the test set). Activation covariances come from the *base* model's module inputs on a few
training-distribution batches of the collection's tasks (`TrainStream`, which never yields a
held-out input).

    python -m benchmarks.testbed                       # all four collections, writes results
    python -m benchmarks.testbed --quick --json        # reduced grid, JSON rows on stdout
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Callable, Sequence

import numpy as np

from . import evaluate as E
from . import tasks as T

HERE = pathlib.Path(__file__).resolve().parent
ADAPTERS = HERE / "adapters"
RESULTS = HERE.parent / "results"

COLLECTIONS = (
    "small_lr_same_seed",
    "small_lr_diff_seed",
    "large_lr_same_seed",
    "large_lr_diff_seed",
)
ROW_KEYS = ("method", "collection", "storage_ratio", "score", "min_task_ratio")

# --quick: one collection, a 2 applications x 4 languages sub-grid of its committed adapters.
QUICK_COLLECTIONS = ("small_lr_same_seed",)
QUICK_APPS = ("reverse", "dedup")
QUICK_LANGS = (0, 1, 2, 3)

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
# Baselines with a rank to choose, swept like HydraOpt's plans so that the comparison is fair.
BASELINE_SWEEP = ("joint", "pca")

# Budgets of the planner's points (its own default candidate ranks; nothing tuned here):
# one adapter's storage (0.025 with these shapes), the storage of each shared-basis baseline
# rounded down (joint_diag 0.031, joint / pca at k = r 0.071 and at k = 2r 0.234), so that
# every baseline faces a HydraOpt point at equal or smaller storage, and 0.15 / 0.30 / 0.55.
PLANNER_BUDGETS = (0.025, 0.03, 0.07, 0.15, 0.23, 0.30, 0.55)
QUICK_PLANNER_BUDGETS = (0.30,)

# Activation covariances: base-model module inputs on training-distribution batches.
CALIBRATION = dict(batches=8, batch_size=64, seed=777)


# ---------------------------------------------------------------------------- collections
@dataclasses.dataclass
class TestbedCollection:
    """The factors of one collection (or a subset of its tasks), stacked per module.

    `A[m]`: `[T, r_max, d_in]`, `B[m]`: `[T, d_out, r_max]` with each task's LoRA scale folded
    into `B`; `scales[m]`: `[T]`, that scale; `ranks[m]`: each task's rank (0 = absent).
    """

    name: str
    path: pathlib.Path
    tasks: list[str]
    modules: list[str]
    A: dict[str, np.ndarray]
    B: dict[str, np.ndarray]
    scales: dict[str, np.ndarray]
    ranks: dict[str, tuple[int, ...]]
    own_accuracy: dict[str, float]
    adapters: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def rank(self) -> int:
        """The adapters' (largest) rank `r`."""
        return max(max(r) for r in self.ranks.values())

    def factors(self) -> dict[str, tuple[np.ndarray, np.ndarray, tuple[int, ...]]]:
        """`{module: (A, B, ranks)}`, the input of `merge_adapters`."""
        return {m: (self.A[m], self.B[m], self.ranks[m]) for m in self.modules}

    def attributes(self) -> list[dict[str, object]]:
        """`[{"application": ..., "language": ...}]` per task, for grouped plans."""
        out = []
        for name in self.tasks:
            task = T.task_from_name(name)
            out.append({"application": task.app, "language": task.lang})
        return out


def collection_path(name: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(name)
    if path.is_dir():
        return path
    path = ADAPTERS / str(name)
    if not (path / "manifest.json").exists():
        raise FileNotFoundError(f"{path}: no such testbed collection (no manifest.json)")
    return path


def _adapter_scales(adapter_dir: pathlib.Path, modules: Sequence[str]) -> dict[str, float]:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    out = {}
    for m in modules:
        r = E._pattern_value(config.get("rank_pattern") or {}, m, config["r"])
        alpha = E._pattern_value(config.get("alpha_pattern") or {}, m, config["lora_alpha"])
        out[m] = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return out


def load_testbed_collection(
    name: str | pathlib.Path, tasks: Sequence[str] | None = None
) -> TestbedCollection:
    """Load a committed collection (all its tasks, or `tasks`), in grid order."""
    path = collection_path(name)
    manifest = json.loads((path / "manifest.json").read_text())
    available = [p.name for p in path.iterdir() if (p / "adapter_config.json").exists()]
    if tasks is None:
        tasks = available
    missing = sorted(set(tasks) - set(available))
    if missing:
        raise FileNotFoundError(f"{path}: no adapter for task(s) {', '.join(missing)}")
    tasks = sorted(tasks, key=lambda n: T.task_from_name(n).index)
    adapters = {t: E.load_adapter_factors(path / t) for t in tasks}
    modules = sorted({m for lora in adapters.values() for m in lora})
    A, B, scales, ranks = {}, {}, {}, {}
    for m in modules:
        shapes = [lora[m] for lora in adapters.values() if m in lora]
        r_max = max(a.shape[0] for a, _ in shapes)
        d_in, d_out = shapes[0][0].shape[1], shapes[0][1].shape[0]
        A[m] = np.zeros((len(tasks), r_max, d_in), np.float32)
        B[m] = np.zeros((len(tasks), d_out, r_max), np.float32)
        scales[m] = np.zeros(len(tasks), np.float32)
        rk = []
        for i, t in enumerate(tasks):
            if m not in adapters[t]:
                rk.append(0)
                continue
            a, b = adapters[t][m]
            A[m][i, : a.shape[0]] = a
            B[m][i, :, : b.shape[1]] = b
            scales[m][i] = _adapter_scales(path / t, [m])[m]
            rk.append(a.shape[0])
        ranks[m] = tuple(rk)
    own = {t: float(manifest["tasks"][t]["own_accuracy"]) for t in tasks}
    return TestbedCollection(
        name=path.name, path=path, tasks=list(tasks), modules=modules, A=A, B=B,
        scales=scales, ranks=ranks, own_accuracy=own, adapters=adapters,
    )  # fmt: skip


def quick_tasks() -> list[str]:
    return [t.name for t in T.all_tasks(QUICK_APPS, QUICK_LANGS)]


# ---------------------------------------------------------------------------- methods
@dataclasses.dataclass(frozen=True)
class Method:
    """One point of the chart.

    `kind`: `"lora"`, `"hydraopt"` or `"baseline"`; `plan`: `shared_a`, `shared_b`,
    `full_merge`, `separate`, `a_per_lang`, `b_per_app` or `a_lang_b_app`; `kind` `"planner"`:
    the per-module plan `hydraopt_jax._planner.plan_budget` picks under `budget`; `rank_mult`: the
    merged rank as a multiple of `r` (`None`: the method's default); `activation`: whiten by
    the modules' input covariances.
    """

    name: str
    kind: str
    plan: str | None = None
    rank_mult: float | None = None
    solver: str = "exact"
    activation: bool = False
    baseline: str | None = None
    budget: float | None = None  # kind "planner": storage budget of `plan_budget`
    module_weighting: str = "equal"  # kind "planner": `plan_budget(module_weights=...)`

    def rank(self, r: int) -> int | None:
        return None if self.rank_mult is None else max(1, int(round(self.rank_mult * r)))


def _rank_tag(mult: float) -> str:
    return {0.5: "r/2", 1.0: "r", 2.0: "2r", 4.0: "4r"}.get(mult, f"{mult:g}r")


def _budget_tag(budget: float) -> str:
    """`0.3 -> "0.30"`, `0.025 -> "0.025"`: two decimals, three where needed."""
    tag = f"{budget:.3f}"
    return tag[:-1] if tag.endswith("0") else tag


def method_grid(sweep: bool = True) -> list[Method]:
    """Every method, in a fixed order. `sweep` adds the rank sweeps (k in r/2, r, 2r, 4r)."""
    H = "hydraopt"
    grid = [
        Method("lora", "lora"),
        # reference, not a merge: each task's own adapter truncated to rank r/2 (its SVD);
        # storage 0.5, no sharing. In neither the HydraOpt front nor the baselines.
        Method("reference:truncate-r/2", "hydraopt", "separate", 0.5),
        # the same at rank r/4 (storage 0.25): what the planner's 0.23-0.30 points mostly do
        Method("reference:truncate-r/4", "hydraopt", "separate", 0.25),
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
    # the planner (per-module side, groups and rank under a global budget)
    grid += [
        Method(f"hydraopt:plan@{_budget_tag(b)}", "planner", budget=b)
        for b in (PLANNER_BUDGETS if sweep else QUICK_PLANNER_BUDGETS)
    ]
    if sweep:  # the planner with activation-aware losses (and merges), at the same budgets
        grid += [
            Method(f"hydraopt:plan+act@{_budget_tag(b)}", "planner", budget=b, activation=True)
            for b in PLANNER_BUDGETS
        ]
        # the planner with each module's loss weighted by its size (d_in + d_out)
        grid += [
            Method(f"hydraopt:plan+size@{_budget_tag(b)}", "planner", budget=b,
                   module_weighting="size")
            for b in PLANNER_BUDGETS
        ]  # fmt: skip
    if sweep:
        # k = r and k = 2r of shared-a, k = r of full-merge are the named rows above
        grid += [
            Method(f"hydraopt:shared-a@k={_rank_tag(0.5)}", H, "shared_a", 0.5),
            Method(f"hydraopt:shared-a@k={_rank_tag(4.0)}", H, "shared_a", 4.0),
        ]
        grid += [
            Method(f"hydraopt:full-merge@k={_rank_tag(m)}", H, "full_merge", m)
            for m in (0.5, 2.0, 4.0)
        ]
    grid += [Method(f"baseline:{name}", "baseline", baseline=name) for name in BASELINE_PARAMS]
    if sweep:
        grid += [
            Method(f"baseline:{name}@k={_rank_tag(m)}", "baseline", rank_mult=m, baseline=name)
            for name in BASELINE_SWEEP
            for m in (2.0,)  # at 4r their k x k cores per task cost more than the adapters
        ]
    return grid


EXTRA_METHODS = {"hydraopt:separate": Method("hydraopt:separate", "hydraopt", "separate", 1.0)}


def methods_by_name(names: Sequence[str] | None, sweep: bool = True) -> list[Method]:
    grid = method_grid(sweep=sweep)
    if names is None:
        return grid
    known = {m.name: m for m in method_grid(sweep=True)} | EXTRA_METHODS
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return [known[n] for n in names]


def build_plan(method: Method, coll: TestbedCollection):
    from hydraopt_jax import SharingPlan

    k = method.rank(coll.rank)
    n = coll.num_tasks
    if method.plan in ("shared_a", "shared_b", "full_merge", "separate"):
        return SharingPlan.named(method.plan, n, k)
    attrs = coll.attributes()
    by = {
        "a_per_lang": dict(share_a_by="language"),
        "b_per_app": dict(share_b_by="application"),
        "a_lang_b_app": dict(share_a_by="language", share_b_by="application"),
    }[method.plan]
    return SharingPlan.from_attributes(attrs, rank=k, **by)


# ---------------------------------------------------------------------------- activations
def activation_covariances(
    base_model, coll: TestbedCollection, batches: int = CALIBRATION["batches"],
    batch_size: int = CALIBRATION["batch_size"], seed: int = CALIBRATION["seed"],
) -> dict[str, np.ndarray]:  # fmt: skip
    """`{module: E[x x^T]}` of each adapted module's input in the *base* model, over
    `batches` training-distribution batches of the collection's tasks (no held-out input)."""
    import torch

    stream = T.TrainStream([T.task_from_name(t) for t in coll.tasks], batch_size, seed=seed)
    named = dict(base_model.named_modules())
    sums = {m: np.zeros((coll.A[m].shape[2],) * 2) for m in coll.modules}
    count = 0
    current_mask: list[np.ndarray] = []

    def hook(name):
        def fn(_module, inputs):
            x = inputs[0].detach().double().numpy().reshape(-1, inputs[0].shape[-1])
            x = x[current_mask[0]]
            sums[name] += x.T @ x

        return fn

    handles = [named[m].register_forward_pre_hook(hook(m)) for m in coll.modules]
    try:
        with torch.no_grad():
            for _ in range(batches):
                ids, _labels, mask = stream.next_batch()
                current_mask[:] = [mask.reshape(-1).astype(bool)]
                base_model(
                    input_ids=torch.from_numpy(ids),
                    attention_mask=torch.from_numpy(mask),
                    use_cache=False,
                )
                count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    return {m: (s / count).astype(np.float32) for m, s in sums.items()}


# ---------------------------------------------------------------------------- merging
@dataclasses.dataclass
class Merged:
    """A method's output: each task's factors, the storage, the reconstruction error."""

    loras: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]
    num_params: int
    original_params: int
    relative_error: dict[str, float]  # RMS over modules (whitened metric for `+act`)
    seconds: float

    @property
    def storage_ratio(self) -> float:
        return self.num_params / self.original_params


def _original_params(coll: TestbedCollection) -> int:
    return sum(sum(coll.ranks[m]) * (coll.A[m].shape[2] + coll.B[m].shape[1]) for m in coll.modules)


def _task_loras(coll: TestbedCollection, solutions: dict) -> dict[str, dict]:
    loras: dict[str, dict] = {t: {} for t in coll.tasks}
    for m, sol in solutions.items():
        for local, t in enumerate(sol.task_ids):
            a, b = sol.task_factors(local)
            # writable copies (torch warns on read-only buffers from jax)
            loras[coll.tasks[t]][m] = (np.array(a, np.float32), np.array(b, np.float32))
    return loras


def _rms_errors(coll: TestbedCollection, solutions: dict) -> dict[str, float]:
    from hydraopt_jax._solution import task_relative_errors

    err = task_relative_errors(solutions, coll.num_tasks)
    return {t: float(e) for t, e in zip(coll.tasks, err, strict=True)}


def merge_method(
    method: Method, coll: TestbedCollection, covs: dict[str, np.ndarray] | None = None
) -> Merged:
    """Run `method` on every module of `coll` at once."""
    start = time.perf_counter()
    if method.kind == "lora":
        loras = {t: dict(coll.adapters[t]) for t in coll.tasks}
        orig = _original_params(coll)
        return Merged(loras, orig, orig, {t: 0.0 for t in coll.tasks}, 0.0)

    if method.activation and covs is None:
        raise ValueError(f"{method.name} needs activation covariances")
    act = covs if method.activation else None
    if method.kind == "hydraopt":
        from hydraopt_jax import merge_adapters

        plan = build_plan(method, coll)
        solutions = merge_adapters(coll.factors(), plan, method.solver, activation_covs=act)
    elif method.kind == "planner":
        from hydraopt_jax import merge_adapters
        from hydraopt_jax._planner import plan_budget

        chosen = plan_budget(
            coll.factors(), method.budget, task_names=coll.tasks,
            task_attributes=coll.attributes(), activation_covs=act,
            module_weights=method.module_weighting,
        )  # fmt: skip
        solutions = merge_adapters(coll.factors(), chosen.plans, activation_covs=act)
    elif method.kind == "baseline":
        from hydraopt_jax.baselines import run_baseline

        solutions = {}
        params = dict(BASELINE_PARAMS[method.baseline])
        for m in coll.modules:
            present = [i for i, r in enumerate(coll.ranks[m]) if r > 0]
            extra = dict(params)
            if method.baseline in FACTORWISE:
                extra["scales"] = coll.scales[m][present]
            solutions[m] = run_baseline(
                method.baseline, coll.A[m][present], coll.B[m][present],
                rank=method.rank(coll.rank), task_ranks=[coll.ranks[m][i] for i in present],
                task_ids=present, **extra,
            )  # fmt: skip
    else:
        raise ValueError(f"unknown method kind {method.kind!r}")
    loras = _task_loras(coll, solutions)
    num_params = sum(int(s.num_params) for s in solutions.values())
    orig = sum(int(s.original_params) for s in solutions.values())
    errors = _rms_errors(coll, solutions)
    return Merged(loras, num_params, orig, errors, time.perf_counter() - start)


# ---------------------------------------------------------------------------- scoring
def score_accuracies(
    accuracy: dict[str, float], own_accuracy: dict[str, float]
) -> tuple[float, float, dict[str, float]]:
    """`(score, min_task_ratio, ratios)`: mean and min over tasks of merged / own accuracy."""
    ratios = {t: accuracy[t] / own_accuracy[t] for t in accuracy}
    values = list(ratios.values())
    return float(np.mean(values)), float(np.min(values)), ratios


def evaluate_merged(base_model, merged: Merged) -> dict[str, float]:
    """Exact-match test accuracy of every task with its merged factors."""
    return {t: float(E.evaluate_task(base_model, t, lora)) for t, lora in merged.loras.items()}


def make_row(method: str, collection: str, storage: float, score: float, worst: float) -> dict:
    return dict(
        method=method,
        collection=collection,
        storage_ratio=round(float(storage), 6),
        score=round(float(score), 6),
        min_task_ratio=round(float(worst), 6),
    )


def evaluate_collection(
    collection: str | pathlib.Path,
    *,
    tasks: Sequence[str] | None = None,
    methods: Sequence[Method] | None = None,
    base_model=None,
    log: Callable[[str], None] = lambda s: None,
    previous: dict | None = None,
    on_progress: Callable[[dict], None] | None = None,
) -> dict:
    """Merge and score every method on one collection.

    `previous`: an earlier (partial) result of the same collection and tasks; its methods are
    reused, not recomputed. `on_progress(result)` is called after every method with the
    partial result (`"complete": False`), e.g. to write it.

    **Returns** `{"collection", "tasks", "rows", "details", "config", "summary", "complete"}`;
    `rows` are `{method, collection, storage_ratio, score, min_task_ratio}` dicts.
    """
    from . import model as M

    coll = load_testbed_collection(collection, tasks)
    base_model = M.load_base_model() if base_model is None else base_model
    methods = method_grid() if methods is None else list(methods)
    covs = None
    if any(m.activation for m in methods):
        t0 = time.perf_counter()
        covs = activation_covariances(base_model, coll)
        log(f"[{coll.name}] activation covariances: {time.perf_counter() - t0:.1f} s")
    rows, details = [], {}
    done = {}
    if previous is not None and previous.get("tasks") == coll.tasks:
        done = {r["method"]: r for r in previous["rows"]}

    wanted = {m.name for m in methods}
    kept = [r for r in (previous or {}).get("rows", []) if r["method"] not in wanted]
    kept = [r for r in kept if r["method"] in previous.get("details", {})] if kept else []
    order = {m.name: i for i, m in enumerate(method_grid(sweep=True))}

    def result(complete: bool) -> dict:
        all_rows = sorted(rows + kept, key=lambda r: order.get(r["method"], len(order)))
        all_details = {r["method"]: previous["details"][r["method"]] for r in kept} | details
        return dict(
            collection=coll.name,
            tasks=coll.tasks,
            complete=complete,
            rows=all_rows,
            details=all_details,
            config=dict(
                baseline_params=BASELINE_PARAMS,
                calibration=CALIBRATION,
                rank=coll.rank,
                weights="relative",
                own_accuracy=coll.own_accuracy,
            ),
            summary=summarize(all_rows),
        )

    for method in methods:
        if method.name in done and method.name in previous.get("details", {}):
            rows.append(done[method.name])
            details[method.name] = previous["details"][method.name]
            log(f"[{coll.name}] {method.name:32s} (reused from the previous result)")
            continue
        merged = merge_method(method, coll, covs)
        t0 = time.perf_counter()
        accuracy = evaluate_merged(base_model, merged)
        eval_s = time.perf_counter() - t0
        score, worst, ratios = score_accuracies(accuracy, coll.own_accuracy)
        rows.append(make_row(method.name, coll.name, merged.storage_ratio, score, worst))
        details[method.name] = dict(
            num_params=merged.num_params,
            original_params=merged.original_params,
            accuracy=accuracy,
            relative_error_mean=float(np.mean(list(merged.relative_error.values()))),
            merge_seconds=round(merged.seconds, 3),
            eval_seconds=round(eval_s, 3),
        )
        err = details[method.name]["relative_error_mean"]
        log(
            f"[{coll.name}] {method.name:32s} storage {merged.storage_ratio:7.4f}  "
            f"score {score:.4f}  min {worst:.4f}  rel.err {err:.3f}  "
            f"({merged.seconds:.1f} s merge, {eval_s:.1f} s eval)"
        )
        if on_progress is not None:
            on_progress(result(False))
    return result(True)


# ---------------------------------------------------------------------------- analysis
def _is(prefix: str, row: dict) -> bool:
    return row["method"].startswith(prefix)


def hydraopt_front(rows: Sequence[dict]) -> list[dict]:
    """The HydraOpt rows on the storage/score front (best score at each storage or less)."""
    front, best = [], -math.inf
    for row in sorted(
        (r for r in rows if _is("hydraopt:", r)), key=lambda r: (r["storage_ratio"], -r["score"])
    ):
        if row["score"] > best:
            front.append(row)
            best = row["score"]
    return front


def best_hydraopt_at(rows: Sequence[dict], max_storage: float) -> dict | None:
    """The best-scoring HydraOpt row with storage `<= max_storage`."""
    cands = [r for r in rows if _is("hydraopt:", r) and r["storage_ratio"] <= max_storage + 1e-9]
    return max(cands, key=lambda r: (r["score"], -r["storage_ratio"]), default=None)


def front_check(rows: Sequence[dict], tol: float = 1e-9) -> dict:
    """For every baseline row, the best HydraOpt row at equal or smaller storage must score
    at least as high. **Returns** `{"passed": bool, "violations": [...], "checked": n,
    "closest": the smallest margin's baseline, HydraOpt row and margin}`."""
    violations = []
    baselines = [r for r in rows if _is("baseline:", r)]
    closest = None  # the baseline with the smallest margin (HydraOpt score - baseline score)
    for b in baselines:
        h = best_hydraopt_at(rows, b["storage_ratio"] + tol)
        if h is not None and (closest is None or h["score"] - b["score"] < closest["margin"]):
            closest = dict(baseline=b["method"], baseline_score=b["score"],
                           hydraopt=h["method"], hydraopt_score=h["score"],
                           margin=h["score"] - b["score"])  # fmt: skip
        if h is None or h["score"] < b["score"] - tol:
            violations.append(
                dict(
                    baseline=b["method"],
                    baseline_storage=b["storage_ratio"],
                    baseline_score=b["score"],
                    hydraopt=None if h is None else h["method"],
                    hydraopt_storage=None if h is None else h["storage_ratio"],
                    hydraopt_score=None if h is None else h["score"],
                )
            )
    return dict(
        passed=not violations, checked=len(baselines), violations=violations, closest=closest
    )


ONE_ADAPTER_RIVALS = (
    "baseline:linear",
    "baseline:ties",
    "baseline:dare_linear",
    "baseline:dare_ties",
)


def summarize(rows: Sequence[dict]) -> dict:
    """The numbers the issue asks for, computed from the rows."""
    by = {r["method"]: r for r in rows}
    best_055 = best_hydraopt_at(rows, 0.55)
    rivals = [by[m] for m in ONE_ADAPTER_RIVALS if m in by]
    one = None
    if rivals:
        one_storage = max(r["storage_ratio"] for r in rivals)
        h = best_hydraopt_at(rows, one_storage)
        best_rival = max(rivals, key=lambda r: r["score"])
        one = dict(
            storage=one_storage,
            hydraopt=None if h is None else h["method"],
            hydraopt_score=None if h is None else h["score"],
            best_rival=best_rival["method"],
            best_rival_score=best_rival["score"],
            passed=h is not None and h["score"] >= best_rival["score"],
        )
    return dict(
        best_hydraopt_at_055=None
        if best_055 is None
        else dict(
            method=best_055["method"], storage=best_055["storage_ratio"], score=best_055["score"]
        ),
        one_adapter=one,
        front_check=front_check(rows),
        front=[r["method"] for r in hydraopt_front(rows)],
    )


def format_summary(result: dict) -> str:
    """Human-readable summary lines of one collection's result."""
    s = result.get("summary") or summarize(result["rows"])
    name = result["collection"]
    lines = []
    b = s["best_hydraopt_at_055"]
    if b:
        lines.append(
            f"{name}: best HydraOpt at storage <= 0.55: {b['method']} "
            f"(storage {b['storage']:.4f}) score {b['score']:.4f}"
        )
    o = s["one_adapter"]
    if o and o["hydraopt"] is not None:
        lines.append(
            f"{name}: one-adapter storage ({o['storage']:.4f}): "
            f"{o['hydraopt']} {o['hydraopt_score']:.4f} "
            f"vs best of linear/ties/dare {o['best_rival']} {o['best_rival_score']:.4f} -> "
            f"{'PASS' if o['passed'] else 'FAIL'}"
        )
    fc = s["front_check"]
    lines.append(
        f"{name}: HydraOpt front >= every baseline at equal or larger storage: "
        f"{'PASS' if fc['passed'] else 'FAIL'} ({fc['checked']} baselines checked, "
        f"{len(fc['violations'])} violations)"
    )
    if fc.get("closest"):
        c = fc["closest"]
        lines.append(
            f"  closest: {c['hydraopt']} {c['hydraopt_score']:.4f} vs {c['baseline']} "
            f"{c['baseline_score']:.4f} (margin {c['margin']:+.4f})"
        )
    for v in fc["violations"]:
        lines.append(
            f"  violation: {v['baseline']} storage {v['baseline_storage']:.4f} score "
            f"{v['baseline_score']:.4f} > {v['hydraopt']} storage {v['hydraopt_storage']} "
            f"score {v['hydraopt_score']}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- files
def combine_results(first: dict, second: dict) -> dict:
    """One result from two runs on the same collection and tasks (e.g. run in parallel with
    different `--methods`); `second` wins for a method in both. Rows in grid order."""
    if first["collection"] != second["collection"] or first["tasks"] != second["tasks"]:
        raise ValueError("combine_results: the results are of different collections or tasks")
    order = {m.name: i for i, m in enumerate(method_grid(sweep=True))}
    rows = {r["method"]: r for r in first["rows"]} | {r["method"]: r for r in second["rows"]}
    rows = sorted(rows.values(), key=lambda r: order.get(r["method"], len(order)))
    out = dict(first)
    out.update(
        rows=rows,
        details=first.get("details", {}) | second.get("details", {}),
        complete=bool(first.get("complete", True) and second.get("complete", True)),
        summary=summarize(rows),
    )
    if "seconds" in first or "seconds" in second:
        out["seconds"] = first.get("seconds", 0) + second.get("seconds", 0)
    return out


def write_result(result: dict, out_dir: pathlib.Path = RESULTS) -> pathlib.Path:
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"testbed_{result['collection']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def load_results(out_dir: pathlib.Path = RESULTS) -> list[dict]:
    """Every `testbed_<collection>.json` in `out_dir`, in `COLLECTIONS` order."""
    found = {
        p.stem[len("testbed_") :]: json.loads(p.read_text())
        for p in sorted(pathlib.Path(out_dir).glob("testbed_*.json"))
    }
    order = [c for c in COLLECTIONS if c in found] + sorted(set(found) - set(COLLECTIONS))
    return [found[c] for c in order]


def markdown(results: Sequence[dict]) -> str:
    """The summary table and one table per collection."""
    out = [
        "# Quality testbed: storage vs score",
        "",
        "Generated by `python -m benchmarks.testbed` (see `benchmarks/testbed/README.md`). "
        "score = mean over tasks of merged / own-LoRA exact-match accuracy; min = the worst "
        "task's ratio; storage = stored parameters / original adapters' parameters.",
        "",
        "| collection | tasks | best HydraOpt at storage <= 0.55 "
        "| one-adapter storage: HydraOpt vs best of linear/TIES/DARE "
        "| HydraOpt front >= every baseline at <= storage |",
        "|---|---|---|---|---|",
    ]
    for res in results:
        s = summarize(res["rows"])  # from the rows: the checks of the code as it is
        b, o, fc = s["best_hydraopt_at_055"], s["one_adapter"], s["front_check"]
        best = f"{b['score']:.4f} (`{b['method']}`, {b['storage']:.3f})" if b else "-"
        one = (
            f"{o['hydraopt_score']:.4f} (`{o['hydraopt']}`) vs {o['best_rival_score']:.4f} "
            f"(`{o['best_rival']}`)"
            if o and o["hydraopt"] is not None
            else "-"
        )
        if fc["passed"]:
            c = fc.get("closest")
            tight = (
                f"; closest: `{c['hydraopt']}` {c['hydraopt_score']:.4f} vs `{c['baseline']}` "
                f"{c['baseline_score']:.4f}"
                if c
                else ""
            )
            check = f"yes ({fc['checked']} baselines{tight})"
        else:
            bad = ", ".join(f"`{v['baseline']}`" for v in fc["violations"])
            check = f"**no**: {bad}"
        name = res["collection"]
        if res.get("complete") is False:
            name += f" (partial: {len(res['rows'])} methods)"
        out.append(f"| {name} | {len(res['tasks'])} | {best} | {one} | {check} |")
    for res in results:
        out += [
            "",
            f"## {res['collection']}",
            "",
            "| method | storage | score | min task ratio | rel. error |",
            "|---|---|---|---|---|",
        ]
        front = set((res.get("summary") or summarize(res["rows"]))["front"])
        for row in sorted(res["rows"], key=lambda r: (r["storage_ratio"], r["method"])):
            d = res.get("details", {}).get(row["method"], {})
            err = d.get("relative_error_mean")
            name = f"**{row['method']}**" if row["method"] in front else row["method"]
            out.append(
                f"| {name} | {row['storage_ratio']:.4f} | {row['score']:.4f} | "
                f"{row['min_task_ratio']:.4f} | {'-' if err is None else f'{err:.3f}'} |"
            )
    out += [
        "",
        "Bold: on the HydraOpt front. rel. error: RMS over modules of "
        "`||dW - dW_hat|| / ||dW||`, mean over tasks (`+act`: in the activation metric).",
        "",
    ]
    return "\n".join(out)


def write_reports(out_dir: pathlib.Path = RESULTS) -> tuple[pathlib.Path, pathlib.Path] | None:
    """`testbed.md` and `testbed.png` from every `testbed_*.json` in `out_dir`."""
    from . import chart

    results = load_results(out_dir)
    if not results:
        return None
    md = pathlib.Path(out_dir) / "testbed.md"
    md.write_text(markdown(results))
    png = pathlib.Path(out_dir) / "testbed.png"
    chart.save_chart(results, png)
    return md, png
