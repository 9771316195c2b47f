"""Storage vs score chart and tables of the testbed results (`benchmarks.quality.report`).

python -m benchmarks.testbed.chart            # testbed.md + testbed.png from the JSON files
"""

from __future__ import annotations

import argparse
import pathlib

from ..quality import report
from ..quality.analysis import format_summary
from .evaluate_methods import TESTBED


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=pathlib.Path, default=TESTBED.results)
    args = parser.parse_args(argv)
    written = TESTBED.write_reports(args.results)
    if written is None:
        raise SystemExit(f"no testbed_*.json in {args.results}")
    for res in report.load_results(args.results, TESTBED.name, TESTBED.collections):
        print(format_summary(res))
    print("wrote", *written)


if __name__ == "__main__":
    main()
