"""The memory guard: a shape group that does not fit the budget is loaded and solved in
module sub-batches (same results); a module that does not fit alone is refused cleanly. And
the solver's own temporaries stay small next to a large group."""

from __future__ import annotations

import numpy as np
import pytest

from hydraopt_jax.cli import main
from hydraopt_jax.io import AdapterCollection, memory
from tests.helpers.files import bundle_arrays, listing, write_collection

Q_BYTES = 27264  # estimate for one 24 -> 24 module of the helpers' collection (T=3, r=4)
K_BYTES = 19200  # one 24 -> 12 module
Q_EXACT, K_EXACT = 12672, 9216  # the same, solved in closed form (what `merge` runs by default)


def test_parse_size_and_estimate():
    assert memory.parse_size("512MB") == 512 * 10**6
    assert memory.parse_size("2GiB") == 2 * 2**30
    assert memory.parse_size("1.5k") == 1500
    assert memory.parse_size("4096") == 4096
    for bad in ("lots", "-1GB", "0", "12 parsecs", ""):
        with pytest.raises(ValueError):
            memory.parse_size(bad)
    assert memory.estimate_module_bytes(3, 4, 24, 24, 4, 1, 3) == Q_BYTES
    assert memory.estimate_module_bytes(3, 4, 24, 12, 4, 1, 3) == K_BYTES
    assert memory.estimate_module_bytes(3, 4, 24, 24, 4, 1, 3, exact=True) == Q_EXACT
    assert memory.estimate_module_bytes(3, 4, 24, 12, 4, 1, 3, exact=True) == K_EXACT
    sizes = {"a": 5, "b": 5, "c": 5, "d": 9}
    assert memory.plan_batches(list(sizes), sizes, 10, "x") == [("a", "b"), ("c",), ("d",)]
    assert memory.plan_batches(list(sizes), sizes, 100, "x") == [("a", "b", "c", "d")]
    with pytest.raises(memory.MemoryBudgetError, match="^d: needs about 9 B"):
        memory.plan_batches(list(sizes), sizes, 8, "x")


@pytest.fixture
def loads(monkeypatch):
    """Record the module batches the command loads."""
    seen = []
    original = AdapterCollection.load_group

    def spy(self, names):
        seen.append(tuple(names))
        return original(self, names)

    monkeypatch.setattr(AdapterCollection, "load_group", spy)
    return seen


def _merge(dirs, out, *flags):
    return main(["merge", *map(str, dirs), "--out", str(out), "--json", *flags])


def test_sub_batches_give_the_same_factors(tmp_path, loads, capsys, monkeypatch):
    dirs = write_collection(tmp_path / "in")
    assert _merge(dirs, tmp_path / "whole") == 0
    assert sorted(len(b) for b in loads) == [2, 3]  # two shape groups, loaded whole
    loads.clear()
    # 20 kB: the 24 -> 24 modules (12.7 kB each) one at a time, 24 -> 12 (9.2 kB) in pairs
    assert _merge(dirs, tmp_path / "split", "--max-memory", "20kB") == 0
    assert sorted(len(b) for b in loads) == [1, 1, 1, 2]
    whole, split = bundle_arrays(tmp_path / "whole"), bundle_arrays(tmp_path / "split")
    assert sorted(whole) == sorted(split)
    for key in whole:
        np.testing.assert_allclose(split[key], whole[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # without the flag the budget is a fraction of the available memory
    loads.clear()
    monkeypatch.setattr(memory, "available_memory", lambda: int(15_000 / 0.8))
    assert _merge(dirs, tmp_path / "avail") == 0
    assert sorted(len(b) for b in loads) == [1, 1, 1, 1, 1]
    assert listing(tmp_path) == ["avail", "in", "split", "whole"]


def test_a_module_too_big_for_the_budget_is_refused(tmp_path, loads, capsys):
    dirs = write_collection(tmp_path / "in")
    capsys.readouterr()
    assert _merge(dirs, tmp_path / "out", "--max-memory", "20kB", "--solver", "als") == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    # the 24 -> 12 modules would fit one at a time; the 24 -> 24 modules do not fit at all
    assert err.startswith("hydraopt: model.layers.0.self_attn.q_proj: needs about 26.6 KiB")
    assert "--max-memory" in err
    assert listing(tmp_path) == ["in"]  # refused before anything is solved or written
    assert loads == []


def test_solver_temporaries_stay_a_small_fraction_of_a_large_group():
    """1000 adapters at d = 4096 (a 1 GB group, compiled only): XLA's temporaries stay under a
    tenth of the inputs. (A `jnp.all(jnp.isfinite(B_hat))` once cost a 125 MiB bool copy.)"""
    import jax
    import jax.numpy as jnp

    from hydraopt_jax import SharingPlan, _solve

    T, r, d, modules = 1000, 16, 4096, 2
    statics, traced = _solve.solver_arguments(
        SharingPlan.shared_a(T, rank=r), "exact", None, "relative", 10, 1e-6, "relaxed", "auto",
        jnp.float32,
    )  # fmt: skip
    solve = _solve.batched_solver(tuple(sorted(traced)), **statics)
    A = jax.ShapeDtypeStruct((modules, T, r, d), jnp.float32)
    B = jax.ShapeDtypeStruct((modules, T, d, r), jnp.float32)
    memory = solve.lower(A, B, traced).compile().memory_analysis()
    assert memory.temp_size_in_bytes < 0.1 * memory.argument_size_in_bytes


@pytest.mark.parametrize(
    ("plan_name", "solver", "covariance"),
    [
        ("shared-a", "exact", False),
        ("shared-b", "exact", False),
        ("full-merge", "exact", False),
        ("shared-a", "adam", False),
        ("shared-a", "exact", True),
        ("shared-b", "als", True),
    ],
)
def test_the_estimate_covers_what_the_compiled_solve_holds(plan_name, solver, covariance):
    """The guard's estimate for a module (closed form: `exact=True`; activation-aware:
    `covariance=True`) is at least the solve's arguments + outputs + XLA temporaries, as XLA
    accounts them, plus one copy of the outputs (the bundle's), so a batch that fits the
    estimate fits the machine."""
    import jax
    import jax.numpy as jnp

    from hydraopt_jax import SharingPlan, _solve

    T, r, d_in, d_out, modules = 40, 16, 512, 256, 3
    plan = SharingPlan.named(plan_name, T, rank=r)
    statics, traced = _solve.solver_arguments(
        plan, solver, None, "relative", 10, 1e-6, "relaxed", "auto", jnp.float32
    )
    if covariance:
        traced["cov"] = jax.ShapeDtypeStruct((modules, d_in, d_in), jnp.float32)
    solve = _solve.batched_solver(tuple(sorted(traced)), **statics)
    A = jax.ShapeDtypeStruct((modules, T, r, d_in), jnp.float32)
    B = jax.ShapeDtypeStruct((modules, T, d_out, r), jnp.float32)
    held = solve.lower(A, B, traced).compile().memory_analysis()
    needed = held.argument_size_in_bytes + 2 * held.output_size_in_bytes + held.temp_size_in_bytes
    estimate = modules * memory.estimate_module_bytes(
        T, r, d_in, d_out, r, plan.num_a_groups, plan.num_b_groups, exact=solver == "exact",
        covariance=covariance,
    )  # fmt: skip
    assert needed <= estimate
