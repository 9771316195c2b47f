"""`hydraopt plan`: plans under a budget written as YAML, read back by `merge --config`; its
flags and errors; `hydraopt sweep`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers.files import run_main
from tests.helpers.grid import NAMES


def test_cli_plan_then_merge(tmp_path, capsys, adapter_dirs):
    out = tmp_path / "plans" / "plan.yaml"
    rc, stdout, err = run_main(
        capsys, "plan", *adapter_dirs, "--budget", "0.3", "--out", out, "--json"
    )
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["storage_ratio"] <= 0.3 and out.is_file()
    reference = summary["truncation"]  # per-task truncation within the same budget
    assert reference["storage_ratio"] <= 0.3 and summary["loss"] <= reference["loss"]
    assert set(summary["tasks"]) == set(NAMES)
    assert {"part0", "part1"} <= set(summary["groupings"])
    assert not [p for p in out.parent.iterdir() if p != out]  # no temporaries left
    rc, stdout, err = run_main(
        capsys, "merge", *adapter_dirs, "--config", out, "--out", tmp_path / "b", "--json"
    )
    assert rc == 0, err
    merged = json.loads(stdout)
    assert merged["plan"]["name"] == "per-module"
    assert merged["num_params"] == summary["num_params"]
    assert merged["original_params"] == summary["original_params"]
    for name in NAMES:
        np.testing.assert_allclose(
            merged["tasks"][name], summary["tasks"][name], rtol=1e-3, atol=1e-5
        )
    # size-weighted modules: the same budget, a valid plan file
    rc, stdout, err = run_main(
        capsys, "plan", *adapter_dirs, "--budget", "0.3", "--out", out, "--json",
        "--module-weighting", "size",
    )  # fmt: skip
    assert rc == 0, err
    assert json.loads(stdout)["storage_ratio"] <= 0.3
    # human-readable output too
    rc, stdout, err = run_main(capsys, "plan", *adapter_dirs, "--budget", "0.5", "--out", out)
    assert rc == 0, err
    assert "storage ratio" in stdout and "predicted mean relative error" in stdout
    assert "per-task truncation at this budget (rank 2 per task, storage 0.5000)" in stdout
    assert "weighting:" not in out.read_text()  # the default needs no reminder
    # below rank 1's storage, and with no candidate rank below r: each says why
    rc, stdout, err = run_main(capsys, "plan", *adapter_dirs, "--budget", "0.2", "--out", out)
    assert rc == 0, err
    assert "per-task truncation: its lowest candidate rank does not fit this budget" in stdout
    rc, stdout, err = run_main(capsys, "plan", *adapter_dirs, "--budget", "0.5", "--out", out,
                               "--rank-multipliers", "2")  # fmt: skip
    assert rc == 0, err
    assert "per-task truncation: none offered (--rank-multipliers" in stdout


def test_cli_adapter_weighting_plans_and_merges_the_reported_errors(tmp_path, capsys, adapter_dirs):
    """`--weighting adapter`: the plan's loss is the sum of its tasks' squared reported
    errors, and `merge --config` with the same weighting reproduces those errors."""
    out = tmp_path / "plan.yaml"
    rc, stdout, err = run_main(capsys, "plan", *adapter_dirs, "--budget", "0.4", "--out", out,
                               "--weighting", "adapter", "--json")  # fmt: skip
    assert rc == 0, err
    summary = json.loads(stdout)
    errors = np.array(list(summary["tasks"].values()))
    assert summary["loss"] == pytest.approx(float(np.sum(errors**2)), rel=1e-8)
    assert summary["loss"] <= summary["truncation"]["loss"]
    assert "# weighting: adapter (merge with the same --weighting)" in out.read_text()
    rc, stdout, err = run_main(capsys, "merge", *adapter_dirs, "--config", out, "--out",
                               tmp_path / "b", "--weighting", "adapter", "--json")  # fmt: skip
    assert rc == 0, err
    merged = json.loads(stdout)
    for name in NAMES:
        assert merged["tasks"][name] == pytest.approx(summary["tasks"][name], rel=1e-3, abs=1e-5)


def test_cli_per_task_ranks_plan_then_merge(tmp_path, capsys, adapter_dirs):
    """`--per-task-ranks`: some module keeps a rank per task inside its shared factor, the
    plan file lists them, and `merge --config` reproduces the planned storage and errors."""
    out = tmp_path / "plan.yaml"
    rc, stdout, err = run_main(capsys, "plan", *adapter_dirs, "--budget", "0.2", "--out", out,
                               "--per-task-ranks", "--json")  # fmt: skip
    assert rc == 0, err
    summary = json.loads(stdout)
    per_task = [row for row in summary["modules"].values() if isinstance(row["task_rank"], list)]
    assert per_task and all(len(row["task_rank"]) == len(NAMES) for row in per_task)
    assert "task_rank: [" in out.read_text()
    rc, stdout, err = run_main(
        capsys, "merge", *adapter_dirs, "--config", out, "--out", tmp_path / "b", "--json"
    )
    assert rc == 0, err
    merged = json.loads(stdout)
    assert merged["num_params"] == summary["num_params"]
    for name in NAMES:
        assert merged["tasks"][name] == pytest.approx(summary["tasks"][name], rel=1e-3, abs=1e-5)


def test_cli_plan_errors_write_nothing(tmp_path, capsys, adapter_dirs):
    out = tmp_path / "plan.yaml"
    cases = [
        (["--budget", "0.0001"], "--budget"),
        (["--budget", "0"], "--budget"),
        (["--budget", "0.3", "--rank-multipliers", "x"], "--rank-multipliers"),
        (["--budget", "0.3", "--attributes", "(?P<a>[a-z]+)-(?P<b>.*)"], "--attributes"),
        (["--budget", "0.3", "--module-weighting", "bytes"], "--module-weighting"),
    ]
    for extra, where in cases:
        rc, stdout, err = run_main(capsys, "plan", *adapter_dirs, "--out", out, *extra)
        assert rc == 2, (extra, err)
        assert err.count("\n") == 1 and where in err, err
        assert not out.exists() and not list(tmp_path.iterdir())
    rc, _, err = run_main(capsys, "plan", tmp_path / "missing", "--budget", "0.3", "--out", out)
    assert rc == 2 and "missing" in err and err.count("\n") == 1
    (tmp_path / "dir.yaml").mkdir()
    rc, _, err = run_main(
        capsys, "plan", *adapter_dirs, "--budget", "0.3", "--out", tmp_path / "dir.yaml"
    )
    assert rc == 2 and "dir.yaml" in err
    assert not out.exists()


def test_cli_sweep(tmp_path, capsys, adapter_dirs):
    png = tmp_path / "sweep.png"
    rc, stdout, err = run_main(
        capsys,
        "sweep",
        *adapter_dirs,
        "--plot",
        png,
        "--baselines",
        "linear,svd",
        "--budgets",
        "0.2,0.4",
        "--json",
    )
    assert rc == 0, err
    result = json.loads(stdout)
    methods = {r["method"]: r for r in result["rows"]}
    assert {"hydraopt:shared-a k=1r", "hydraopt:full-merge k=1r", "linear", "svd"} <= set(methods)
    assert {"planner budget=0.2", "planner budget=0.4"} <= set(methods)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.png"]
    fm, sep = methods["hydraopt:full-merge k=1r"], methods["hydraopt:separate k=1r"]
    assert fm["storage_ratio"] == methods["svd"]["storage_ratio"]
    assert sep["storage_ratio"] == 1.0 and sep["max_relative_error"] < 1e-5
    assert methods["planner budget=0.4"]["storage_ratio"] <= 0.4
    # per-task truncation below r (these adapters have r = 4: ranks 1 and 2)
    trunc = sorted((r["storage_ratio"], r["method"]) for r in result["rows"]
                   if r["family"] == "truncation")  # fmt: skip
    assert trunc == [(0.25, "truncation rank 1"), (0.5, "truncation rank 2")]
    assert "hydraopt:separate k=0.5r" not in methods  # the same point, named once
    rc, stdout, err = run_main(
        capsys, "plan", *adapter_dirs, "--budget", "0.5", "--out", tmp_path / "p.yaml", "--json"
    )
    reference = json.loads(stdout)["truncation"]  # what `plan` prints beside its choice
    assert reference["mean_relative_error"] == pytest.approx(
        methods["truncation rank 2"]["mean_relative_error"], rel=1e-12
    )
    (tmp_path / "p.yaml").unlink()


def test_truncation_reference_counts_the_tasks_it_pads(tmp_path, capsys):
    """Adapters of mixed ranks on one module (4, 2, 2): truncation at the module's rank 4
    stores the rank-2 tasks padded to 4, as `merge --plan separate --rank` does; the plan
    says how many (module, task) pairs, and none at ranks every task has."""
    from tests.helpers.peft_models import llama_adapters

    dirs = llama_adapters()
    out = tmp_path / "plan.yaml"
    rc, stdout, err = run_main(capsys, "plan", *dirs, "--budget", "3.0", "--out", out, "--json")
    assert rc == 0, err
    reference = json.loads(stdout)["truncation"]
    assert reference["rank_fraction"] == 1.0 and reference["padded"] > 0
    assert reference["storage_ratio"] > 1.0  # the padding costs storage
    rc, stdout, err = run_main(capsys, "plan", *dirs, "--budget", "0.3", "--out", out, "--json")
    assert rc == 0, err
    assert json.loads(stdout)["truncation"]["padded"] == 0
    rc, stdout, err = run_main(capsys, "plan", *dirs, "--budget", "3.0", "--out", out)
    assert rc == 0, err
    text = " ".join(stdout.split())  # the console wraps long lines
    assert f"{reference['padded']} (module, task) pairs of lower rank stored padded to it" in text
