"""The real-LLM testbed as a `benchmarks.quality` testbed: collections, scoring, grid.

For one collection of PEFT LoRAs trained on SmolLM2-135M-Instruct (`adapters/same_seed`,
`adapters/diff_seed`, `train.py`), every method merges all modules at once; each task is
then scored by teacher-forced exact match (`evaluate.Scorer`) on its 64 held-out test
examples (words never seen in training) with *its* merged factors, against its own LoRA:

    score          = mean_t  acc_merged(t) / acc_own(t)
    min_task_ratio = min_t   acc_merged(t) / acc_own(t)
    storage_ratio  = stored parameters (all modules) / sum_t r_t (d_in + d_out) (all modules)

Activation covariances (the `+act` methods) are the base model's inputs to every adapted
module on training-distribution batches of the collection's tasks (never held-out inputs).

    python -m benchmarks.llm_testbed                     # both collections, writes results
    python -m benchmarks.llm_testbed --quick --json      # trains a 4-task collection: CI
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np

from hydraopt_jax.io.calibration import input_covariances
from hydraopt_jax.io.calibration import output_sensitivities as module_sensitivities

from ..quality.collection import Collection, load_collection
from ..quality.methods import FISHER, NESTED_VARIANTS, Grid, budget_tag, rank_tag
from ..quality.run import Testbed
from . import evaluate as E
from . import tasks as T
from . import train as TR

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
COLLECTIONS = TR.COLLECTIONS
QUICK_COLLECTIONS = ("same_seed",)
QUICK_TEST_EXAMPLES = TR.QUICK_TRAIN["test_examples"]

# Planner budgets: one adapter's storage (1/40 = 0.025), the small storages the issues aim
# at (0.04-0.10), just below and at each per-task truncation's storage (r/16: 0.0625,
# r/8: 0.125, r/4: 0.25, r/2: 0.5), 0.30 and the paper's 0.55. The plain, activation-aware
# and size-weighted planners run at a subset; the planner with nested ranks at all of them.
PLANNER_BUDGETS = (0.025, 0.07, 0.10, 0.25, 0.55)
NESTED_BUDGETS = (0.025, 0.04, 0.06, 0.0625, 0.07, 0.10, 0.12, 0.125, 0.25, 0.30, 0.50, 0.55)
# The nested planner's other objectives: below rank 1 and at each per-task truncation's storage
# (where they are compared with it); the first 20 tasks have them at every nested budget.
VARIANT_BUDGETS = (0.04, 0.0625, 0.125, 0.25, 0.50)
GRID = Grid(
    planner_budgets=PLANNER_BUDGETS,
    quick_planner_budgets=(0.10,),
    truncation=(0.5, 0.25, 0.125, 0.0625),
    nested=((1.0, 0.0625), (1.0, 0.125), (1.0, 0.25)),
    nested_budgets=NESTED_BUDGETS,
    planner_variants=("act", "size", "fisher", "adapter", "act+adapter", "adapter+task-ranks"),
    variant_budgets=VARIANT_BUDGETS,
)
CALIBRATION = dict(examples_per_task=4, seed=777)


def _nested(budgets, suffixes=("",)) -> tuple[str, ...]:
    """The nested planner's rows, one objective (suffix) at a time, all its budgets together:
    a run computes an objective's options once and chooses every budget's plan from them,
    keeping one objective's at a time (`quality.methods`), so alternating objectives would
    recompute them (4-8 minutes per collection here) for every row."""
    return tuple(f"hydraopt:plan+nested{s}@{budget_tag(b)}" for s in suffixes for b in budgets)


# A full run scores these first (each 220-320 s of evaluation per collection on one core with
# two collections side by side, plus the merge: the whole grid takes hours): the references,
# the plain nested planner at each truncation's storage (the front check), one adapter's
# storage against the classic merges, the paper's named plan, the plain planner's other
# budgets, the planner's other objectives below rank 1 and where they meet truncation (the
# output-aware one first), then Compress-then-Serve's `joint` (its merge is the slowest).
_FISHER = NESTED_VARIANTS[FISHER][0]
_VARIANTS = [_FISHER] + [
    s for v, (s, _) in NESTED_VARIANTS.items() if v in GRID.planner_variants and s != _FISHER
]
PRIORITY = (
    "lora",
    *(f"reference:truncate-{rank_tag(m)}" for m in GRID.truncation),
    *_nested((0.0625, 0.125, 0.25, 0.50)),
    "hydraopt:full-merge",
    *_nested((0.025,)),
    *(f"baseline:{name}" for name in ("linear", "ties", "dare_linear", "dare_ties", "svd")),
    "hydraopt:shared-a",
    *_nested((0.10, 0.07, 0.04, 0.06, 0.12, 0.30, 0.55)),
    *_nested((0.04, 0.125, 0.0625, 0.25, 0.50), _VARIANTS),
    "baseline:joint",
)


def collection_path(name: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(name)
    if path.is_dir():
        return path
    path = TR.ADAPTERS / str(name)
    if not (path / "manifest.json").exists():
        raise FileNotFoundError(
            f"{path}: no trained collection (run python -m benchmarks.llm_testbed.train "
            f"--collection {name})"
        )
    return path


def load_llm_collection(name: str | pathlib.Path, tasks: Sequence[str] | None = None) -> Collection:
    return load_collection(
        collection_path(name), tasks,
        order=lambda n: T.task_from_name(n).index,
        attributes=lambda n: T.task_from_name(n).attributes,
    )  # fmt: skip


def calibration_batches(tokenizer, coll: Collection, *, examples_per_task: int = 4,
                        seed: int = 777):  # fmt: skip
    """`(task, (input_ids, attention_mask, labels))` per task: `examples_per_task`
    training-distribution examples (answer included: the tokens a LoRA acts on)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for name in coll.tasks:
        stream = T.TrainStream(T.task_from_name(name), examples_per_task, seed=seed)
        yield name, E.batch_tensors(E.tokenize(tokenizer, stream.next_batch()), pad)


def activation_covariances(base, coll: Collection, **calibration) -> dict[str, np.ndarray]:
    """`{module: E[x x^T]}` of each adapted module's input in the *base* model, over the
    `calibration_batches` of every task, padding excluded."""
    model, tokenizer = base
    batches = calibration_batches(tokenizer, coll, **calibration)
    return input_covariances(model, coll.modules, ((ids, mask) for _, (ids, mask, _) in batches))


def output_sensitivities(base, coll: Collection, **calibration) -> dict[str, float]:
    """The `+fisher` planner's module weights
    (`hydraopt_jax.io.calibration.output_sensitivities`):
    each task's own LoRA on the base model, on its `calibration_batches`."""
    model, tokenizer = base
    return module_sensitivities(
        model, coll.modules,
        ((coll.adapters[task], batch)
         for task, batch in calibration_batches(tokenizer, coll, **calibration)),
    )  # fmt: skip


def _scorer(base, limit: int | None = None):
    return E.Scorer(*base, limit=limit).evaluate


def _load_base():
    from . import model as M

    return M.load_base_model()


def quick_tasks() -> list[str]:
    return list(TR.QUICK_TASKS)


TESTBED = Testbed(
    name="llm_testbed",
    title="Real-LLM testbed (SmolLM2-135M LoRAs, applications x languages): storage vs score",
    command="python -m benchmarks.llm_testbed",
    results=RESULTS,
    collections=COLLECTIONS,
    quick_collections=QUICK_COLLECTIONS,
    quick_tasks=quick_tasks,
    load=load_llm_collection,
    load_base=_load_base,
    scorer=_scorer,
    calibrate=lambda base, coll: activation_covariances(base, coll, **CALIBRATION),
    sensitivities=lambda base, coll: output_sensitivities(base, coll, **CALIBRATION),
    grid=GRID,
    reuse_own=False,  # the own LoRA's answer likelihoods are the reference
    calibration=CALIBRATION,
    sensitivity=CALIBRATION,  # the same 4 examples per task
    priority=PRIORITY,
    quick_methods=(
        "lora",
        "reference:truncate-r/16",
        "hydraopt:shared-a",
        "hydraopt:full-merge",
        "hydraopt:shared-a@k=r,j=r/8",
        "hydraopt:plan@0.10",
        "hydraopt:plan+nested@0.10",
        "baseline:ties",
        "baseline:svd",
    ),
)


QUICK_ADAPTERS = HERE / "_cache" / "quick"


def quick_testbed() -> Testbed:
    """The `--quick` testbed: the 4-task collection `train.py --quick` trains (10 steps each)
    into `_cache/quick/`, scored on 16 test examples per task."""
    import dataclasses

    return dataclasses.replace(
        TESTBED,
        load=lambda name, tasks: load_llm_collection(QUICK_ADAPTERS / name, tasks),
        scorer=lambda base: _scorer(base, QUICK_TEST_EXAMPLES),
        reuse_own=True,  # the manifest's own accuracies: scored on the same 16 examples
    )
