"""Serving from the merged form: a mixed-task batch through `hydraopt_jax.serve.lora_apply`
against a per-row gather of full adapters (what S-LoRA / Punica-style kernels compute) and a
loop over tasks, side by side in one run; memory of each form.

    PYTHONPATH=. python benchmarks/serve.py            # 40 tasks, 512 rows, 2048 x 2048, r = 32
    PYTHONPATH=. python benchmarks/serve.py --small    # quick: 8 tasks, 64 rows, d = 256

The adapters are synthetic (`hydraopt_jax._synthetic`-style: `A` near one shared init, `B`
with application and language structure), merged with `shared-a` (one A, a B per task),
a grouped plan (A per language, B per task) and `separate` (exact: every task its own
factors). Every method computes each row's `B_t A_t x` for its task; results are checked
equal to the dense per-task reference before timing. Times: median of `--reps` calls after
one warm-up (compile), methods interleaved so that a noisy machine affects all alike.

Measured on the 2-core development machine, 2026-11-29, while two LLM-testbed training
processes held both cores (absolute times are therefore slow; the ratios are side by side):

    # serve: 40 tasks, 512 rows of mixed tasks, d_in = d_out = 2048, r = 32; jax 0.10.2 on cpu, median of 20
    method                                   ms     rows/s  x vs gather      params x of the adapters  rel. err
    hydraopt shared-a                     52.02       9842         4.31   2,686,976             0.512    0.0975
    hydraopt A per language               77.02       6648         2.91   3,145,728             0.600    0.0883
    hydraopt separate                     85.21       6009         2.63   5,242,880             1.000    0.0000
    per-row gather (S-LoRA/Punica)       224.00       2286         1.00   5,242,880             1.000    0.0000
    loop over tasks                      201.61       2540         1.11   5,242,880             1.000    0.0000

One shared A projects the whole batch in one GEMM (then each row meets its own B);
grouping rows by task turns even the unmerged `separate` form into dense GEMMs, 2.6x the
per-row gather on this CPU. "rel. err" is the merge's mean relative reconstruction error.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def adapters(num_tasks: int, rank: int, d: int, seed: int = 0):
    """`A [T, r, d]`, `B [T, d, r]`: A near one init (10% drift), B per app + language."""
    rng = np.random.default_rng(seed)
    a0 = rng.normal(size=(1, rank, d)) / np.sqrt(d)
    A = a0 + 0.1 * rng.normal(size=(num_tasks, rank, d)) / np.sqrt(d)
    langs = np.arange(num_tasks) % 8
    apps = np.arange(num_tasks) // 8
    B = (
        rng.normal(size=(5, d, rank))[apps % 5]
        + rng.normal(size=(8, d, rank))[langs]
        + 0.5 * rng.normal(size=(num_tasks, d, rank))
    ) / np.sqrt(rank)
    return A.astype(np.float32), B.astype(np.float32), langs


def bundle_of(A, B, plan):
    """An in-memory one-module bundle (`q`) of the merged factors."""
    import hydraopt_jax as hj
    from hydraopt_jax.io import Bundle, BundleModule

    sol = hj.merge(A, B, plan)
    num_tasks = A.shape[0]
    module = BundleModule(
        "q", "linear", sol.d_in, sol.d_out, tuple(range(num_tasks)), (A.shape[1],) * num_tasks,
        sol.plan, np.asarray(sol.shared_a), np.asarray(sol.shared_b),
        tuple(np.asarray(sol.relative_error)), tuple(np.asarray(sol.task_sq_norms)),
        cores=None if sol.cores is None else np.asarray(sol.cores), core=sol.core,
    )  # fmt: skip
    tasks = tuple(f"t{i}" for i in range(num_tasks))
    return Bundle(tasks=tasks, modules={"q": module}, task_configs={}, carried={}), sol


def main(argv=None) -> None:
    from hydraopt_jax import SharingPlan
    from hydraopt_jax.serve import lora_apply, prepare

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    num_tasks, rows, d, r = (8, 64, 256, 8) if args.small else (40, 512, 2048, 32)
    A, B, langs = adapters(num_tasks, r, d)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(rows, d)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, num_tasks, rows), jnp.int32)

    plans = {
        "shared-a": SharingPlan.shared_a(num_tasks, r),
        "A per language": SharingPlan.from_labels(langs, None, r),
        "separate": SharingPlan.separate(num_tasks, r),
    }
    A_dev, B_dev = jnp.asarray(A), jnp.asarray(B)
    apply = jax.jit(lora_apply, static_argnames="module")

    @jax.jit
    def per_row_gather(x, ids):  # every row gathers its task's full adapter (BGMV)
        return jnp.einsum("nor,nr->no", B_dev[ids], jnp.einsum("nrd,nd->nr", A_dev[ids], x))

    @jax.jit
    def loop_over_tasks(x, ids):  # one pass per task over the whole batch, masked
        def body(t, y):
            mask = (ids == t)[:, None]
            return y + jnp.where(mask, (x @ A_dev[t].T) @ B_dev[t].T, 0.0)

        return jax.lax.fori_loop(0, num_tasks, body, jnp.zeros((x.shape[0], d), x.dtype))

    reference = np.einsum("nor,nrd,nd->no", B[np.asarray(ids)], A[np.asarray(ids)], np.asarray(x))
    methods, errors, stored = {}, {}, {}
    for name, plan in plans.items():
        bundle, sol = bundle_of(A, B, plan)
        served = prepare(bundle)
        pairs = [tuple(np.asarray(f) for f in sol.task_factors(t)) for t in range(num_tasks)]
        merged_ref = np.stack(
            [pairs[t][1] @ (pairs[t][0] @ np.asarray(x)[n]) for n, t in enumerate(np.asarray(ids))]
        )
        out = np.asarray(apply(served, "q", x, ids))
        assert np.allclose(out, merged_ref, rtol=1e-3, atol=1e-3 * np.abs(merged_ref).max())
        methods[f"hydraopt {name}"] = lambda s=served: apply(s, "q", x, ids)
        errors[f"hydraopt {name}"] = float(np.mean(np.asarray(sol.relative_error)))
        stored[f"hydraopt {name}"] = served.modules["q"].num_params
    for name, fn in (("per-row gather (S-LoRA/Punica)", per_row_gather),
                     ("loop over tasks", loop_over_tasks)):  # fmt: skip
        out = np.asarray(fn(x, ids))
        assert np.allclose(out, reference, rtol=1e-3, atol=1e-3 * np.abs(reference).max())
        methods[name] = lambda f=fn: f(x, ids)
        errors[name] = 0.0
        stored[name] = A.size + B.size
    times = {name: [] for name in methods}
    for fn in methods.values():
        jax.block_until_ready(fn())  # compile
    for _ in range(args.reps):  # interleaved
        for name, fn in methods.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    gather_ms = 1e3 * statistics.median(times["per-row gather (S-LoRA/Punica)"])
    separate_params = A.size + B.size
    platform = jax.devices()[0].platform
    print(f"# serve: {num_tasks} tasks, {rows} rows of mixed tasks, d_in = d_out = {d}, r = {r}; "
          f"jax {jax.__version__} on {platform}, median of {args.reps}")  # fmt: skip
    print(f"{'method':34s} {'ms':>8s} {'rows/s':>10s} {'x vs gather':>12s} {'params':>11s} "
          f"{'x of the adapters':>17s} {'rel. err':>9s}")  # fmt: skip
    for name in methods:
        ms = 1e3 * statistics.median(times[name])
        share = stored[name] / separate_params
        print(f"{name:34s} {ms:8.2f} {rows / ms * 1e3:10.0f} {gather_ms / ms:12.2f} "
              f"{stored[name]:11,d} {share:17.3f} {errors[name]:9.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
