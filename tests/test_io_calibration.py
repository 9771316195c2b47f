"""Calibration statistics (`hydraopt_jax.io.calibration`): input covariances and output
sensitivities from a PyTorch model, their file, and `--calibration` on `hydraopt plan` /
`hydraopt merge` (the same objective as the library's `activation_covs` / `module_weights`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import hydraopt_jax as hj
from hydraopt_jax.io import AdapterError
from hydraopt_jax.io.calibration import (
    input_covariances,
    load_calibration,
    output_sensitivities,
    save_calibration,
)
from tests.helpers.files import listing, run_main
from tests.helpers.grid import NAMES


# ------------------------------------------------------------------- the grid collection
def _grid_statistics(collection, seed=0):
    """Anisotropic covariances (a few input directions dominate) and skewed module weights
    for the grid collection's modules."""
    rng = np.random.default_rng(seed)
    covs, weights = {}, {}
    for i, (name, (a, *_)) in enumerate(collection.items()):
        d_in = a.shape[-1]
        x = rng.normal(size=(256, d_in)) * np.geomspace(10.0, 0.1, d_in)
        covs[name] = x.T @ x / len(x)
        weights[name] = [8.0, 1.0, 0.1][i % 3]
    return covs, weights


def test_file_round_trip_and_checks_against_the_adapters(tmp_path, collection, adapter_dirs):
    covs, weights = _grid_statistics(collection)
    path = save_calibration(tmp_path / "c.safetensors", covs, weights)
    stats = load_calibration(path)
    assert set(stats.activation_covs) == set(covs) and stats.module_weights == pytest.approx(
        weights
    )
    for m in covs:
        np.testing.assert_allclose(stats.activation_covs[m], covs[m], rtol=1e-6)
    # against a collection: entries of other modules are left out, missing ones refused
    adapters = hj.io.load_collection(adapter_dirs, NAMES)
    extra = {**covs, "model.layers.9.mlp.up_proj": np.eye(4)}
    stats = load_calibration(save_calibration(tmp_path / "x.safetensors", extra), adapters)
    assert set(stats.activation_covs) == set(adapters.modules) and stats.module_weights is None
    first = next(iter(covs))
    fewer = {m: c for m, c in covs.items() if m != first}
    save_calibration(tmp_path / "fewer.safetensors", fewer, weights)
    with pytest.raises(AdapterError, match=f"fewer.safetensors: has no input covariance.*{first}"):
        load_calibration(tmp_path / "fewer.safetensors", adapters)
    small = {m: c[:8, :8] for m, c in covs.items()}
    save_calibration(tmp_path / "small.safetensors", small)
    with pytest.raises(AdapterError, match="is 8 x 8; the adapters' d_in is 32"):
        load_calibration(tmp_path / "small.safetensors", adapters)


@pytest.mark.parametrize(
    ("covs", "weights", "cause"),
    [
        ({}, {}, "nothing to save"),
        ({"m": np.array([[1.0, 2.0], [0.0, 1.0]])}, None, "not a covariance"),
        ({"m": -np.eye(2)}, None, "not a covariance"),
        ({"m": np.full((2, 2), np.nan)}, None, "NaN or Inf"),
        ({"m": np.ones((2, 3))}, None, r"not a square"),
        ({"m": np.array([[1.0, 2.0], [2.0, 1.0]])}, None, "not positive semi-definite"),
        ({"m": np.zeros((2, 2))}, None, "mean variance 0 is outside"),
        ({"m": 1e30 * np.eye(2)}, None, "too large or small for float32"),
        ({"m": 1e200 * np.eye(2)}, None, "NaN or Inf"),
        (None, {"m": -1.0}, "finite non-negative"),
        (None, {"m": np.inf}, "finite non-negative"),
    ],
)
def test_save_refuses_bad_statistics_and_writes_nothing(tmp_path, covs, weights, cause):
    with pytest.raises(ValueError, match=cause):
        save_calibration(tmp_path / "c.safetensors", covs, weights)
    assert listing(tmp_path) == []


def test_load_refuses_files_that_are_not_calibration_files(tmp_path):
    from hydraopt_jax.io import write_safetensors

    cases = {}
    (tmp_path / "text.safetensors").write_text("not safetensors")
    cases["text.safetensors"] = "not a readable safetensors file"
    write_safetensors(tmp_path / "plain.safetensors", {"covariance/m": np.eye(2, dtype="f4")})
    cases["plain.safetensors"] = "not a calibration file"
    meta = {"format": "hydraopt-calibration", "version": "2"}
    write_safetensors(tmp_path / "v2.safetensors", {"covariance/m": np.eye(2, dtype="f4")}, meta)
    cases["v2.safetensors"] = "version '2'"
    meta["version"] = "1"
    write_safetensors(tmp_path / "odd.safetensors", {"bias/m": np.eye(2, dtype="f4")}, meta)
    cases["odd.safetensors"] = "unknown entry 'bias/m'"
    huge = {"covariance/m": np.full((2, 2), 1e200)}  # float64, beyond float32: Inf when read
    write_safetensors(tmp_path / "f64.safetensors", huge, meta)
    cases["f64.safetensors"] = "covariance/m has NaN or Inf values"
    cases["missing.safetensors"] = "no such calibration file"
    for name, cause in cases.items():
        with pytest.raises(AdapterError, match=cause) as err:
            load_calibration(tmp_path / name)
        assert err.value.path == str(tmp_path / name)


# ---------------------------------------------------------------------- the commands
def test_plan_and_merge_with_calibration_fit_the_library_objective(
    tmp_path, capsys, collection, adapter_dirs
):
    """`hydraopt plan --calibration F` chooses the plan `plan_budget(activation_covs=C,
    module_weights=W)` chooses; `merge --config PLAN --calibration F` solves each module as
    `merge_adapters(activation_covs=C)` does, and the bundle says so."""
    covs, weights = _grid_statistics(collection)
    path = save_calibration(tmp_path / "c.safetensors", covs, weights)
    plan_file = tmp_path / "plan.yaml"
    rc, stdout, err = run_main(
        capsys, "plan", *adapter_dirs, "--budget", "0.3", "--out", plan_file, "--json",
        "--calibration", path,
    )  # fmt: skip
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["calibration"] == str(path)
    adapters = hj.io.load_collection(adapter_dirs, NAMES)
    expected = hj.plan_budget(adapters, 0.3, activation_covs=covs, module_weights=weights)
    plain = hj.plan_budget(adapters, 0.3)
    assert summary["loss"] == pytest.approx(expected.loss, rel=1e-5)

    def choices(rows):  # each module's plan (groups, ranks, sizes), not its float losses
        return {m: {k: v for k, v in row.items() if not isinstance(v, float)} for m, row in rows}

    assert choices(summary["modules"].items()) == choices(expected.summary().items())
    # the statistics change the choice
    assert choices(expected.summary().items()) != choices(plain.summary().items())
    assert f"calibration: {str(path)!r}" in plan_file.read_text()

    out = tmp_path / "bundle"
    rc, stdout, err = run_main(
        capsys, "merge", *adapter_dirs, "--config", plan_file, "--out", out, "--json",
        "--calibration", path,
    )  # fmt: skip
    assert rc == 0, err
    merged = json.loads(stdout)
    assert merged["objective"] == "activation"
    bundle = hj.io.load_bundle(out)
    assert bundle.meta["objective"] == "activation"
    solutions = hj.merge_adapters(
        {m: v[:2] for m, v in collection.items()}, expected.plans, activation_covs=covs
    )
    errors = hj.task_relative_errors(solutions, len(NAMES))
    np.testing.assert_allclose([merged["tasks"][n] for n in NAMES], errors, rtol=1e-3, atol=1e-6)
    for m, sol in solutions.items():  # in the activation metric: the planner's prediction
        np.testing.assert_allclose(
            bundle.modules[m].relative_error, np.asarray(sol.relative_error), rtol=1e-3, atol=1e-6
        )


def test_adapter_weighting_with_covariances_plans_and_merges_the_reported_errors(
    tmp_path, capsys, collection, adapter_dirs
):
    """`--weighting adapter --calibration F` (covariances only): the plan's loss is the sum
    of the squared per-task errors it predicts, in the activation metric, and `merge` with
    the same flags reports those errors."""
    covs, _ = _grid_statistics(collection)
    path = save_calibration(tmp_path / "c.safetensors", covs)
    plan_file = tmp_path / "plan.yaml"
    flags = ("--calibration", path, "--weighting", "adapter", "--json")
    rc, stdout, err = run_main(capsys, "plan", *adapter_dirs, "--budget", "0.3", "--out",
                               plan_file, *flags)  # fmt: skip
    assert rc == 0, err
    summary = json.loads(stdout)
    errors = np.array([summary["tasks"][n] for n in NAMES])
    assert summary["loss"] == pytest.approx(float(np.sum(errors**2)), rel=1e-6)
    rc, stdout, err = run_main(capsys, "merge", *adapter_dirs, "--config", plan_file, "--out",
                               tmp_path / "bundle", *flags)  # fmt: skip
    assert rc == 0, err
    merged = json.loads(stdout)
    np.testing.assert_allclose([merged["tasks"][n] for n in NAMES], errors, rtol=1e-3, atol=1e-6)


def test_calibration_flag_errors_write_nothing(tmp_path, capsys, collection, adapter_dirs):
    covs, weights = _grid_statistics(collection)
    full = save_calibration(tmp_path / "in" / "full.safetensors", covs, weights)
    only_weights = save_calibration(tmp_path / "in" / "weights.safetensors", None, weights)
    first = next(iter(covs))
    partial = save_calibration(
        tmp_path / "in" / "partial.safetensors", {m: c for m, c in covs.items() if m != first}
    )
    (tmp_path / "in" / "bad.safetensors").write_text("{}")
    bad = tmp_path / "in" / "bad.safetensors"
    outs = tmp_path / "out"
    cases = [
        (("plan", "--budget", "0.3", "--calibration", partial), str(partial)),
        (("plan", "--budget", "0.3", "--calibration", bad), str(bad)),
        (("plan", "--budget", "0.3", "--calibration", full, "--module-weighting", "size"),
         "--module-weighting"),
        (("merge", "--calibration", only_weights), str(only_weights)),
        (("merge", "--calibration", tmp_path / "nope.safetensors"), "nope.safetensors"),
    ]  # fmt: skip
    for argv, where in cases:
        out = outs / ("plan.yaml" if argv[0] == "plan" else "bundle")
        rc, stdout, err = run_main(capsys, argv[0], *adapter_dirs, "--out", out, *argv[1:])
        assert rc == 2, (argv, err)
        assert len(err.strip().splitlines()) == 1 and where in err, (argv, err)
        assert not outs.exists(), argv
    # merge reads only the covariances: module weights it does not use may be incomplete
    some_weights = save_calibration(tmp_path / "in" / "some.safetensors", covs, {first: 1.0})
    rc, stdout, err = run_main(
        capsys, "merge", *adapter_dirs, "--out", outs / "bundle", "--calibration", some_weights
    )
    assert rc == 0, err


def test_merge_collection_wants_a_covariance_for_every_module(collection, adapter_dirs):
    covs, _ = _grid_statistics(collection)
    adapters = hj.io.load_collection(adapter_dirs, NAMES)
    first = next(iter(covs))
    with pytest.raises(ValueError, match=f"no covariance for module '{first}'"):
        hj.merge_collection(
            adapters, "shared-a", activation_covs={m: c for m, c in covs.items() if m != first}
        )


# ------------------------------------------------------------------------ from PyTorch
def _sensitivity_setup():
    """A tiny Llama, its q/v projections, one answer-labelled batch and LoRA factories."""
    import torch

    from tests.helpers.peft_models import tiny_llama

    model = tiny_llama()
    modules = [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in ("q", "v")]
    named = dict(model.named_modules())
    rng = np.random.default_rng(0)
    ids = torch.as_tensor(rng.integers(1, 64, size=(3, 8)))
    labels = ids.clone()
    labels[:, :4] = -100  # the answers: the last four tokens
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0  # one padded row
    labels[2, 6:] = -100

    def lora(seed):  # small enough not to move the gradients
        r = np.random.default_rng(seed)
        shapes = {m: named[m].weight.shape for m in modules}
        return {m: (r.normal(size=(2, d_in)), 1e-4 * r.normal(size=(d_out, 2)))
                for m, (d_out, d_in) in shapes.items()}  # fmt: skip

    return model, modules, (ids, mask, labels), lora


def test_input_covariances_are_the_mean_outer_product_over_unpadded_positions():
    """Equal to each row run alone without its padding, inputs captured here by hooks of
    our own; modules that take token ids, or do not exist, are refused."""
    import torch

    model, modules, (ids, mask, _), _ = _sensitivity_setup()
    covs = input_covariances(model, modules, [(ids[:2], mask[:2]), (ids[2:], mask[2:])])
    named = dict(model.named_modules())
    seen = {m: [] for m in modules}
    handles = [
        named[m].register_forward_pre_hook(lambda _, a, m=m: seen[m].append(a[0][0].double()))
        for m in modules
    ]
    with torch.no_grad():
        for row, keep in zip(ids, mask.bool(), strict=True):
            model(input_ids=row[keep][None])
    for h in handles:
        h.remove()
    for m in modules:
        x = torch.cat(seen[m]).numpy()
        np.testing.assert_allclose(covs[m], x.T @ x / len(x), rtol=2e-4, atol=1e-6)
    with pytest.raises(ValueError, match="takes torch.int64 inputs"):
        input_covariances(model, ["model.embed_tokens"], [(ids, mask)])
    with pytest.raises(ValueError, match="not a module of the model"):
        input_covariances(model, ["base_model.model.model.layers.0.self_attn.q_proj"], [])


def test_output_sensitivities_weigh_each_module_by_its_loss_gradient_and_update():
    """`w_m` (mean 1) grows with the energy of the module's LoRA output change (4x for a
    doubled `B`, when the LoRA is too small to move the gradients) and is 0 for a module
    the LoRAs leave alone or do not have; each task counts equally whatever its scale; the
    model's `requires_grad` flags are left as they were."""
    model, modules, batch, lora = _sensitivity_setup()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a flag to keep
    loras = [lora(1), lora(2)]
    w = output_sensitivities(model, modules, [(x, batch) for x in loras])
    assert np.mean(list(w.values())) == pytest.approx(1.0) and min(w.values()) > 0
    q0, v1 = modules[0], modules[3]
    doubled = {m: (a, 2 * b if m == v1 else b) for m, (a, b) in loras[0].items()}
    w1, w2 = (output_sensitivities(model, modules, [(x, batch)]) for x in (loras[0], doubled))
    assert (w2[v1] / w2[q0]) / (w1[v1] / w1[q0]) == pytest.approx(4.0, rel=1e-3)
    zeroed = [{m: (a, 0 * b if m == q0 else b) for m, (a, b) in x.items()} for x in loras]
    assert output_sensitivities(model, modules, [(x, batch) for x in zeroed])[q0] == 0.0
    missing = [{m: f for m, f in x.items() if m != q0} for x in loras]
    assert output_sensitivities(model, modules, [(x, batch) for x in missing])[q0] == 0.0
    # tasks count equally: the result is the mean of the tasks' own profiles, however
    # much larger one task's updates are
    louder = {m: (a, 30 * b) for m, (a, b) in loras[1].items()}
    both = output_sensitivities(model, modules, [(loras[0], batch), (louder, batch)])
    alone = [output_sensitivities(model, modules, [(x, batch)]) for x in (loras[0], louder)]
    for m in modules:
        assert both[m] == pytest.approx((alone[0][m] + alone[1][m]) / 2, rel=1e-9)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert not flags["model.layers.0.mlp.up_proj.weight"] and flags["lm_head.weight"]


def test_output_sensitivities_match_gradients_taken_at_each_output():
    """One task: `w_m` is proportional to `mean ||dL/dy_m||^2 * ||dW_m x||^2` over the
    unpadded positions, with the gradient taken here by a zero perturbation added to the
    module's output (independently of the function's own hooks)."""
    import torch

    from hydraopt_jax.io.torch import lora_applied

    model, modules, (ids, mask, labels), lora = _sensitivity_setup()
    adapter = lora(3)
    w = output_sensitivities(model, modules, [(adapter, (ids, mask, labels))])
    named = dict(model.named_modules())
    deltas, inputs, handles = {}, {}, []

    def perturb(name):
        def fn(_module, args, out):
            deltas[name] = torch.zeros_like(out, requires_grad=True)
            inputs[name] = args[0].detach()
            return out + deltas[name]

        return fn

    for m in modules:
        handles.append(named[m].register_forward_hook(perturb(m)))
    with lora_applied(model, adapter):
        logits = model(input_ids=ids, attention_mask=mask).logits
    for h in handles:
        h.remove()
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
        ignore_index=-100, reduction="sum",
    )  # fmt: skip
    grads = torch.autograd.grad(loss, [deltas[m] for m in modules])
    keep = mask.bool()
    fu = []
    for m, g in zip(modules, grads, strict=True):
        a, b = (torch.as_tensor(f) for f in adapter[m])
        dy = (inputs[m][keep].double() @ a.T) @ b.T
        fu.append(float((g[keep].double() ** 2).mean()) * float((dy**2).sum()))
    expected = np.array(fu) / np.mean(fu)
    np.testing.assert_allclose([w[m] for m in modules], expected, rtol=1e-6)


def test_statistics_of_a_bfloat16_model_are_close_to_float32s():
    """A model in bfloat16 (as LLMs are loaded): the LoRA branch is added in the layers'
    dtype, and both statistics come out within bfloat16's precision of float32's."""
    import torch

    model, modules, batch, lora = _sensitivity_setup()
    adapter = {m: (a, 1e3 * b) for m, (a, b) in lora(1).items()}
    ids, mask, _ = batch
    w32 = output_sensitivities(model, modules, [(adapter, batch)])
    c32 = input_covariances(model, modules, [(ids, mask)])
    model = model.to(torch.bfloat16)
    w16 = output_sensitivities(model, modules, [(adapter, batch)])
    c16 = input_covariances(model, modules, [(ids, mask)])
    for m in modules:
        assert w16[m] == pytest.approx(w32[m], rel=0.1)
        np.testing.assert_allclose(c16[m], c32[m], rtol=0.1, atol=0.05 * np.abs(c32[m]).max())


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_from_a_model_to_a_calibrated_plan_and_bundle(tmp_path, capsys):
    """The user's path on real PEFT adapters of a tiny Llama: statistics from the base
    model (each task's adapter given as an `io.PeftAdapter`), saved, then `hydraopt plan`
    and `hydraopt merge` with `--calibration`."""
    import torch

    from tests.helpers.peft_models import llama_adapters, tiny_llama

    dirs = llama_adapters()
    model = tiny_llama()
    adapters = hj.io.load_collection(dirs)
    modules = list(adapters.modules)
    rng = np.random.default_rng(1)
    ids = torch.as_tensor(rng.integers(1, 64, size=(2, 6)))
    mask, labels = torch.ones_like(ids), ids.clone()
    labels[:, :3] = -100
    covs = input_covariances(model, modules, [(ids, mask)])
    peft = [hj.io.load_peft_adapter(d) for d in dirs]
    weights = output_sensitivities(model, modules, [(a, (ids, mask, labels)) for a in peft])
    # an io.PeftAdapter counts as its factors with PEFT's scale folded in, read here by hand
    # (the first adapter: lora_alpha / r = 2, no patterns)
    from safetensors.numpy import load_file

    raw = load_file(str(dirs[0] / "adapter_model.safetensors"))
    by_hand = {
        m: (
            raw[f"base_model.model.{m}.lora_A.weight"],
            2.0 * raw[f"base_model.model.{m}.lora_B.weight"],
        )
        for m in peft[0].modules
    }
    assert output_sensitivities(model, modules, [(peft[0], (ids, mask, labels))]) == pytest.approx(
        output_sensitivities(model, modules, [(by_hand, (ids, mask, labels))]), rel=1e-6
    )
    path = save_calibration(tmp_path / "calibration.safetensors", covs, weights)
    plan_file = tmp_path / "plan.yaml"
    rc, stdout, err = run_main(
        capsys, "plan", *dirs, "--budget", "0.5", "--out", plan_file, "--calibration", path
    )
    assert rc == 0, err
    rc, stdout, err = run_main(
        capsys, "merge", *dirs, "--config", plan_file, "--out", tmp_path / "b",
        "--calibration", path, "--json",
    )  # fmt: skip
    assert rc == 0, err
    assert json.loads(stdout)["objective"] == "activation"
