"""The numbers the issues ask for, computed from result rows (`{method, storage_ratio, score,
min_task_ratio, ...}`): the HydraOpt front, the front check, the summary."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

__all__ = [
    "best_hydraopt_at",
    "compare_results",
    "format_summary",
    "front_check",
    "hydraopt_front",
    "is_rival",
    "paired_margin",
    "paired_nll",
    "summarize",
    "task_ratios",
    "truncation_margins",
]

ONE_ADAPTER_RIVALS = (
    "baseline:linear",
    "baseline:ties",
    "baseline:dare_linear",
    "baseline:dare_ties",
)
TRUNCATION = "reference:truncate"


def _is(prefix: str, row: dict) -> bool:
    return row["method"].startswith(prefix)


def is_rival(row: dict) -> bool:
    """What HydraOpt's front must beat: every baseline, and per-task truncation."""
    return _is("baseline:", row) or _is(TRUNCATION, row)


def hydraopt_front(rows: Sequence[dict]) -> list[dict]:
    """The HydraOpt rows on the storage/score front (best score at each storage or less)."""
    front, best = [], -math.inf
    for row in sorted(
        (r for r in rows if _is("hydraopt:", r)), key=lambda r: (r["storage_ratio"], -r["score"])
    ):
        if row["score"] > best:
            front.append(row)
            best = row["score"]
    return front


def best_hydraopt_at(rows: Sequence[dict], max_storage: float) -> dict | None:
    """The best-scoring HydraOpt row with storage `<= max_storage`."""
    cands = [r for r in rows if _is("hydraopt:", r) and r["storage_ratio"] <= max_storage + 1e-9]
    return max(cands, key=lambda r: (r["score"], -r["storage_ratio"]), default=None)


def front_check(rows: Sequence[dict], tol: float = 1e-9) -> dict:
    """For every rival row (baselines and per-task truncation), the best HydraOpt row at
    equal or smaller storage must score at least as high.

    **Returns** `{"passed", "violations", "checked", "closest", "margins"}`: `margins` lists,
    per rival, the best HydraOpt row at its storage and the margin (HydraOpt - rival)."""
    violations, margins = [], []
    rivals = [r for r in rows if is_rival(r)]
    closest = None  # the rival with the smallest margin (HydraOpt score - rival score)
    for b in rivals:
        h = best_hydraopt_at(rows, b["storage_ratio"] + tol)
        margin = None if h is None else h["score"] - b["score"]
        margins.append(dict(rival=b["method"], storage=b["storage_ratio"], score=b["score"],
                            hydraopt=None if h is None else h["method"],
                            hydraopt_score=None if h is None else h["score"],
                            margin=margin))  # fmt: skip
        if h is not None and (closest is None or margin < closest["margin"]):
            closest = dict(
                baseline=b["method"], baseline_score=b["score"], hydraopt=h["method"],
                hydraopt_score=h["score"], margin=margin,
            )  # fmt: skip
        if h is None or h["score"] < b["score"] - tol:
            violations.append(
                dict(
                    baseline=b["method"],
                    baseline_storage=b["storage_ratio"],
                    baseline_score=b["score"],
                    hydraopt=None if h is None else h["method"],
                    hydraopt_storage=None if h is None else h["storage_ratio"],
                    hydraopt_score=None if h is None else h["score"],
                )
            )
    return dict(
        passed=not violations, checked=len(rivals), violations=violations, closest=closest,
        margins=margins,
    )  # fmt: skip


def task_ratios(accuracy: Mapping[str, float], own: Mapping[str, float]) -> dict[str, float]:
    """Merged / own accuracy per task; NaN where the own LoRA scores 0 (cannot be scored)."""
    return {t: a / own[t] if own[t] > 0 else math.nan for t, a in accuracy.items()}


def _paired(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[float, float] | None:
    """`(mean, s.e.)` over tasks of `a[t] - b[t]` (tasks in both, NaN dropped); None below two
    tasks."""
    diffs = [a[t] - b[t] for t in a if t in b and not math.isnan(a[t] - b[t])]
    if len(diffs) < 2:
        return None
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(var / len(diffs))


def paired_margin(result: dict, method: str, rival: str) -> tuple[float, float] | None:
    """`(margin, s.e.)` of `method`'s score minus `rival`'s, paired over tasks: the mean of the
    per-task ratio differences (equal to the difference of the two scores) and its standard
    error across tasks. None when the result lacks the per-task accuracies of either, or
    fewer than two tasks pair."""
    details, own = result.get("details", {}), result.get("config", {}).get("own_accuracy")
    acc = [details.get(m, {}).get("accuracy") for m in (method, rival)]
    if own is None or None in acc:
        return None
    return _paired(*(task_ratios(a, own) for a in acc))


def paired_nll(result: dict, method: str, rival: str) -> tuple[float, float] | None:
    """`(difference, s.e.)` of the mean answer NLL, `method` minus `rival`, paired over tasks
    (negative: `method` gives the answers more likelihood); None without per-task NLLs."""
    details = result.get("details", {})
    nll = [details.get(m, {}).get("answer_nll") for m in (method, rival)]
    return None if None in nll else _paired(*nll)


def compare_results(new: dict, old: dict) -> dict:
    """How far two results of one collection lie apart, row by row and task by task, over the
    methods and tasks both scored (e.g. regenerated adapters against the scored ones).

    **Returns** `{"methods", "tasks", "pairs", "equal_accuracy", "ratio_sd", "ratio_max",
    "nll_median", "nll_max", "nll_rel_median", "nll_rel_max"}`: of the (method, task) pairs,
    how many have the same exact-match accuracy; the standard deviation and largest size of
    the per-pair change of the score ratio (merged / own, each against its own LoRA); the
    median and largest size of the answer-NLL change, absolute and relative to `old`'s.
    """
    nd, od = new.get("details", {}), old.get("details", {})
    own_n = new.get("config", {}).get("own_accuracy", {})
    own_o = old.get("config", {}).get("own_accuracy", {})
    methods = [m for m in nd if m in od and "accuracy" in nd[m] and "accuracy" in od[m]]
    tasks = [t for t in new["tasks"] if t in old["tasks"] and t in own_n and t in own_o]
    ratio, nll, rel, equal = [], [], [], 0
    for m in methods:
        rn, ro = task_ratios(nd[m]["accuracy"], own_n), task_ratios(od[m]["accuracy"], own_o)
        for t in tasks:
            equal += nd[m]["accuracy"][t] == od[m]["accuracy"][t]
            ratio.append(rn[t] - ro[t])  # NaN where an own accuracy is 0: dropped below
            if "answer_nll" in nd[m] and "answer_nll" in od[m]:
                nll.append(abs(nd[m]["answer_nll"][t] - od[m]["answer_nll"][t]))
                if od[m]["answer_nll"][t] != 0:
                    rel.append(nll[-1] / abs(od[m]["answer_nll"][t]))
    pairs = len(ratio)
    ratio = [x for x in ratio if not math.isnan(x)]

    def median(xs):
        return statistics.median(xs) if xs else math.nan

    return dict(
        methods=methods, tasks=tasks, pairs=pairs, equal_accuracy=equal,
        ratio_sd=statistics.stdev(ratio) if len(ratio) > 1 else 0.0,
        ratio_max=max(map(abs, ratio), default=0.0), nll_median=median(nll),
        nll_max=max(nll, default=math.nan), nll_rel_median=median(rel),
        nll_rel_max=max(rel, default=math.nan),
    )  # fmt: skip


def truncation_margins(result: dict, rel_tol: float = 0.01) -> list[dict]:
    """Every HydraOpt row at a per-task truncation's storage (within `rel_tol`) against it:
    `{truncation, truncation_score, method, storage, score, margin, nll}` with `margin` and
    `nll` as `paired_margin` and `paired_nll` give them (None without per-task data), by
    storage, then HydraOpt score (best first)."""
    rows = result["rows"]
    out = []
    for t in sorted((r for r in rows if _is(TRUNCATION, r)), key=lambda r: r["storage_ratio"]):
        level = t["storage_ratio"]
        near = rel_tol * level
        same = [r for r in rows if _is("hydraopt:", r) and abs(r["storage_ratio"] - level) <= near]
        for h in sorted(same, key=lambda r: -r["score"]):
            out.append(dict(
                truncation=t["method"], truncation_score=t["score"], method=h["method"],
                storage=h["storage_ratio"], score=h["score"],
                margin=paired_margin(result, h["method"], t["method"]),
                nll=paired_nll(result, h["method"], t["method"]),
            ))  # fmt: skip
    return out


def summarize(rows: Sequence[dict]) -> dict:
    """Best HydraOpt at <= 0.55 storage, the one-adapter comparison, the front check."""
    by = {r["method"]: r for r in rows}
    best_055 = best_hydraopt_at(rows, 0.55)
    rivals = [by[m] for m in ONE_ADAPTER_RIVALS if m in by]
    one = None
    if rivals:
        one_storage = max(r["storage_ratio"] for r in rivals)
        h = best_hydraopt_at(rows, one_storage)
        best_rival = max(rivals, key=lambda r: r["score"])
        one = dict(
            storage=one_storage,
            hydraopt=None if h is None else h["method"],
            hydraopt_score=None if h is None else h["score"],
            best_rival=best_rival["method"],
            best_rival_score=best_rival["score"],
            passed=h is not None and h["score"] >= best_rival["score"],
        )
    return dict(
        best_hydraopt_at_055=None
        if best_055 is None
        else dict(
            method=best_055["method"], storage=best_055["storage_ratio"], score=best_055["score"]
        ),
        one_adapter=one,
        front_check=front_check(rows),
        front=[r["method"] for r in hydraopt_front(rows)],
    )


def format_summary(result: dict) -> str:
    """Human-readable summary lines of one collection's result."""
    s = summarize(result["rows"])
    name = result["collection"]
    lines = []
    b = s["best_hydraopt_at_055"]
    if b:
        lines.append(
            f"{name}: best HydraOpt at storage <= 0.55: {b['method']} "
            f"(storage {b['storage']:.4f}) score {b['score']:.4f}"
        )
    o = s["one_adapter"]
    if o and o["hydraopt"] is not None:
        lines.append(
            f"{name}: one-adapter storage ({o['storage']:.4f}): "
            f"{o['hydraopt']} {o['hydraopt_score']:.4f} "
            f"vs best of linear/ties/dare {o['best_rival']} {o['best_rival_score']:.4f} -> "
            f"{'PASS' if o['passed'] else 'FAIL'}"
        )
    fc = s["front_check"]
    lines.append(
        f"{name}: HydraOpt front >= every baseline and per-task truncation at equal or larger "
        f"storage: {'PASS' if fc['passed'] else 'FAIL'} ({fc['checked']} rivals checked, "
        f"{len(fc['violations'])} violations)"
    )
    if fc.get("closest"):
        c = fc["closest"]
        lines.append(
            f"  closest: {c['hydraopt']} {c['hydraopt_score']:.4f} vs {c['baseline']} "
            f"{c['baseline_score']:.4f} (margin {c['margin']:+.4f})"
        )
    for v in fc["violations"]:
        pm = v["hydraopt"] and paired_margin(result, v["hydraopt"], v["baseline"])
        rival = (
            f"  violation: {v['baseline']} storage {v['baseline_storage']:.4f} score "
            f"{v['baseline_score']:.4f} > "
        )
        if v["hydraopt"] is None:
            lines.append(rival + f"no HydraOpt point at storage <= {v['baseline_storage']:.4f}")
            continue
        lines.append(
            rival + f"{v['hydraopt']} storage {v['hydraopt_storage']:.4f} score "
            f"{v['hydraopt_score']:.4f}"
            + (f" (margin {pm[0]:+.4f}, paired s.e. over tasks {pm[1]:.4f})" if pm else "")
        )
    return "\n".join(lines)
