"""What every command shares: the one-line error, output claims, loading, rich output."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "CliError",
    "calibration",
    "choice",
    "claim_output",
    "claimed",
    "floats",
    "ints",
    "load",
    "module_table",
    "progress_bar",
    "stderr_console",
    "stdout_console",
    "write_file_atomically",
]


class CliError(Exception):
    """A bad input: `where` (a file or a flag) and the cause; printed as one line."""

    def __init__(self, where, cause: str):
        self.where, self.cause = str(where), " ".join(str(cause).split())
        super().__init__(f"{self.where}: {self.cause}")


_CLAIMED: list[Path] = []  # directories the running command may create for its outputs


def claimed() -> list[Path]:
    """The directories claimed so far by the running command (see `claim_output`)."""
    return _CLAIMED


def claim_output(path: Path) -> None:
    """Check, before any work, that the output `path` can be written (else one-line error,
    exit 2); if the command then fails, `main` removes the parent directories created for it
    that are still empty."""
    from ..io._files import check_output_path

    _CLAIMED.extend(check_output_path(path))


def load(dirs: Sequence[Path], names: str | None):
    """The `AdapterCollection` of the command's adapter directories (and `--names`)."""
    from ..io import load_collection

    name_list = None
    if names is not None:
        name_list = [n.strip() for n in names.split(",")]
        if len(name_list) != len(dirs):
            raise CliError("--names", f"{len(name_list)} names for {len(dirs)} adapter directories")
    return load_collection(dirs, name_list)


def calibration(path: Path | None, collection, parts=("activation_covs", "module_weights")):
    """`--calibration FILE`: the statistics `parts` the command uses, checked against the
    collection (`None` without the flag); a bad file is an `AdapterError` naming it."""
    if path is None:
        return None
    from ..io.calibration import load_calibration

    return load_calibration(path, collection, parts)


def floats(text: str, flag: str) -> list[float]:
    """Comma-separated positive finite numbers, or `CliError(flag)`."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliError(flag, f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 < v < math.inf for v in values):
        raise CliError(flag, f"expected comma-separated positive numbers, got {text!r}")
    return values


def ints(text: str, flag: str) -> list[int]:
    """Comma-separated integers >= 1, or `CliError(flag)`."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliError(flag, f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise CliError(flag, f"expected comma-separated integers >= 1, got {text!r}")
    return values


def choice(value: str, allowed: Sequence[str], flag: str, what: str) -> str:
    if value not in allowed:
        raise CliError(flag, f"unknown {what} {value!r}; expected {', '.join(allowed)}")
    return value


def write_file_atomically(path: Path, write) -> None:
    """`io._files.write_file_atomically`, imported on use (the command starts fast)."""
    from ..io._files import write_file_atomically as write_atomically

    write_atomically(path, write)


# --------------------------------------------------------------------------- output
def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def stdout_console():
    from rich.console import Console

    return Console()


def progress_bar(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def module_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], console):
    """Print a table whose first column holds module names: no cell is ever folded or cut.

    Every column takes the width its longest entry needs; when the table is wider than the
    console (an 80-column terminal, a pipe), the console widens for it instead of splitting
    names over two lines (`model.layers.0.mlp.d` / `own_proj`).
    """
    from rich.console import Console
    from rich.table import Table

    widths = [max([len(col)] + [len(row[i]) for row in rows]) for i, col in enumerate(columns)]
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(
            col,
            justify="left" if i == 0 or col in ("plan", "kind") else "right",
            no_wrap=True,
            min_width=widths[i],
        )
    for row in rows:
        table.add_row(*row)
    needed = sum(widths) + 3 * len(widths) + 1  # cell padding and borders
    if needed > console.width:
        console = Console(file=console.file, width=needed, force_terminal=console.is_terminal)
    console.print(table)
