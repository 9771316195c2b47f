"""Orbax save/restore of Solution pytrees is exact."""

from __future__ import annotations

import pytest

from hydraopt_jax.io import AdapterError, load_collection, restore_solution, save_solution
from hydraopt_jax.io.checkpoint import solutions_equal
from tests.helpers.peft_models import hand_solutions, llama_adapters


def test_solution_round_trip_is_exact(tmp_path):
    _, solutions = hand_solutions(load_collection(llama_adapters()), "shared_b", seed=3)
    name = "model.layers.0.self_attn.k_proj"
    save_solution(tmp_path / "one", solutions[name])
    back = restore_solution(tmp_path / "one")
    assert solutions_equal(back, solutions[name])
    save_solution(tmp_path / "all", solutions)
    save_solution(tmp_path / "all", solutions)  # replacing a checkpoint is fine
    back = restore_solution(tmp_path / "all")
    assert list(back) == list(solutions)
    assert all(solutions_equal(back[n], solutions[n]) for n in solutions)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all", "one"]


def test_restore_refuses_non_checkpoint(tmp_path):
    with pytest.raises(AdapterError, match="not a Solution checkpoint"):
        restore_solution(tmp_path)


def test_restore_refuses_arrays_that_do_not_match_their_digest(tmp_path):
    """Valid Orbax data that is not what was saved (here: another checkpoint's arrays) is
    refused, so `--resume` never continues from damaged factors."""
    import shutil

    collection = load_collection(llama_adapters())
    name = "model.layers.0.self_attn.k_proj"
    first = hand_solutions(collection, "shared_b", seed=3)[1][name]
    second = hand_solutions(collection, "shared_b", seed=4)[1][name]
    save_solution(tmp_path / "first", first)
    save_solution(tmp_path / "second", second)
    shutil.rmtree(tmp_path / "first" / "arrays")
    shutil.copytree(tmp_path / "second" / "arrays", tmp_path / "first" / "arrays")
    with pytest.raises(AdapterError, match="do not match their digest"):
        restore_solution(tmp_path / "first")
    assert solutions_equal(restore_solution(tmp_path / "second"), second)
