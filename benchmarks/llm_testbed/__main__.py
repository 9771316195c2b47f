"""`python -m benchmarks.llm_testbed`: score every merge method on the real-LLM testbed.

    python -m benchmarks.llm_testbed                                 # both collections
    python -m benchmarks.llm_testbed --collection same_seed          # one (repeatable)
    python -m benchmarks.llm_testbed --resume --methods hydraopt:plan+nested@0.10
    python -m benchmarks.llm_testbed --resume --redo --methods lora   # re-score rows in place
    python -m benchmarks.llm_testbed --report                        # md + png from the JSON
    python -m benchmarks.llm_testbed --quick --json                  # CI: trains 4 tasks first

The adapters must exist (`python -m benchmarks.llm_testbed.train --collection same_seed`,
hours on 2 cores; resumable). A full run writes `benchmarks/results/llm_testbed_<collection>
.json` and regenerates `llm_testbed.md` and `llm_testbed.png`. `--quick` trains the 4-task,
10-step collection into `_cache/quick/` when it is missing and scores the reduced grid on 16
test examples per task; it writes nothing unless `--out` is given.
"""

from __future__ import annotations

import sys

from ..quality.run import main as run_main
from .bench import TESTBED, quick_testbed


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--quick" in args:
        from . import train

        train.main(["--quick", "--threads", "2"] if "--threads" not in args else ["--quick"])
        return run_main(quick_testbed(), args, __doc__)
    return run_main(TESTBED, args, __doc__)


if __name__ == "__main__":
    sys.exit(main())
