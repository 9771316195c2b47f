"""Sharing plans: which tasks share which factor, each task's rank, and the storage cost.

A plan maps every task `t` to an A-group `a_group[t]` and a B-group `b_group[t]` and fixes
the shared rank `k`. Task `t` is reconstructed as `Bh[b_group[t]] @ Ah[a_group[t]]`.

**Nested ranks.** A plan may also give each task a rank `j_t <= k` inside its shared factor
(`task_rank`). The side that holds one factor per task (B when A is shared, A when B is
shared) then stores a rank-`j_t` factor inside the shared one:

    shared A:  dW_hat_t = U_t V_t^T Ah[a_group[t]]     U_t [d_out, j_t], V_t [k, j_t]
    shared B:  dW_hat_t = Bh[b_group[t]] W_t Z_t^T     W_t [k, j_t],     Z_t [d_in, j_t]

`j_t = k` is the plain plan; groups of one with `j_t = k` are per-task truncation.

**Own ranks.** In a plan whose A-groups and B-groups are all single tasks (`separate`),
`task_rank` is each task's own rank: task `t` keeps the rank-`j_t` factors `Ah[t] [j_t, d_in]`,
`Bh[t] [d_out, j_t]` (stored padded to `k = max_t j_t`), per-task truncation with a rank per
task, at `j_t (d_in + d_out)` parameters each.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence

__all__ = ["GROUPINGS", "NAMED_PLANS", "SharingPlan", "original_params", "plan_name"]

# The named plans, each as (A grouping, B grouping): "all" tasks share one factor, "task"
# keeps one factor per task. The one table of named plans; command-line spellings use "-".
NAMED_PLANS: dict[str, tuple[str, str]] = {
    "shared_a": ("all", "task"),
    "shared_b": ("task", "all"),
    "full_merge": ("all", "all"),
    "separate": ("task", "task"),
}
GROUPINGS = ("all", "task")


def plan_name(name: str) -> str:
    """The canonical name of a named plan from either spelling (`shared-a`, `shared_a`)."""
    key = name.replace("-", "_")
    if key not in NAMED_PLANS:
        raise ValueError(f"unknown plan {name!r}; expected one of {', '.join(NAMED_PLANS)}")
    return key


def relabel(labels: Sequence[Hashable]) -> tuple[int, ...]:
    """Group ids contiguous from 0, in order of first appearance."""
    seen: dict[Hashable, int] = {}
    return tuple(seen.setdefault(label, len(seen)) for label in labels)


def refines(fine: Sequence[int], coarse: Sequence[int]) -> bool:
    """True if every group of `fine` lies inside one group of `coarse`."""
    parent: dict[int, int] = {}
    return all(parent.setdefault(f, c) == c for f, c in zip(fine, coarse, strict=True))


def original_params(ranks: Sequence[int], d_in: int, d_out: int) -> int:
    """Parameters of the original adapters on one module: `sum_t r_t (d_in + d_out)`."""
    return int(sum(ranks)) * (d_in + d_out)


def _grouping_labels(grouping: str, num_tasks: int) -> tuple[int, ...]:
    return (0,) * num_tasks if grouping == "all" else tuple(range(num_tasks))


@dataclasses.dataclass(frozen=True)
class SharingPlan:
    """Which tasks share their A factor, which share their B factor, the shared rank, and
    optionally each task's rank inside its shared factor.

    `dW_hat_t = Bh[b_group[t]] @ Ah[a_group[t]]` with `Ah: [K_A, k, d_in]`,
    `Bh: [K_B, d_out, k]`. Plans are hashable and static under `jax.jit`.

    **Arguments:**

    - `a_group`: one A-group id per task, contiguous from 0.
    - `b_group`: one B-group id per task, contiguous from 0.
    - `rank`: the shared rank `k`, or `None` for "the adapters' (padded) rank", resolved by
      `merge`. `k` may exceed the original rank.
    - `task_rank`: optional nested ranks `j_t` (one per task, `1 <= j_t <= k`): the
      task-specific side keeps a rank-`j_t` factor inside the shared one (module docstring).
      Needs one side whose groups are all single tasks; `None` means `j_t = k`.

    **Example:**

    ```python
    plan = SharingPlan.shared_a(num_tasks=40)               # one A, 40 B's
    plan = SharingPlan(a_group=[0, 0, 1, 1], b_group=[0, 1, 2, 3], rank=16)
    plan = SharingPlan.shared_a(40, rank=16).with_task_rank(2)   # k = 16, j_t = 2
    ```
    """

    a_group: tuple[int, ...]
    b_group: tuple[int, ...]
    rank: int | None = None
    task_rank: tuple[int, ...] | None = None

    def __post_init__(self):
        a = tuple(int(g) for g in self.a_group)
        b = tuple(int(g) for g in self.b_group)
        object.__setattr__(self, "a_group", a)
        object.__setattr__(self, "b_group", b)
        if len(a) == 0:
            raise ValueError("SharingPlan needs at least one task; got empty a_group")
        if len(a) != len(b):
            raise ValueError(
                f"SharingPlan: a_group has {len(a)} tasks but b_group has {len(b)}; "
                "expected one group id per task in each"
            )
        for side, groups in (("a_group", a), ("b_group", b)):
            if sorted(set(groups)) != list(range(len(set(groups)))):
                raise ValueError(
                    f"SharingPlan: {side}={list(groups)} must use group ids contiguous "
                    f"from 0 (expected the set {{0..{len(set(groups)) - 1}}})"
                )
        if self.rank is not None:
            if isinstance(self.rank, bool) or int(self.rank) != self.rank or self.rank < 1:
                raise ValueError(f"SharingPlan: rank must be an integer >= 1, got {self.rank!r}")
            object.__setattr__(self, "rank", int(self.rank))
        if self.task_rank is not None:
            self._check_task_rank()

    def _check_task_rank(self) -> None:
        ranks = tuple(self.task_rank)
        if len(ranks) != len(self.a_group) or any(
            isinstance(j, bool) or int(j) != j or j < 1 for j in ranks
        ):
            raise ValueError(
                f"SharingPlan: task_rank must hold one integer >= 1 per task "
                f"({len(self.a_group)}), got {list(ranks)}"
            )
        ranks = tuple(int(j) for j in ranks)
        if self.rank is not None and max(ranks) > self.rank:
            raise ValueError(
                f"SharingPlan: task_rank {list(ranks)} exceeds the shared rank {self.rank}"
            )
        if not (self.b_task_specific or self.a_task_specific):
            raise ValueError(
                "SharingPlan: nested task ranks need one side with a factor per task "
                f"(a_group={list(self.a_group)}, b_group={list(self.b_group)})"
            )
        object.__setattr__(self, "task_rank", ranks)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_groupings(
        cls, a_by: str, b_by: str, num_tasks: int, rank: int | None = None
    ) -> SharingPlan:
        """A plan from the grouping names `"all"` / `"task"` of each side."""
        for side in (a_by, b_by):
            if side not in GROUPINGS:
                raise ValueError(f"grouping must be one of {GROUPINGS}, got {side!r}")
        return cls(_grouping_labels(a_by, num_tasks), _grouping_labels(b_by, num_tasks), rank)

    @classmethod
    def shared_a(cls, num_tasks: int, rank: int | None = None) -> SharingPlan:
        """One A shared by all tasks, one B per task (`K_A = 1, K_B = T`)."""
        return cls.named("shared_a", num_tasks, rank)

    @classmethod
    def shared_b(cls, num_tasks: int, rank: int | None = None) -> SharingPlan:
        """One B shared by all tasks, one A per task (`K_A = T, K_B = 1`)."""
        return cls.named("shared_b", num_tasks, rank)

    @classmethod
    def full_merge(cls, num_tasks: int, rank: int | None = None) -> SharingPlan:
        """One adapter for all tasks (`K_A = K_B = 1`)."""
        return cls.named("full_merge", num_tasks, rank)

    @classmethod
    def separate(cls, num_tasks: int, rank: int | None = None) -> SharingPlan:
        """Every task keeps its own factors (`K_A = K_B = T`): exact, no compression."""
        return cls.named("separate", num_tasks, rank)

    @classmethod
    def named(cls, name: str, num_tasks: int, rank: int | None = None) -> SharingPlan:
        """One of `shared_a`, `shared_b`, `full_merge`, `separate` (`-` or `_`)."""
        return cls.from_groupings(*NAMED_PLANS[plan_name(name)], num_tasks, rank)

    @classmethod
    def from_labels(
        cls,
        a_labels: Sequence[Hashable] | None,
        b_labels: Sequence[Hashable] | None,
        rank: int | None = None,
    ) -> SharingPlan:
        """Tasks with equal labels share a factor; `None` on a side keeps it task-specific.

        ```python
        # B shared per application, A shared per language
        SharingPlan.from_labels(a_labels=langs, b_labels=apps)
        ```
        """
        if a_labels is None and b_labels is None:
            raise ValueError("from_labels: give a_labels, b_labels or both")
        n = len(a_labels if a_labels is not None else b_labels)
        a = relabel(a_labels) if a_labels is not None else tuple(range(n))
        b = relabel(b_labels) if b_labels is not None else tuple(range(n))
        return cls(a, b, rank)

    @classmethod
    def from_attributes(
        cls,
        attributes: Sequence[Mapping[str, Hashable]],
        *,
        share_a_by: str | None = None,
        share_b_by: str | None = None,
        rank: int | None = None,
    ) -> SharingPlan:
        """Group tasks by named attributes, e.g. A per `"language"`, B per `"application"`.

        `"*"` shares that factor across all tasks; `None` keeps it task-specific.
        """

        def labels(key):
            if key is None:
                return None
            if key == "*":
                return [0] * len(attributes)
            missing = [i for i, attrs in enumerate(attributes) if key not in attrs]
            if missing:
                raise ValueError(f"from_attributes: tasks {missing} have no attribute {key!r}")
            return [attrs[key] for attrs in attributes]

        if share_a_by is None and share_b_by is None:
            return cls.separate(len(attributes), rank)
        return cls.from_labels(labels(share_a_by), labels(share_b_by), rank)

    # ------------------------------------------------------------------ structure
    @property
    def num_tasks(self) -> int:
        return len(self.a_group)

    @property
    def num_a_groups(self) -> int:
        return max(self.a_group) + 1

    @property
    def num_b_groups(self) -> int:
        return max(self.b_group) + 1

    @property
    def a_task_specific(self) -> bool:
        """Every A-group holds exactly one task."""
        return self.num_a_groups == self.num_tasks

    @property
    def b_task_specific(self) -> bool:
        """Every B-group holds exactly one task."""
        return self.num_b_groups == self.num_tasks

    @property
    def b_nested_in_a(self) -> bool:
        """Every B-group lies inside one A-group (shared-A family; closed form exists)."""
        return refines(self.b_group, self.a_group)

    @property
    def a_nested_in_b(self) -> bool:
        """Every A-group lies inside one B-group (shared-B family; closed form exists)."""
        return refines(self.a_group, self.b_group)

    @property
    def has_closed_form(self) -> bool:
        """The exact solver applies: one side's groups nest inside the other's."""
        return self.b_nested_in_a or self.a_nested_in_b

    @property
    def own_ranks(self) -> bool:
        """Both sides hold one factor per task and `task_rank` gives each task its own rank
        (module docstring): per-task truncation at a rank per task."""
        return self.task_rank is not None and self.a_task_specific and self.b_task_specific

    @property
    def nested(self) -> bool:
        """Some task keeps fewer directions than the shared rank (`task_rank` below `k`)
        inside a shared factor (not `own_ranks`)."""
        return (
            self.task_rank is not None
            and not self.own_ranks
            and (self.rank is None or min(self.task_rank) < self.rank)
        )

    @property
    def nested_side(self) -> str | None:
        """`"b"` when the per-task factor sits on the B side (A shared: `U_t V_t^T Ah`),
        `"a"` for the mirror image, `None` for a plain plan or one of `own_ranks`."""
        if self.task_rank is None or self.own_ranks:
            return None
        return "b" if self.b_task_specific else "a"

    @property
    def name(self) -> str:
        """`shared_a`, `shared_b`, `full_merge`, `separate` or `grouped` (with `+nested`
        when tasks keep nested ranks below `k`, `+ranks` for `own_ranks` that differ)."""
        base = "grouped"
        for key, (a_by, b_by) in NAMED_PLANS.items():
            if (self.a_group, self.b_group) == (
                _grouping_labels(a_by, self.num_tasks),
                _grouping_labels(b_by, self.num_tasks),
            ):
                base = key
                break
        if self.nested:
            return base + "+nested"
        return base + "+ranks" if self.own_ranks and len(set(self.task_rank)) > 1 else base

    def with_rank(self, rank: int) -> SharingPlan:
        return dataclasses.replace(self, rank=rank)

    def resolved(self, default_rank: int) -> SharingPlan:
        """The plan with its rank set (`default_rank` when it has none; `max_t j_t` for
        `own_ranks`, whose factors are padded to it) and task ranks dropped when every `j_t`
        equals `k` (a plain plan, stored as one)."""
        plan = self if self.rank is not None else self.with_rank(default_rank)
        if plan.own_ranks:
            plan = plan.with_rank(max(plan.task_rank))
        if plan.task_rank is not None and min(plan.task_rank) == plan.rank:
            plan = plan.with_task_rank(None)
        return plan

    def with_task_rank(self, task_rank: int | Sequence[int] | None) -> SharingPlan:
        """The plan with nested ranks `j_t` (one integer for every task, or one per task)."""
        if task_rank is not None:
            try:
                task_rank = tuple(task_rank)  # a list, a tuple, a NumPy array
            except TypeError:  # one integer
                task_rank = (task_rank,) * self.num_tasks
        return dataclasses.replace(self, task_rank=task_rank)

    def inner_ranks(self, rank: int | None = None) -> tuple[int, ...]:
        """Each task's rank `j_t` (`k` for every task of a plain plan)."""
        k = self.rank if rank is None else rank
        if self.task_rank is not None:
            return self.task_rank
        if k is None:
            raise ValueError("inner_ranks: the plan has no rank yet; pass rank=")
        return (k,) * self.num_tasks

    def restrict(self, task_ids: Sequence[int]) -> SharingPlan:
        """The plan on a subset of tasks, group ids relabelled contiguously."""
        task_ids = list(task_ids)
        bad = [t for t in task_ids if not 0 <= t < self.num_tasks]
        if bad:
            raise ValueError(f"restrict: task ids {bad} out of range for {self.num_tasks} tasks")
        return SharingPlan(
            relabel([self.a_group[t] for t in task_ids]),
            relabel([self.b_group[t] for t in task_ids]),
            self.rank,
            None if self.task_rank is None else tuple(self.task_rank[t] for t in task_ids),
        )

    def groups(self, side: str) -> tuple[tuple[int, ...], ...]:
        """Member tasks of each group of `side` (`"a"` or `"b"`)."""
        labels = self.a_group if side == "a" else self.b_group
        out: list[list[int]] = [[] for _ in range(max(labels) + 1)]
        for t, g in enumerate(labels):
            out[g].append(t)
        return tuple(tuple(m) for m in out)

    # ------------------------------------------------------------------ storage
    def num_params(self, d_in: int, d_out: int, rank: int | None = None) -> int:
        """Stored parameters on one module: `K_A k d_in + K_B d_out k`; with nested ranks
        (A shared) `K_A k d_in + sum_t j_t (d_out + k)`, or the mirror image; with
        `own_ranks`, `sum_t j_t (d_in + d_out)`."""
        k = self.rank if rank is None else rank
        if k is None:
            raise ValueError("num_params: the plan has no rank yet; pass rank=")
        if not (self.own_ranks or self.nested):  # no task ranks, or every j_t = k
            return self.num_a_groups * k * d_in + self.num_b_groups * d_out * k
        inner = sum(self.task_rank)
        if self.own_ranks:
            return inner * (d_in + d_out)
        if self.nested_side == "b":
            return self.num_a_groups * k * d_in + inner * (d_out + k)
        return self.num_b_groups * d_out * k + inner * (d_in + k)

    def storage_ratio(
        self, d_in: int, d_out: int, ranks: Sequence[int], rank: int | None = None
    ) -> float:
        """`num_params` over the original adapters' `sum_t r_t (d_in + d_out)`."""
        return self.num_params(d_in, d_out, rank) / original_params(ranks, d_in, d_out)

    def to_dict(self) -> dict:
        out = {"a_group": list(self.a_group), "b_group": list(self.b_group), "rank": self.rank}
        if self.task_rank is not None:
            out["task_rank"] = list(self.task_rank)
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> SharingPlan:
        task_rank = data.get("task_rank")
        return cls(
            tuple(data["a_group"]),
            tuple(data["b_group"]),
            data.get("rank"),
            None if task_rank is None else tuple(task_rank),
        )
