"""Solvers: steps and time of `als` and `adam` to reach 1.001 x the exact optimum, and the
factored vs dense loss + gradient cost.

    PYTHONPATH=. python benchmarks/solvers.py                  # the grid below
    PYTHONPATH=. python benchmarks/solvers.py --d 1024 --T 8   # one point

Grid: d_in = d_out = d in {1024, 2048, 4096}, T in {8, 40, 200}; r = k = 16; shared-a plan;
synthetic adapters (`hydraopt_jax._synthetic`), relative weights (the default).

* `exact`: the closed form; its loss L* is the reference.
* `als`, `adam` (lr 1e-2) start from `init="random"`; with `tol=0` the iterates are
  deterministic, so the loss after N steps is one run with `max_steps=N` (traced: no
  recompile). N goes over a geometric grid; the table gives the first grid point with
  loss <= 1.001 L* and the warm time of that run (init included). Runs stop at a per-combo
  step cap or time cap (`--cap-s`), then `>N` is printed.
* factored vs dense: `jax.value_and_grad` of the loss w.r.t. `(Ah, Bh)`, jitted, same inputs.
  Dense = a benchmark-local function that forms every `Bh_t Ah` and the residual against
  the precomputed dense `dW_t` (`[T, d, d]`, the most favourable dense variant); it runs only
  where `T d^2` float32 fits in `--dense-mb` (default 1200 MB), else `-`.

Only ratios measured side by side in the same run mean anything (shared 2-core CPU).

Recorded run:

    Run at commit 31fc28b (package snapshot on PYTHONPATH), 2 CPU cores shared with other jobs,
    load average 10-14 throughout (absolute seconds are inflated several times; ratios in one
    row were measured side by side). Grid subsampled for time: d in {1024, 2048} x T in
    {8, 40} (+ rows below when present); T = 200 and d = 4096 not run in this recording.
    Command: python benchmarks/solvers.py --d 1024 2048 --T 8 40 --cap-s 15 --reps 3

    # OPENBLAS_NUM_THREADS=1; solvers: r = k = 16, shared-a, target loss <= 1.001 x exact, cap 15 s per solver per combo
    # jax 0.10.2 on cpu x1, 2 CPU cores, python 3.11.7
        d    T  exact s | als steps   als s    als/L* | adam steps  adam s   adam/L* | fact vg ms dense vg ms dense/fact
     1024    8    0.042 |         2    0.04   1.00000 |        1300    7.53   1.00047 |      24.22       328.0       13.5
     1024   40    0.260 |         2    0.22   1.00000 |        >300   25.38  11.62382 |      64.03       896.0       14.0
     2048    8    0.064 |         2    0.08   1.00000 |        2000   16.84   1.00005 |       8.57       676.0       78.9
     2048   40    0.544 |         2    0.38   1.00000 |         >80   16.04  87.47257 |     586.83      5259.4        9.0
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see speed.py

import hydraopt_jax as hj  # noqa: E402  (first: sets the XLA CPU flag)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from hydraopt_jax._loss import plan_loss, task_norms_sq, task_weights  # noqa: E402
from hydraopt_jax._synthetic import synthetic_collection  # noqa: E402

from _common import header, interleaved, median  # noqa: E402

STEP_GRID = (1, 2, 3, 5, 8, 13, 20, 30, 50, 80, 130, 200, 300, 500, 800, 1300, 2000, 3000, 5000)
TARGET = 1.001


def problem(d: int, num_tasks: int, r: int):
    apps = max(x for x in range(1, int(num_tasks**0.5) + 1) if num_tasks % x == 0)
    coll, _, _ = synthetic_collection(apps, num_tasks // apps, num_layers=1,
                                      shapes={"q_proj": (d, d)}, rank=r)  # fmt: skip
    a, b = next(iter(coll.values()))
    return jnp.asarray(a), jnp.asarray(b)


def timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def steps_to_target(A, B, plan, solver: str, optimum: float, max_cap: int, cap_s: float):
    """(steps, warm seconds, ratio reached) at the first grid point within TARGET."""
    def run(n):
        return hj.merge(A, B, plan, solver, init="random", max_steps=n, tol=0.0, throw=False)

    timed(lambda: run(1))  # compile
    last = (None, None, None)
    for n in STEP_GRID:
        if n > max_cap:
            break
        seconds, sol = timed(lambda n=n: run(n))
        ratio = float(sol.loss) / optimum
        last = (n, seconds, ratio)
        if ratio <= TARGET:
            return n, seconds, ratio, True
        if seconds > cap_s:
            break
    return (*last, False)


def dense_value_and_grad(plan):
    a_group = np.asarray(plan.a_group)
    b_group = np.asarray(plan.b_group)

    def loss(params, dense, weights):
        sa, sb = params
        approx = jnp.einsum("tok,tkd->tod", sb[b_group], sa[a_group])  # [T, d_out, d_in]
        return jnp.sum(weights * jnp.sum((dense - approx) ** 2, axis=(1, 2)))

    return jax.jit(jax.value_and_grad(loss))


def factored_value_and_grad(plan):
    def loss(params, A, B, weights, norms):
        return plan_loss(params[0], params[1], A, B, weights, norms, plan)

    return jax.jit(jax.value_and_grad(loss))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d", type=int, nargs="*", default=[1024, 2048, 4096])
    parser.add_argument("--T", type=int, nargs="*", default=[8, 40, 200])
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5, help="loss+grad timing repetitions")
    parser.add_argument("--cap-s", type=float, default=20.0, help="stop a solver's grid past this")
    parser.add_argument("--adam-cap", type=int, default=5000, help="largest Adam step count")
    parser.add_argument("--dense-mb", type=float, default=1200.0)
    args = parser.parse_args()
    r = k = args.r
    header(f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}; solvers: r = k = {r}, "
           f"shared-a, target loss <= {TARGET} x exact, cap {args.cap_s:.0f} s per solver "
           f"per combo")  # fmt: skip
    print(f"{'d':>5s} {'T':>4s} {'exact s':>8s} | {'als steps':>9s} {'als s':>7s} "
          f"{'als/L*':>9s} | {'adam steps':>10s} {'adam s':>7s} {'adam/L*':>9s} | "
          f"{'fact vg ms':>10s} {'dense vg ms':>11s} {'dense/fact':>10s}")  # fmt: skip
    for d in args.d:
        for num_tasks in args.T:
            A, B = problem(d, num_tasks, r)
            plan = hj.SharingPlan.shared_a(num_tasks, rank=k)
            timed(lambda: hj.merge(A, B, plan, "exact"))
            exact_s, sol = timed(lambda: hj.merge(A, B, plan, "exact"))
            optimum = float(sol.loss)
            als = steps_to_target(A, B, plan, "als", optimum, 5000, args.cap_s)
            adam = steps_to_target(A, B, plan, "adam", optimum, args.adam_cap, args.cap_s)

            weights = task_weights(A, B)
            norms = task_norms_sq(A, B)
            params = (sol.shared_a + 0.01, sol.shared_b * 1.01)
            fvg = factored_value_and_grad(plan)
            fns = {"fact": lambda: jax.block_until_ready(fvg(params, A, B, weights, norms))}
            dense_mb = num_tasks * d * d * 4 / 2**20
            if dense_mb <= args.dense_mb:
                dense = jnp.einsum("tor,trd->tod", B, A)
                dvg = dense_value_and_grad(plan)
                fns["dense"] = lambda: jax.block_until_ready(dvg(params, dense, weights))
            for fn in fns.values():
                fn()  # compile
            times = interleaved(fns, args.reps)
            fact_ms = 1e3 * median(times["fact"])
            if "dense" in times:
                dense_ms = 1e3 * median(times["dense"])
                dense_txt = f"{dense_ms:11.1f} {dense_ms / fact_ms:10.1f}"
                del dense
            else:
                dense_txt = f"{'-':>11s} {'-':>10s}"

            def fmt(res):
                n, s, ratio, ok = res
                return f"{('' if ok else '>') + str(n):>9s} {s:7.2f} {ratio:9.5f}"

            print(f"{d:5d} {num_tasks:4d} {exact_s:8.3f} | {fmt(als)} | {fmt(adam):>29s} | "
                  f"{fact_ms:10.2f} {dense_txt}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
