"""Task attributes: which tasks may share a factor besides "all of them" and "each alone"."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .._plan import relabel

__all__ = ["groupings", "task_attributes_from_names"]


def task_attributes_from_names(
    names: Sequence[str], pattern: str | None = None
) -> list[dict[str, str]]:
    """Task attributes parsed from task names.

    With `pattern`, a regular expression with named groups that must match each whole name,
    e.g. `(?P<application>[a-z]+)_(?P<language>[a-z]+)`. Without, names that all split on
    `_` into the same number (>= 2) of parts give attributes `part0`, `part1`, ...; any other
    names give no attributes.
    """
    if pattern is not None:
        regex = re.compile(pattern)
        if not regex.groupindex:
            raise ValueError(f"attribute pattern {pattern!r} has no named group (?P<name>...)")
        out = []
        for name in names:
            match = regex.fullmatch(name)
            if match is None:
                raise ValueError(f"task name {name!r} does not match the pattern {pattern!r}")
            out.append({k: v for k, v in match.groupdict().items() if v is not None})
        return out
    parts = [name.split("_") for name in names]
    if not parts or len({len(p) for p in parts}) != 1 or len(parts[0]) < 2:
        return [{} for _ in names]
    return [{f"part{i}": p for i, p in enumerate(split)} for split in parts]


def groupings(num_tasks: int, attributes: Sequence[Mapping[str, Any]] | None) -> dict:
    """`{grouping name: labels [T]}`: `all`, one per attribute (when distinct), `task`."""
    out: dict[str, tuple[int, ...]] = {"all": (0,) * num_tasks}
    seen = {out["all"]: "all", tuple(range(num_tasks)): "task"}
    if attributes:
        if len(attributes) != num_tasks:
            raise ValueError(f"{len(attributes)} task attribute dicts for {num_tasks} tasks")
        keys = sorted({k for attrs in attributes for k in attrs})
        for key in keys:
            if not all(key in attrs for attrs in attributes):
                continue  # an attribute some tasks lack cannot group them all
            labels = relabel([attrs[key] for attrs in attributes])
            if labels not in seen:
                seen[labels] = key
                out[key] = labels
    out["task"] = tuple(range(num_tasks))
    return out
