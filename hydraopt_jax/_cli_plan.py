"""`hydraopt plan` (per-module plans under a storage budget) and `hydraopt sweep` (storage
vs error of every named plan, the planner and the classic merges).

```
hydraopt plan DIR... --budget 0.3 --out PLAN.yaml [--names a,b,...] [--ranks 8,16]
              [--rank-multipliers 0.5,1,1.5,2,3,4] [--attributes REGEX] [--no-attributes]
              [--weighting relative|uniform] [--module-weighting equal|size] [--json]
hydraopt merge DIR... --out OUT --config PLAN.yaml         # uses the plan
hydraopt sweep DIR... --plot FILE.png [--rank-multipliers 0.5,1,2] [--budgets 0.2,0.3,0.5]
               [--baselines linear,ties,...] [--names ...] [--attributes REGEX] [--json]
```

Task attributes (which tasks may share a factor besides "all" and "each") come from the task
names: `--attributes '(?P<app>[a-z]+)_(?P<lang>[a-z]+)'` (named groups, full match), or by
default from names that all split on `_` into the same number of parts (`part0`, `part1`).

Errors print one line `hydraopt: WHERE: cause`, exit with status 2 and write nothing;
outputs (the plan file, the plot) are written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from ._planner import DEFAULT_RANK_MULTIPLIERS, MODULE_WEIGHTINGS

__all__ = ["plan", "sweep"]

DEFAULT_SWEEP_MULTIPLIERS = "0.5,1,2"
DEFAULT_SWEEP_BUDGETS = "0.1,0.2,0.3,0.5"
DEFAULT_SWEEP_BASELINES = "linear,ties,dare_linear,svd,knots"
NAMED_KEYS = {
    "shared-a": ("all", "task"),
    "shared-b": ("task", "all"),
    "full-merge": ("all", "all"),
    "separate": ("task", "task"),
}


def _cli_error(where, cause: str):
    from .cli import CliError

    return CliError(where, cause)


def _floats(text: str, flag: str, *, positive: bool = True) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise _cli_error(flag, f"expected comma-separated numbers, got {text!r}") from None
    if not values or (positive and any(not 0 < v < math.inf for v in values)):
        raise _cli_error(flag, f"expected comma-separated positive numbers, got {text!r}")
    return values


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise _cli_error(flag, f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise _cli_error(flag, f"expected comma-separated integers >= 1, got {text!r}")
    return values


def _attributes(names: Sequence[str], pattern: str | None, disabled: bool):
    from ._planner import task_attributes_from_names

    if disabled:
        return None
    try:
        return task_attributes_from_names(names, pattern)
    except (ValueError, Exception) as err:  # re.error is an Exception
        raise _cli_error("--attributes", str(err)) from None


def _atomic_write(path: Path, write) -> None:
    """`write(tmp_path)`, then rename onto `path`; nothing is left behind on failure."""
    from .io._files import write_error

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent
        )
        os.close(fd)
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise write_error(path, err) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


PLAN_FILE_MARK = "written by `hydraopt plan`"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _replaceable(path: Path, suffix: str) -> bool:
    """An existing output file we may replace: a plan file `hydraopt plan` wrote, a PNG."""
    try:
        with open(path, "rb") as f:
            head = f.read(200)
    except OSError:
        return False
    if suffix == ".png":
        return head.startswith(_PNG_MAGIC)
    return PLAN_FILE_MARK.encode() in head


def _check_output(path: Path, flag: str, suffixes: tuple[str, ...]) -> None:
    """Refuse, before any work, an output file name with the wrong suffix, an existing file
    that is not of the kind written here (a plan file `hydraopt plan` wrote; any PNG image),
    or a location that cannot be written."""
    from .cli import claim_output

    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise _cli_error(flag, f"{path}: expected a {' or '.join(suffixes)} file name")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise _cli_error(path, f"exists and is not a file; refusing to overwrite it ({flag})")
        if not _replaceable(path, suffix):
            what = "a PNG image" if suffix == ".png" else "a plan file written by hydraopt plan"
            raise _cli_error(path, f"exists and is not {what}; refusing to overwrite it ({flag})")
    claim_output(path)


def _options(collection, names, attrs, multipliers, ranks, weighting, module_weighting="equal"):
    """`(groupings, {module: (stats, options)}, {module: (A, B, ranks)} loader)` per group."""
    from ._planner import collection_options

    return collection_options(
        collection,
        task_names=names,
        task_attributes=attrs,
        rank_multipliers=multipliers,
        ranks=ranks,
        weights=weighting,
        module_weights=module_weighting,
    )


# --------------------------------------------------------------------------- plan


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
        str, typer.Option(help="relative (each task counts equally) or uniform.")
    ] = "relative",
    module_weighting: Annotated[
        str,
        typer.Option(
            help="equal (every module's relative loss counts the same) or size (in proportion "
            "to the module's d_in + d_out)."
        ),
    ] = "equal",
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON summary object.")
    ] = False,
):
    """Choose per module the shared side, task groups and rank under a storage budget."""
    from .cli import WEIGHTINGS, _load, plans_from_config

    start = time.perf_counter()
    if not budget > 0 or not np.isfinite(budget):
        raise _cli_error(
            "--budget", f"must be a positive fraction of the original storage, got {budget}"
        )
    if weighting not in WEIGHTINGS:
        raise _cli_error(
            "--weighting", f"unknown weighting {weighting!r}; expected {', '.join(WEIGHTINGS)}"
        )
    if module_weighting not in MODULE_WEIGHTINGS:
        raise _cli_error(
            "--module-weighting",
            f"unknown module weighting {module_weighting!r}; expected "
            f"{', '.join(MODULE_WEIGHTINGS)}",
        )
    _check_output(out, "--out", (".yaml", ".yml"))
    multipliers = _floats(rank_multipliers, "--rank-multipliers")
    extra = _ints(ranks, "--ranks") if ranks is not None else None
    collection = _load(dirs, names)
    task_names = list(collection.names)
    attrs = _attributes(task_names, attributes, no_attributes)
    from ._planner import choose

    groupings, options = _options(
        collection, task_names, attrs, multipliers, extra, weighting, module_weighting
    )
    try:
        chosen = choose(groupings, options, budget)
    except ValueError as err:
        raise _cli_error("--budget", str(err)) from None
    text = chosen.to_yaml(
        task_names,
        header=[
            f"{PLAN_FILE_MARK}; use with `hydraopt merge DIR... --config THIS_FILE`",
            f"tasks: {', '.join(task_names)}",
        ],
    )
    # the file must read back as exactly the chosen plans
    import yaml

    back = plans_from_config(yaml.safe_load(text), task_names, list(collection.modules), out)
    for module, module_plan in chosen.plans.items():
        ids = collection.modules[module].task_ids
        if back[module].restrict(ids) != module_plan.restrict(ids):
            raise RuntimeError(f"plan file does not round-trip for {module}")
    _atomic_write(out, lambda p: p.write_text(text, encoding="utf-8"))
    errors = chosen.task_relative_errors()
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
        "method": chosen.method,
        "modules": chosen.summary(),
        "out": str(out),
        "seconds": time.perf_counter() - start,
    }
    if json_out:
        sys.stdout.write(json.dumps(summary) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{out}: per-module plans under budget {budget:g}")
    for col in ("module", "plan", "k", "params", "storage", "RMS rel. error"):
        table.add_column(col, justify="left" if col in ("module", "plan") else "right")
    for module, row in summary["modules"].items():
        table.add_row(
            module,
            row["plan"],
            str(row["rank"]),
            f"{row['num_params']:,}",
            f"{row['storage_ratio']:.3f}",
            f"{row['rms_relative_error']:.4g}",
        )
    console.print(table)
    console.print(
        f"storage ratio {summary['storage_ratio']:.4f} ({summary['num_params']:,} / "
        f"{summary['original_params']:,} params); predicted mean relative error "
        f"{summary['mean_relative_error']:.4g} (worst task {summary['max_relative_error']:.4g})"
    )


# --------------------------------------------------------------------------- sweep


def _aggregate(per_module: dict, sq_norms: dict, num_tasks: int) -> np.ndarray:
    """Per-task relative error over modules, as `hydraopt merge` reports it."""
    num, den = np.zeros(num_tasks), np.zeros(num_tasks)
    for module, (task_ids, errs) in per_module.items():
        for t, e, sq in zip(task_ids, errs, sq_norms[module], strict=True):
            num[t] += float(e) ** 2 * sq
            den[t] += sq
    return np.sqrt(np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0))


def sweep(
    dirs: Annotated[
        list[Path],
        typer.Argument(help="PEFT adapter directories, one per task.", show_default=False),
    ],
    plot: Annotated[Path, typer.Option("--plot", help="PNG chart to write.", show_default=False)],
    names: Annotated[str | None, typer.Option(help="Comma-separated task names.")] = None,
    rank_multipliers: Annotated[
        str, typer.Option(help="Ranks of the named plans, as multiples of the LoRA rank.")
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
    """Storage vs error: named plans at a few ranks, planner points, classic merges."""
    from ._planner import choose, collection_options
    from .baselines import BASELINES, run_baseline
    from .cli import _load

    start = time.perf_counter()
    _check_output(plot, "--plot", (".png",))
    multipliers = _floats(rank_multipliers, "--rank-multipliers")
    budget_list = _floats(budgets, "--budgets")
    base_list = (
        []
        if baselines.strip().lower() in ("", "none")
        else [b.strip().replace("-", "_") for b in baselines.split(",") if b.strip()]
    )
    for b in base_list:
        if b not in BASELINES:
            raise _cli_error(
                "--baselines", f"unknown baseline {b!r}; expected {', '.join(BASELINES)}"
            )
    collection = _load(dirs, names)
    task_names = list(collection.names)
    num_tasks = len(task_names)
    attrs = _attributes(task_names, attributes, no_attributes)
    all_multipliers = sorted(set(multipliers) | set(DEFAULT_RANK_MULTIPLIERS))

    groupings, options = None, {}
    base_errors: dict[str, dict] = {b: {} for b in base_list}
    base_params: dict[str, int] = dict.fromkeys(base_list, 0)
    for _, group in collection.iter_groups():
        g, opts = collection_options(
            group,
            task_names=task_names,
            task_attributes=attrs,
            rank_multipliers=all_multipliers,
        )
        groupings = g
        options.update(opts)
        for module, (a, b, ranks) in group.items():
            present = [t for t, k in enumerate(ranks) if k > 0]
            if not present:
                continue
            for name in base_list:
                sol = run_baseline(
                    name, a[present], b[present], task_ranks=[ranks[t] for t in present]
                )
                base_errors[name][module] = (present, np.asarray(sol.relative_error))
                base_params[name] += int(sol.num_params)
    sq_norms = {m: st.sq_norms for m, (st, _) in options.items()}
    original = sum(st.original_params for st, _ in options.values())
    rows = []

    def add(method, family, params, errors):
        rows.append(
            {
                "method": method,
                "family": family,
                "storage_ratio": params / original,
                "num_params": int(params),
                "mean_relative_error": float(np.mean(errors)),
                "max_relative_error": float(np.max(errors)),
            }
        )

    for plan_name, key in NAMED_KEYS.items():
        for m in multipliers:
            label = f"{m:g}r"
            picked = {}
            for module, (st, opts) in options.items():
                hit = [o for o in opts if (o.a_by, o.b_by, o.rank_label) == (*key, label)]
                if hit:
                    picked[module] = (st.present, hit[0])
            if len(picked) != len(options):
                continue
            params = sum(o.num_params for _, o in picked.values())
            errors = _aggregate(
                {mod: (p, o.relative_error) for mod, (p, o) in picked.items()}, sq_norms, num_tasks
            )
            add(f"hydraopt:{plan_name} k={label}", plan_name, params, errors)
    for budget in budget_list:
        try:
            chosen = choose(groupings, options, budget)
        except ValueError:
            continue
        add(
            f"planner budget={budget:g}",
            "planner",
            chosen.num_params,
            chosen.task_relative_errors(),
        )
    for name in base_list:
        add(name, "baseline", base_params[name], _aggregate(base_errors[name], sq_norms, num_tasks))

    def draw(path: Path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for family in (*NAMED_KEYS, "planner"):
            pts = sorted(
                (r["storage_ratio"], r["mean_relative_error"])
                for r in rows
                if r["family"] == family
            )
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="*" if family == "planner" else "o", label=family)
        for r in rows:
            if r["family"] == "baseline":
                ax.scatter([r["storage_ratio"]], [r["mean_relative_error"]], marker="x")
                ax.annotate(r["method"], (r["storage_ratio"], r["mean_relative_error"]), fontsize=7)
        ax.set_xlabel("storage ratio (stored / original parameters)")
        ax.set_ylabel("mean relative reconstruction error")
        ax.set_title(f"{num_tasks} adapters, {len(options)} modules")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=120)
        plt.close(fig)

    _atomic_write(plot, draw)
    result = {
        "rows": rows,
        "tasks": task_names,
        "original_params": original,
        "plot": str(plot),
        "seconds": time.perf_counter() - start,
    }
    if json_out:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"storage vs error ({plot})")
    for col in ("method", "storage", "mean rel. error", "worst task"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in sorted(rows, key=lambda r: r["storage_ratio"]):
        table.add_row(
            r["method"],
            f"{r['storage_ratio']:.3f}",
            f"{r['mean_relative_error']:.4g}",
            f"{r['max_relative_error']:.4g}",
        )
    Console().print(table)
