"""The fast testbed as a `benchmarks.quality` testbed: its collections, scoring and grid.

For one collection of trained PEFT LoRAs (`adapters/<regime>_<seed_variant>/`), every method
merges all modules at once; each task is then decoded with *its* merged factors
(`evaluate.evaluate_task`, exact match on the 256 held-out test inputs) and scored against
its own LoRA (the accuracy recorded in the collection's `manifest.json`):

    score          = mean_t  acc_merged(t) / acc_own(t)
    min_task_ratio = min_t   acc_merged(t) / acc_own(t)
    storage_ratio  = stored parameters (all modules) / sum_t r_t (d_in + d_out) (all modules)

The methods are `benchmarks.quality.methods`' grid with this testbed's budgets. Activation
covariances come from the *base* model's module inputs on a few training-distribution
batches of the collection's tasks (`TrainStream`, which never yields a held-out input); the
Fisher module weights from each task's own LoRA on a batch of that task's inputs.

    python -m benchmarks.testbed                       # all four collections, writes results
    python -m benchmarks.testbed --quick --json        # reduced grid, JSON rows on stdout
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np

from hydraopt_jax.io.calibration import input_covariances
from hydraopt_jax.io.calibration import output_sensitivities as module_sensitivities

from ..quality.collection import Collection, load_collection
from ..quality.methods import Grid
from ..quality.run import Testbed
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
# --quick: one collection, a 2 applications x 4 languages sub-grid of its committed adapters.
QUICK_COLLECTIONS = ("small_lr_same_seed",)
QUICK_APPS = ("reverse", "dedup")
QUICK_LANGS = (0, 1, 2, 3)

# Budgets of the planner's points (its own default candidate ranks; nothing tuned here):
# one adapter's storage (0.025 with these shapes), the storage of each shared-basis baseline
# rounded down (joint_diag 0.031, joint / pca at k = r 0.071 and at k = 2r 0.234), so that
# every baseline faces a HydraOpt point at equal or smaller storage, and 0.15 / 0.30 / 0.55;
# with nested ranks also just below each per-task truncation's storage (r/2: 0.50, r/4:
# 0.25, r/8: 0.125).
PLANNER_BUDGETS = (0.025, 0.03, 0.07, 0.15, 0.23, 0.30, 0.55)
NESTED_BUDGETS = (0.07, 0.12, 0.15, 0.23, 0.25, 0.30, 0.50, 0.55)
GRID = Grid(
    planner_budgets=PLANNER_BUDGETS,
    truncation=(0.5, 0.25, 0.125),
    nested=((1.0, 0.25), (1.0, 0.5)),
    nested_budgets=NESTED_BUDGETS,
    planner_variants=("act", "size", "fisher"),
)

# Activation covariances: base-model module inputs on training-distribution batches; the
# Fisher module weights: per task, its own LoRA on one training-distribution batch.
CALIBRATION = dict(batches=8, batch_size=64, seed=777)
SENSITIVITY = dict(examples_per_task=16, seed=777)


def collection_path(name: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(name)
    if path.is_dir():
        return path
    path = ADAPTERS / str(name)
    if not (path / "manifest.json").exists():
        raise FileNotFoundError(f"{path}: no such testbed collection (no manifest.json)")
    return path


def task_attributes(name: str) -> dict[str, str]:
    task = T.task_from_name(name)
    return {"application": task.app, "language": task.lang}


def load_testbed_collection(
    name: str | pathlib.Path, tasks: Sequence[str] | None = None
) -> Collection:
    """Load a committed collection (all its tasks, or `tasks`), in grid order."""
    return load_collection(
        collection_path(name), tasks,
        order=lambda n: T.task_from_name(n).index, attributes=task_attributes,
    )  # fmt: skip


def quick_tasks() -> list[str]:
    return [t.name for t in T.all_tasks(QUICK_APPS, QUICK_LANGS)]


def activation_covariances(
    base_model, coll: Collection, batches: int = CALIBRATION["batches"],
    batch_size: int = CALIBRATION["batch_size"], seed: int = CALIBRATION["seed"],
) -> dict[str, np.ndarray]:  # fmt: skip
    """`{module: E[x x^T]}` of each adapted module's input in the *base* model, over
    `batches` training-distribution batches of the collection's tasks (no held-out input)."""
    import torch

    stream = T.TrainStream([T.task_from_name(t) for t in coll.tasks], batch_size, seed=seed)

    def batch():
        ids, _labels, mask = stream.next_batch()
        return torch.from_numpy(ids), torch.from_numpy(mask)

    return input_covariances(base_model, coll.modules, (batch() for _ in range(batches)))


def output_sensitivities(
    base_model, coll: Collection, examples_per_task: int = SENSITIVITY["examples_per_task"],
    seed: int = SENSITIVITY["seed"],
) -> dict[str, float]:  # fmt: skip
    """The `+fisher` planner's module weights
    (`hydraopt_jax.io.calibration.output_sensitivities`):
    each task's own LoRA on the base model, on `examples_per_task` of its training-
    distribution inputs (`TrainStream` of that task alone)."""
    import torch

    def batches():
        for name in coll.tasks:
            stream = T.TrainStream([T.task_from_name(name)], examples_per_task, seed=seed)
            ids, labels, mask = (torch.from_numpy(a) for a in stream.next_batch())
            yield coll.adapters[name], (ids, mask, labels)

    return module_sensitivities(base_model, coll.modules, batches())


def _scorer(base_model):
    return lambda task, lora: E.evaluate_task(base_model, task, lora)


def _load_base():
    from . import model as M

    return M.load_base_model()


TESTBED = Testbed(
    name="testbed",
    title="Quality testbed (tiny Llama, synthetic tasks): storage vs score",
    command="python -m benchmarks.testbed",
    results=RESULTS,
    collections=COLLECTIONS,
    quick_collections=QUICK_COLLECTIONS,
    quick_tasks=quick_tasks,
    load=load_testbed_collection,
    load_base=_load_base,
    scorer=_scorer,
    calibrate=activation_covariances,
    sensitivities=output_sensitivities,
    grid=GRID,
    calibration=CALIBRATION,
    sensitivity=SENSITIVITY,
)
