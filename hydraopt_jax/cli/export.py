"""`hydraopt export`: one standard PEFT adapter per task (`hydraopt_jax.io.export_peft`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ._common import CliError, choice, claim_output
from .merge import DTYPE_NAMES

__all__ = ["export"]


def export(
    bundle_dir: Annotated[
        Path,
        typer.Argument(
            metavar="OUT", help="A bundle written by `hydraopt merge`.", show_default=False
        ),
    ],
    to: Annotated[
        Path,
        typer.Option(
            "--to", help="Directory to write, one PEFT adapter per task.", show_default=False
        ),
    ],
    task: Annotated[
        str | None, typer.Option(help="Export only this task (comma-separated for several).")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="float32, bfloat16 or float16 (default: the bundle's).")
    ] = None,
):
    """Write standard PEFT adapters (DIR/<task>/) from a bundle."""
    from ..io import export_peft, load_bundle

    if dtype is not None:
        choice(dtype, DTYPE_NAMES, "--dtype", "dtype")
    bundle = load_bundle(bundle_dir)
    claim_output(to)
    tasks = None if task is None else [t.strip() for t in task.split(",")]
    for name in tasks or ():
        if name not in bundle.tasks:
            raise CliError(
                "--task", f"unknown task {name!r}; {bundle_dir} has {', '.join(bundle.tasks)}"
            )
    for path in export_peft(bundle, to, tasks, dtype=dtype):
        sys.stdout.write(f"{path}\n")
