"""`hydraopt inspect`: how similar the tasks' factors are, and what each named plan stores."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from ._common import load, module_table, progress_bar, stderr_console, stdout_console

__all__ = ["inspect", "module_overlaps"]


def module_overlaps(a_all, b_all, ranks, present) -> tuple[float | None, float | None]:
    """Mean pairwise subspace overlap of the tasks' A row spaces and B column spaces."""
    from .._similarity import basis_overlap, orthonormal_basis

    # each task's bases once, then every pair (`subspace_overlap` of each pair, T times fewer SVDs)
    qa = {t: orthonormal_basis(a_all[t, : ranks[t]].T) for t in present}
    qb = {t: orthonormal_basis(b_all[t][:, : ranks[t]]) for t in present}
    a_ov, b_ov = [], []
    for i, t in enumerate(present):
        for u in present[i + 1 :]:
            a_ov.append(basis_overlap(qa[t], qa[u]))
            b_ov.append(basis_overlap(qb[t], qb[u]))

    def mean(values):
        return float(np.nanmean(values)) if values and not np.all(np.isnan(values)) else None

    return mean(a_ov), mean(b_ov)


def inspect(
    dirs: Annotated[
        list[Path],
        typer.Argument(help="PEFT adapter directories, one per task.", show_default=False),
    ],
    rank: Annotated[
        int | None,
        typer.Option(
            min=1, help="Shared rank k for the storage table (default: each module's largest rank)."
        ),
    ] = None,
    names: Annotated[str | None, typer.Option(help="Comma-separated task names.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
):
    """Per module: mean pairwise subspace overlap of A's and of B's; storage of each plan."""
    from .._plan import NAMED_PLANS, SharingPlan, original_params

    collection = load(dirs, names)
    rows = []
    storage = {name: [0, 0] for name in NAMED_PLANS}
    groups = collection.shape_groups()
    with progress_bar(stderr_console()) as progress:
        bar = progress.add_task("inspecting", total=len(groups))
        for module_names in groups.values():
            group = collection.load_group(module_names)
            for name in module_names:
                a_all, b_all, ranks = group[name]
                info = collection.modules[name]
                present = info.task_ids
                a_overlap, b_overlap = module_overlaps(a_all, b_all, ranks, present)
                k = rank or max(ranks)
                original = original_params(ranks, info.d_in, info.d_out)
                for plan_name in storage:
                    plan = SharingPlan.named(plan_name, len(present), k)
                    storage[plan_name][0] += plan.num_params(info.d_in, info.d_out)
                    storage[plan_name][1] += original
                rows.append(
                    {
                        "module": name,
                        "kind": info.kind,
                        "d_in": info.d_in,
                        "d_out": info.d_out,
                        "tasks": len(present),
                        "ranks": [ranks[t] for t in present],
                        "a_overlap": a_overlap,
                        "b_overlap": b_overlap,
                    }
                )
            progress.advance(bar)
    plans = {
        name: {"num_params": p, "original_params": o, "storage_ratio": p / o if o else None}
        for name, (p, o) in storage.items()
    }
    if json_out:
        sys.stdout.write(
            json.dumps({"tasks": list(collection.names), "modules": rows, "plans": plans}) + "\n"
        )
        return
    fmt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"  # noqa: E731
    out = stdout_console()
    module_table(
        f"{collection.num_tasks} tasks: mean pairwise subspace overlap (1 = same subspace)",
        ("module", "kind", "d_in", "d_out", "tasks", "A overlap", "B overlap"),
        [
            (
                r["module"],
                r["kind"],
                str(r["d_in"]),
                str(r["d_out"]),
                str(r["tasks"]),
                fmt(r["a_overlap"]),
                fmt(r["b_overlap"]),
            )
            for r in rows
        ],  # fmt: skip
        out,
    )
    module_table(
        f"storage of each named plan (k = {rank or 'largest rank per module'})",
        ("plan", "params", "original", "ratio"),
        [
            (
                name.replace("_", "-"),
                f"{p['num_params']:,}",
                f"{p['original_params']:,}",
                fmt(p["storage_ratio"]),
            )
            for name, p in plans.items()
        ],  # fmt: skip
        out,
    )
