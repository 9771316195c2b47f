"""The planner: Gram-space losses against `merge`, the knapsack, and `hydraopt plan` / `sweep`
end to end on small PEFT adapter directories written here."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import yaml

import hydraopt_jax as hj
from hydraopt_jax._planner import (
    _groupings,
    allocate,
    choose,
    collection_options,
    module_options,
    module_stats,
    plan_budget,
    task_attributes_from_names,
)
from hydraopt_jax.cli import main, plans_from_config

APPS, LANGS, RANK = ("chat", "qa"), ("fr", "de", "it"), 4
NAMES = [f"{a}_{b}" for a in APPS for b in LANGS]
ATTRS = [{"app": a, "lang": b} for a in APPS for b in LANGS]


def make_collection(seed=0, rank=RANK, ranks=None):
    """Two 'similar-A' modules (A near one shared init) and two 'dissimilar-A' modules
    (independent A per task), with B structured by application."""
    rng = np.random.default_rng(seed)
    t = len(NAMES)
    app = np.repeat(np.arange(len(APPS)), len(LANGS))
    out = {}
    for layer in range(2):
        for kind, (d_in, d_out), drift in (
            ("q_proj", (32, 32), 0.02),  # similar A
            ("k_proj", (32, 12), 0.02),  # similar A, d_out < d_in
            ("v_proj", (32, 32), None),  # dissimilar A
        ):
            a0 = rng.normal(size=(1, rank, d_in))
            if drift is None:
                a = rng.normal(size=(t, rank, d_in))
            else:
                a = a0 + drift * rng.normal(size=(t, rank, d_in))
            b = rng.normal(size=(len(APPS), d_out, rank))[app] + 0.7 * rng.normal(
                size=(t, d_out, rank)
            )
            out[f"model.layers.{layer}.self_attn.{kind}"] = (a, b)
    if ranks is not None:
        for name, (a, b) in out.items():
            a, b = a.copy(), b.copy()
            for i, r in enumerate(ranks):
                a[i, r:] = 0
                b[i, :, r:] = 0
            out[name] = (a, b, tuple(ranks))
    return out


def write_peft_dirs(root, collection, names=NAMES):
    """One PEFT LoRA adapter directory per task (lora_alpha = r: scale 1)."""
    from hydraopt_jax.io import write_safetensors

    dirs = []
    for t, name in enumerate(names):
        d = root / name
        d.mkdir(parents=True)
        tensors = {}
        for module, (a, b, *_) in collection.items():
            tensors[f"base_model.model.{module}.lora_A.weight"] = a[t].astype(np.float32)
            tensors[f"base_model.model.{module}.lora_B.weight"] = b[t].astype(np.float32)
        write_safetensors(d / "adapter_model.safetensors", tensors)
        config = {
            "peft_type": "LORA",
            "r": RANK,
            "lora_alpha": RANK,
            "target_modules": ["q_proj", "k_proj", "v_proj"],
            "base_model_name_or_path": "tiny",
        }
        (d / "adapter_config.json").write_text(json.dumps(config))
        dirs.append(d)
    return dirs


@pytest.fixture(scope="module")
def collection():
    return make_collection()


@pytest.fixture(scope="module")
def options(collection):
    return collection_options(collection, task_names=NAMES, task_attributes=ATTRS)


# --------------------------------------------------------------------------- losses


def test_attributes_from_names():
    assert task_attributes_from_names(NAMES)[0] == {"part0": "chat", "part1": "fr"}
    parsed = task_attributes_from_names(NAMES, r"(?P<app>[a-z]+)_(?P<lang>[a-z]+)")
    assert parsed == ATTRS
    assert task_attributes_from_names(["a", "b_c"]) == [{}, {}]
    with pytest.raises(ValueError, match="does not match"):
        task_attributes_from_names(["x-y"], r"(?P<a>\w+)_(?P<b>\w+)")


@pytest.mark.parametrize("with_cov", [False, True])
def test_option_losses_and_errors_match_merge(with_cov):
    """Every family (shared-A, shared-B, grouped, full merge, separate), mixed ranks and an
    absent task: the Gram-space loss and per-task errors are merge's exact solver's."""
    coll = make_collection(seed=1, ranks=(4, 2, 4, 0, 3, 4))
    a, b, ranks = coll["model.layers.0.self_attn.k_proj"]
    rng = np.random.default_rng(2)
    cov = None
    if with_cov:
        x = rng.normal(size=(64, a.shape[2]))
        cov = x.T @ x / 64
    stats = module_stats("m", a, b, ranks, activation_cov=cov)
    opts = module_options(stats, _groupings(len(NAMES), ATTRS))
    assert {o.name for o in opts} >= {"shared-a", "shared-b", "full-merge", "separate"}
    picks = [
        o
        for o in opts
        if (o.name, o.rank_label)
        in {
            ("shared-a", "1r"),
            ("shared-b", "2r"),
            ("full-merge", "1r"),
            ("A:app,B:task", "0.5r"),
            ("A:task,B:app", "1.5r"),
            ("A:all,B:app", "1r"),
            ("separate", "0.5r"),
        }
    ]
    assert len(picks) == 7
    present = list(stats.present)
    for o in picks:
        sol = hj.merge(a[present], b[present], o.plan, activation_cov=cov)
        np.testing.assert_allclose(o.loss, float(sol.loss), rtol=1e-7, atol=1e-9, err_msg=o.name)
        np.testing.assert_allclose(
            o.relative_error, np.asarray(sol.relative_error), rtol=1e-6, atol=1e-7
        )
        assert o.num_params == sol.num_params


# --------------------------------------------------------------------------- knapsack


def test_allocate_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(40):
        costs = [np.sort(rng.integers(1, 100, size=5)) for _ in range(4)]
        losses = [np.sort(rng.uniform(0, 10, size=5))[::-1] for _ in range(4)]
        capacity = float(rng.uniform(sum(c.min() for c in costs), sum(c.max() for c in costs)))
        best = min(
            sum(losses[m][i] for m, i in enumerate(ch))
            for ch in itertools.product(range(5), repeat=4)
            if sum(costs[m][i] for m, i in enumerate(ch)) <= capacity
        )
        choice, _ = allocate(costs, losses, capacity)
        assert sum(costs[m][i] for m, i in enumerate(choice)) <= capacity
        assert sum(losses[m][i] for m, i in enumerate(choice)) <= best + 1e-9


def test_allocate_refuses_impossible_budget():
    with pytest.raises(ValueError, match="cheapest"):
        allocate([[10, 20]], [[1.0, 0.0]], 5)


# --------------------------------------------------------------------------- planner


@pytest.mark.parametrize("budget", [0.12, 0.2, 0.3, 0.5, 0.8])
def test_budget_respected(options, budget):
    bp = choose(*options, budget)
    assert bp.storage_ratio <= budget + 1e-12
    assert bp.num_params == sum(c.option.num_params for c in bp.modules.values())
    assert np.isclose(bp.loss, sum(c.option.loss for c in bp.modules.values()))


def test_too_small_budget_is_refused(options):
    with pytest.raises(ValueError, match="smallest achievable"):
        choose(*options, 1e-4)


def test_generous_budget_keeps_everything(options):
    bp = choose(*options, 1.0)
    assert bp.loss < 1e-9
    assert np.max(bp.task_relative_errors()) < 1e-5
    assert all(c.option.name == "separate" for c in bp.modules.values())


def test_similar_a_shared_dissimilar_a_gets_more(options):
    bp = choose(*options, 0.35)
    for layer in range(2):
        similar = bp.modules[f"model.layers.{layer}.self_attn.q_proj"].option
        dissimilar = bp.modules[f"model.layers.{layer}.self_attn.v_proj"].option
        assert similar.a_by == "all"  # one shared A
        assert dissimilar.a_by != "all" or dissimilar.rank > similar.rank
        assert dissimilar.num_params > similar.num_params


def test_size_module_weighting_is_each_modules_share_of_the_parameters(collection):
    """`module_weights="size"` = the mapping `(d_in + d_out) / mean`; it moves storage to
    the larger modules (here the 32 -> 32 ones over the 32 -> 12 `k_proj`)."""
    sizes = {m: a.shape[2] + b.shape[1] for m, (a, b) in collection.items()}
    mapping = {m: s / np.mean(list(sizes.values())) for m, s in sizes.items()}
    by_name = plan_budget(collection, 0.2, task_attributes=ATTRS, module_weights="size")
    by_map = plan_budget(collection, 0.2, task_attributes=ATTRS, module_weights=mapping)
    equal = plan_budget(collection, 0.2, task_attributes=ATTRS)
    assert by_name.plans == by_map.plans and by_name.loss == pytest.approx(by_map.loss)
    assert plan_budget(collection, 0.2, task_attributes=ATTRS, module_weights="equal").plans == (
        equal.plans
    )

    def small_share(bp):
        params = {m: c.option.num_params for m, c in bp.modules.items()}
        return sum(v for m, v in params.items() if "k_proj" in m) / sum(params.values())

    assert by_name.plans != equal.plans and small_share(by_name) < small_share(equal)
    with pytest.raises(ValueError, match="module_weights must be 'equal' or 'size'"):
        plan_budget(collection, 0.3, module_weights="bytes")


def test_never_worse_than_uniform_plans(options):
    groupings, opts = options
    original = sum(st.original_params for st, _ in opts.values())
    checked = 0
    for key in [("all", "task"), ("task", "all"), ("all", "all"), ("lang", "task")]:
        for label in ("0.5r", "1r", "2r"):
            sel = [next(o for o in o_list if o.key == (*key, label)) for _, o_list in opts.values()]
            storage = sum(o.num_params for o in sel) / original
            loss = sum(o.loss for o in sel)
            if storage >= 1:
                continue
            bp = choose(groupings, opts, storage)
            assert bp.storage_ratio <= storage + 1e-12
            assert bp.loss <= loss + 1e-9, (key, label)
            checked += 1
    assert checked >= 9


def test_plans_merge_as_predicted(collection):
    bp = plan_budget(collection, 0.3, task_names=NAMES, task_attributes=ATTRS)
    solutions = hj.merge_adapters(collection, bp.plans)
    for module, sol in solutions.items():
        choice = bp.modules[module]
        assert sol.num_params == choice.option.num_params
        np.testing.assert_allclose(float(sol.loss), choice.option.loss, rtol=1e-5, atol=1e-7)


def test_yaml_round_trips(options):
    bp = choose(*options, 0.3)
    spec = yaml.safe_load(bp.to_yaml(NAMES))
    plans = plans_from_config(spec, NAMES, list(bp.modules))
    assert plans == bp.plans


# --------------------------------------------------------------------------- CLI


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, collection):
    return write_peft_dirs(tmp_path_factory.mktemp("adapters"), collection)


def test_cli_plan_then_merge(tmp_path, capsys, adapter_dirs):
    out = tmp_path / "plans" / "plan.yaml"
    rc, stdout, err = _run(capsys, "plan", *adapter_dirs, "--budget", "0.3", "--out", out, "--json")
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["storage_ratio"] <= 0.3 and out.is_file()
    assert set(summary["tasks"]) == set(NAMES)
    assert {"part0", "part1"} <= set(summary["groupings"])
    assert not [p for p in out.parent.iterdir() if p != out]  # no temporaries left
    rc, stdout, err = _run(
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
    rc, stdout, err = _run(
        capsys, "plan", *adapter_dirs, "--budget", "0.3", "--out", out, "--json",
        "--module-weighting", "size",
    )  # fmt: skip
    assert rc == 0, err
    assert json.loads(stdout)["storage_ratio"] <= 0.3
    # human-readable output too
    rc, stdout, err = _run(capsys, "plan", *adapter_dirs, "--budget", "0.5", "--out", out)
    assert rc == 0, err
    assert "storage ratio" in stdout and "predicted mean relative error" in stdout


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
        rc, stdout, err = _run(capsys, "plan", *adapter_dirs, "--out", out, *extra)
        assert rc == 2, (extra, err)
        assert err.count("\n") == 1 and where in err, err
        assert not out.exists() and not list(tmp_path.iterdir())
    rc, _, err = _run(capsys, "plan", tmp_path / "missing", "--budget", "0.3", "--out", out)
    assert rc == 2 and "missing" in err and err.count("\n") == 1
    (tmp_path / "dir.yaml").mkdir()
    rc, _, err = _run(
        capsys, "plan", *adapter_dirs, "--budget", "0.3", "--out", tmp_path / "dir.yaml"
    )
    assert rc == 2 and "dir.yaml" in err
    assert not out.exists()


def test_cli_sweep(tmp_path, capsys, adapter_dirs):
    png = tmp_path / "sweep.png"
    rc, stdout, err = _run(
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
