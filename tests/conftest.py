"""Strict test settings: x64 for reference checks, rank promotion and implicit dtype promotion
are errors, warnings are errors (pyproject.toml). Heavy tests carry the `slow` marker
(`-m "not slow"` skips them locally; CI runs everything)."""

import os
import tempfile

# Four host devices for the sharding tests (the package appends its own CPU flags).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
# `hydraopt` commands run as subprocesses keep their compilation cache out of ~/.cache.
os.environ.setdefault("HYDRAOPT_CACHE_DIR", tempfile.mkdtemp(prefix="hydraopt-test-cache-"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.helpers import grid  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# The planner tests' application x language collection (tests/helpers/grid.py), as arrays
# and as PEFT adapter directories.
@pytest.fixture(scope="module")
def collection():
    return grid.make_collection()


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, collection):
    return grid.write_peft_dirs(tmp_path_factory.mktemp("adapters"), collection)
