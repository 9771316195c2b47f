"""Strict test settings: x64 for reference checks, rank promotion errors, warnings as errors."""

import os
import tempfile

# Four host devices for the sharding tests (the package appends its own CPU flags).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
# `hydraopt` commands run as subprocesses keep their compilation cache out of ~/.cache.
os.environ.setdefault("HYDRAOPT_CACHE_DIR", tempfile.mkdtemp(prefix="hydraopt-test-cache-"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def random_collection(rng, num_tasks=5, rank=3, d_in=20, d_out=16, drift=0.3, dtype=np.float64):
    """A, B with similar A factors (one shared init plus drift) and task norms spread over
    an order of magnitude: the situation HydraOpt is built for."""
    a0 = rng.normal(size=(1, rank, d_in))
    A = a0 + drift * rng.normal(size=(num_tasks, rank, d_in))
    B = rng.normal(size=(num_tasks, d_out, rank)) * rng.uniform(0.3, 3.0, size=(num_tasks, 1, 1))
    return A.astype(dtype), B.astype(dtype)
