"""Speed, side by side: PEFT `add_weighted_adapter` vs hydraopt_jax on the same adapters.

    PYTHONPATH=. python benchmarks/speed.py            # acceptance: 16 adapters x 16 modules, d=2048, r=16
    PYTHONPATH=. python benchmarks/speed.py --small    # quick: 4 adapters x 4 modules, d=512

One run builds a synthetic collection, writes it as PEFT adapter dirs, loads them all into a
torch model of `nn.Linear` modules (PEFT's own loader), and times, interleaved (round robin,
median of `--reps`):

* in process: PEFT `linear`, `cat`, `svd`, `ties_svd` (adapters already loaded) against our
  `full-merge` (exact, uniform weights: the same target as PEFT's `svd`), `shared-a` and the
  baselines `linear`, `svd`, `ties` (collection already in memory; warm, after one compile,
  whose time is reported separately);
* cold commands: `hydraopt merge DIRS --plan full-merge --weighting uniform` (and
  `--plan shared-a`) in a fresh Python process, against a fresh PEFT process that loads the
  base model and the adapters, runs `add_weighted_adapter(..., "svd")` and saves the result.
  The command keeps JAX's persistent compilation cache (`HYDRAOPT_CACHE_DIR`): each of ours
  runs once with an empty cache (compiles everything, as the very first run does) and once
  with a warm one (every later run with these shapes).

Errors: every one-adapter output is compared with the exact mean update
`M = (1/T) sum_t B_t A_t`: `||dW_merged - M||_F / ||M||_F`, in factored form (float64).
`shared-a` keeps one adapter per task; its column is the mean per-task relative error
`||dW_t - dW_hat_t|| / ||dW_t||` instead (its own objective), marked `*`.

Only ratios measured side by side mean anything here (2 shared CPU cores).

Recorded run (acceptance figure; `PYTHONPATH=. python benchmarks/speed.py --reps 3`), at commit
36c21db on the 2-core development machine while two LLM-testbed trainings ran at nice 19
(load average 4-5; they yield the CPU but share caches and memory bandwidth):

    # OPENBLAS_NUM_THREADS=1; speed: 16 adapters x 16 modules, d_in = d_out = 2048, r = k = 16; torch 2.13.0+cpu (2 threads)
    # jax 0.10.2 on cpu x1, 2 CPU cores, python 3.11.7

    ## in process (median of 3; PEFT ties_svd: 1); ratio = time(PEFT svd) / time(method)
    method                            rank  median s  x vs PEFT svd  compile s  err vs mean
    PEFT linear                         16     0.107          193.2          -    1.50e+01 
    PEFT cat                           256     0.190          108.5          -    0.00e+00 
    PEFT svd                            16    20.621            1.0          -    4.54e-02 
    PEFT ties_svd                       16    78.908            0.3          -    1.78e+00 
    hydraopt full-merge (exact)         16     0.309           66.7       0.73    4.54e-02 
    hydraopt shared-a (exact)           16     0.315           65.4       0.64    9.59e-02*
    hydraopt baseline linear            16     0.137          150.2       0.79    1.50e+01 
    hydraopt baseline svd               16     0.635           32.5       0.21    4.54e-02 
    hydraopt baseline ties              16     0.504           40.9       0.79    2.37e+00 

    ## cold commands (fresh process: imports, load, compile, solve, write; median of 3, each run listed)
    command                             median s  x vs PEFT svd in process  x vs PEFT svd fresh process  each run: s (x vs PEFT svd fresh process)
    PEFT svd (fresh process)               31.85                       0.6                          1.0  31.85 (1.0x), 31.80 (1.0x), 34.80 (0.9x)
    merge full-merge, empty cache           2.68                       7.7                         11.9  2.68 (11.9x), 2.56 (12.4x), 2.82 (11.3x)
    merge full-merge, warm cache            1.89                      10.9                         16.9  1.89 (16.9x), 1.84 (17.3x), 2.05 (15.5x)
    merge shared-a, empty cache             2.56                       8.1                         12.5  2.56 (12.5x), 2.53 (12.6x), 2.58 (12.4x)
    merge shared-a, warm cache              2.00                      10.3                         15.9  2.00 (15.9x), 1.95 (16.3x), 2.12 (15.0x)
    error vs the exact mean of the command's full-merge bundle: 4.54e-02 (warm cache), 4.54e-02 (empty cache)

    * shared-a keeps one adapter per task: its error is the mean per-task relative error.

Against the targets (16 adapters x 16 modules at d = 2048, equal error 4.54e-2 against the
exact mean for PEFT `svd` and our full merge, checked on the command's own bundle too):

* **First run of the command (empty compilation cache), >= 10x a fresh PEFT process in each
  of three runs:** 11.9x, 12.4x, 11.3x here (2.56-2.82 s against 31.8-34.8 s). Two earlier
  runs this session, before the two cuts below were both in: 12.7x, 11.8x, 12.7x and 9.9x,
  10.6x, 10.9x (idle-machine runs in earlier sessions: 8.8-11.2x). Against PEFT's merge
  *inside* an already-loaded process (no imports, no loading) the first run is 7.7-8.7x.
* With a warm cache (every later run with these shapes): 15.5-17.3x a fresh PEFT process
  (13.9-16.1x in the two earlier runs).
* In process: 66.7x here; 85.4x and 84.6x in the two earlier runs this session (69-82x over
  six idle runs in earlier sessions; PEFT svd 17.4-22.1 s, our full merge 0.21-0.31 s).

Where a first run's 2.0-2.7 s go (cProfile of `hydraopt merge --plan full-merge`, empty
cache, at cfd8469): starting Python and importing the command 0.78 s (JAX alone 0.39 s);
typer's argument parsing 0.1 s (it builds pydantic validators); modules imported on first use
0.33 s (scipy's BLAS/LAPACK tables that jaxlib's CPU LAPACK kernels load, 0.10 s; typer's
pydantic adapters 0.08 s; rich, psutil); tracing 0.09 s, lowering 0.13 s and XLA's
compilation 0.51 s of the one solve program (339 StableHLO ops, 8 LAPACK calls); the solve
itself ~0.2 s; reading 64 MB 0.05 s; writing 0.02 s. Cut since: two tiny programs compiled
only to convert the solver's unused scalar arguments (`_solve._scalar`, 0.04 s), and SHA-256
of every input file (0.04-0.07 s), now computed only when a checkpoint or a multi-process part
needs the run's fingerprint. XLA flags (`--xla_llvm_disable_expensive_passes`,
`--xla_backend_optimization_level=0`) did not shorten the compile by more than 0.08 s and
slowed the solve. What remains is JAX's own start-up and compiler.

Before commits d710b13 / 5b54f4e the in-process figure was 41-50x (0.42-0.52 s): the per-task
residuals are now taken from the Gram identity when every residual is large (a merge without
task-specific factors; QR otherwise, see `_loss.reported_residuals`), and each virtual task's
triangular factor from a Cholesky of its small Gram instead of a Householder QR
(`_solvers/_linalg.gram_factor`, with a QR fallback when the Cholesky fails). Only ratios from
one run compare: an earlier record (commit 44ba5aa, 202x) was taken at load 8-14, which slowed
PEFT's dense SVD 15x and ours far less. Where our in-process time goes (full merge, warm,
~0.21-0.27 s idle): the batched 256 x 256 eigh 50 ms, GEMMs of the Grams and products ~90 ms,
relayout copies ~25 ms, stacking the inputs ~20 ms.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# jaxlib's LAPACK (QR, SVD, eigh) is scipy's OpenBLAS; its threads spin against each other
# on a loaded 2-core machine (100-300x slower small QR/SVD measured here). Torch uses MKL
# and is not affected. Set before JAX loads; inherited by the `hydraopt merge` children.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import hydraopt_jax as hj  # noqa: E402  (first: sets the XLA CPU flag)
from hydraopt_jax._synthetic import synthetic_collection  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from _common import (  # noqa: E402
    error_vs_mean,
    header,
    hydraopt_cmd,
    interleaved,
    median,
    run_cmd,
    write_collection,
)
from _peft_model import build_peft_model  # noqa: E402

PEFT_COLD_SCRIPT = r"""
import sys, warnings
warnings.simplefilter("ignore")
bench, d, layers, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
dirs = sys.argv[5:]
sys.path.insert(0, bench)
from _peft_model import build_peft_model
names = [f"t{i}" for i in range(len(dirs))]
model = build_peft_model(dirs, names, d, layers)
model.add_weighted_adapter(names, [1.0 / len(names)] * len(names), "merged", combination_type="svd")
model.save_pretrained(out, selected_adapters=["merged"])
"""


def peft_merged_factors(model, adapter: str, modules):
    """`{module: (A_hat [k, d_in], B_hat [d_out, k])}` of a PEFT adapter, scale folded in B."""
    out = {}
    for module in modules:
        layer = model.base_model.model.get_submodule(module)
        a = layer.lora_A[adapter].weight.detach().double().numpy()
        b = layer.lora_B[adapter].weight.detach().double().numpy() * layer.scaling[adapter]
        out[module] = (a, b)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="4 adapters x 4 modules, d=512")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (median)")
    parser.add_argument("--slow-reps", type=int, default=1,
                        help="repetitions of PEFT ties_svd")
    args = parser.parse_args()  # fmt: skip
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.small:
        apps, langs, layers, d = 2, 2, 4, 512
    else:
        apps, langs, layers, d = 4, 4, 16, 2048
    r = k = 16
    num_tasks = apps * langs
    header(
        f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}; speed: {num_tasks} adapters x {layers} modules, d_in = d_out = {d}, r = k = {r}; "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    collection, _, _ = synthetic_collection(
        apps, langs, num_layers=layers, shapes={"q_proj": (d, d)}, rank=r
    )
    modules = list(collection)
    names = [f"t{i}" for i in range(num_tasks)]
    tmp = Path(tempfile.mkdtemp(prefix="hydraopt-speed-"))
    try:
        dirs = write_collection(tmp / "adapters", collection, names)
        model = build_peft_model(dirs, names, d, layers)
        uniform = [1.0 / num_tasks] * num_tasks

        errors: dict[str, float] = {}
        ranks: dict[str, int] = {}

        def peft_run(kind: str):
            weights = [1.0] * num_tasks if kind.startswith("ties") else uniform
            extra = {"density": 0.2} if kind.startswith("ties") else {}

            def fn():
                model.add_weighted_adapter(names, weights, "merged", combination_type=kind, **extra)
                factors = peft_merged_factors(model, "merged", modules)
                model.delete_adapter("merged")
                return factors

            return fn

        # ---- our side
        full_plan = hj.SharingPlan.full_merge(num_tasks, rank=k)
        shared_plan = hj.SharingPlan.shared_a(num_tasks, rank=k)

        def ours_full():
            sols = hj.merge_adapters(collection, full_plan, "exact", weights="uniform")
            return jax.block_until_ready(sols)

        def ours_shared():
            sols = hj.merge_adapters(collection, shared_plan, "exact")
            return jax.block_until_ready(sols)

        def ours_baseline(name: str):
            def fn():
                sols = {
                    m: hj.baselines.run_baseline(name, a, b, **({"rank": k} if name == "svd" else {}))
                    for m, (a, b) in collection.items()
                }
                return jax.block_until_ready(sols)

            return fn

        ours = {
            "hydraopt full-merge (exact)": ours_full,
            "hydraopt shared-a (exact)": ours_shared,
            "hydraopt baseline linear": ours_baseline("linear"),
            "hydraopt baseline svd": ours_baseline("svd"),
            "hydraopt baseline ties": ours_baseline("ties"),
        }
        compile_s = {}
        first_out = {}
        for name, fn in ours.items():
            start = time.perf_counter()
            first_out[name] = fn()
            compile_s[name] = time.perf_counter() - start

        peft = {f"PEFT {kind}": peft_run(kind) for kind in ("linear", "cat", "svd", "ties_svd")}
        # errors (outside the timed loop)
        for name, fn in peft.items():
            if name != "PEFT ties_svd":
                factors = fn()
                errors[name] = float(np.mean([error_vs_mean(*factors[m], *collection[m]) for m in modules]))
                ranks[name] = next(iter(factors.values()))[0].shape[0]
        for name, sols in first_out.items():
            if "shared-a" in name:
                errors[name] = float(np.mean([np.mean(s.relative_error) for s in sols.values()]))
                ranks[name] = k
                continue
            errs = []
            for m in modules:
                a_hat, b_hat = sols[m].task_factors(0)
                errs.append(error_vs_mean(np.asarray(a_hat), np.asarray(b_hat), *collection[m]))
                ranks[name] = int(a_hat.shape[0])
            errors[name] = float(np.mean(errs))

        # ---- in process, interleaved
        fns = {**peft, **ours}
        reps = {n: (args.slow_reps if n == "PEFT ties_svd" else args.reps) for n in fns}
        ties_holder = {}

        def ties_timed():
            ties_holder["f"] = peft["PEFT ties_svd"]()

        fns["PEFT ties_svd"] = ties_timed
        times = interleaved(fns, reps)
        f = ties_holder["f"]
        errors["PEFT ties_svd"] = float(np.mean([error_vs_mean(*f[m], *collection[m]) for m in modules]))
        ranks["PEFT ties_svd"] = next(iter(f.values()))[0].shape[0]

        med = {n: median(t) for n, t in times.items()}
        ref = med["PEFT svd"]
        print()
        print(f"## in process (median of {args.reps}; PEFT ties_svd: {args.slow_reps}); "
              f"ratio = time(PEFT svd) / time(method)")  # fmt: skip
        print(f"{'method':32s} {'rank':>5s} {'median s':>9s} {'x vs PEFT svd':>14s} "
              f"{'compile s':>10s} {'err vs mean':>12s}")  # fmt: skip
        for n in fns:
            comp = f"{compile_s[n] - med[n]:10.2f}" if n in compile_s else f"{'-':>10s}"
            mark = "*" if "shared-a" in n else " "
            print(f"{n:32s} {ranks[n]:5d} {med[n]:9.3f} {ref / med[n]:14.1f} {comp} "
                  f"{errors[n]:11.2e}{mark}")  # fmt: skip

        # ---- cold commands
        cold = {}
        outs = tmp / "outs"
        counter = iter(range(10**6))
        dir_args = [str(p) for p in dirs]

        warm_cache = tmp / "cache-warm"
        cold_errors: dict[str, float] = {}

        def cold_ours(plan: str, extra: list[str], cache: str):
            def fn():
                out = outs / f"o{next(counter)}"
                # "empty": a new compilation cache folder per run (compiles everything);
                # "warm": one folder filled by an untimed first run (what every later
                # `hydraopt merge` of these shapes gets; see cli.compilation_cache_dir)
                folder = tmp / f"cache-{next(counter)}" if cache == "empty" else warm_cache
                run_cmd([*hydraopt_cmd(), "merge", *dir_args, "--out", str(out), "--plan", plan,
                         "--rank", str(k), "--json", *extra],
                        env={"HYDRAOPT_CACHE_DIR": str(folder)})  # fmt: skip
                if plan == "full-merge" and cache not in cold_errors:
                    # the command's own bundle, against the exact mean (as in process)
                    bundle = hj.io.load_bundle(out)
                    cold_errors[cache] = float(np.mean([
                        error_vs_mean(*bundle.modules[m].task_factors(0), *collection[m])
                        for m in modules
                    ]))  # fmt: skip
                shutil.rmtree(out, ignore_errors=True)

            return fn

        def cold_peft():
            out = outs / f"p{next(counter)}"
            run_cmd([sys.executable, "-c", PEFT_COLD_SCRIPT, str(Path(__file__).resolve().parent),
                     str(d), str(layers), str(out),
                     *dir_args])  # fmt: skip
            shutil.rmtree(out, ignore_errors=True)

        uniform_w = ["--weighting", "uniform"]
        cold = {
            "PEFT svd (fresh process)": cold_peft,
            "merge full-merge, empty cache": cold_ours("full-merge", uniform_w, "empty"),
            "merge full-merge, warm cache": cold_ours("full-merge", uniform_w, "warm"),
            "merge shared-a, empty cache": cold_ours("shared-a", [], "empty"),
            "merge shared-a, warm cache": cold_ours("shared-a", [], "warm"),
        }
        for name, fn in cold.items():  # fill the warm cache (untimed)
            if name.endswith("warm cache"):
                fn()
        cold_times = interleaved(cold, args.reps)
        cmed = {n: median(t) for n, t in cold_times.items()}
        fresh = cmed["PEFT svd (fresh process)"]
        print()
        print(f"## cold commands (fresh process: imports, load, compile, solve, write; median of "
              f"{args.reps}, each run listed)")  # fmt: skip
        print(f"{'command':34s} {'median s':>9s} {'x vs PEFT svd in process':>25s} "
              f"{'x vs PEFT svd fresh process':>28s}  each run: s (x vs PEFT svd fresh process)")  # fmt: skip
        for n in cold:
            runs = ", ".join(f"{t:.2f} ({fresh / t:.1f}x)" for t in cold_times[n])
            print(f"{n:34s} {cmed[n]:9.2f} {ref / cmed[n]:25.1f} "
                  f"{fresh / cmed[n]:28.1f}  {runs}")  # fmt: skip
        print("error vs the exact mean of the command's full-merge bundle: " + ", ".join(
            f"{e:.2e} ({c} cache)" for c, e in cold_errors.items()))  # fmt: skip
        print()
        print("* shared-a keeps one adapter per task: its error is the mean per-task relative error.")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
