"""`python -m benchmarks.testbed`: score every merge method on the testbed collections.

    python -m benchmarks.testbed                                   # all four collections
    python -m benchmarks.testbed --collection small_lr_same_seed   # one (repeatable)
    python -m benchmarks.testbed --quick --json                    # reduced grid, JSON rows
    python -m benchmarks.testbed --report                          # md + png from the JSON

A full run writes `benchmarks/results/testbed_<collection>.json` and regenerates
`testbed.md` and `testbed.png` from every result file there. `--quick` (small_lr_same_seed,
2 applications x 4 languages, no rank sweeps) writes nothing unless `--out` is given.
Progress goes to stderr; with `--json` stdout holds only the JSON list of rows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.testbed", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--collection", action="append", help="collection name (repeatable)")
    parser.add_argument("--quick", action="store_true", help="reduced grid, < 10 min on 2 cores")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON to stdout")
    parser.add_argument("--methods", help="comma-separated method names (default: all)")
    parser.add_argument("--tasks", help="comma-separated task names (default: all / quick grid)")
    parser.add_argument(
        "--out", type=pathlib.Path, help="results folder (default: benchmarks/results)"
    )
    parser.add_argument("--no-write", action="store_true", help="write no files")
    parser.add_argument("--report", action="store_true", help="only rebuild md + png from the JSON")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--resume", action="store_true", help="reuse the methods of an existing result file"
    )
    args = parser.parse_args(argv)

    from . import evaluate_methods as EM

    out_dir = args.out or EM.RESULTS
    if args.report:
        written = EM.write_reports(out_dir)
        if written is None:
            print(f"no testbed_*.json in {out_dir}", file=sys.stderr)
            return 2
        for res in EM.load_results(out_dir):
            print(EM.format_summary(res))
        return 0

    real_stdout = sys.stdout
    write = not args.no_write and (not args.quick or args.out is not None)
    rows = []
    # keep stdout clean for --json: anything a library prints goes to stderr
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        from . import model as M

        collections = args.collection or list(
            EM.QUICK_COLLECTIONS if args.quick else EM.COLLECTIONS
        )
        tasks = args.tasks.split(",") if args.tasks else (EM.quick_tasks() if args.quick else None)
        methods = EM.methods_by_name(
            args.methods.split(",") if args.methods else None, sweep=not args.quick
        )
        base = M.load_base_model()
        summaries = []
        for name in collections:
            t0 = time.perf_counter()
            previous = None
            existing = out_dir / f"testbed_{EM.collection_path(name).name}.json"
            if args.resume and existing.exists():
                previous = json.loads(existing.read_text())
            result = EM.evaluate_collection(
                name, tasks=tasks, methods=methods, base_model=base, previous=previous,
                log=lambda s: print(s, file=sys.stderr, flush=True),
                on_progress=(lambda r: EM.write_result(r, out_dir)) if write else None,
            )  # fmt: skip
            result["seconds"] = round(time.perf_counter() - t0, 1)
            result["quick"] = bool(args.quick)
            rows += result["rows"]
            summaries.append(EM.format_summary(result))
            print(summaries[-1], file=sys.stderr, flush=True)
            if write:
                path = EM.write_result(result, out_dir)
                print(f"wrote {path} ({result['seconds']} s)", file=sys.stderr, flush=True)
        if write:
            written = EM.write_reports(out_dir)
            if written:
                print("wrote", *written, file=sys.stderr, flush=True)
    if args.json:
        real_stdout.write(json.dumps(rows) + "\n")
    else:
        print("\n".join(summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
