"""Crash safety: `hydraopt merge` / `export` killed with SIGKILL while loading, solving or
writing leave no partial output (an existing output stays intact), and a rerun succeeds and
clears the temporary siblings the killed process left."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from test_reliability_helpers import bundle_arrays, listing, run_cli, write_collection

from hydraopt_jax.cli import main
from hydraopt_jax.io import load_bundle

MODULES = {"model.layers.0.q_proj": (16, 16), "model.layers.1.q_proj": (16, 16)}


def _digest(path):
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("point", ["load", "solve", "write"])
def test_merge_killed_leaves_no_partial_output(point, tmp_path, capsys):
    dirs = write_collection(tmp_path / "in", modules=MODULES)
    out = tmp_path / "out"
    old = None
    if point == "write":  # killed while replacing an older bundle: the old one survives
        assert main(["merge", *map(str, dirs), "--out", str(out), "--plan", "separate"]) == 0
        old = _digest(out)
    proc = run_cli("merge", *dirs, "--out", out, env={"HYDRAOPT_TEST_KILL_AT": point})
    assert proc.returncode == -9, proc.stderr
    if old is None:
        assert not out.exists()
    else:
        assert _digest(out) == old
        assert [p for p in listing(tmp_path) if p.startswith(".out.tmp-")]  # left by the kill
    capsys.readouterr()
    assert main(["merge", *map(str, dirs), "--out", str(out), "--json"]) == 0
    assert load_bundle(out).meta["plan"]["name"] == "shared_a"
    assert listing(tmp_path) == ["in", "out"]  # no temporary sibling, no checkpoint


def test_export_killed_leaves_no_partial_output(tmp_path, capsys):
    dirs = write_collection(tmp_path / "in", modules=MODULES)
    assert main(["merge", *map(str, dirs), "--out", str(tmp_path / "bundle"), "--json"]) == 0
    peft = tmp_path / "peft"
    proc = run_cli(
        "export", tmp_path / "bundle", "--to", peft, env={"HYDRAOPT_TEST_KILL_AT": "write"}
    )
    assert proc.returncode == -9, proc.stderr
    assert not peft.exists()
    capsys.readouterr()
    assert main(["export", str(tmp_path / "bundle"), "--to", str(peft)]) == 0
    assert listing(peft) == [".hydraopt-export.json", "task0", "task1", "task2"]
    assert listing(tmp_path) == ["bundle", "in", "peft"]


def test_command_compilation_cache_is_filled_once_and_changes_nothing(tmp_path):
    dirs = write_collection(tmp_path / "in", modules=MODULES)
    cache = tmp_path / "cache"
    outputs = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        proc = run_cli("merge", *dirs, "--out", out, env={"HYDRAOPT_CACHE_DIR": str(cache)})
        assert proc.returncode == 0, proc.stderr
        outputs.append(bundle_arrays(out))
        if run == 0:
            entries = sorted(p.name for p in cache.iterdir())
            assert entries, "the first run compiles and fills the cache"
    assert sorted(p.name for p in cache.iterdir()) == entries  # the second run only reads
    assert outputs[0].keys() == outputs[1].keys()
    for key in outputs[0]:
        np.testing.assert_array_equal(outputs[0][key], outputs[1][key])


def test_empty_cache_dir_setting_disables_the_cache(tmp_path, monkeypatch):
    from hydraopt_jax.cli import compilation_cache_dir

    monkeypatch.setenv("HYDRAOPT_CACHE_DIR", "")
    assert compilation_cache_dir() is None
    monkeypatch.delenv("HYDRAOPT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation_cache_dir() == str(tmp_path / "hydraopt" / "jax")
