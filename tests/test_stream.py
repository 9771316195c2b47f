"""Streaming a collection from disk (`hydraopt_jax.merge_collection`, which `hydraopt merge`
calls): from Python it gives the command's bundle; iterative solves run in checkpointed
chunks that continue the solver's state, so chunking changes nothing; an interrupted run,
resumed, ends with bitwise the factors of an uninterrupted one; a checkpoint made from other
inputs, plan or flags is refused (exit 2, one line naming the checkpoint and the cause); a
killed run leaves no partial output."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from hydraopt_jax.cli import main
from hydraopt_jax.io import load_bundle
from hydraopt_jax.io.resume import checkpoint_dir
from tests.helpers.files import (
    bundle_arrays,
    listing,
    run_cli,
    tree_digest,
    write_adapter,
    write_collection,
)

# A plan without a closed form (A- and B-groups do not nest), so ALS really iterates.
PLAN = "a_group: [0, 0, 1]\nb_group: [0, 1, 1]\n"


# One shape group of two modules; the memory budget (~18.6 kB estimated per module) splits
# it into two units of one module each, so a run has several units but one compilation.
MODULES = {"model.layers.0.q_proj": (16, 16), "model.layers.1.q_proj": (16, 16)}


MEMORY = ["--max-memory", "20kB"]


ALS = ["--solver", "als", "--steps", "5", "--checkpoint-every", "2", *MEMORY]  # chunks 2, 2, 1


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    dirs = write_collection(root / "in", modules=MODULES)
    plan = root / "plan.yaml"
    plan.write_text(PLAN)
    return root, dirs, plan


def _merge(out, dirs, plan, flags, *extra):
    return main(
        ["merge", *map(str, dirs), "--out", str(out), "--plan", str(plan), *flags, "--json", *extra]
    )


@pytest.fixture(scope="module")
def als_reference(inputs):
    root, dirs, plan = inputs
    assert _merge(root / "ref_als", dirs, plan, ALS) == 0
    return bundle_arrays(root / "ref_als"), json.loads(
        (root / "ref_als" / "hydraopt.json").read_text()
    )


def _assert_bitwise(out, reference):
    got = bundle_arrays(out)
    assert sorted(got) == sorted(reference)
    for key, value in reference.items():
        assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key


def test_uninterrupted_run_counts_all_steps_and_removes_its_checkpoint(inputs, als_reference):
    root, dirs, plan = inputs
    _, meta = als_reference
    steps = {m["steps"] for m in meta["modules"].values()}
    assert steps <= {1, 2, 3, 4, 5} and max(steps) > 2  # chunks were chained
    assert not checkpoint_dir(root / "ref_als").exists()
    assert not [p for p in listing(root) if p.startswith(".")]


@pytest.mark.parametrize(
    "solver_flags, kill_at",
    [
        (ALS, "chunk:4"),
        (["--solver", "adam", "--steps", "6", "--checkpoint-every", "3"], "chunk:1"),
    ],
    ids=["als-after-first-unit", "adam-mid-unit"],
)
def test_interrupt_then_resume_is_bitwise_equal(
    inputs, als_reference, solver_flags, kill_at, monkeypatch, capsys, tmp_path
):
    root, dirs, plan = inputs
    if solver_flags is ALS:
        reference = als_reference[0]
    else:
        assert _merge(tmp_path / "ref", dirs, plan, solver_flags) == 0
        reference = bundle_arrays(tmp_path / "ref")
    capsys.readouterr()
    out = tmp_path / "out"
    monkeypatch.setenv("HYDRAOPT_TEST_KILL_AT", kill_at)
    monkeypatch.setenv("HYDRAOPT_TEST_KILL_MODE", "interrupt")
    assert _merge(out, dirs, plan, solver_flags) == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.delenv("HYDRAOPT_TEST_KILL_AT")
    assert not out.exists() and checkpoint_dir(out).is_dir()
    units = listing(checkpoint_dir(out) / "units")
    assert units == (["g0000b00", "g0000b01"] if kill_at == "chunk:4" else ["g0000b00"])
    assert _merge(out, dirs, plan, solver_flags, "--resume") == 0, capsys.readouterr().err
    _assert_bitwise(out, reference)
    assert not checkpoint_dir(out).exists()
    assert [p for p in listing(tmp_path) if p != "ref"] == ["out"]


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_equal(inputs, als_reference, tmp_path):
    """A real SIGKILL of the command (a subprocess) after its first checkpoint."""
    _, dirs, plan = inputs
    out = tmp_path / "out"
    proc = run_cli(
        "merge", *dirs, "--out", out, "--plan", plan, *ALS, env={"HYDRAOPT_TEST_KILL_AT": "chunk:1"}
    )
    assert proc.returncode == -9, proc.stderr
    assert not out.exists() and (checkpoint_dir(out) / "manifest.json").is_file()
    assert _merge(out, dirs, plan, ALS, "--resume") == 0
    _assert_bitwise(out, als_reference[0])
    assert listing(tmp_path) == ["out"]  # checkpoint and temporary siblings gone


def _changed_input(root, dirs, plan):
    changed = root / "changed"
    shutil.copytree(dirs[0].parent, changed)
    write_adapter(changed / "task1", seed=99, modules=MODULES)
    new_dirs = [changed / d.name for d in dirs]
    return new_dirs, plan, ALS, "--resume", "task1: adapter_model.safetensors changed"


REFUSALS = {
    "changed input": _changed_input,
    "changed steps": lambda root, dirs, plan: (
        dirs,
        plan,
        ["--solver", "als", "--steps", "7", "--checkpoint-every", "2", *MEMORY],
        "--resume",
        "--steps 5, now 7",
    ),
    "changed solver": lambda root, dirs, plan: (
        dirs,
        plan,
        ["--solver", "adam", "--steps", "5", "--checkpoint-every", "2", *MEMORY],
        "--resume",
        "--solver 'als', now 'adam'",
    ),
    "changed chunking": lambda root, dirs, plan: (
        dirs,
        plan,
        ["--solver", "als", "--steps", "5", "--checkpoint-every", "3", *MEMORY],
        "--resume",
        "--checkpoint-every 2, now 3",
    ),
    "changed plan": lambda root, dirs, plan: (dirs, "separate", ALS, "--resume", "different plan"),
    "added input covariances": lambda root, dirs, plan: (
        dirs,
        plan,
        [*ALS, "--calibration", _calibration_file(root)],
        "--resume",
        "made without input covariances (--calibration), this run with them",
    ),
    "no --resume": lambda root, dirs, plan: (dirs, plan, ALS, None, "pass --resume"),
}


def _calibration_file(root):
    from hydraopt_jax.io import save_calibration

    covs = {m: np.diag(np.linspace(1.0, 2.0, d_in)) for m, (d_in, _) in MODULES.items()}
    return str(save_calibration(root / "calibration.safetensors", covs))


@pytest.fixture(scope="module")
def interrupted(inputs, tmp_path_factory):
    """A checkpoint of an interrupted ALS run (made once, copied by each refusal case)."""
    _, dirs, plan = inputs
    root = tmp_path_factory.mktemp("interrupted")
    mp = pytest.MonkeyPatch()
    mp.setenv("HYDRAOPT_TEST_KILL_AT", "chunk:1")
    mp.setenv("HYDRAOPT_TEST_KILL_MODE", "interrupt")
    try:
        assert _merge(root / "out", dirs, plan, ALS) == 130
    finally:
        mp.undo()
    return checkpoint_dir(root / "out")


@pytest.mark.parametrize("case", list(REFUSALS))
def test_resume_refuses_a_checkpoint_of_other_inputs(case, inputs, interrupted, tmp_path, capsys):
    root, dirs, plan = inputs
    new_dirs, new_plan, flags, resume, needle = REFUSALS[case](tmp_path, dirs, plan)
    out = tmp_path / "out"
    ckpt = checkpoint_dir(out)
    shutil.copytree(interrupted, ckpt)
    before = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*"))
    capsys.readouterr()
    rc = main(
        [
            "merge",
            *map(str, new_dirs),
            "--out",
            str(out),
            "--plan",
            str(new_plan),
            *flags,
            *([resume] if resume else []),
        ]
    )
    out_text, err = capsys.readouterr()
    assert rc == 2 and out_text == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"hydraopt: {ckpt}: ") and needle in err, err
    assert not out.exists()
    assert sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*")) == before  # untouched


def test_resume_without_a_checkpoint_starts_fresh(inputs, als_reference, tmp_path):
    _, dirs, plan = inputs
    assert _merge(tmp_path / "out", dirs, plan, ALS, "--resume") == 0
    _assert_bitwise(tmp_path / "out", als_reference[0])


@pytest.mark.slow
@pytest.mark.parametrize("point", ["load", "solve", "write"])
def test_merge_killed_leaves_no_partial_output(point, tmp_path, capsys):
    dirs = write_collection(tmp_path / "in", modules=MODULES)
    out = tmp_path / "out"
    old = None
    if point == "write":  # killed while replacing an older bundle: the old one survives
        assert main(["merge", *map(str, dirs), "--out", str(out), "--plan", "separate"]) == 0
        old = tree_digest(out)
    proc = run_cli("merge", *dirs, "--out", out, env={"HYDRAOPT_TEST_KILL_AT": point})
    assert proc.returncode == -9, proc.stderr
    if old is None:
        assert not out.exists()
    else:
        assert tree_digest(out) == old
        assert [p for p in listing(tmp_path) if p.startswith(".out.tmp-")]  # left by the kill
    capsys.readouterr()
    assert main(["merge", *map(str, dirs), "--out", str(out), "--json"]) == 0
    assert load_bundle(out).meta["plan"]["name"] == "shared_a"
    assert listing(tmp_path) == ["in", "out"]  # no temporary sibling, no checkpoint


@pytest.mark.slow
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


def test_streaming_from_python_gives_the_commands_bundle(inputs, tmp_path):
    import hydraopt_jax as hj

    _, dirs, plan = inputs
    assert main(["merge", *map(str, dirs), "--out", str(tmp_path / "cli"), "--plan",
                 "shared-b", "--rank", "3", "--max-memory", "20kB", "--json"]) == 0  # fmt: skip
    collection = hj.io.load_collection(dirs)
    bundle = hj.merge_collection(
        collection, "shared-b", rank=3, out=tmp_path / "py", max_memory=20_000,
        plan_source="shared_b",
    )  # fmt: skip
    _assert_bitwise(tmp_path / "py", bundle_arrays(tmp_path / "cli"))
    cli_meta = json.loads((tmp_path / "cli" / "hydraopt.json").read_text())
    assert json.loads((tmp_path / "py" / "hydraopt.json").read_text()) == cli_meta
    assert bundle.task_relative_errors() == load_bundle(tmp_path / "cli").task_relative_errors()
    # and without `out`: the same bundle in memory, nothing written
    in_memory = hj.merge_collection(collection, "shared-b", rank=3, max_memory=20_000)
    for name, module in in_memory.modules.items():
        assert np.array_equal(module.shared_b, bundle.modules[name].shared_b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli", "py"]


def test_chunked_adam_continues_its_moments(inputs, tmp_path):
    """Checkpoint chunks carry Adam's moments and step count: 3 chunks of 4 steps end where
    12 steps in one go end (they restarted the moments at every chunk before)."""
    import hydraopt_jax as hj

    _, dirs, plan = inputs
    collection = hj.io.load_collection(dirs)
    plans = hj.planner.read_plan_file(plan, collection.names, list(collection.modules))
    chunked = hj.merge_collection(
        collection, plans, "adam", out=tmp_path / "chunked", max_steps=12, checkpoint_every=4
    )
    group = collection.load_group(list(collection.modules))
    whole = hj.merge_adapters(group, plans, "adam", max_steps=12)
    for name, sol in whole.items():
        module = chunked.modules[name]
        assert module.steps == int(sol.steps) == 12
        np.testing.assert_allclose(module.shared_a, sol.shared_a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(module.shared_b, sol.shared_b, rtol=1e-5, atol=1e-6)


def test_streamed_adapter_weights_are_the_whole_collections(tmp_path):
    """`merge_collection(weights="adapter")` weighs each task by its update over every
    module (a first pass over the collection), not over the shape group being solved: it
    equals `merge_adapters` on all modules at once."""
    import hydraopt_jax as hj

    modules = {"model.layers.0.q_proj": (16, 16), "model.layers.0.k_proj": (16, 8)}
    dirs = write_collection(tmp_path / "in", num_tasks=4, modules=modules)
    collection = hj.io.load_collection(dirs)
    assert len(collection.shape_groups()) > 1  # groups are solved one at a time
    bundle = hj.merge_collection(collection, "shared-a", weights="adapter")
    arrays = {m: (a, b, r) for m, a, b, r in collection.iter_modules()}
    whole = hj.merge_adapters(arrays, hj.SharingPlan.shared_a(collection.num_tasks),
                              weights="adapter")  # fmt: skip
    assert bundle.meta["weighting"] == "adapter"
    for name, sol in whole.items():
        np.testing.assert_allclose(
            np.asarray(bundle.modules[name].relative_error), np.asarray(sol.relative_error),
            rtol=1e-5, atol=1e-7,
        )  # fmt: skip
