"""`python -m benchmarks.testbed`: score every merge method on the testbed collections.

    python -m benchmarks.testbed                                   # all four collections
    python -m benchmarks.testbed --collection small_lr_same_seed   # one (repeatable)
    python -m benchmarks.testbed --quick --json                    # reduced grid, JSON rows
    python -m benchmarks.testbed --report                          # md + png from the JSON
    python -m benchmarks.testbed --resume --methods hydraopt:plan+nested@0.12   # add rows

A full run writes `benchmarks/results/testbed_<collection>.json` and regenerates
`testbed.md` and `testbed.png` from every result file there. `--quick` (small_lr_same_seed,
2 applications x 4 languages, no rank sweeps) writes nothing unless `--out` is given.
Progress goes to stderr; with `--json` stdout holds only the JSON list of rows.
"""

from __future__ import annotations

import sys

from ..quality.run import main as run_main
from .evaluate_methods import TESTBED


def main(argv: list[str] | None = None) -> int:
    return run_main(TESTBED, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
