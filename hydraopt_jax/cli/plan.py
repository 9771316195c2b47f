"""`hydraopt plan`: per-module plans under a storage budget (`hydraopt_jax.plan_budget`).

```
hydraopt plan DIR... --budget 0.3 --out PLAN.yaml [--names a,b,...] [--ranks 8,16]
              [--rank-multipliers 0.5,1,1.5,2,3,4] [--attributes REGEX] [--no-attributes]
              [--weighting relative|uniform|adapter] [--module-weighting equal|size]
              [--calibration FILE] [--nested/--no-nested] [--per-task-ranks] [--json]
hydraopt merge DIR... --out OUT --config PLAN.yaml [--calibration FILE]   # uses the plan
```

`--calibration FILE` (written by `hydraopt_jax.io.calibration.save_calibration`) makes the
objective output-aware: its input covariances measure each error as the layer's outputs see
it, and its module weights (in place of `--module-weighting`) weigh the modules by what their
output errors cost the task losses. Pass the same file to `merge` to fit that objective.

Task attributes (which tasks may share a factor besides "all" and "each") come from the task
names: `--attributes '(?P<app>[a-z]+)_(?P<lang>[a-z]+)'` (named groups, full match), or by
default from names that all split on `_` into the same number of parts (`part0`, `part1`).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from ..planner import DEFAULT_RANK_MULTIPLIERS, MODULE_WEIGHTINGS
from ._common import (
    CliError,
    calibration,
    choice,
    floats,
    ints,
    load,
    module_table,
    stdout_console,
    write_file_atomically,
)
from ._outputs import check_output_file
from .merge import WEIGHTINGS

__all__ = ["attributes_from_flags", "plan"]


def attributes_from_flags(names: Sequence[str], pattern: str | None, disabled: bool):
    """Task attributes from `--attributes` / `--no-attributes`."""
    from ..planner import task_attributes_from_names

    if disabled:
        return None
    try:
        return task_attributes_from_names(names, pattern)
    except Exception as err:  # ValueError, re.error
        raise CliError("--attributes", str(err)) from None


def plan(
    dirs: Annotated[
        list[Path],
        typer.Argument(help="PEFT adapter directories, one per task.", show_default=False),
    ],
    budget: Annotated[
        float,
        typer.Option(
            "--budget", help="Storage budget: a fraction of the original parameters (e.g. 0.3)."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Plan file (YAML) to write.", show_default=False)
    ],
    names: Annotated[
        str | None, typer.Option(help="Comma-separated task names (default: directory names).")
    ] = None,
    ranks: Annotated[
        str | None, typer.Option(help="Extra candidate ranks k, comma-separated (absolute).")
    ] = None,
    rank_multipliers: Annotated[
        str,
        typer.Option(help="Candidate ranks as multiples of each module's LoRA rank."),
    ] = ",".join(f"{m:g}" for m in DEFAULT_RANK_MULTIPLIERS),
    attributes: Annotated[
        str | None,
        typer.Option(help="Regex with named groups parsing task attributes from task names."),
    ] = None,
    no_attributes: Annotated[
        bool, typer.Option("--no-attributes", help="Only 'all' and 'per task' groupings.")
    ] = False,
    weighting: Annotated[
        str,
        typer.Option(
            help="relative (each task counts equally, module by module), uniform, or adapter "
            "(each task's error relative to its whole adapter: the reported per-task error)."
        ),
    ] = "relative",
    module_weighting: Annotated[
        str | None,
        typer.Option(
            help="equal (every module's relative loss counts the same; the default) or size "
            "(in proportion to the module's d_in + d_out)."
        ),
    ] = None,
    calibration_file: Annotated[
        Path | None,
        typer.Option(
            "--calibration",
            help="Calibration file (hydraopt_jax.io.calibration): input covariances and/or "
            "module weights for an output-aware objective.",
        ),
    ] = None,
    nested: Annotated[
        bool,
        typer.Option(
            "--nested/--no-nested",
            help="Also try nested ranks: each task at a rank j < k inside the shared factor.",
        ),
    ] = True,
    per_task_ranks: Annotated[
        bool,
        typer.Option(
            "--per-task-ranks",
            help="Let the tasks of a module differ in rank: per-task truncation at a rank "
            "per task and, with nested ranks, a rank j_t per task inside the shared factor "
            "(more choices, a slower plan).",
        ),
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON summary object.")
    ] = False,
):
    """Choose per module the shared side, task groups and rank under a storage budget."""
    from ..planner import (
        choose,
        collection_options,
        per_task_truncation,
        plans_from_config,
        truncation_levels,
    )
    from ..planner.planfile import PLAN_FILE_MARK

    start = time.perf_counter()
    if not budget > 0 or not np.isfinite(budget):
        raise CliError(
            "--budget", f"must be a positive fraction of the original storage, got {budget}"
        )
    choice(weighting, WEIGHTINGS, "--weighting", "weighting")
    if module_weighting is not None:
        choice(module_weighting, MODULE_WEIGHTINGS, "--module-weighting", "module weighting")
    check_output_file(out, "--out", (".yaml", ".yml"))
    multipliers = floats(rank_multipliers, "--rank-multipliers")
    extra = ints(ranks, "--ranks") if ranks is not None else None
    collection = load(dirs, names)
    stats = calibration(calibration_file, collection)
    covs, module_weights = None, module_weighting or "equal"
    if stats is not None:
        covs = stats.activation_covs
        if stats.module_weights is not None:
            if module_weighting is not None:
                raise CliError(
                    "--module-weighting",
                    f"conflicts with the module weights of --calibration {calibration_file}",
                )
            module_weights = stats.module_weights
    task_names = list(collection.names)
    attrs = attributes_from_flags(task_names, attributes, no_attributes)
    groupings, options = collection_options(
        collection, task_names=task_names, task_attributes=attrs, rank_multipliers=multipliers,
        ranks=extra, weights=weighting, module_weights=module_weights, nested=nested,
        per_task_ranks=per_task_ranks, activation_covs=covs,
    )  # fmt: skip
    try:
        chosen = choose(groupings, options, budget)
    except ValueError as err:
        raise CliError("--budget", str(err)) from None
    text = chosen.to_yaml(
        task_names,
        header=[
            f"{PLAN_FILE_MARK}; use with `hydraopt merge DIR... --config THIS_FILE`",
            f"tasks: {', '.join(task_names)}",
            *(
                [f"calibration: {str(calibration_file)!r} (merge with the same --calibration)"]
                if stats is not None
                else []
            ),
            *(
                [f"weighting: {weighting} (merge with the same --weighting)"]
                if weighting != "relative"
                else []
            ),
        ],
    )
    # the file must read back as exactly the chosen plans
    import yaml

    back = plans_from_config(yaml.safe_load(text), task_names, list(collection.modules), out)
    for module, module_plan in chosen.plans.items():
        ids = collection.modules[module].task_ids
        if back[module].restrict(ids) != module_plan.restrict(ids):
            raise RuntimeError(f"plan file does not round-trip for {module}")
    write_file_atomically(out, lambda p: p.write_text(text, encoding="utf-8"))
    errors = chosen.task_relative_errors()
    levels = truncation_levels(options)
    truncation = per_task_truncation(groupings, options, budget, levels)
    summary = {
        "budget": budget,
        "storage_ratio": chosen.storage_ratio,
        "num_params": chosen.num_params,
        "original_params": chosen.original_params,
        "bytes": chosen.num_params * 4,
        "mean_relative_error": float(np.mean(errors)),
        "max_relative_error": float(np.max(errors)),
        "rms_relative_error": chosen.rms_relative_error,
        "loss": chosen.loss,
        "tasks": {n: float(e) for n, e in zip(task_names, errors, strict=True)},
        "groupings": sorted(groupings),
        "calibration": None if calibration_file is None else str(calibration_file),
        "method": chosen.method,
        "truncation": _truncation_summary(truncation, options),
        "modules": chosen.summary(),
        "out": str(out),
        "seconds": time.perf_counter() - start,
    }
    if json_out:
        sys.stdout.write(json.dumps(summary) + "\n")
        return
    console = stdout_console()
    module_table(
        f"{out}: per-module plans under budget {budget:g}",
        ("module", "plan", "k", "params", "storage", "RMS rel. error"),
        [
            (
                module,
                row["plan"],
                str(row["rank"]),
                f"{row['num_params']:,}",
                f"{row['storage_ratio']:.3f}",
                f"{row['rms_relative_error']:.4g}",
            )
            for module, row in summary["modules"].items()
        ],  # fmt: skip
        console,
    )
    console.print(
        f"storage ratio {summary['storage_ratio']:.4f} ({summary['num_params']:,} / "
        f"{summary['original_params']:,} params); predicted mean relative error "
        f"{summary['mean_relative_error']:.4g} (worst task {summary['max_relative_error']:.4g})"
    )
    reference = summary["truncation"]
    if reference is None:
        console.print(
            "per-task truncation: its lowest candidate rank does not fit this budget"
            if levels
            else "per-task truncation: none offered (--rank-multipliers has no rank at or "
            "below each module's LoRA rank)"
        )
    else:
        console.print(
            f"per-task truncation at this budget ({reference['name']} per task, storage "
            f"{reference['storage_ratio']:.4f}): objective {reference['loss']:.4g} against "
            f"this plan's {summary['loss']:.4g}; predicted mean relative error "
            f"{reference['mean_relative_error']:.4g} (worst task "
            f"{reference['max_relative_error']:.4g})"
            + (
                f"; {reference['padded']} (module, task) pairs of lower rank stored padded to it"
                if reference["padded"]
                else ""
            )
        )


def _truncation_summary(reference, options) -> dict | None:
    """The JSON of `planner.per_task_truncation` (None when no level fits the budget);
    `padded`: how many (module, task) pairs have a LoRA rank below the level's and are
    stored padded to it, as `merge --plan separate --rank J` stores them."""
    if reference is None:
        return None
    level, plan = reference
    padded = sum(
        stats.ranks[t] < level.ranks[m] for m, (stats, _) in options.items() for t in stats.present
    )
    errors = plan.task_relative_errors()
    ranks = set(level.ranks.values())
    return {
        "name": level.name,
        "rank": ranks.pop() if len(ranks) == 1 else None,  # `merge --plan separate --rank`
        "rank_fraction": level.fraction,
        "storage_ratio": plan.storage_ratio,
        "num_params": plan.num_params,
        "mean_relative_error": float(np.mean(errors)),
        "max_relative_error": float(np.max(errors)),
        "loss": plan.loss,
        "padded": int(padded),
    }
