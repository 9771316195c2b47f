"""The `hydraopt` command: merge PEFT adapters into a bundle, export, inspect, demo.

```
hydraopt merge DIR... --out OUT [--plan shared-a|shared-b|full-merge|separate|FILE.yaml]
               [--rank K] [--solver exact|als|adam|lbfgs] [--steps N] [--names a,b,...]
               [--weighting relative|uniform] [--config PLAN.yaml]
               [--dtype float32|bfloat16|float16] [--json] [--resume]
               [--checkpoint-every N] [--max-memory SIZE]
hydraopt export OUT --to DIR [--task NAME[,NAME...]] [--dtype ...]  # DIR/<task>/ per task
hydraopt inspect DIR... [--rank K] [--names ...] [--json]
hydraopt demo
```

Every bad input prints one line `hydraopt: PATH: cause` (or `hydraopt: --flag: cause`) to
stderr, exits with status 2 and leaves no output behind (outputs are written atomically).
docs/errors.md lists every refusal with its message.

**Long runs.** Iterative solvers (`als`, `adam`, `lbfgs`) run in chunks of
`--checkpoint-every N` steps (default 50) per unit of modules and save an Orbax checkpoint
in `OUT.hydraopt-ckpt/` after each chunk (see `hydraopt_jax.io.resume`); after a crash,
`--resume` continues from it and ends with bitwise the factors of an uninterrupted run with
the same flags (the uninterrupted run is chunked the same way: Adam's moments and L-BFGS's
memory restart at every chunk). A checkpoint made from other inputs, plan or flags is
refused, and so is a fresh run while a checkpoint exists. The checkpoint is removed once the
bundle is written.

**Memory guard.** Before a shape group is solved its memory is estimated
(`hydraopt_jax.io.memory`) and compared with `--max-memory` (default 80% of the memory
available); a group that does not fit is loaded and solved in module sub-batches that do,
and a module that does not fit alone is refused, naming it and the flag.

**`--json`** (merge) prints one JSON object: `storage_ratio`, `num_params`,
`original_params`, `tasks` (name -> relative error), `plan`, `solver`, `seconds` (plus
`bytes`, `dtype`, `out`). A task's relative error is over its whole update, all modules at
once: `sqrt(sum_m err_m^2 ||dW_m||^2) / sqrt(sum_m ||dW_m||^2)` (the relative Frobenius
error of the concatenated module updates; not a mean of per-module errors, so a module with
a tiny update cannot dominate).

**Plan files** (`--config PLAN.yaml`, or `--plan PLAN.yaml`), mergekit-style, grouping
tasks by name:

```yaml
rank: 16              # shared rank k (optional; --rank overrides it)
a_groups:             # tasks whose names match a group's pattern(s) share one A
  fr: "*_fr"          # fnmatch patterns on task names; a list of patterns also works
  de: ["*_de", "de_*"]
b_groups:
  qa: "qa_*"          # tasks matched by no group keep a task-specific factor
```

A plan may differ per module: a `modules:` section maps module-name patterns (fnmatch,
first match wins) to overrides of the keys above; an override that names a side replaces
that side's top-level setting, and `rank` there replaces the top-level rank:

```yaml
a: shared
modules:
  "*.mlp.*": {a: per-task, b: shared, rank: 8}
  "model.layers.0.self_attn.q_proj": {rank: 4}
```

`--rank` replaces the top-level `rank` only. Each side (`a` / `b`) takes exactly one of:

- `a: shared` (one factor for all tasks) or `a: per-task` (the default);
- `a_groups: {group: pattern | [patterns]}` as above; a task matched by two groups, or a
  pattern matching no task, is an error;
- `a_group: [0, 0, 1, 1]` (one id per task, in task order) or `a_group: {task: id}`
  (unlisted tasks keep their own factor); ids must be `0..K-1`, names must be tasks.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from .io._files import AdapterError, kill_point

__all__ = ["app", "main"]

app = typer.Typer(
    name="hydraopt",
    help="Shrink a collection of LoRA adapters with shared and task-specific factors.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    no_args_is_help=True,
)

NAMED = {
    "shared-a": "shared_a",
    "shared-b": "shared_b",
    "full-merge": "full_merge",
    "separate": "separate",
}
SOLVERS = ("exact", "als", "adam", "lbfgs")
DEFAULT_CHECKPOINT_EVERY = 50
WEIGHTINGS = ("relative", "uniform")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
_PLAN_KEYS = {"rank", "a", "b", "a_groups", "b_groups", "a_group", "b_group"}
_FILE_KEYS = _PLAN_KEYS | {"modules"}


class CliError(Exception):
    """A bad input: `where` (a file or a flag) and the cause; printed as one line."""

    def __init__(self, where, cause: str):
        self.where, self.cause = str(where), " ".join(str(cause).split())
        super().__init__(f"{self.where}: {self.cause}")


# --------------------------------------------------------------------------- plans


def _side_labels(spec: dict, side: str, tasks: Sequence[str], where) -> list | None:
    """Group labels of `tasks` on one side, or `None` for task-specific."""
    given = [k for k in (side, f"{side}_groups", f"{side}_group") if k in spec]
    if len(given) > 1:
        raise CliError(where, f"give only one of {', '.join(given)}")
    if not given:
        return None
    key = given[0]
    value = spec[key]
    if key == side:
        if value in ("shared", "all"):
            return [0] * len(tasks)
        if value in ("per-task", "per_task", "specific", "separate"):
            return None
        raise CliError(where, f"{key}: {value!r}; expected 'shared' or 'per-task'")
    if key == f"{side}_groups":
        if not isinstance(value, dict) or not value:
            raise CliError(where, f"{key} must map group names to name patterns, got {value!r}")
        labels: list = [("task", t) for t in range(len(tasks))]
        owner: dict[int, str] = {}
        for group, patterns in value.items():
            patterns = [patterns] if isinstance(patterns, str) else patterns
            if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                raise CliError(
                    where,
                    f"{key}.{group}: expected a pattern or a list of patterns, got {patterns!r}",
                )
            for pattern in patterns:
                hits = [t for t, name in enumerate(tasks) if fnmatch.fnmatchcase(name, pattern)]
                if not hits:
                    raise CliError(
                        where,
                        f"{key}.{group}: pattern {pattern!r} matches no task (tasks: "
                        f"{', '.join(tasks)})",
                    )
                for t in hits:
                    if owner.get(t, group) != group:
                        raise CliError(
                            where,
                            f"{key}: task {tasks[t]!r} matches both {owner[t]!r} and {group!r}",
                        )
                    owner[t] = group
                    labels[t] = ("group", group)
        return labels
    # explicit ids
    if isinstance(value, list):
        if len(value) != len(tasks):
            raise CliError(
                where, f"{key} has {len(value)} ids for {len(tasks)} tasks ({', '.join(tasks)})"
            )
        ids = dict(zip(tasks, value, strict=False))
    elif isinstance(value, dict):
        unknown = [n for n in value if n not in tasks]
        if unknown:
            raise CliError(where, f"{key}: unknown task {unknown[0]!r} (tasks: {', '.join(tasks)})")
        ids = dict(value)
    else:
        raise CliError(where, f"{key} must be a list of ids or a mapping task -> id, got {value!r}")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids.values()):
        raise CliError(where, f"{key}: group ids must be integers, got {list(ids.values())}")
    used = sorted(set(ids.values()))
    if used != list(range(len(used))):
        raise CliError(
            where, f"{key}: group ids {used} out of range; expected 0..K-1 with every id used"
        )
    return [("group", ids[n]) if n in ids else ("task", t) for t, n in enumerate(tasks)]


def plan_from_config(spec, tasks: Sequence[str], where="plan"):
    """A `SharingPlan` over `tasks` from a parsed plan file (see the module docstring)."""
    from ._plan import SharingPlan

    if not isinstance(spec, dict):
        raise CliError(where, f"a plan file must be a YAML mapping, got {type(spec).__name__}")
    unknown = sorted(set(spec) - _PLAN_KEYS)
    if unknown:
        raise CliError(
            where, f"unknown key {unknown[0]!r}; expected {', '.join(sorted(_PLAN_KEYS))}"
        )
    rank = spec.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise CliError(where, f"rank must be an integer >= 1, got {rank!r}")
    a = _side_labels(spec, "a", tasks, where)
    b = _side_labels(spec, "b", tasks, where)
    n = len(tasks)
    if a is None and b is None:
        return SharingPlan.separate(n, rank)
    return SharingPlan.from_labels(
        a if a is not None else list(range(n)), b if b is not None else list(range(n)), rank
    )


def plans_from_config(
    spec, tasks: Sequence[str], modules: Sequence[str], where="plan", rank: int | None = None
):
    """A `SharingPlan`, or `{module: SharingPlan}` if the file has a `modules:` section.

    `rank` (from `--rank`) replaces the top-level `rank`; modules whose override sets its
    own `rank` keep it.
    """
    if not isinstance(spec, dict):
        raise CliError(where, f"a plan file must be a YAML mapping, got {type(spec).__name__}")
    unknown = sorted(set(spec) - _FILE_KEYS)
    if unknown:
        raise CliError(
            where, f"unknown key {unknown[0]!r}; expected {', '.join(sorted(_FILE_KEYS))}"
        )
    base = {k: v for k, v in spec.items() if k != "modules"}
    if rank is not None:
        base["rank"] = rank
    default = plan_from_config(base, tasks, where)
    overrides = spec.get("modules")
    if overrides is None:
        return default
    if not isinstance(overrides, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) for k, v in overrides.items()
    ):
        raise CliError(where, "modules must map module-name patterns to plan mappings")
    resolved = {}
    for pattern, override in overrides.items():
        if not any(fnmatch.fnmatchcase(m, pattern) for m in modules):
            raise CliError(where, f"modules: pattern {pattern!r} matches no adapted module")
        merged = dict(base)
        for side in "ab":
            side_keys = (side, f"{side}_groups", f"{side}_group")
            if any(k in override for k in side_keys):
                for k in side_keys:
                    merged.pop(k, None)
        merged.update(override)
        try:
            resolved[pattern] = plan_from_config(merged, tasks, where)
        except CliError as err:
            raise CliError(where, f"modules.{pattern}: {err.cause}") from None
    plans = {}
    for m in modules:
        pattern = next((p for p in overrides if fnmatch.fnmatchcase(m, p)), None)
        plans[m] = default if pattern is None else resolved[pattern]
    return plans


def _read_plan_file(path: Path):
    import yaml

    if not path.is_file():
        raise CliError(path, "no such plan file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise CliError(path, "not valid YAML (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise CliError(path, f"not valid YAML ({' '.join(str(err).split())})") from None


def _resolve_plan(
    plan: str | None,
    config: Path | None,
    tasks: Sequence[str],
    modules: Sequence[str],
    rank: int | None,
):
    from ._plan import SharingPlan

    if plan is not None and config is not None:
        raise CliError("--config", "give either --plan or --config, not both")
    if config is None and plan is not None and plan not in NAMED:
        if plan.endswith((".yaml", ".yml")) or Path(plan).exists():
            config = Path(plan)
        else:
            raise CliError(
                "--plan", f"unknown plan {plan!r}; expected {', '.join(NAMED)} or a FILE.yaml"
            )
    if config is not None:
        spec = _read_plan_file(config)
        return plans_from_config(spec, tasks, modules, where=config, rank=rank), str(config)
    return SharingPlan.named(NAMED[plan or "shared-a"], len(tasks), rank), NAMED[plan or "shared-a"]


# --------------------------------------------------------------------------- output


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _progress(console, total: int):
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


def _load(dirs: Sequence[Path], names: str | None):
    from .io.peft import load_collection

    name_list = None
    if names is not None:
        name_list = [n.strip() for n in names.split(",")]
        if len(name_list) != len(dirs):
            raise CliError("--names", f"{len(name_list)} names for {len(dirs)} adapter directories")
    return load_collection(dirs, name_list)


# --------------------------------------------------------------------------- commands


@app.command()
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
    ] = DEFAULT_CHECKPOINT_EVERY,
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="Memory budget per solve, e.g. 8GB (default: 80% of available memory); "
            "larger shape groups are solved in module sub-batches.",
        ),
    ] = None,
):
    """Merge adapters into a bundle (OUT/hydraopt.json + OUT/factors.safetensors)."""
    from .io.bundle import Bundle, is_bundle, save_bundle
    from .io.memory import parse_size
    from .io.resume import RunCheckpoint, checkpoint_dir, fingerprint

    if solver not in SOLVERS:
        raise CliError("--solver", f"unknown solver {solver!r}; expected {', '.join(SOLVERS)}")
    if weighting not in WEIGHTINGS:
        raise CliError(
            "--weighting", f"unknown weighting {weighting!r}; expected {', '.join(WEIGHTINGS)}"
        )
    if dtype not in DTYPE_NAMES:
        raise CliError("--dtype", f"unknown dtype {dtype!r}; expected {', '.join(DTYPE_NAMES)}")
    memory_limit = None
    if max_memory is not None:
        try:
            memory_limit = parse_size(max_memory)
        except ValueError as err:
            raise CliError("--max-memory", str(err)) from None
    if out.exists() and not (out.is_dir() and (is_bundle(out) or not any(out.iterdir()))):
        raise CliError(out, "exists and is not a hydraopt bundle; refusing to overwrite it")
    claim_output(out)
    start = time.perf_counter()
    collection = _load(dirs, names)
    sharing, plan_source = _resolve_plan(
        plan, config, collection.names, list(collection.modules), rank
    )
    per_module = (
        sharing if isinstance(sharing, dict) else dict.fromkeys(collection.modules, sharing)
    )
    if solver == "exact":
        for module, module_plan in per_module.items():
            if not module_plan.restrict(collection.modules[module].task_ids).has_closed_form:
                raise CliError(
                    plan_source,
                    f"the plan of {module} has no closed form (its A- and B-groups do not "
                    "nest); use --solver als, adam or lbfgs",
                )
    if isinstance(sharing, dict):
        plan_summary = {
            "name": "per-module",
            "source": plan_source,
            "modules": {m: p.to_dict() for m, p in sharing.items()},
        }
    else:
        plan_summary = {"name": sharing.name, "source": plan_source, **sharing.to_dict()}
    iterative = solver != "exact"
    total_steps = _total_steps(solver, steps)
    checkpoint = None
    if (iterative and checkpoint_every > 0) or checkpoint_dir(out).exists():
        flags = {
            "solver": solver,
            "steps": total_steps,
            "weighting": weighting,
            "rank": rank,
            "checkpoint_every": checkpoint_every if iterative else None,
        }
        resolved_plan = {k: v for k, v in plan_summary.items() if k != "source"}
        checkpoint = RunCheckpoint.open(
            out, fingerprint(collection, resolved_plan, flags), resume=resume
        )
        if not (iterative and checkpoint_every > 0):
            checkpoint = None  # a matching checkpoint with nothing to resume: ignored
    bundle = Bundle.empty(
        collection,
        dtype=dtype,
        meta={"solver": solver, "weighting": weighting, "plan": plan_summary},
    )
    created = checkpoint is not None and not checkpoint.resumed
    try:
        _solve_all(
            collection,
            sharing,
            per_module,
            solver,
            weighting,
            total_steps,
            checkpoint,
            checkpoint_every,
            memory_limit,
            bundle,
            out,
        )
        save_bundle(bundle, out)
    except (CliError, AdapterError):
        # a bad input found while solving (e.g. NaN in a later group): leave nothing behind
        if created:
            checkpoint.remove()
        raise
    if checkpoint is not None:
        checkpoint.remove()
    seconds = time.perf_counter() - start
    summary = {
        "storage_ratio": bundle.storage_ratio,
        "num_params": bundle.num_params,
        "original_params": bundle.original_params,
        "tasks": bundle.task_relative_errors(),
        "plan": plan_summary,
        "solver": solver,
        "seconds": seconds,
        "bytes": bundle.num_params * _itemsize(dtype),
        "dtype": dtype,
        "out": str(out),
    }
    if json_out:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        _print_merge_summary(summary, len(bundle.modules))


def _total_steps(solver: str, steps: int | None) -> int | None:
    """The step budget of an iterative solver (its default if `--steps` is not given)."""
    if solver == "exact":
        return None
    from ._merge import DEFAULT_MAX_STEPS

    return steps if steps is not None else DEFAULT_MAX_STEPS["als" if solver == "als" else "optax"]


def _module_bytes(collection, per_module, names) -> dict[str, int]:
    """The memory guard's estimate for each module of one shape group (see io/memory.py)."""
    from .io.memory import estimate_module_bytes

    r_max = max(max(collection.modules[n].ranks) for n in names)
    out = {}
    for name in names:
        info = collection.modules[name]
        plan = per_module[name].restrict(info.task_ids)
        k = plan.rank or max(info.ranks)
        out[name] = estimate_module_bytes(
            collection.num_tasks,
            r_max,
            info.d_in,
            info.d_out,
            k,
            plan.num_a_groups,
            plan.num_b_groups,
        )
    return out


def _solve_all(
    collection,
    sharing,
    per_module,
    solver,
    weighting,
    total_steps,
    checkpoint,
    checkpoint_every,
    memory_limit,
    bundle,
    out,
) -> None:
    """Solve every shape group (in memory-sized units, chunked and checkpointed if
    iterative) and add the solutions to `bundle`."""
    from .io.memory import MemoryBudgetError, budget, plan_batches

    groups = collection.shape_groups()
    kinds = {name: info.kind for name, info in collection.modules.items()}
    limit, source = budget(memory_limit)
    # Split every group before solving any, so a module that cannot fit fails at once.
    # A resumed run keeps the split its checkpoint recorded (same units, same factors).
    splits = {}
    for (kind, d_in, d_out), module_names in groups.items():
        key = f"{kind}:{d_in}x{d_out}"
        batches = checkpoint.batches(key) if checkpoint is not None else None
        if batches is None or sorted(n for b in batches for n in b) != sorted(module_names):
            try:
                batches = plan_batches(
                    module_names,
                    _module_bytes(collection, per_module, module_names),
                    limit,
                    source,
                )
            except MemoryBudgetError as err:
                raise CliError(err.module, err.cause) from None
        splits[key] = batches
    console = _stderr_console()
    with _progress(console, len(groups)) as progress:
        bar = progress.add_task("merging", total=len(groups))
        for g, ((kind, d_in, d_out), module_names) in enumerate(groups.items()):
            progress.update(bar, description=f"{kind} {d_in}->{d_out} x{len(module_names)}")
            key = f"{kind}:{d_in}x{d_out}"
            batches = splits[key]
            if checkpoint is not None:
                checkpoint.set_batches(key, batches)
            for b, batch in enumerate(batches):
                group = collection.load_group(batch)
                solutions = _solve_unit(
                    f"g{g:04d}b{b:02d}",
                    group,
                    sharing,
                    solver,
                    weighting,
                    total_steps,
                    checkpoint,
                    checkpoint_every,
                )
                try:
                    bundle.add_solutions(group, solutions, kinds)
                except ValueError as err:
                    raise CliError(out, str(err)) from None
                del group, solutions
            progress.advance(bar)


def _merge(group, sharing, solver, weighting, max_steps, init="relaxed"):
    from . import merge_adapters

    try:
        return merge_adapters(
            group, sharing, solver, weights=weighting, max_steps=max_steps, init=init
        )
    except FloatingPointError as err:
        # inputs were checked finite (and far from float32 overflow) when read: this is
        # the solver diverging
        hint = "check the adapters' scales" if solver == "exact" else "try --solver exact or als"
        raise CliError(f"--solver {solver}", f"{err}; {hint}") from None


def _solve_unit(
    unit, group, sharing, solver, weighting, total_steps, checkpoint, checkpoint_every
) -> dict:
    """Solve one unit of modules; iterative solvers run in checkpointed chunks.

    Chunk `c` runs `min(N, total - c N)` steps on the modules not done yet, starting from
    the previous chunk's factors; a module is done when its solver converged (stopped
    before its step budget) or the total is spent. `Solution.steps` counts all chunks.
    """
    from ._solution import RESULTS

    if checkpoint is None:
        solutions = _merge(group, sharing, solver, weighting, total_steps)
        kill_point("solve")
        return solutions
    saved = checkpoint.load_unit(unit)
    if saved is not None:
        solutions, extra = saved
        solutions = {n: solutions[n] for n in group if n in solutions}
        steps_done, done = int(extra["steps_done"]), set(extra["done"])
        if extra.get("complete"):
            return solutions
    else:
        solutions, steps_done, done = {}, 0, set()
    while True:
        active = [n for n in group if n not in done]
        if not active:
            break
        chunk = min(checkpoint_every, total_steps - steps_done)
        init = (
            "relaxed"
            if not solutions
            else {n: (solutions[n].shared_a, solutions[n].shared_b) for n in active}
        )
        new = _merge({n: group[n] for n in active}, sharing, solver, weighting, chunk, init)
        kill_point("solve")
        steps_done += chunk
        for name, sol in new.items():
            before = solutions[name].steps if name in solutions else 0
            solutions[name] = sol.replace(steps=sol.steps + before)
            if int(sol.result) != RESULTS.max_steps_reached or steps_done >= total_steps:
                done.add(name)
        complete = all(n in done for n in group)
        checkpoint.save_unit(
            unit,
            solutions,
            {"steps_done": steps_done, "done": sorted(done), "complete": complete},
        )
    return {n: solutions[n] for n in group if n in solutions}


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def _print_merge_summary(summary: dict, num_modules: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(
        title=(
            f"{summary['out']}: {num_modules} modules, "
            f"plan {summary['plan']['name']}, solver {summary['solver']}"
        )
    )
    table.add_column("task")
    table.add_column("relative error", justify="right")
    for task, err in summary["tasks"].items():
        table.add_row(task, f"{err:.4g}")
    console.print(table)
    console.print(
        f"storage {summary['num_params']:,} / {summary['original_params']:,} params "
        f"= {summary['storage_ratio']:.3f} ({summary['bytes']:,} bytes as {summary['dtype']}) "
        f"in {summary['seconds']:.2f} s"
    )


@app.command()
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
    from .io.bundle import load_bundle
    from .io.peft import export_peft

    if dtype is not None and dtype not in DTYPE_NAMES:
        raise CliError("--dtype", f"unknown dtype {dtype!r}; expected {', '.join(DTYPE_NAMES)}")
    bundle = load_bundle(bundle_dir)
    claim_output(to)
    tasks = None if task is None else [t.strip() for t in task.split(",")]
    for name in tasks or ():
        if name not in bundle.tasks:
            raise CliError(
                "--task", f"unknown task {name!r}; {bundle_dir} has {', '.join(bundle.tasks)}"
            )
    written = export_peft(bundle, to, tasks, dtype=dtype)
    for path in written:
        sys.stdout.write(f"{path}\n")


def subspace_overlap(x, y, rank_x: int, rank_y: int) -> float:
    """`||Q_x^T Q_y||_F^2 / min(r_x, r_y)` for orthonormal bases of two factor subspaces.

    `x`: `[d, r_x]`, `y`: `[d, r_y]` (column spaces compared). 1 means one subspace
    contains the other, 0 means orthogonal; random subspaces of a large `d` give about
    `max(r_x, r_y) / d`. NaN if a factor is zero.
    """
    import numpy as np

    def basis(m):
        u, s, _ = np.linalg.svd(np.asarray(m, np.float64), full_matrices=False)
        keep = s > (s[0] if s.size else 0.0) * max(m.shape) * np.finfo(np.float32).eps
        return u[:, keep] if s.size and s[0] > 0 else None

    qx, qy = basis(x), basis(y)
    if qx is None or qy is None:
        return float("nan")
    return float(np.sum((qx.T @ qy) ** 2) / min(qx.shape[1], qy.shape[1]))


@app.command()
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
    import numpy as np

    from ._plan import SharingPlan

    collection = _load(dirs, names)
    rows = []
    storage = {name: [0, 0] for name in NAMED.values()}
    console = _stderr_console()
    groups = collection.shape_groups()
    with _progress(console, len(groups)) as progress:
        bar = progress.add_task("inspecting", total=len(groups))
        for module_names in groups.values():
            group = collection.load_group(module_names)
            for name in module_names:
                a_all, b_all, ranks = group[name]
                info = collection.modules[name]
                present = info.task_ids
                a_ov, b_ov = [], []
                for i, t in enumerate(present):
                    for u in present[i + 1 :]:
                        # A's row spaces: compare columns of A^T; B's column spaces directly.
                        a_ov.append(
                            subspace_overlap(
                                a_all[t, : ranks[t]].T, a_all[u, : ranks[u]].T, ranks[t], ranks[u]
                            )
                        )
                        b_ov.append(
                            subspace_overlap(
                                b_all[t][:, : ranks[t]], b_all[u][:, : ranks[u]], ranks[t], ranks[u]
                            )
                        )
                k = rank or max(ranks)
                original = sum(ranks) * (info.d_in + info.d_out)
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
                        "a_overlap": float(np.nanmean(a_ov))
                        if a_ov and not np.all(np.isnan(a_ov))
                        else None,
                        "b_overlap": float(np.nanmean(b_ov))
                        if b_ov and not np.all(np.isnan(b_ov))
                        else None,
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
    from rich.console import Console
    from rich.table import Table

    out = Console()
    table = Table(
        title=f"{collection.num_tasks} tasks: mean pairwise subspace overlap (1 = same subspace)"
    )
    for col in ("module", "kind", "d_in", "d_out", "tasks", "A overlap", "B overlap"):
        table.add_column(
            col, justify="left" if col in ("module", "kind") else "right", overflow="fold"
        )
    fmt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"  # noqa: E731
    for row in rows:
        table.add_row(
            row["module"],
            row["kind"],
            str(row["d_in"]),
            str(row["d_out"]),
            str(row["tasks"]),
            fmt(row["a_overlap"]),
            fmt(row["b_overlap"]),
        )
    out.print(table)
    plan_table = Table(
        title=f"storage of each named plan (k = {rank or 'largest rank per module'})"
    )
    for col in ("plan", "params", "original", "ratio"):
        plan_table.add_column(col, justify="left" if col == "plan" else "right")
    for name, p in plans.items():
        plan_table.add_row(
            name.replace("_", "-"),
            f"{p['num_params']:,}",
            f"{p['original_params']:,}",
            fmt(p["storage_ratio"]),
        )
    out.print(plan_table)


@app.command()
def demo():
    """Run the embedded end-to-end example (offline)."""
    try:
        from ._demo import run_demo
    except ImportError as err:
        raise CliError(
            "demo", f"hydraopt_jax._demo.run_demo is not available in this build ({err})"
        ) from None
    run_demo()


from ._cli_plan import plan as _plan_command  # noqa: E402
from ._cli_plan import sweep as _sweep_command  # noqa: E402

app.command(name="plan")(_plan_command)
app.command(name="sweep")(_sweep_command)


# --------------------------------------------------------------------------- entry point


def _fail(message: str) -> int:
    sys.stderr.write(f"hydraopt: {' '.join(message.split())}\n")
    sys.stderr.flush()
    return 2


INTERRUPTED = 130


def _interrupted() -> int:
    sys.stderr.write(
        "hydraopt: interrupted; no output written (an iterative merge continues with --resume)\n"
    )
    sys.stderr.flush()
    return INTERRUPTED


CACHE_ENV = "HYDRAOPT_CACHE_DIR"
CACHE_MAX_BYTES = 1 << 30  # least recently used entries are evicted beyond 1 GiB


def compilation_cache_dir() -> str | None:
    """The folder of the command's persistent compilation cache, or `None` (disabled).

    `HYDRAOPT_CACHE_DIR` if set (an empty value disables the cache), else
    `$XDG_CACHE_HOME/hydraopt/jax` (`~/.cache/hydraopt/jax`).
    """
    path = os.environ.get(CACHE_ENV)
    if path is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "hydraopt", "jax")
    return path or None


def _enable_compilation_cache() -> None:
    """JAX's persistent compilation cache for the `hydraopt` command: a fresh process loads
    the solvers it compiled before from disk (a 16-module full merge: see the cold-command
    rows of `benchmarks/speed.py`). Entries are keyed by program, shapes, jaxlib and device,
    so a stale entry is never used; a folder that cannot be written only costs the speed-up
    (JAX warns about it on stderr). The cache is capped at `CACHE_MAX_BYTES`.
    """
    path = compilation_cache_dir()
    if path is None:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)


_CLAIMED: list[Path] = []  # directories the running command may create for its outputs


def claim_output(path: Path) -> None:
    """Check, before any work, that the output `path` can be written (else one-line error,
    exit 2); if the command then fails, `main` removes the parent directories created for it
    that are still empty."""
    from .io._files import check_output_path

    _CLAIMED.extend(check_output_path(path))


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 2 bad input, 1 internal error,
    130 interrupted). Run as the `hydraopt` command (`argv` None), it enables the persistent
    compilation cache (`compilation_cache_dir`). A failed command leaves no directory it
    created behind (`claim_output`)."""
    from .io._files import remove_empty_dirs

    _CLAIMED.clear()
    status = 1  # if _main raises (HYDRAOPT_DEBUG=1 re-raises internal errors)
    try:
        status = _main(argv)
    finally:
        if status != 0:
            remove_empty_dirs(_CLAIMED)
        _CLAIMED.clear()
    return status


def _main(argv: Sequence[str] | None) -> int:
    if argv is None:
        _enable_compilation_cache()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = app(args=args, prog_name="hydraopt", standalone_mode=False)
        if result == INTERRUPTED:  # Typer turns Ctrl-C (KeyboardInterrupt) into 130
            return _interrupted()
        return result if isinstance(result, int) else 0
    except CliError as err:
        return _fail(f"{err.where}: {err.cause}")
    except AdapterError as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as err:
        # Typer >= 0.29 vendors click (`typer._click`), so match click's classes by name.
        kinds = {cls.__name__ for cls in type(err).__mro__}
        if "Exit" in kinds:
            return int(getattr(err, "exit_code", 0))
        if "Abort" in kinds:
            return _fail("aborted")
        if "ClickException" in kinds:
            ctx = getattr(err, "ctx", None)
            where = ctx.command_path.removeprefix("hydraopt").strip() if ctx is not None else ""
            return _fail(f"{where + ': ' if where else ''}{err.format_message()}")
        if os.environ.get("HYDRAOPT_DEBUG"):
            raise
        sys.stderr.write(
            f"hydraopt: internal error: {type(err).__name__}: {' '.join(str(err).split())} "
            "(set HYDRAOPT_DEBUG=1 for a traceback)\n"
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
