"""Several processes merge one collection: each reads and solves only its share of the
modules, process 0 writes the bundle from their parts; killed anywhere, the run leaves no
bundle, and resumed it completes. In process (the split and the parts) and as real JAX
multi-controller runs of `hydraopt merge` on localhost (2 and 4 processes)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import hydraopt_jax as hj
from hydraopt_jax._stream import split_modules
from hydraopt_jax.io import load_collection, parts_dir, tensor_bytes_read
from tests.helpers.files import bundle_arrays, write_collection

# Three shape groups over four layers: 12 modules of different sizes to balance.
MODULES = {
    f"model.layers.{layer}.self_attn.{name}": shape
    for layer in range(4)
    for name, shape in (("q_proj", (24, 24)), ("k_proj", (24, 12)), ("o_proj", (24, 16)))
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("processes")
    dirs = write_collection(root / "in", num_tasks=4, modules=MODULES)
    reference = hj.merge_collection(load_collection(dirs), "shared-a", out=root / "one")
    return root, dirs, bundle_arrays(root / "one"), reference


def _factor_bytes(collection, modules) -> int:
    return sum(
        4 * info.d_in * r + 4 * info.d_out * r
        for m, info in collection.modules.items()
        if m in modules
        for r in info.ranks
    )


def test_the_split_is_balanced_deterministic_and_covers_every_module_once(inputs):
    _, dirs, _, _ = inputs
    collection = load_collection(dirs)
    plans = dict.fromkeys(collection.modules, hj.SharingPlan.shared_a(4))
    for count in (1, 2, 3, 4):
        shares = split_modules(collection, plans, count)
        assert sorted(m for s in shares for m in s) == sorted(collection.modules)
        assert shares == split_modules(collection, plans, count)
        sizes = [_factor_bytes(collection, s) for s in shares]
        assert max(sizes) <= 1.6 * min(sizes) or count == 1


@pytest.mark.parametrize("count", [2, 4])
def test_parts_assemble_into_the_one_process_bundle_reading_only_each_share(inputs, count):
    """Processes 1..n-1 write their parts, then process 0 assembles (without a JAX
    distributed runtime it waits for the part files): the bundle is bitwise the one-process
    bundle, and each process read exactly its own modules' factors."""
    root, dirs, reference, _ = inputs
    out = root / f"parts{count}"
    read = {}
    for index in [*range(1, count), 0]:
        collection = load_collection(dirs)
        before = tensor_bytes_read()
        part = hj.merge_collection(collection, "shared-a", out=out, process=(index, count))
        read[index] = (tensor_bytes_read() - before, list(part.modules))
        if index:
            assert not out.exists() and parts_dir(out).exists()
    got = bundle_arrays(out)
    assert sorted(got) == sorted(reference)
    assert all(np.array_equal(got[k], reference[k]) for k in reference)
    assert not parts_dir(out).exists()  # removed once the bundle is written
    collection = load_collection(dirs)
    total = _factor_bytes(collection, collection.modules)
    for index, (nbytes, modules) in read.items():
        if index:
            assert nbytes == _factor_bytes(collection, modules) < total / (count - 1)
    # process 0 reads its own modules' factors, then the others' parts (merged factors):
    # none of the other modules' adapter factors
    others = {m for index in range(1, count) for m in read[index][1]}
    part_bytes = sum(v.nbytes for k, v in reference.items() if k.split("/")[1] in others)
    plans = dict.fromkeys(collection.modules, hj.SharingPlan.shared_a(4))
    own = split_modules(collection, plans, count)[0]
    assert not set(own) & others
    assert read[0][0] == _factor_bytes(collection, own) + part_bytes


# ------------------------------------------------------------------ real multi-controller runs
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(dirs, out, count, port, *extra, env=None):
    full_env = dict(os.environ, JAX_PLATFORMS="cpu", HYDRAOPT_CACHE_DIR="")
    full_env.pop("XLA_FLAGS", None)  # one CPU device per process
    procs = []
    for index in range(count):
        cmd = [sys.executable, "-m", "hydraopt_jax.cli", "merge", *map(str, dirs), "--out",
               str(out), "--json", "--coordinator", f"localhost:{port}", "--num-processes",
               str(count), "--process-id", str(index), *extra]  # fmt: skip
        procs.append(subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(full_env, **((env or {}).get(index, {}))),
        ))  # fmt: skip
    return procs


def _finish(procs, timeout=240):
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        outs.append((p.returncode, out, err))
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("count", [2, 4])
def test_multi_controller_merge_equals_one_process(inputs, count):
    import json

    root, dirs, reference, _ = inputs
    out = root / f"mc{count}"
    results = _finish(_launch(dirs, out, count, _free_port()))
    assert all(rc == 0 for rc, _, _ in results), [err[-500:] for _, _, err in results]
    summaries = [json.loads(o) for _, o, _ in results]  # stdout: one JSON object each
    got = bundle_arrays(out)
    assert sorted(got) == sorted(reference)
    assert all(np.allclose(got[k], reference[k], rtol=1e-6, atol=1e-7) for k in reference)
    collection = load_collection(dirs)
    total = _factor_bytes(collection, collection.modules)
    parts = summaries[1:]
    assert sum(p["tensor_bytes_read"] for p in parts) < total
    for part in parts:
        assert part["tensor_bytes_read"] == _factor_bytes(collection, part["modules"])


@pytest.mark.slow
def test_a_killed_process_leaves_no_bundle_and_resume_completes(inputs):
    """Process 1 dies (SIGKILL) after its first solve; the job is then stopped (as a cluster
    scheduler stops a job whose task died). No bundle exists; rerun with --resume, the
    processes reuse the parts already written and the bundle equals the one-process one."""
    root, dirs, reference, _ = inputs
    out = root / "killed"
    procs = _launch(dirs, out, 2, _free_port(), env={1: {"HYDRAOPT_TEST_KILL_AT": "solve"}})
    deadline = time.monotonic() + 180
    while procs[1].poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert procs[1].returncode == -signal.SIGKILL
    time.sleep(1.0)
    procs[0].kill()
    _finish(procs)
    assert not out.exists()
    assert not [p for p in Path(root).iterdir() if p.name.startswith(".killed")]  # no temp
    results = _finish(_launch(dirs, out, 2, _free_port(), "--resume"))
    assert all(rc == 0 for rc, _, _ in results), [err[-500:] for _, _, err in results]
    got = bundle_arrays(out)
    assert all(np.allclose(got[k], reference[k], rtol=1e-6, atol=1e-7) for k in reference)
    assert not parts_dir(out).exists()
