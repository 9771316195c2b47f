"""`hydraopt sweep`: storage vs error of the named plans, per-task truncation, the planner and
the classic merges (`hydraopt_jax.planner.storage_sweep`), drawn to a PNG.

```
hydraopt sweep DIR... --plot FILE.png [--rank-multipliers 0.5,1,2] [--budgets 0.2,0.3,0.5]
               [--baselines linear,ties,...] [--names ...] [--attributes REGEX] [--json]
```
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from .._plan import NAMED_PLANS, original_params
from ._common import CliError, floats, load, stdout_console, write_file_atomically
from ._outputs import check_output_file
from .plan import attributes_from_flags

__all__ = ["sweep"]

DEFAULT_SWEEP_MULTIPLIERS = "0.5,1,2"
DEFAULT_SWEEP_BUDGETS = "0.1,0.2,0.3,0.5"
DEFAULT_SWEEP_BASELINES = "linear,ties,dare_linear,svd,knots"


def draw(rows: list[dict], num_tasks: int, num_modules: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family in (*(n.replace("_", "-") for n in NAMED_PLANS), "planner"):
        pts = sorted(
            (r["storage_ratio"], r["mean_relative_error"]) for r in rows if r["family"] == family
        )
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="*" if family == "planner" else "o", label=family)
    pts = sorted((r["storage_ratio"], r["mean_relative_error"]) for r in rows
                 if r["family"] == "truncation")  # fmt: skip
    if pts:
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, "--", marker="s", color="grey", label="per-task truncation")
    for r in rows:
        if r["family"] == "baseline":
            ax.scatter([r["storage_ratio"]], [r["mean_relative_error"]], marker="x")
            ax.annotate(r["method"], (r["storage_ratio"], r["mean_relative_error"]), fontsize=7)
    ax.set_xlabel("storage ratio (stored / original parameters)")
    ax.set_ylabel("mean relative reconstruction error")
    ax.set_title(f"{num_tasks} adapters, {num_modules} modules")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def sweep(
    dirs: Annotated[
        list[Path],
        typer.Argument(help="PEFT adapter directories, one per task.", show_default=False),
    ],
    plot: Annotated[Path, typer.Option("--plot", help="PNG chart to write.", show_default=False)],
    names: Annotated[str | None, typer.Option(help="Comma-separated task names.")] = None,
    rank_multipliers: Annotated[
        str,
        typer.Option(
            help="Ranks of the named plans, as multiples of the LoRA rank (separate only at "
            "1 and above: below r it is the per-task truncation rows, drawn at every "
            "candidate rank)."
        ),
    ] = DEFAULT_SWEEP_MULTIPLIERS,
    budgets: Annotated[
        str, typer.Option(help="Storage budgets of the planner points.")
    ] = DEFAULT_SWEEP_BUDGETS,
    baselines: Annotated[
        str, typer.Option(help="Comma-separated baselines (hydraopt_jax.baselines), or none.")
    ] = DEFAULT_SWEEP_BASELINES,
    attributes: Annotated[
        str | None, typer.Option(help="Regex with named groups parsing task attributes.")
    ] = None,
    no_attributes: Annotated[bool, typer.Option("--no-attributes")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
):
    """Storage vs error: named plans at a few ranks, per-task truncation, planner points,
    classic merges."""
    from ..baselines import BASELINES
    from ..planner import storage_sweep

    start = time.perf_counter()
    check_output_file(plot, "--plot", (".png",))
    multipliers = floats(rank_multipliers, "--rank-multipliers")
    budget_list = floats(budgets, "--budgets")
    base_list = (
        []
        if baselines.strip().lower() in ("", "none")
        else [b.strip().replace("-", "_") for b in baselines.split(",") if b.strip()]
    )
    for b in base_list:
        if b not in BASELINES:
            raise CliError(
                "--baselines", f"unknown baseline {b!r}; expected {', '.join(BASELINES)}"
            )
    collection = load(dirs, names)
    attrs = attributes_from_flags(list(collection.names), attributes, no_attributes)
    rows = storage_sweep(
        collection, rank_multipliers=multipliers, budgets=budget_list, baselines=base_list,
        task_attributes=attrs,
    )  # fmt: skip
    write_file_atomically(
        plot, lambda p: draw(rows, collection.num_tasks, len(collection.modules), p)
    )
    result = {
        "rows": rows,
        "tasks": list(collection.names),
        "original_params": sum(
            original_params(i.ranks, i.d_in, i.d_out) for i in collection.modules.values()
        ),
        "plot": str(plot),
        "seconds": time.perf_counter() - start,
    }
    if json_out:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    from rich.table import Table

    table = Table(title=f"storage vs error ({plot})")
    for col in ("method", "storage", "mean rel. error", "worst task"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for r in sorted(rows, key=lambda r: r["storage_ratio"]):
        table.add_row(
            r["method"],
            f"{r['storage_ratio']:.3f}",
            f"{r['mean_relative_error']:.4g}",
            f"{r['max_relative_error']:.4g}",
        )
    stdout_console().print(table)
