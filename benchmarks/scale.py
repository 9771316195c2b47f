"""Scale: a Llama-sized merge through the CLI, a thousand adapters in bounded memory, and the
same on several processes.

    PYTHONPATH=. python benchmarks/scale.py            # (a), (b) and (c)
    PYTHONPATH=. python benchmarks/scale.py --only a   # or --only b, --only c
    PYTHONPATH=. python benchmarks/scale.py --tasks-b 200 --layers-b 1   # smaller (b)

(a) 40 adapters with Llama-3.2-1B attention shapes (16 layers; q, o 2048x2048; k, v
    512x2048; r = 32), written to disk in PEFT format here, then
    `hydraopt merge DIRS --out OUT --plan shared-a --json` in a fresh process, timed end to
    end (imports, reading 40 adapters, 4 compilations, solves, writing the bundle).
    Target: under 60 s on the 2-core development machine.
(b) `--tasks-b` adapters (default 1000) at d = 4096, r = 16, q_proj only on `--layers-b`
    layers (default 2): the same CLI command, plus a child process that times loading and
    solving the shape group separately. Reports time per module, peak resident memory
    (ru_maxrss of the child), the bytes of one shape group's factors (float32), and the
    extrapolated time of a 32-layer model (q_proj only, and 4 attention projections of
    4096x4096 each, i.e. Llama-2-7B-like).
(c) `--tasks-c` adapters (default 1000) at d = 4096, r = 16, q_proj on `--layers-c` layers
    (default 4: 2000 MB of float32 factors): `hydraopt merge --plan shared-a` as 1, 2 and 4
    processes of one JAX multi-controller run on localhost (`--coordinator`,
    `--num-processes`, `--process-id`); each process's peak resident memory (VmHWM) and the
    adapter bytes it read. Targets: per-process peak <= 0.6x the one-process peak at 2
    processes, <= 0.35x at 4.

Both use synthetic adapters shaped like trained ones (`hydraopt_jax._synthetic`: A near a
shared init, B with application / language structure). Absolute seconds on a shared 2-core
CPU are indicative only.

Recorded run (`PYTHONPATH=. python benchmarks/scale.py`, both parts), at commit 28e7dfe on the
idle 2-core development machine (load average < 1.5):

    # OPENBLAS_NUM_THREADS=1; scale
    # jax 0.10.2 on cpu x1, 2 CPU cores, python 3.11.7

    ## (a) 40 adapters, Llama-3.2-1B attention shapes, 16 layers, r = 32, shared-a, CLI
    generated 40 PEFT dirs (1040 MB of float32 factors) in 10.1 s (not timed below)
      child CPU time (user + sys) 23.3 s; load average 1.2 1.2 1.2
    hydraopt merge --plan shared-a (64 modules, 4 shape groups): wall 22.6 s (its own 'seconds' 20.4 s); target < 60 s: met
    storage ratio 0.400; per-task relative error mean 0.0974, max 0.0975

    ## (b) 1000 adapters at d = 4096, r = 16, q_proj on 2 layer(s), shared-a
    generated 1000 PEFT dirs (1000 MB of float32 factors) in 12.4 s (not timed below)
    in a child process: open 0.2 s; load group 1.8 s; solve 8.2 s (incl. one compile) for 2 module(s)
      time per module: solve 4.1 s, load 0.9 s; mean per-task relative error 0.0993
      one shape group's factors (float32): 1000 MB; peak RSS 1913 MB = 1.91x the group; the runtime alone (import jax + hydraopt_jax) 189 MB; peak minus runtime = 1.72x the group
      child CPU time (user + sys) 15.4 s; load average 1.2 1.2 1.2
    hydraopt merge --plan shared-a (CLI, end to end): wall 13.6 s = 6.8 s per module (incl. imports, compile, write)
    extrapolated to 32 layers (load + solve per module, compile once): q_proj only 159 s; 4 attention projections 4096x4096 (Llama-2-7B-like) 636 s

Against the targets: (a) 22.6 s end to end, under 60 s (20.7 s at 2fd1ba7, 27.7 s at 5f295e2).
(b) peak RSS 1913 MB for a 1000 MB shape group: 1.91x the group for the whole process, 1.72x
above the 189 MB that importing JAX costs (1908 MB at 2fd1ba7); solve 4.1 s per module (3.6 s
at 2fd1ba7). Before the host-buffer work (commit a58b2d1) the same run
peaked at 5363 MB (5.36x): the group was copied by `np.stack`, by `jnp.asarray`, and the
solver held scaled copies of B, a broadcast of the shared A and a transposed copy of A; at
5f295e2 it was 2003 MB (2.00x), of which 125 MB was a bool copy of the output that XLA's CPU
backend made for `jnp.all(jnp.isfinite(B_hat))` (now one fused reduction, `_loss.all_finite`).
Now the loader's aligned buffer is used in place and the output (500 MB of per-task B) is the
only other large array; XLA's own temporaries for this solve are 32 MB
(`compiled.memory_analysis()`; `tests/test_io_memory.py` keeps them under a tenth of
the inputs).

Recorded run of (c) (`PYTHONPATH=. python benchmarks/scale.py --only c`) at commit 36c21db,
while two LLM-testbed trainings ran at nice 19 (load average 4-5; memory is not affected, wall
times are):

    ## (c) 1000 adapters at d = 4096, r = 16, q_proj on 4 layers, shared-a, hydraopt merge on 1, 2, 4 processes (localhost), default memory budget
    generated 1000 PEFT dirs (2000 MB of float32 factors) in 21.1 s (not timed below)
    1 process(es): wall 19.0 s; per-process peak RSS 3462 MB (max 1.00x the one-process peak); tensor bytes read per process (its adapters; process 0 also the others' parts) 2000 MB
    2 process(es): wall 19.0 s; per-process peak RSS 1940, 1928 MB (max 0.56x the one-process peak); tensor bytes read per process (its adapters; process 0 also the others' parts) 1500, 1000 MB
    4 process(es): wall 21.4 s; per-process peak RSS 1166, 1161, 1174, 1169 MB (max 0.34x the one-process peak); tensor bytes read per process (its adapters; process 0 also the others' parts) 1251, 500, 500, 500 MB

Against the targets: 0.56x at 2 processes and 0.34x at 4: met (a second run of the same code
gave 0.58x and 0.34x). A process holds the runtime (~150 MB of shared libraries and ~70 MB of
heap) plus its share: its modules' factors once (the loader's buffer is solved in place) and
~1.3x their results. Process 0 reads the others' parts (their results, 500 MB each at 2
processes) one tensor at a time while writing the bundle. Before 36c21db the guard estimated
the closed-form solve with the iterative solvers' copies (6x the inputs, 8x the outputs), so a
default one-process run split these 4 modules into 2 batches and peaked at one batch plus the
results so far (2959-3388 MB); per-process memory then fell only to 0.72-0.83x at 2 processes
and 0.42-0.48x at 4. Wall time does not fall here: every process pays its own start-up and
compilation, and 4 processes share 2 cores (not measured here: one host per process).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# jaxlib's LAPACK threads (scipy OpenBLAS) spin against each other on a loaded small
# machine; see speed.py. Inherited by the child processes.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import hydraopt_jax  # noqa: E402, F401  (first: sets the XLA CPU flag)
import numpy as np  # noqa: E402
from hydraopt_jax._synthetic import synthetic_collection  # noqa: E402

from _common import LAST_CHILD, header, hydraopt_cmd, load_average, run_cmd, write_peft_dir  # noqa: E402

LLAMA_32_1B = {"q_proj": (2048, 2048), "k_proj": (2048, 512), "v_proj": (2048, 512),
               "o_proj": (2048, 2048)}  # fmt: skip  (d_in, d_out)

CHILD = r"""
import json, resource, sys, time
import jax, numpy as np
import hydraopt_jax as hj
from hydraopt_jax.io import load_collection
dirs = sys.argv[1:]
t0 = time.perf_counter()
coll = load_collection(dirs)
t1 = time.perf_counter()
out = {"open_s": t1 - t0, "groups": []}
plan = hj.SharingPlan.shared_a(len(dirs))
for key, names in coll.shape_groups().items():
    t1 = time.perf_counter()
    group = coll.load_group(names)
    t2 = time.perf_counter()
    sols = jax.block_until_ready(hj.merge_adapters(group, plan, "exact"))
    t3 = time.perf_counter()
    rss_after_solve = float("nan")
    rel = float(np.mean([np.mean(s.relative_error) for s in sols.values()]))
    factor_bytes = sum(a.nbytes + b.nbytes for a, b, _ in group.values())
    del group, sols
    out["groups"].append(dict(key=list(key), modules=len(names), load_s=t2 - t1,
                              solve_s=t3 - t2, mean_rel_err=rel, factor_mb=factor_bytes / 2**20,
                              peak_rss_mb=rss_after_solve))
import re
out["peak_rss_mb"] = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
print(json.dumps(out))
"""

# VmHWM (per address space, reset by exec), not ru_maxrss: Linux keeps ru_maxrss across
# execve, so a child of a big parent would report the parent's peak.
RSS_OF_BARE_IMPORT = r"""
import re, jax, jax.numpy as jnp, hydraopt_jax
jnp.zeros(1).block_until_ready()
print(int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024)
"""


def generate(root: Path, num_tasks: int, layers: int, shapes, rank: int) -> tuple[list[str], float]:
    """Write `num_tasks` PEFT adapter dirs; returns (dirs, MB of factors written)."""
    apps = max(d for d in range(1, int(num_tasks**0.5) + 1) if num_tasks % d == 0)
    langs = num_tasks // apps
    dirs = [root / f"task{t:04d}" for t in range(num_tasks)]
    per_task: list[dict] = [{} for _ in range(num_tasks)]
    total = 0
    # one layer at a time keeps the generator's float64 temporaries small
    for layer in range(layers):
        coll, _, _ = synthetic_collection(apps, langs, num_layers=1, shapes=shapes, rank=rank,
                                          seed=layer)  # fmt: skip
        for name, (a, b) in coll.items():
            module = f"model.layers.{layer}.self_attn.{name.split('.', 2)[-1]}"
            for t in range(num_tasks):
                per_task[t][module] = (a[t], b[t])
            total += a.nbytes + b.nbytes
        del coll
    for t, path in enumerate(dirs):
        write_peft_dir(path, per_task[t], rank)
        per_task[t] = None
    return [str(d) for d in dirs], total / 2**20


def cli_merge(dirs: list[str], out: Path, plan: str) -> tuple[float, dict]:
    seconds, stdout = run_cmd([*hydraopt_cmd(), "merge", *dirs, "--out", str(out), "--plan", plan,
                               "--json"])  # fmt: skip
    return seconds, json.loads(stdout.strip().splitlines()[-1])


def child_peak(cmd: list[str]) -> tuple[float, str]:
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    seconds, stdout = run_cmd(cmd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the max over all waited-for children: only a new max is seen
    return (after / 1024 if after > before else float("nan")), stdout


def part_a(tmp: Path) -> None:
    print("\n## (a) 40 adapters, Llama-3.2-1B attention shapes, 16 layers, r = 32, shared-a, CLI")
    start = time.perf_counter()
    dirs, mb = generate(tmp / "a", 40, 16, LLAMA_32_1B, 32)
    print(f"generated 40 PEFT dirs ({mb:.0f} MB of float32 factors) in "
          f"{time.perf_counter() - start:.1f} s (not timed below)")  # fmt: skip
    seconds, summary = cli_merge(dirs, tmp / "a_out", "shared-a")
    print(f"  child CPU time (user + sys) {LAST_CHILD['cpu_s']:.1f} s; {load_average()}")
    errs = list(summary["tasks"].values())
    print(f"hydraopt merge --plan shared-a (64 modules, 4 shape groups): wall {seconds:.1f} s "
          f"(its own 'seconds' {summary['seconds']:.1f} s); target < 60 s: "
          f"{'met' if seconds < 60 else 'MISSED'}")  # fmt: skip
    print(f"storage ratio {summary['storage_ratio']:.3f}; per-task relative error mean "
          f"{np.mean(errs):.4f}, max {np.max(errs):.4f}")  # fmt: skip
    shutil.rmtree(tmp / "a", ignore_errors=True)
    shutil.rmtree(tmp / "a_out", ignore_errors=True)


def part_b(tmp: Path, num_tasks: int, layers: int) -> None:
    d, r = 4096, 16
    print(f"\n## (b) {num_tasks} adapters at d = {d}, r = {r}, q_proj on {layers} layer(s), shared-a")
    start = time.perf_counter()
    dirs, mb = generate(tmp / "b", num_tasks, layers, {"q_proj": (d, d)}, r)
    print(f"generated {num_tasks} PEFT dirs ({mb:.0f} MB of float32 factors) in "
          f"{time.perf_counter() - start:.1f} s (not timed below)")  # fmt: skip
    base_rss, out = child_peak([sys.executable, "-c", RSS_OF_BARE_IMPORT])
    base_rss = float(out.strip())
    _, stdout = child_peak([sys.executable, "-c", CHILD, *dirs])
    info = json.loads(stdout.strip().splitlines()[-1])
    group = info["groups"][0]
    per_module = group["solve_s"] / group["modules"]
    load_per_module = group["load_s"] / group["modules"]
    print(f"in a child process: open {info['open_s']:.1f} s; load group {group['load_s']:.1f} s; "
          f"solve {group['solve_s']:.1f} s (incl. one compile) for {group['modules']} module(s)")  # fmt: skip
    print(f"  time per module: solve {per_module:.1f} s, load {load_per_module:.1f} s; mean "
          f"per-task relative error {group['mean_rel_err']:.4f}")  # fmt: skip
    print(f"  one shape group's factors (float32): {group['factor_mb']:.0f} MB; peak RSS "
          f"{info['peak_rss_mb']:.0f} MB = {info['peak_rss_mb'] / group['factor_mb']:.2f}x the "
          f"group; the runtime alone (import jax + hydraopt_jax) {base_rss:.0f} MB; peak minus "
          f"runtime = {(info['peak_rss_mb'] - base_rss) / group['factor_mb']:.2f}x the group")  # fmt: skip
    seconds, summary = cli_merge(dirs, tmp / "b_out", "shared-a")
    cli_per_module = seconds / layers
    print(f"  child CPU time (user + sys) {LAST_CHILD['cpu_s']:.1f} s; {load_average()}")
    print(f"hydraopt merge --plan shared-a (CLI, end to end): wall {seconds:.1f} s = "
          f"{cli_per_module:.1f} s per module (incl. imports, compile, write)")  # fmt: skip
    steady = per_module + load_per_module
    print(f"extrapolated to 32 layers (load + solve per module, compile once): q_proj only "
          f"{32 * steady:.0f} s; 4 attention projections 4096x4096 (Llama-2-7B-like) "
          f"{128 * steady:.0f} s")  # fmt: skip
    shutil.rmtree(tmp / "b", ignore_errors=True)
    shutil.rmtree(tmp / "b_out", ignore_errors=True)


PROCESS_CHILD = r"""
import json, re, sys, time
start = time.perf_counter()
from hydraopt_jax.cli import main
rc = main(sys.argv[1:])
peak = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
print(json.dumps({"rc": rc, "wall_s": time.perf_counter() - start, "peak_rss_mb": peak}),
      file=sys.stderr)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(
    dirs: list[str], out: Path, count: int, max_memory: str | None = None
) -> list[dict]:
    """`hydraopt merge` as `count` processes of one multi-controller run (localhost); each
    child's wall time and peak RSS (VmHWM) and its `--json` line."""
    import subprocess

    env = dict(os.environ, JAX_PLATFORMS="cpu", HYDRAOPT_CACHE_DIR="")
    port = _free_port()
    procs = []
    for i in range(count):
        flags = [] if count == 1 else ["--coordinator", f"localhost:{port}", "--num-processes",
                                       str(count), "--process-id", str(i)]  # fmt: skip
        cmd = [sys.executable, "-c", PROCESS_CHILD, "merge", *dirs, "--out", str(out),
               "--plan", "shared-a", "--json", *flags,
               *(["--max-memory", max_memory] if max_memory else [])]  # fmt: skip
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env))  # fmt: skip
    rows = []
    for p in procs:
        stdout, stderr = p.communicate()
        child = json.loads(stderr.strip().splitlines()[-1])
        if child["rc"] != 0:
            raise RuntimeError(stderr[-2000:])
        rows.append({**child, **json.loads(stdout.strip().splitlines()[-1])})
    return rows


def part_c(tmp: Path, num_tasks: int, layers: int, max_memory: str | None = None) -> None:
    d, r = 4096, 16
    budget = f"--max-memory {max_memory} each" if max_memory else "default memory budget"
    print(f"\n## (c) {num_tasks} adapters at d = {d}, r = {r}, q_proj on {layers} layers, "
          f"shared-a, hydraopt merge on 1, 2, 4 processes (localhost), {budget}")  # fmt: skip
    start = time.perf_counter()
    dirs, mb = generate(tmp / "c", num_tasks, layers, {"q_proj": (d, d)}, r)
    print(f"generated {num_tasks} PEFT dirs ({mb:.0f} MB of float32 factors) in "
          f"{time.perf_counter() - start:.1f} s (not timed below)")  # fmt: skip
    one_peak = None
    for count in (1, 2, 4):
        out = tmp / f"c_out{count}"
        start = time.perf_counter()
        rows = run_processes(dirs, out, count, max_memory)
        wall = time.perf_counter() - start
        peaks = [row["peak_rss_mb"] for row in rows]
        one_peak = one_peak or max(peaks)
        read = [row["tensor_bytes_read"] / 2**20 for row in rows]
        print(f"{count} process(es): wall {wall:.1f} s; per-process peak RSS "
              f"{', '.join(f'{p:.0f}' for p in peaks)} MB (max {max(peaks) / one_peak:.2f}x the "
              f"one-process peak); tensor bytes read per process (its adapters; process 0 also the "
              f"others' parts) "
              f"{', '.join(f'{x:.0f}' for x in read)} MB")  # fmt: skip
        shutil.rmtree(out, ignore_errors=True)
    print(f"  {load_average()}")
    shutil.rmtree(tmp / "c", ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["a", "b", "c"])
    parser.add_argument("--tasks-b", type=int, default=1000)
    parser.add_argument("--layers-b", type=int, default=2)
    parser.add_argument("--tasks-c", type=int, default=1000)
    parser.add_argument("--layers-c", type=int, default=4)
    parser.add_argument("--max-memory-c", default=None,
                        help="--max-memory of each (c) process (default: the guard's)")  # fmt: skip
    parser.add_argument("--tmp", default=None, help="scratch dir (default: a new temp dir)")
    args = parser.parse_args()
    header(f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}; scale")
    if args.tmp:
        Path(args.tmp).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="hydraopt-scale-", dir=args.tmp))
    try:
        if args.only in (None, "a"):
            part_a(tmp)
        if args.only in (None, "b"):
            part_b(tmp, args.tasks_b, args.layers_b)
        if args.only in (None, "c"):
            part_c(tmp, args.tasks_c, args.layers_c, args.max_memory_c)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
