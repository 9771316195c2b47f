#!/usr/bin/env bash
# GPU check: one prepared script for a lent GPU machine (JAX CUDA, peft, torch installed).
#
#   run from the working tree:   OUT=/some/dir bash benchmarks/gpu_check.sh
#   (with the device tool:       run(command="bash benchmarks/gpu_check.sh", timeout_s=560))
#
# Writes logs under $OUT (default /tmp/gpu_check): env.log, tests.log, speed.log,
# scale_a.log, scale_b.log, flops.log, summary.log. Every step has its own timeout so the
# whole script stays under ~9 minutes, and a failing step does not stop the others.
# Copy summary.log + flops.log into benchmarks/results/gpu.md afterwards.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-4}
SUMMARY="$OUT/summary.log"
: > "$SUMMARY"

step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2
  shift 2
  local start=$SECONDS
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc ($((SECONDS - start)) s)" | tee -a "$SUMMARY"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())"
  python -c "import torch, peft; print('torch', torch.__version__, 'peft', peft.__version__)"
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log" >> "$SUMMARY"

step tests 150 python -m pytest -q -p no:benchmark -x tests/test_merge.py
# PEFT runs on the CPU (its model is a CPU torch model); ours on the GPU.
step speed 120 python benchmarks/speed.py --small --reps 3
step scale_a 170 python benchmarks/scale.py --only a
step scale_b 100 python benchmarks/scale.py --only b --tasks-b 200 --layers-b 1

# Achieved FLOP/s and bandwidth of the exact solver (shared-a, randomized subspace path) on
# a large batch of modules, against H200 peaks: 67 TFLOP/s fp32 (non-tensor-core),
# 989 TFLOP/s dense bf16, 4.8 TB/s HBM. FLOPs and bytes from XLA's cost analysis of the
# compiled program (loops counted as XLA counts them) and from the analytic count of the
# dominant term (the implicit Gram applications).
step flops 120 python - <<'EOF'
import time
import hydraopt_jax as hj
import jax, jax.numpy as jnp, numpy as np
from hydraopt_jax._solvers import _linalg

M, T, r, d = 16, 200, 16, 4096
k = r
plan = hj.SharingPlan.shared_a(T, rank=k)
key = jax.random.PRNGKey(0)
A = jax.random.normal(key, (M, T, r, d), jnp.float32) / np.sqrt(d)
B = jax.random.normal(jax.random.fold_in(key, 1), (M, T, d, r), jnp.float32) * 0.02

def solve(a, b):
    sol = hj.merge(a, b, plan, "exact", throw=False)
    return sol.shared_a, sol.shared_b, sol.loss

f = jax.jit(jax.vmap(solve))
compiled = f.lower(A, B).compile()
cost = compiled.cost_analysis()
cost = cost[0] if isinstance(cost, (list, tuple)) else cost
jax.block_until_ready(f(A, B))
times = []
for _ in range(5):
    t = time.perf_counter(); jax.block_until_ready(f(A, B)); times.append(time.perf_counter() - t)
sec = float(np.median(times))
p = k + _linalg.OVERSAMPLE
applies = _linalg.POWER_STEPS + 2
analytic = M * applies * 8.0 * T * r * d * p      # 4 einsums of 2 T r d p flops each
data = M * T * r * 2 * d * 4.0                     # bytes of A and B
xla_flops = float(cost.get("flops", float("nan")))
xla_bytes = float(cost.get("bytes accessed", float("nan")))
print(f"{M} modules x T={T}, r={r}, d={d}, shared-a exact: median {sec*1e3:.1f} ms "
      f"({sec/M*1e3:.2f} ms per module); inputs {data/2**30:.2f} GiB")
print(f"XLA cost analysis: {xla_flops:.3e} flops, {xla_bytes:.3e} bytes -> "
      f"{xla_flops/sec/1e12:.2f} TFLOP/s = {100*xla_flops/sec/67e12:.1f}% of 67 TFLOP/s fp32, "
      f"{100*xla_flops/sec/989e12:.2f}% of 989 TFLOP/s bf16; "
      f"{xla_bytes/sec/1e12:.2f} TB/s = {100*xla_bytes/sec/4.8e12:.1f}% of 4.8 TB/s")
print(f"analytic Gram applications: {analytic:.3e} flops -> {analytic/sec/1e12:.2f} TFLOP/s "
      f"= {100*analytic/sec/67e12:.1f}% of fp32 peak; reading A and B once per application: "
      f"{applies*data/sec/1e12:.2f} TB/s = {100*applies*data/sec/4.8e12:.1f}% of 4.8 TB/s")
EOF
cat "$OUT/flops.log" >> "$SUMMARY"
tail -n 3 "$OUT/tests.log" >> "$SUMMARY"
cat "$SUMMARY"
