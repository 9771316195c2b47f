"""`hydraopt merge` -> `export` end to end with real PEFT adapters and models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hydraopt_jax.io import AdapterError, load_bundle, load_collection
from hydraopt_jax.planner.planfile import plan_from_config, plans_from_config
from tests.helpers.files import bundle_arrays, run_cli, run_main, write_collection
from tests.helpers.peft_models import (
    LLAMA_TASKS,
    as_update,
    llama_adapters,
    load_peft,
    peft_deltas,
    rel_err,
    tiny_llama,
)


@pytest.fixture(scope="module")
def originals():
    """PEFT's own delta weights of the original adapters, in our [d_out, d_in] layout."""
    return {
        path.name: {n: as_update(*v) for n, v in peft_deltas(tiny_llama(), path).items()}
        for path in llama_adapters()
    }


def _exported(root):
    return {
        task: {n: as_update(*v) for n, v in peft_deltas(tiny_llama(), root / task).items()}
        for task in LLAMA_TASKS
    }


def test_merge_separate_then_export_reproduces_every_adapter(tmp_path, capsys, originals):
    dirs = llama_adapters()
    rc, out, err = run_main(
        capsys, "merge", *dirs, "--out", tmp_path / "bundle", "--plan", "separate", "--json"
    )
    assert rc == 0, err
    summary = json.loads(out)  # exactly one JSON object on stdout
    assert {
        "storage_ratio",
        "num_params",
        "original_params",
        "tasks",
        "plan",
        "solver",
        "seconds",
    } <= set(summary)
    assert summary["solver"] == "exact" and summary["plan"]["name"] == "separate"
    assert set(summary["tasks"]) == set(LLAMA_TASKS) and max(summary["tasks"].values()) < 1e-5
    assert err == ""  # stderr is not a terminal: no progress bar
    rc, out, err = run_main(capsys, "export", tmp_path / "bundle", "--to", tmp_path / "peft")
    assert rc == 0, err
    exported = _exported(tmp_path / "peft")
    for task, modules in originals.items():
        assert set(exported[task]) == set(modules)
        for name, delta in modules.items():
            assert rel_err(exported[task][name], delta) < 1e-5, (task, name)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    for path in dirs:
        with torch.no_grad():
            ref = load_peft(tiny_llama(), path)(ids).logits
            got = load_peft(tiny_llama(), tmp_path / "peft" / path.name)(ids).logits
            base = tiny_llama()(ids).logits
        # float32 noise of the attention path: compare against the adapter's own effect
        assert float((got - ref).norm() / (ref - base).norm()) < 1e-4, path.name
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4), path.name


def _shared_a_optimum(group_entry):
    """Dense reference: with one A and per-task B, the optimum of sum_t w_t ||dW_t - B_t A||^2
    is the tail energy of the stacked [sqrt(w_t) dW_t] beyond rank k (Eckart-Young)."""
    a, b, ranks = group_entry
    present = [t for t, r in enumerate(ranks) if r]
    rows = []
    for t in present:
        dw = b[t].astype(np.float64) @ a[t].astype(np.float64)
        rows.append(dw / np.linalg.norm(dw))
    s = np.linalg.svd(np.concatenate(rows), compute_uv=False)
    return float(np.sum(s[max(ranks) :] ** 2)), present


def test_merge_shared_a_exports_the_engine_reconstruction_at_the_optimum(tmp_path, capsys):
    dirs = llama_adapters()
    rc, out, err = run_main(
        capsys, "merge", *dirs, "--out", tmp_path / "bundle", "--plan", "shared-a", "--json"
    )
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["storage_ratio"] < 1 and summary["plan"]["a_group"] == [0, 0, 0]
    bundle = load_bundle(tmp_path / "bundle")
    rc, _, err = run_main(capsys, "export", tmp_path / "bundle", "--to", tmp_path / "peft")
    assert rc == 0, err
    exported = _exported(tmp_path / "peft")
    collection = load_collection(dirs)
    groups = {}
    for _, group in collection.iter_groups():
        groups.update(group)
    for name, module in bundle.modules.items():
        assert module.plan.num_a_groups == 1
        optimum, present = _shared_a_optimum(groups[name])
        assert module.task_ids == tuple(present)
        assert module.loss == pytest.approx(optimum, rel=1e-3, abs=1e-6), name
        loss = 0.0
        for i, t in enumerate(present):
            task = collection.names[t]
            engine = module.shared_b[module.plan.b_group[i]] @ module.shared_a[0]
            assert rel_err(exported[task][name], engine) < 1e-6, (task, name)
            a, b, _ = groups[name]
            dw = b[t].astype(np.float64) @ a[t].astype(np.float64)
            loss += np.sum((dw - exported[task][name]) ** 2) / np.sum(dw**2)
        assert loss == pytest.approx(optimum, rel=1e-3, abs=1e-6), name


def test_merge_with_a_yaml_plan(tmp_path, capsys):
    # the shared-a plan again, as a file (the test above compiled it: this run is fast)
    plan = tmp_path / "plan.yaml"
    plan.write_text('a_groups:\n  all: "*"\nb: per-task\n')
    rc, out, err = run_main(
        capsys,
        "merge",
        *llama_adapters(),
        "--out",
        tmp_path / "bundle",
        "--plan",
        plan,
        "--dtype",
        "bfloat16",
    )
    assert rc == 0, err
    assert "storage" in out
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.dtype == "bfloat16" and bundle.meta["plan"]["source"] == str(plan)
    q = bundle.modules["model.layers.0.self_attn.q_proj"]
    assert q.plan.a_group == (0, 0, 0) and q.plan.b_group == (0, 1, 2)
    assert str(q.shared_a.dtype) == "bfloat16"


def test_merge_with_per_module_plans(tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text('a: shared\nmodules:\n  "*.v_proj": {a: per-task}\n')
    rc, out, err = run_main(
        capsys, "merge", *llama_adapters(), "--out", tmp_path / "b", "--plan", plan, "--json"
    )
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["plan"]["name"] == "per-module"
    bundle = load_bundle(tmp_path / "b")
    assert bundle.modules["model.layers.1.self_attn.v_proj"].plan.a_group == (0, 1, 2)
    assert bundle.modules["model.layers.1.self_attn.v_proj"].relative_error[0] < 1e-5
    assert bundle.modules["model.layers.1.self_attn.q_proj"].plan.a_group == (0, 0, 0)


def test_per_module_plan_files():
    tasks = ["t0", "t1", "t2"]
    modules = ["l0.q", "l0.v", "l1.q", "l1.v", "l0.mlp.up"]
    spec = {
        "a": "shared",
        "rank": 4,
        "modules": {"*.v": {"b": "shared", "a": "per-task"}, "*.mlp.*": {"rank": 2}},
    }
    plans = plans_from_config(spec, tasks, modules, rank=6)
    assert plans["l0.q"].a_group == (0, 0, 0) and plans["l0.q"].rank == 6
    assert plans["l1.v"].a_group == (0, 1, 2) and plans["l1.v"].b_group == (0, 0, 0)
    assert plans["l0.mlp.up"].rank == 2 and plans["l0.mlp.up"].a_group == (0, 0, 0)
    assert plans_from_config({"a": "shared"}, tasks, modules).a_group == (0, 0, 0)
    with pytest.raises(AdapterError, match="matches no adapted module"):
        plans_from_config({"modules": {"*.k": {"a": "shared"}}}, tasks, modules)
    with pytest.raises(AdapterError, match=r"modules.\*.v: unknown key 'c'"):
        plans_from_config({"modules": {"*.v": {"c": 1}}}, tasks, modules)


def test_plan_files():
    tasks = ["chat_fr", "chat_de", "qa_fr", "qa_de"]
    p = plan_from_config(
        {"a_groups": {"fr": "*_fr", "de": ["*_de"]}, "b_groups": {"qa": "qa_*"}}, tasks
    )
    assert p.a_group == (0, 1, 0, 1) and p.b_group == (0, 1, 2, 2) and p.rank is None
    p = plan_from_config({"a": "shared", "b": "per-task", "rank": 8}, tasks)
    assert p.a_group == (0, 0, 0, 0) and p.b_group == (0, 1, 2, 3) and p.rank == 8
    p = plan_from_config({"b_group": [0, 0, 1, 1]}, tasks)
    assert p.a_group == (0, 1, 2, 3) and p.b_group == (0, 0, 1, 1)
    p = plan_from_config({"b_group": {"qa_fr": 0, "qa_de": 0}}, tasks)
    assert p.b_group == (0, 1, 2, 2)
    assert plan_from_config({}, tasks).a_group == (0, 1, 2, 3)


def test_inspect_reports_overlaps_and_plan_storage(capsys):
    rc, out, err = run_main(capsys, "inspect", *llama_adapters(), "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["tasks"] == list(LLAMA_TASKS)
    rows = {r["module"]: r for r in report["modules"]}
    q0 = rows["model.layers.0.self_attn.q_proj"]
    assert q0["tasks"] == 3 and 0 <= q0["a_overlap"] <= 1 and 0 <= q0["b_overlap"] <= 1
    assert rows["model.layers.0.mlp.up_proj"]["a_overlap"] is None  # one task: no pair
    plans = report["plans"]
    assert plans["full_merge"]["storage_ratio"] < plans["shared_a"]["storage_ratio"]
    rc, out, err = run_main(capsys, "inspect", *llama_adapters())
    assert rc == 0 and "q_proj" in out and "shared-a" in out


def test_subspace_overlap_reference():
    from hydraopt_jax import subspace_overlap

    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 3))
    assert subspace_overlap(x, x @ rng.normal(size=(3, 3))) == pytest.approx(1.0)
    assert subspace_overlap(x, x[:, :1]) == pytest.approx(1.0)  # contained
    e = np.eye(20)
    assert subspace_overlap(e[:, :2], e[:, 2:5]) == pytest.approx(0.0)
    assert np.isnan(subspace_overlap(np.zeros((20, 2)), x))


MODULES = {"model.layers.0.q_proj": (16, 16), "model.layers.1.q_proj": (16, 16)}


@pytest.mark.slow
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
