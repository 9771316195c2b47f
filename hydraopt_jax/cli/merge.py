"""`hydraopt merge`: adapters in, a bundle out (`hydraopt_jax.merge_collection`)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from ._common import (
    CliError,
    calibration,
    choice,
    claim_output,
    load,
    progress_bar,
    stderr_console,
)

__all__ = ["merge"]

SOLVERS = ("exact", "als", "adam", "lbfgs")
WEIGHTINGS = ("relative", "uniform", "adapter")
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
        str,
        typer.Option(
            help="relative (1/||dW_t||^2 per module), uniform, or adapter (relative to each "
            "task's whole adapter: 1/sum over modules of ||dW_t||^2)."
        ),
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
    distributed: Annotated[
        bool,
        typer.Option(
            "--distributed",
            help="Run as one process of a JAX multi-controller job, its cluster detected "
            "(SLURM, TPU, ...): each process solves its share of the modules.",
        ),
    ] = False,
    coordinator: Annotated[
        str | None,
        typer.Option(help="Multi-process run: the coordinator's HOST:PORT (process 0's)."),
    ] = None,
    num_processes: Annotated[
        int | None, typer.Option(min=1, help="Multi-process run: the number of processes.")
    ] = None,
    process_id: Annotated[
        int | None, typer.Option(min=0, help="Multi-process run: this process's index.")
    ] = None,
    calibration_file: Annotated[
        Path | None,
        typer.Option(
            "--calibration",
            help="Calibration file (hydraopt_jax.io.calibration): fit the error the layers' "
            "outputs see, weighted by its input covariances.",
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
    with _native_stdout_to_stderr(json_out):
        _join(distributed, coordinator, num_processes, process_id)
    collection = load(dirs, names)
    stats = calibration(calibration_file, collection, parts=("activation_covs",))
    if stats is not None and stats.activation_covs is None:
        raise CliError(
            calibration_file,
            "holds no input covariances (what merge uses; module weights are for hydraopt plan)",
        )
    sharing, source = resolve_plan(plan, config, collection, rank)
    console = stderr_console()
    with progress_bar(console) as bar:
        task = bar.add_task("merging", total=len(collection.shape_groups()))

        def progress(description, done, total):
            bar.update(task, description=description, completed=done)

        try:
            with _native_stdout_to_stderr(json_out):
                bundle = merge_collection(
                    collection, sharing, solver, out=out, weights=weighting, max_steps=steps,
                    dtype=dtype, max_memory=memory_limit, resume=resume,
                    checkpoint_every=checkpoint_every, plan_source=source, progress=progress,
                    activation_covs=None if stats is None else stats.activation_covs,
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
    import jax

    from ..io import tensor_bytes_read

    if jax.process_index() != 0:  # its modules are in the part process 0 assembled
        _print_part(bundle, json_out, time.perf_counter() - start)
        return
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
        "tensor_bytes_read": tensor_bytes_read(),
        "objective": bundle.meta.get("objective", "frobenius"),
    }
    if json_out:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        _print_summary(summary, len(bundle.modules))


@contextlib.contextmanager
def _native_stdout_to_stderr(active: bool):
    """Native code's stdout (file descriptor 1) sent to stderr for the block: gloo announces
    its connections there, and `--json` promises stdout holds one JSON object."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _join(distributed: bool, coordinator, num_processes, process_id) -> None:
    """Join a JAX multi-controller run (`jax.distributed.initialize`), if asked to."""
    explicit = (coordinator, num_processes, process_id)
    if not distributed and all(x is None for x in explicit):
        return
    if not distributed and any(x is None for x in explicit):
        raise CliError(
            "--coordinator",
            "a multi-process run needs --coordinator, --num-processes and "
            "--process-id together (or --distributed to detect the cluster)",
        )
    if process_id is not None and process_id >= num_processes:
        raise CliError("--process-id", f"{process_id} is not below --num-processes {num_processes}")
    import jax

    # processes of one CPU host meet through gloo (JAX's CPU collectives)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = (
        {}
        if distributed
        else dict(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )
    )
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as err:
        where = "--distributed" if distributed else "--coordinator"
        raise CliError(where, f"cannot join the multi-process run ({err})") from None


def _print_part(bundle, json_out: bool, seconds: float) -> None:
    import jax

    from ..io import tensor_bytes_read

    info = {
        "process": jax.process_index(),
        "of": jax.process_count(),
        "modules": list(bundle.modules),
        "tensor_bytes_read": tensor_bytes_read(),
        "seconds": seconds,
    }
    if json_out:
        sys.stdout.write(json.dumps(info) + "\n")
    else:
        print(f"process {info['process']} of {info['of']}: solved {len(info['modules'])} "
              f"modules ({info['tensor_bytes_read']:,} bytes of factors read)")  # fmt: skip


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
