#!/usr/bin/env bash
# Regenerate one collection's adapters and score the whole grid on them; rerun to continue.
#
#   benchmarks/llm_testbed/regenerate.sh same_seed [OUT]     # OUT: results/llm_testbed_regen40
#
# Both steps resume where a run stopped: `train.py` skips every task whose adapter matches a
# checksum its manifest records, and the grid (`--resume`) keeps every row already in OUT.
# One torch thread each, so that the two collections run side by side on a 2-core machine:
#
#   nohup benchmarks/llm_testbed/regenerate.sh same_seed > same_seed.log 2>&1 &
#   nohup benchmarks/llm_testbed/regenerate.sh diff_seed > diff_seed.log 2>&1 &
set -euo pipefail
collection=${1:?usage: regenerate.sh same_seed|diff_seed [OUT]}
out=$(realpath -m "${2:-$(dirname "$0")/../results/llm_testbed_regen40}")  # before the cd
cd "$(dirname "$0")/../.."
python -m benchmarks.llm_testbed.train --collection "$collection" --threads 1
python -m benchmarks.llm_testbed --collection "$collection" --threads 1 --out "$out" --resume
