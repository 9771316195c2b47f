"""`hydraopt demo`: the whole method on an embedded synthetic collection, offline."""

from __future__ import annotations

import time

import numpy as np

from .._merge import merge_adapters
from .._plan import SharingPlan
from .._solution import collection_storage, task_relative_errors
from .._synthetic import synthetic_collection

__all__ = ["demo", "demo_plans", "run_demo"]


def demo_plans(num_tasks: int, rank: int, attrs) -> list[tuple[str, SharingPlan, str]]:
    """`(label, plan, solver)` rows of the demo table, from "all kept" to "one adapter": the
    named plans, per-task truncation (groups of one at a lower rank: the baseline every plan
    is judged against at its storage) and shared A with a lower rank per task inside it."""
    grouped = SharingPlan.from_attributes(attrs, share_a_by="language", share_b_by="application")
    return [
        ("separate", SharingPlan.separate(num_tasks, rank), "exact"),
        ("shared-a, k=2r", SharingPlan.shared_a(num_tasks, 2 * rank), "exact"),
        ("shared-b", SharingPlan.shared_b(num_tasks, rank), "exact"),
        ("truncate to r/2", SharingPlan.separate(num_tasks, rank // 2), "exact"),
        ("shared-a", SharingPlan.shared_a(num_tasks, rank), "exact"),
        ("truncate to r/4", SharingPlan.separate(num_tasks, rank // 4), "exact"),
        ("A per lang, B per app", grouped.with_rank(rank), "als"),
        (
            "shared-a, j=r/4",
            SharingPlan.shared_a(num_tasks, rank).with_task_rank(rank // 4),
            "exact",
        ),
        ("full-merge, k=2r", SharingPlan.full_merge(num_tasks, 2 * rank), "exact"),
        ("full-merge", SharingPlan.full_merge(num_tasks, rank), "exact"),
    ]


def run_demo(console=None, *, num_layers: int = 2) -> list[dict]:
    """Merge a synthetic 5 x 8 collection with every plan of `demo_plans` and print a table.

    Returns the table rows as dicts (plan, solver, storage_ratio, mean/worst relative
    error, seconds).
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    rank = 16
    collection, names, attrs = synthetic_collection(num_layers=num_layers, rank=rank)
    shapes = {m: (a.shape[2], b.shape[1]) for m, (a, b) in collection.items()}
    console.print(
        f"[bold]hydraopt demo[/bold]: {len(names)} synthetic LoRA adapters (5 applications x "
        f"8 languages), rank {rank}, {len(collection)} modules "
        f"({', '.join(sorted({f'{o}x{i}' for i, o in shapes.values()}))}); A factors near one "
        "shared init, B factors with application and language structure."
    )
    table = Table(title="storage vs reconstruction error (relative, of each task's whole update)")
    for col in ("plan", "solver", "storage", "mean error", "worst error", "seconds"):
        table.add_column(col, justify="left" if col in ("plan", "solver") else "right")
    rows = []
    for label, plan, solver in demo_plans(len(names), rank, attrs):
        start = time.perf_counter()
        solutions = merge_adapters(collection, plan, solver)
        errors = task_relative_errors(solutions, len(names))
        seconds = time.perf_counter() - start
        params, original = collection_storage(solutions)
        row = dict(
            plan=label,
            solver=solver,
            storage_ratio=params / original,
            mean_error=float(np.mean(errors)),
            worst_error=float(np.max(errors)),
            seconds=seconds,
        )
        rows.append(row)
        table.add_row(
            label,
            solver,
            f"{row['storage_ratio']:.3f}",
            f"{row['mean_error']:.4f}",
            f"{row['worst_error']:.4f}",
            f"{seconds:.2f}",
        )
    console.print(table)
    console.print(
        "storage = stored parameters / original adapters' parameters; error = "
        "||dW_t - dW_hat_t||_F / ||dW_t||_F. Seconds include compilation (one per shape)."
    )
    return rows


def demo():
    """Run the embedded end-to-end example (offline)."""
    run_demo()
