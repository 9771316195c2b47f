"""`hydraopt merge`: adapters in, a bundle out (`hydraopt_jax.merge_collection`)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from ._common import CliError, choice, claim_output, load, progress_bar, stderr_console

__all__ = ["merge"]

SOLVERS = ("exact", "als", "adam", "lbfgs")
WEIGHTINGS = ("relative", "uniform")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
PLAN_NAMES = ("shared-a", "shared-b", "full-merge", "separate")


def resolve_plan(plan: str | None, config: Path | None, collection, rank: int | None):
    """`(plan, source)`: a named plan or the plans of a plan file, and where it came from."""
    from ..planner import read_plan_file

    if plan is not None and config is not None:
        raise CliError("--config", "give either --plan or --config, not both")
    if config is None and plan is not None and plan not in PLAN_NAMES:
        if plan.endswith((".yaml", ".yml")) or Path(plan).exists():
            config = Path(plan)
        else:
            raise CliError(
                "--plan", f"unknown plan {plan!r}; expected {', '.join(PLAN_NAMES)} or a FILE.yaml"
            )
    if config is not None:
        plans = read_plan_file(config, collection.names, list(collection.modules), rank=rank)
        return plans, str(config)
    name = plan or "shared-a"
    from .._plan import SharingPlan

    return SharingPlan.named(name, collection.num_tasks, rank), name.replace("-", "_")


def merge(
    dirs: Annotated[
        list[Path],
        typer.Argument(help="PEFT adapter directories, one per task.", show_default=False),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Bundle directory to write.", show_default=False)
    ],
    plan: Annotated[
        str | None,
        typer.Option(help="shared-a (default), shared-b, full-merge, separate, or FILE.yaml."),
    ] = None,
    rank: Annotated[
        int | None, typer.Option(min=1, help="Shared rank k (default: each module's largest rank).")
    ] = None,
    solver: Annotated[str, typer.Option(help="exact, als, adam or lbfgs.")] = "exact",
    steps: Annotated[
        int | None, typer.Option(min=1, help="Max steps of an iterative solver.")
    ] = None,
    names: Annotated[
        str | None, typer.Option(help="Comma-separated task names (default: directory names).")
    ] = None,
    weighting: Annotated[
        str, typer.Option(help="relative (1/||dW_t||^2) or uniform.")
    ] = "relative",
    config: Annotated[
        Path | None, typer.Option(help="YAML plan grouping tasks by name patterns.")
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="Stored dtype: float32, bfloat16, float16.")
    ] = "float32",
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON summary object.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an interrupted iterative run from OUT.hydraopt-ckpt/ (same inputs "
            "and flags).",
        ),
    ] = False,
    checkpoint_every: Annotated[
        int,
        typer.Option(
            min=0,
            help="Iterative solvers: checkpoint every N steps for --resume (0: never).",
        ),
    ] = 50,
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="Memory budget per solve, e.g. 8GB (default: 80% of available memory); "
            "larger shape groups are solved in module sub-batches.",
        ),
    ] = None,
):
    """Merge adapters into a bundle (OUT/hydraopt.json + OUT/factors.safetensors)."""
    from .. import SolverError, merge_collection
    from .._stream import PlanError
    from ..io import check_bundle_output
    from ..io.memory import parse_size

    choice(solver, SOLVERS, "--solver", "solver")
    choice(weighting, WEIGHTINGS, "--weighting", "weighting")
    choice(dtype, DTYPE_NAMES, "--dtype", "dtype")
    memory_limit = None
    if max_memory is not None:
        try:
            memory_limit = parse_size(max_memory)
        except ValueError as err:
            raise CliError("--max-memory", str(err)) from None
    check_bundle_output(out)
    claim_output(out)
    start = time.perf_counter()
    collection = load(dirs, names)
    sharing, source = resolve_plan(plan, config, collection, rank)
    console = stderr_console()
    with progress_bar(console) as bar:
        task = bar.add_task("merging", total=len(collection.shape_groups()))

        def progress(description, done, total):
            bar.update(task, description=description, completed=done)

        try:
            bundle = merge_collection(
                collection, sharing, solver, out=out, weights=weighting, max_steps=steps,
                dtype=dtype, max_memory=memory_limit, resume=resume,
                checkpoint_every=checkpoint_every, plan_source=source, progress=progress,
            )  # fmt: skip
        except PlanError as err:
            raise CliError(
                source,
                str(err).replace("solver='als', 'adam' or 'lbfgs'", "--solver als, adam or lbfgs"),
            ) from None
        except SolverError as err:
            # inputs were checked finite (and far from float32 overflow) when read: this is
            # the solver diverging
            hint = (
                "check the adapters' scales" if solver == "exact" else "try --solver exact or als"
            )
            raise CliError(f"--solver {solver}", f"{err}; {hint}") from None
    summary = {
        "storage_ratio": bundle.storage_ratio,
        "num_params": bundle.num_params,
        "original_params": bundle.original_params,
        "tasks": bundle.task_relative_errors(),
        "plan": bundle.meta["plan"],
        "solver": solver,
        "seconds": time.perf_counter() - start,
        "bytes": bundle.num_params * {"float32": 4, "bfloat16": 2, "float16": 2}[dtype],
        "dtype": dtype,
        "out": str(out),
    }
    if json_out:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        _print_summary(summary, len(bundle.modules))


def _print_summary(summary: dict, num_modules: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(
        title=(
            f"{summary['out']}: {num_modules} modules, "
            f"plan {summary['plan']['name']}, solver {summary['solver']}"
        )
    )
    table.add_column("task", no_wrap=True)
    table.add_column("relative error", justify="right")
    for task, err in summary["tasks"].items():
        table.add_row(task, f"{err:.4g}")
    console.print(table)
    console.print(
        f"storage {summary['num_params']:,} / {summary['original_params']:,} params "
        f"= {summary['storage_ratio']:.3f} ({summary['bytes']:,} bytes as {summary['dtype']}) "
        f"in {summary['seconds']:.2f} s"
    )
