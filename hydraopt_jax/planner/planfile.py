"""Plan files: the YAML that `hydraopt plan` writes and `hydraopt merge --config` reads.

One home for the format, reader and writer. Tasks are grouped by name, mergekit-style:

```yaml
rank: 16              # shared rank k (optional; --rank overrides it)
a_groups:             # tasks whose names match a group's pattern(s) share one A
  fr: "*_fr"          # fnmatch patterns on task names; a list of patterns also works
  de: ["*_de", "de_*"]
b_groups:
  qa: "qa_*"          # tasks matched by no group keep a task-specific factor
task_rank: 2          # nested ranks (optional): each task's rank j_t <= k inside its
                      # shared factor; an integer, a list (task order) or {pattern: j};
                      # with both sides per-task, each task's own rank (truncation)
```

A plan may differ per module: a `modules:` section maps module-name patterns (fnmatch,
first match wins) to overrides of the keys above; an override that names a side replaces
that side's top-level setting, and `rank` / `task_rank` there replace the top-level ones:

```yaml
a: shared
modules:
  "*.mlp.*": {a: per-task, b: shared, rank: 8}
  "model.layers.0.self_attn.q_proj": {rank: 4}
```

Each side (`a` / `b`) takes exactly one of:

- `a: shared` (one factor for all tasks) or `a: per-task` (the default);
- `a_groups: {group: pattern | [patterns]}` as above; a task matched by two groups, or a
  pattern matching no task, is an error;
- `a_group: [0, 0, 1, 1]` (one id per task, in task order) or `a_group: {task: id}`
  (unlisted tasks keep their own factor); ids must be `0..K-1`, names must be tasks.

Every error is an `io.AdapterError` naming the file and the cause.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from .._plan import SharingPlan
from ..io import AdapterError

__all__ = [
    "PLAN_FILE_MARK",
    "plan_file_text",
    "plan_from_config",
    "plans_from_config",
    "read_plan_file",
]

PLAN_KEYS = {"rank", "task_rank", "a", "b", "a_groups", "b_groups", "a_group", "b_group"}
FILE_KEYS = PLAN_KEYS | {"modules"}
PLAN_FILE_MARK = "written by `hydraopt plan`"


# --------------------------------------------------------------------------- reading
def _side_labels(spec: dict, side: str, tasks: Sequence[str], where) -> list | None:
    """Group labels of `tasks` on one side, or `None` for task-specific."""
    given = [k for k in (side, f"{side}_groups", f"{side}_group") if k in spec]
    if len(given) > 1:
        raise AdapterError(where, f"give only one of {', '.join(given)}")
    if not given:
        return None
    key = given[0]
    value = spec[key]
    if key == side:
        if value in ("shared", "all"):
            return [0] * len(tasks)
        if value in ("per-task", "per_task", "specific", "separate"):
            return None
        raise AdapterError(where, f"{key}: {value!r}; expected 'shared' or 'per-task'")
    if key == f"{side}_groups":
        if not isinstance(value, dict) or not value:
            raise AdapterError(where, f"{key} must map group names to name patterns, got {value!r}")
        labels: list = [("task", t) for t in range(len(tasks))]
        owner: dict[int, str] = {}
        for group, patterns in value.items():
            for t in _matches(patterns, tasks, f"{key}.{group}", where):
                if owner.get(t, group) != group:
                    raise AdapterError(
                        where, f"{key}: task {tasks[t]!r} matches both {owner[t]!r} and {group!r}"
                    )
                owner[t] = group
                labels[t] = ("group", group)
        return labels
    ids = _per_task_values(value, tasks, key, where, "ids")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids.values()):
        raise AdapterError(where, f"{key}: group ids must be integers, got {list(ids.values())}")
    used = sorted(set(ids.values()))
    if used != list(range(len(used))):
        raise AdapterError(
            where, f"{key}: group ids {used} out of range; expected 0..K-1 with every id used"
        )
    return [("group", ids[n]) if n in ids else ("task", t) for t, n in enumerate(tasks)]


def _matches(patterns, tasks: Sequence[str], key: str, where) -> list[int]:
    """Indices of the tasks matched by a pattern or a list of patterns (each must match)."""
    patterns = [patterns] if isinstance(patterns, str) else patterns
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise AdapterError(
            where, f"{key}: expected a pattern or a list of patterns, got {patterns!r}"
        )
    hits = []
    for pattern in patterns:
        found = [t for t, name in enumerate(tasks) if fnmatch.fnmatchcase(name, pattern)]
        if not found:
            raise AdapterError(
                where,
                f"{key}: pattern {pattern!r} matches no task (tasks: {', '.join(tasks)})",
            )
        hits += found
    return hits


def _per_task_values(value, tasks: Sequence[str], key: str, where, what="values") -> dict:
    """`{task name: value}` from a list in task order or a `{task: value}` mapping."""
    if isinstance(value, list):
        if len(value) != len(tasks):
            raise AdapterError(
                where, f"{key} has {len(value)} {what} for {len(tasks)} tasks ({', '.join(tasks)})"
            )
        return dict(zip(tasks, value, strict=False))
    if isinstance(value, dict):
        unknown = [n for n in value if n not in tasks]
        if unknown:
            raise AdapterError(
                where, f"{key}: unknown task {unknown[0]!r} (tasks: {', '.join(tasks)})"
            )
        return dict(value)
    raise AdapterError(
        where, f"{key} must be a list of {what} or a mapping task -> {what[:-1]}, got {value!r}"
    )


def _positive_int(value, key: str, where) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterError(where, f"{key} must be an integer >= 1, got {value!r}")
    return value


def _task_ranks(value, tasks: Sequence[str], rank, where) -> tuple[int, ...] | None:
    """Nested ranks from `task_rank`: one integer, a list in task order, or `{pattern: j}`
    (task-name patterns; unmatched tasks keep `j = k`)."""
    if value is None:
        return None
    if isinstance(value, list):
        values = _per_task_values(value, tasks, "task_rank", where)
        return tuple(_positive_int(values[n], "task_rank", where) for n in tasks)
    if isinstance(value, dict):
        out: list[int | None] = [None] * len(tasks)
        for pattern, j in value.items():
            for t in _matches(pattern, tasks, f"task_rank.{pattern}", where):
                if out[t] is not None:
                    raise AdapterError(where, f"task_rank: task {tasks[t]!r} matched twice")
                out[t] = _positive_int(j, f"task_rank.{pattern}", where)
        if any(j is None for j in out) and rank is None:
            raise AdapterError(where, "task_rank leaves some tasks out: give a rank for them")
        return tuple(rank if j is None else j for j in out)
    return (_positive_int(value, "task_rank", where),) * len(tasks)


def _check_mapping(spec, keys, where) -> None:
    """`spec` is a mapping with no key outside `keys`, else `AdapterError(where)`."""
    if not isinstance(spec, dict):
        raise AdapterError(where, f"a plan file must be a YAML mapping, got {type(spec).__name__}")
    unknown = sorted(set(spec) - keys)
    if unknown:
        raise AdapterError(where, f"unknown key {unknown[0]!r}; expected {', '.join(sorted(keys))}")


def plan_from_config(spec, tasks: Sequence[str], where="plan") -> SharingPlan:
    """A `SharingPlan` over `tasks` from one parsed plan mapping (module docstring)."""
    _check_mapping(spec, PLAN_KEYS, where)
    rank = spec.get("rank")
    if rank is not None:
        rank = _positive_int(rank, "rank", where)
    a = _side_labels(spec, "a", tasks, where)
    b = _side_labels(spec, "b", tasks, where)
    n = len(tasks)
    if a is None and b is None:
        plan = SharingPlan.separate(n, rank)
    else:
        plan = SharingPlan.from_labels(
            a if a is not None else list(range(n)), b if b is not None else list(range(n)), rank
        )
    task_rank = _task_ranks(spec.get("task_rank"), tasks, rank, where)
    if task_rank is None:
        return plan
    try:
        return plan.with_task_rank(task_rank)
    except ValueError as err:
        raise AdapterError(where, str(err).removeprefix("SharingPlan: ")) from None


def plans_from_config(
    spec, tasks: Sequence[str], modules: Sequence[str], where="plan", rank: int | None = None
) -> SharingPlan | dict[str, SharingPlan]:
    """A `SharingPlan`, or `{module: SharingPlan}` if the file has a `modules:` section.

    `rank` (from `--rank`) replaces the top-level `rank`; modules whose override sets its
    own `rank` keep it.
    """
    _check_mapping(spec, FILE_KEYS, where)
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
        raise AdapterError(where, "modules must map module-name patterns to plan mappings")
    resolved = {}
    for pattern, override in overrides.items():
        if not any(fnmatch.fnmatchcase(m, pattern) for m in modules):
            raise AdapterError(where, f"modules: pattern {pattern!r} matches no adapted module")
        merged = dict(base)
        for side in "ab":
            side_keys = (side, f"{side}_groups", f"{side}_group")
            if any(k in override for k in side_keys):
                for k in side_keys:
                    merged.pop(k, None)
        merged.update(override)
        try:
            resolved[pattern] = plan_from_config(merged, tasks, where)
        except AdapterError as err:
            raise AdapterError(where, f"modules.{pattern}: {err.message}") from None
    plans = {}
    for m in modules:
        pattern = next((p for p in overrides if fnmatch.fnmatchcase(m, p)), None)
        plans[m] = default if pattern is None else resolved[pattern]
    return plans


def read_plan_file(
    path, tasks: Sequence[str], modules: Sequence[str], rank: int | None = None
) -> SharingPlan | dict[str, SharingPlan]:
    """Read a plan file for `tasks` and `modules` (see `plans_from_config`)."""
    from ..io import read_yaml

    return plans_from_config(read_yaml(Path(path)), tasks, modules, where=path, rank=rank)


# --------------------------------------------------------------------------- writing
def _escape(name: str) -> str:
    """An fnmatch pattern matching exactly `name`."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def plan_file_text(
    plans: Mapping[str, SharingPlan],
    task_names: Sequence[str],
    groupings: Mapping[str, Sequence[int]],
    choices: Mapping[str, tuple[str, str]],
    comments: Mapping[str, str] | None = None,
    header: Sequence[str] = (),
) -> str:
    """A plan file naming every module exactly, each with both sides and its rank.

    `plans`: `{module: SharingPlan}` over all tasks; `choices`: `{module: (a_by, b_by)}`, the
    grouping name of each side (`all`, `task` or a key of `groupings`, whose groups are
    written as name patterns); `comments`: one line per module (optional).
    """
    names = list(task_names)
    lines = [f"# {h}" for h in header] + ["modules:"]

    def side(key: str, by: str) -> str:
        if by == "all":
            return f"{key}: shared"
        if by == "task":
            return f"{key}: per-task"
        groups: dict[str, list[str]] = {}
        labels = groupings[by]
        for t, name in enumerate(names):
            groups.setdefault(f"{by}{labels[t]}", []).append(_escape(name))
        return f"{key}_groups: {json.dumps(groups)}"

    for module, plan in plans.items():
        a_by, b_by = choices[module]
        comment = f"  # {comments[module]}" if comments and module in comments else ""
        lines.append(f"  {json.dumps(_escape(module))}:{comment}")
        lines.append(f"    {side('a', a_by)}")
        lines.append(f"    {side('b', b_by)}")
        lines.append(f"    rank: {plan.rank}")
        if plan.task_rank is not None:
            ranks = set(plan.task_rank)
            value = plan.task_rank[0] if len(ranks) == 1 else json.dumps(list(plan.task_rank))
            lines.append(f"    task_rank: {value}")
    return "\n".join(lines) + "\n"
