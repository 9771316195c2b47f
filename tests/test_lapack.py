"""Programs with several LAPACK calls finish on a small CPU (see `hydraopt_jax._lapack`).

Before `after`, a full merge of 16 modules at d = 2048 deadlocked on every run on a 2-core
machine (the QR forming Q and the SVD of R in `top_right_singular_vectors` ran at once, each
blocking one of the two pool threads; that function now uses an eigh chain instead, and the
remaining independent pairs go through `after`, as does the activation-aware case's whitening
Cholesky before the solver's own). The case runs in a child process pinned to
2 CPUs, with a timeout, so a hang fails here instead of hanging the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a child process pinned to 2 CPUs

CHILD = r"""
import os
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])  # XLA sizes its pool from this
import jax
import hydraopt_jax as hj
from hydraopt_jax._synthetic import synthetic_collection

coll, _, _ = synthetic_collection(4, 4, num_layers=16, shapes={"q_proj": (2048, 2048)}, rank=16)
for plan in (hj.SharingPlan.full_merge(16, rank=16), hj.SharingPlan.shared_a(16, rank=16)):
    sols = jax.block_until_ready(hj.merge_adapters(coll, plan, "exact", weights="uniform"))
    assert all(float(s.loss) >= 0 for s in sols.values())
# activation-aware: the whitening Cholesky and the solver's Gram Cholesky are independent
import numpy as np
rng = np.random.default_rng(0)
x = rng.normal(size=(4096, 2048)).astype(np.float32)
cov = x.T @ x / 4096
few = dict(list(coll.items())[:4])
plan = hj.SharingPlan.full_merge(16, rank=16)
sols = hj.merge_adapters(few, plan, activation_covs={m: cov for m in few})
assert all(float(s.loss) >= 0 for s in jax.block_until_ready(sols).values())
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_many_batched_lapack_calls_on_two_cpus_finish():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one host device, as users run it
    done = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")
