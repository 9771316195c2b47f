"""Merge and score every method of a testbed on one collection, and the shared command line."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import pathlib
import re
import sys
import time
from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any

import numpy as np

from . import report
from .analysis import format_summary, summarize, task_ratios
from .collection import Collection
from .methods import FISHER, Grid, Method, merge_method
from .report import read_result

__all__ = [
    "Testbed",
    "evaluate_collection",
    "main",
    "make_row",
    "score_accuracies",
    "split_methods",
]

ROW_KEYS = ("method", "collection", "storage_ratio", "score", "min_task_ratio")


@dataclasses.dataclass(frozen=True)
class Testbed:
    """What the harness needs from a testbed.

    - `name`: prefix of its result files (`<name>_<collection>.json`, `<name>.md`,
      `<name>.png` in `results`); `title`, `command`: for the report.
    - `collections`, `quick_collections`, `quick_tasks`: what a full and a `--quick` run use.
    - `load`: `(collection name, tasks or None) -> Collection`.
    - `load_base`: `() -> base model`; `scorer`: `base -> (task, lora or None) -> accuracy`,
      or a mapping `{"accuracy": ..., other measures}` (kept per task in the details).
    - `calibrate`: `(base, Collection) -> {module: E[x x^T]}` on training-distribution inputs.
    - `sensitivities`: `(base, Collection) -> {module: weight}`, the Fisher module weights
      of the `+fisher` planner (`calibration.output_sensitivities`); None: no such methods.
    - `grid`: the methods; `reuse_own`: score the `lora` row from the manifest's own
      accuracies (1.0 by definition) instead of evaluating it again; `quick_methods`: the
      methods of `--quick` (default: the grid without sweeps).
    - `priority`: grid methods a run of the whole grid (no `--methods`) scores first, in
      this order (the rest follow in the grid's order), so that a run stopped part-way holds
      the rows that matter most. Result files list rows in the grid's order whatever the
      scoring order.
    """

    name: str
    title: str
    command: str
    results: pathlib.Path
    collections: tuple[str, ...]
    quick_collections: tuple[str, ...]
    quick_tasks: Callable[[], list[str]]
    load: Callable[[str, Sequence[str] | None], Collection]
    load_base: Callable[[], Any]
    scorer: Callable[[Any], Callable[[str, dict | None], float | Mapping[str, float]]]
    calibrate: Callable[[Any, Collection], dict]
    grid: Grid
    reuse_own: bool = False
    calibration: dict = dataclasses.field(default_factory=dict)
    quick_methods: tuple[str, ...] | None = None  # --quick: these (default: the quick grid)
    sensitivities: Callable[[Any, Collection], dict] | None = None
    sensitivity: dict = dataclasses.field(default_factory=dict)  # its settings, for the config
    priority: tuple[str, ...] = ()

    def write_reports(self, out_dir: pathlib.Path | None = None):
        """`<name>.md` and `<name>.png` from every result file in `out_dir`."""
        out_dir = pathlib.Path(out_dir or self.results)
        results = report.load_results(out_dir, self.name, self.collections)
        if not results:
            return None
        md = report.write_text_atomic(
            out_dir / f"{self.name}.md", report.markdown(results, self.title, self.command)
        )
        png = out_dir / f"{self.name}.png"
        report.save_chart(results, png, self.title)
        return md, png

    def order(self) -> dict[str, int]:
        return {m.name: i for i, m in enumerate(self.grid.methods(sweep=True))}

    def scoring_order(self, methods: Sequence[Method]) -> list[Method]:
        """`methods` with the `priority` ones first, in its order; the others keep theirs."""
        unknown = set(self.priority) - set(self.order())
        if unknown:
            raise ValueError(f"{self.name}: priority names no grid method: {sorted(unknown)}")
        if len(set(self.priority)) != len(self.priority):
            raise ValueError(f"{self.name}: priority names a method twice")
        rank = {name: i for i, name in enumerate(self.priority)}
        return sorted(methods, key=lambda m: rank.get(m.name, len(rank)))


def score_accuracies(
    accuracy: dict[str, float], own_accuracy: dict[str, float]
) -> tuple[float, float, dict[str, float]]:
    """`(score, min_task_ratio, ratios)`: mean and min over tasks of merged / own accuracy.
    A task whose own LoRA scores 0 cannot be scored (its ratio is NaN, left out)."""
    ratios = task_ratios(accuracy, own_accuracy)
    values = [v for v in ratios.values() if v == v]
    return float(np.mean(values)), float(np.min(values)), ratios


def split_scores(scores: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, dict]]:
    """`(accuracy, extra)` from a scorer's per-task results: a float is the accuracy; a
    mapping holds `"accuracy"` and further measures (`extra[key][task]`)."""
    accuracy, extra = {}, {}
    for task, value in scores.items():
        if isinstance(value, Mapping):
            accuracy[task] = float(value["accuracy"])
            for key, x in value.items():
                if key != "accuracy":
                    extra.setdefault(key, {})[task] = float(x)
        else:
            accuracy[task] = float(value)
    return accuracy, extra


def make_row(method: str, collection: str, storage: float, score: float, worst: float) -> dict:
    return dict(
        method=method,
        collection=collection,
        storage_ratio=round(float(storage), 6),
        score=round(float(score), 6),
        min_task_ratio=round(float(worst), 6),
    )


def evaluate_collection(
    testbed: Testbed,
    collection: str,
    *,
    tasks: Sequence[str] | None = None,
    methods: Sequence[Method] | None = None,
    base_model=None,
    log: Callable[[str], None] = lambda s: None,
    previous: dict | None = None,
    redo: Container[str] = (),
    on_progress: Callable[[dict], None] | None = None,
) -> dict:
    """Merge and score every method on one collection.

    `previous`: an earlier (partial) result of the same collection and tasks; its methods are
    reused, not recomputed, except those named in `redo` (re-scored in place: e.g. to add a
    measure to existing rows; the other previous rows are carried). `on_progress(result)` is
    called after every method with the partial result (`"complete": False`), e.g. to write it;
    the final result is `"complete"` when every method of the testbed's grid has a row.

    **Returns** `{"collection", "tasks", "rows", "details", "config", "summary", "complete"}`;
    `rows` are `{method, collection, storage_ratio, score, min_task_ratio}` dicts.
    """
    coll = testbed.load(collection, tasks)
    base_model = testbed.load_base() if base_model is None else base_model
    score = testbed.scorer(base_model)
    methods = testbed.grid.methods() if methods is None else list(methods)
    covs = fisher = None  # computed on the first method that needs them
    rows, details = [], {}
    if previous is not None and previous.get("tasks") != coll.tasks:
        log(f"[{coll.name}] the previous result is on other tasks: nothing of it is reused")
        previous = None
    previous = previous or {"rows": [], "details": {}}
    carried = {r["method"]: r for r in previous["rows"] if r["method"] in previous["details"]}
    done = {m: r for m, r in carried.items() if m not in redo}  # reused, not recomputed
    digests = {previous["details"][m].get("adapters") for m in carried} - {None}
    if digests - {coll.digest}:
        # rows of two adapter sets would be compared by the checks: refuse, as for other tasks
        raise ValueError(
            f"{coll.path}: the previous result was scored on other adapters "
            f"({', '.join(sorted(digests))}) than these ({coll.digest}); --out a new folder"
        )
    order = testbed.order()

    def result(finished: bool) -> dict:
        # every previous row not (yet) redone is carried: an interrupted run loses none
        kept = [r for m, r in carried.items() if m not in details]
        all_rows = sorted(rows + kept, key=lambda r: order.get(r["method"], len(order)))
        # complete: the run finished and every method of the grid has its row
        complete = finished and set(order) <= {r["method"] for r in all_rows}
        all_details = {r["method"]: previous["details"][r["method"]] for r in kept} | details
        return dict(
            collection=coll.name,
            tasks=coll.tasks,
            complete=complete,
            rows=all_rows,
            details=all_details,
            config=dict(
                calibration=testbed.calibration,
                sensitivity=testbed.sensitivity,
                rank=coll.rank,
                weights="relative",
                own_accuracy=coll.own_accuracy,
                adapters=coll.digest,
            ),
            summary=summarize(all_rows),
        )

    for method in methods:
        if method.name in done:
            rows.append(done[method.name])
            details[method.name] = previous["details"][method.name]
            log(f"[{coll.name}] {method.name:36s} (reused from the previous result)")
            continue
        if method.activation and covs is None:
            t0 = time.perf_counter()
            covs = testbed.calibrate(base_model, coll)
            log(f"[{coll.name}] activation covariances: {time.perf_counter() - t0:.1f} s")
        if method.module_weighting == FISHER and fisher is None:
            if testbed.sensitivities is None:
                raise ValueError(f"{method.name}: the {testbed.name} testbed has no sensitivities")
            t0 = time.perf_counter()
            fisher = testbed.sensitivities(base_model, coll)
            top = sorted(fisher.values(), reverse=True) or [0.0]
            log(
                f"[{coll.name}] output sensitivities: {time.perf_counter() - t0:.1f} s "
                f"(weights {top[-1]:.4f}-{top[0]:.2f}; the 10 largest of {len(top)} hold "
                f"{sum(top[:10]) / max(sum(top), 1e-300):.0%})"
            )
        merged = merge_method(method, coll, covs, fisher)
        t0 = time.perf_counter()
        if method.kind == "lora" and testbed.reuse_own:
            accuracy, extra = dict(coll.own_accuracy), {}
        else:
            accuracy, extra = split_scores({t: score(t, lora) for t, lora in merged.loras.items()})
        eval_s = time.perf_counter() - t0
        value, worst, _ = score_accuracies(accuracy, coll.own_accuracy)
        rows.append(make_row(method.name, coll.name, merged.storage_ratio, value, worst))
        details[method.name] = dict(
            num_params=merged.num_params,
            original_params=merged.original_params,
            accuracy=accuracy,
            relative_error_mean=float(np.mean(list(merged.relative_error.values()))),
            merge_seconds=round(merged.seconds, 3),
            options_seconds=round(merged.options_seconds, 3),  # of merge_seconds
            solver_steps_mean=round(merged.steps[0], 2),  # iterations over modules
            solver_steps_max=merged.steps[1],
            eval_seconds=round(eval_s, 3),
            adapters=coll.digest,  # which adapters this row was scored on
        )
        if method.module_weighting == FISHER:  # what the planner was given
            details[method.name]["module_weights"] = {m: round(w, 6) for m, w in fisher.items()}
        for key, per_task in extra.items():  # e.g. answer_nll: per task and the mean
            details[method.name][key] = per_task
            details[method.name][f"{key}_mean"] = float(np.mean(list(per_task.values())))
        err = details[method.name]["relative_error_mean"]
        log(
            f"[{coll.name}] {method.name:36s} storage {merged.storage_ratio:7.4f}  "
            f"score {value:.4f}  min {worst:.4f}  rel.err {err:.3f}  "
            f"({merged.seconds:.1f} s merge, {eval_s:.1f} s eval)"
        )
        if on_progress is not None:
            on_progress(result(False))
    return result(True)


def split_methods(text: str) -> list[str]:
    """`--methods`: names separated by commas; a comma inside a name (`shared-a@k=r,j=r/8`)
    does not split it, since every name starts with `lora` or a `kind:` prefix."""
    return [n for n in re.split(r",(?=\s*(?:lora\b|[a-z]+:))", text) if n.strip()]


def combine_into(testbed: Testbed, source: pathlib.Path, out_dir: pathlib.Path) -> int:
    """`--combine`: each of `source`'s result files merged into `out_dir`'s file of the same
    collection (`report.combine_results`: `source` wins for a method in both, and each such
    replaced row is listed; the same tasks required), then the reports rebuilt. Checks every
    file before writing any; a bad file: one line naming it, status 2."""
    if pathlib.Path(source).resolve() == pathlib.Path(out_dir).resolve():
        print(f"{source}: is --out itself; nothing to combine", file=sys.stderr)
        return 2
    paths = sorted(pathlib.Path(source).glob(f"{testbed.name}_*.json"))
    if not paths:
        print(f"{source}: no {testbed.name}_*.json to combine", file=sys.stderr)
        return 2
    merged, replaced = [], []
    try:
        for source_path in paths:
            new = read_result(source_path)
            path = pathlib.Path(out_dir) / f"{testbed.name}_{new['collection']}.json"
            if not path.exists():
                merged.append(new)
                continue
            old = read_result(path)
            if old["tasks"] != new["tasks"]:
                raise ValueError(f"{path}: other tasks than {source_path}; nothing combined")
            if len({r.get("config", {}).get("adapters") for r in (old, new)} - {None}) > 1:
                raise ValueError(
                    f"{path}: scored on other adapters than {source_path}; nothing combined"
                )
            mine = {r["method"] for r in old["rows"]}
            replaced += [f"{path.name}: {r['method']}" for r in new["rows"] if r["method"] in mine]
            merged.append(report.combine_results(old, new, testbed.order()))
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    for line in replaced:
        print(f"replaced by {source}'s row: {line}", file=sys.stderr)
    for result in merged:
        print("wrote", report.write_result(result, out_dir, testbed.name), file=sys.stderr)
        print(format_summary(result))
    ok, _ = _write_reports(testbed, out_dir)
    return 0 if ok else 2


def _write_reports(testbed: Testbed, out_dir: pathlib.Path) -> tuple[bool, tuple | None]:
    """`(True, testbed.write_reports(out_dir))`, or `(False, None)` after one line on stderr
    naming a damaged result file in `out_dir` (nothing of the reports written)."""
    try:
        return True, testbed.write_reports(out_dir)
    except ValueError as e:
        print(e, file=sys.stderr)
        return False, None


def main(testbed: Testbed, argv: list[str] | None = None, doc: str = "") -> int:
    """`python -m benchmarks.<testbed>`: score every method on the testbed's collections.

    A full run writes `<results>/<name>_<collection>.json` and regenerates `<name>.md` and
    `<name>.png` from every result file there. `--quick` writes nothing unless `--out` is
    given. Progress goes to stderr; with `--json` stdout holds only the JSON list of rows.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{testbed.name}",
        description=(doc or main.__doc__).splitlines()[0],
    )
    parser.add_argument("--collection", action="append", help="collection name (repeatable)")
    parser.add_argument("--quick", action="store_true", help="reduced grid (CI)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON to stdout")
    parser.add_argument("--methods", help="comma-separated method names (default: all)")
    parser.add_argument("--tasks", help="comma-separated task names (default: all / quick grid)")
    parser.add_argument("--out", type=pathlib.Path, help=f"results folder ({testbed.results})")
    parser.add_argument("--no-write", action="store_true", help="write no files")
    parser.add_argument("--report", action="store_true", help="only rebuild md + png from the JSON")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--resume", action="store_true", help="reuse the methods of an existing result file"
    )
    parser.add_argument(
        "--combine", type=pathlib.Path, metavar="DIR",
        help="add the rows of DIR's result files (another run's --out) to --out's, then report",
    )  # fmt: skip
    parser.add_argument(
        "--redo", action="store_true",
        help="with --resume and --methods: re-score the listed methods, keep every other row",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.redo and not (args.resume and args.methods):
        parser.error("--redo needs --resume and --methods (the rows to re-score)")
    out_dir = args.out or testbed.results
    if args.combine is not None:
        others = [f for f in ("quick", "json", "methods", "tasks", "no_write", "report", "resume",
                              "redo", "collection") if getattr(args, f)]  # fmt: skip
        if others:
            parser.error(f"--combine takes only --out (not --{others[0].replace('_', '-')})")
        return combine_into(testbed, args.combine, out_dir)
    if args.report:
        ok, written = _write_reports(testbed, out_dir)
        if not ok:
            return 2
        if written is None:
            print(f"no {testbed.name}_*.json in {out_dir}", file=sys.stderr)
            return 2
        for res in report.load_results(out_dir, testbed.name, testbed.collections):
            print(format_summary(res))
        return 0

    real_stdout = sys.stdout
    write = not args.no_write and (not args.quick or args.out is not None)
    rows = []
    # keep stdout clean for --json: anything a library prints goes to stderr
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        collections = args.collection or list(
            testbed.quick_collections if args.quick else testbed.collections
        )
        tasks = (
            args.tasks.split(",") if args.tasks else (testbed.quick_tasks() if args.quick else None)
        )
        names = split_methods(args.methods) if args.methods else None
        if names is None and args.quick and testbed.quick_methods:
            names = list(testbed.quick_methods)
        methods = testbed.grid.by_name(names, sweep=not args.quick)
        if names is None:  # the whole grid: the rows that matter most first
            methods = testbed.scoring_order(methods)
        runs = []  # (collection, previous result or None, tasks), checked before any work
        for name in collections:
            previous, run_tasks = None, tasks
            existing = out_dir / f"{testbed.name}_{name}.json"
            if args.resume and existing.exists():
                try:  # the same check as --combine's: one line naming a bad file
                    previous = read_result(existing)
                except ValueError as e:
                    print(e, file=sys.stderr)
                    return 2
                # resume on the file's tasks; other tasks would replace its rows, so refuse
                if run_tasks is None:
                    run_tasks = previous["tasks"]
                elif list(run_tasks) != previous["tasks"]:
                    print(
                        f"{existing}: holds other tasks ({len(previous['tasks'])}) than --tasks "
                        f"({len(run_tasks)}); give its tasks, or --out a new folder",
                        file=sys.stderr,
                    )
                    return 2
            runs.append((name, previous, run_tasks))
        base = testbed.load_base()
        summaries = []
        for name, previous, run_tasks in runs:
            t0 = time.perf_counter()
            try:  # missing adapters, a previous result of other ones: one line, status 2
                result = evaluate_collection(
                    testbed, name, tasks=run_tasks, methods=methods, base_model=base,
                    previous=previous,
                    redo={m.name for m in methods} if args.redo else (),
                    log=lambda s: print(s, file=sys.stderr, flush=True),
                    on_progress=(lambda r: report.write_result(r, out_dir, testbed.name))
                    if write else None,
                )  # fmt: skip
            except (ValueError, OSError) as e:
                print(e, file=sys.stderr)
                return 2
            result["seconds"] = round(time.perf_counter() - t0, 1)
            result["quick"] = bool(args.quick)
            rows += result["rows"]
            summaries.append(format_summary(result))
            print(summaries[-1], file=sys.stderr, flush=True)
            if write:
                path = report.write_result(result, out_dir, testbed.name)
                print(f"wrote {path} ({result['seconds']} s)", file=sys.stderr, flush=True)
        if write:
            ok, written = _write_reports(testbed, out_dir)  # the results are written already
            if not ok:
                return 2
            if written:
                print("wrote", *written, file=sys.stderr, flush=True)
    if args.json:
        real_stdout.write(json.dumps(rows) + "\n")
    else:
        print("\n".join(summaries))
    return 0
