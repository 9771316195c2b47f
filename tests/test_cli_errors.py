"""Every bad input: exit status 2, one line on stderr naming the file (or flag) and the
cause, no traceback, and nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from hydraopt_jax.cli import main
from hydraopt_jax.io import load_peft_adapter, save_bundle
from hydraopt_jax.io._files import read_safetensors, read_safetensors_header, write_safetensors
from tests.helpers.files import PREFIX, write_adapter, write_collection
from tests.helpers.peft_models import hand_bundle, llama_adapters, make_adapter, tiny_llama


def _copy(tmp_path, name="broken", src=None):
    src = src or llama_adapters()[0]
    dst = tmp_path / "inputs" / name
    shutil.copytree(src, dst)
    return dst


def _nan_adapter(tmp_path):
    path = _copy(tmp_path, "nan_task")
    tensors = read_safetensors(
        path / "adapter_model.safetensors", load_peft_adapter(path).tensor_dtypes
    )
    # k_proj of layer 0 is in the first shape group: the run stops before any solve
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
    tensors[key] = tensors[key].copy()
    tensors[key][3, 1] = np.nan
    write_safetensors(path / "adapter_model.safetensors", tensors)
    return path, key


def _garbage_safetensors(tmp_path):
    path = _copy(tmp_path)
    (path / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    return path


def _plan_file(tmp_path, text):
    path = tmp_path / "inputs" / "plan.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _occupied_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    return out


COMMAND_CASES = {
    "missing dir": lambda tp, dirs: (
        ["merge", tp / "nope", *dirs, "--out", tp / "out"],
        ["nope", "no such adapter directory"],
    ),
    "bad safetensors": lambda tp, dirs: (
        ["merge", _garbage_safetensors(tp), *dirs[1:], "--out", tp / "out"],
        ["adapter_model.safetensors", "safetensors"],
    ),
    "nan in factors": lambda tp, dirs: (
        lambda p: (
            ["merge", p[0], *dirs[1:], "--out", tp / "out"],
            [str(p[0] / "adapter_model.safetensors"), p[1], "NaN"],
        )
    )(_nan_adapter(tp)),
    "shape mismatch": lambda tp, dirs: (
        [
            "merge",
            *dirs,
            make_adapter(
                tiny_llama(hidden=48), tp / "inputs" / "wide", 3, r=2, target_modules=["q_proj"]
            ),
            "--out",
            tp / "out",
        ],
        ["wide", "q_proj", "(48, 48)"],
    ),
    "rank 0": lambda tp, dirs: (["merge", *dirs, "--out", tp / "out", "--rank", "0"], ["--rank"]),
    "unknown plan": lambda tp, dirs: (
        ["merge", *dirs, "--out", tp / "out", "--plan", "shared-c"],
        ["--plan", "shared-c"],
    ),
    "unknown solver": lambda tp, dirs: (
        ["merge", *dirs, "--out", tp / "out", "--solver", "sgd"],
        ["--solver", "sgd"],
    ),
    "bad dtype": lambda tp, dirs: (
        ["merge", *dirs, "--out", tp / "out", "--dtype", "int8"],
        ["--dtype", "int8"],
    ),
    "bad max memory": lambda tp, dirs: (
        ["merge", *dirs, "--out", tp / "out", "--max-memory", "lots"],
        ["--max-memory", "lots"],
    ),
    "names count": lambda tp, dirs: (
        ["merge", *dirs, "--out", tp / "out", "--names", "a,b"],
        ["--names", "2 names"],
    ),
    "duplicate names": lambda tp, dirs: (
        ["merge", *dirs, "--out", tp / "out", "--names", "a,a,b"],
        ["duplicate task name 'a'"],
    ),
    "missing plan file": lambda tp, dirs: (
        ["merge", *dirs, "--out", tp / "out", "--config", tp / "none.yaml"],
        ["none.yaml", "no such plan file"],
    ),
    "bad yaml": lambda tp, dirs: (
        lambda p: (["merge", *dirs, "--out", tp / "out", "--config", p], [str(p), "YAML"])
    )(_plan_file(tp, "a_groups: [unclosed\n")),
    "unknown task pattern": lambda tp, dirs: (
        lambda p: (
            ["merge", *dirs, "--out", tp / "out", "--config", p],
            [str(p), "'*_es'", "matches no task"],
        )
    )(_plan_file(tp, 'a_groups:\n  es: "*_es"\n')),
    "unknown task id": lambda tp, dirs: (
        lambda p: (
            ["merge", *dirs, "--out", tp / "out", "--plan", p],
            [str(p), "unknown task 'zz'"],
        )
    )(_plan_file(tp, "b_group: {zz: 0}\n")),
    "out of range group": lambda tp, dirs: (
        lambda p: (["merge", *dirs, "--out", tp / "out", "--config", p], [str(p), "out of range"])
    )(_plan_file(tp, "a_group: [0, 2, 2]\n")),
    "unknown plan key": lambda tp, dirs: (
        lambda p: (
            ["merge", *dirs, "--out", tp / "out", "--config", p],
            [str(p), "unknown key 'c'"],
        )
    )(_plan_file(tp, "c: shared\n")),
    "no closed form": lambda tp, dirs: (
        lambda p: (
            ["merge", *dirs, "--out", tp / "out", "--config", p],
            [str(p), "no closed form", "--solver als"],
        )
    )(_plan_file(tp, "a_group: [0, 0, 1]\nb_group: [0, 1, 1]\n")),
    "output occupied": lambda tp, dirs: (
        ["merge", *dirs, "--out", _occupied_output(tp)],
        ["out", "not a hydraopt bundle"],
    ),
    "export missing bundle": lambda tp, dirs: (
        ["export", tp / "nobundle", "--to", tp / "out"],
        ["nobundle", "no such bundle"],
    ),
    "inspect missing dir": lambda tp, dirs: (
        ["inspect", tp / "nope"],
        ["nope", "no such adapter directory"],
    ),
    "unknown command": lambda tp, dirs: (["frobnicate"], ["frobnicate"]),
}


@pytest.mark.parametrize("case", list(COMMAND_CASES))
def test_bad_input_exits_2_with_one_line(case, tmp_path, capsys):
    argv, needles = COMMAND_CASES[case](tmp_path, list(llama_adapters()))
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and out == ""
    for needle in needles:
        assert needle in err, err
    after = sorted(p.name for p in tmp_path.iterdir())
    assert after == before  # no output, no temporary sibling
    if case == "output occupied":
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_export_errors_leave_nothing(tmp_path, capsys):
    _, _, bundle = hand_bundle(llama_adapters())
    save_bundle(bundle, tmp_path / "bundle")
    rc = main(
        ["export", str(tmp_path / "bundle"), "--to", str(tmp_path / "peft"), "--task", "nope"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--task" in err and "nope" in err
    meta = tmp_path / "bundle" / "hydraopt.json"
    data = json.loads(meta.read_text())
    data["format_version"] = 7
    meta.write_text(json.dumps(data))
    rc = main(["export", str(tmp_path / "bundle"), "--to", str(tmp_path / "peft")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "hydraopt.json" in err and "format_version" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_demo_calls_run_demo(monkeypatch, capsys):
    from hydraopt_jax.cli import demo

    called = []
    monkeypatch.setattr(demo, "run_demo", lambda: called.append(True))
    assert main(["demo"]) == 0 and called == [True]


def test_real_process_prints_one_line_and_exits_2(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hydraopt_jax.cli",
            "merge",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"hydraopt: {tmp_path / 'nope'}: no such adapter directory\n"
    assert list(tmp_path.iterdir()) == []


DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


K0 = "model.layers.0.self_attn.k_proj"  # in the first shape group (24 -> 12)


Q0 = "model.layers.0.self_attn.q_proj"  # in the second shape group (24 -> 24)


WEIGHTS = "adapter_model.safetensors"


CONFIG = "adapter_config.json"


# ----------------------------------------------------------------------------- builders
def _tensors(path):
    return read_safetensors(path / WEIGHTS, read_safetensors_header(path / WEIGHTS))


def _edit_tensors(path, edit):
    tensors = _tensors(path)
    edit(tensors)
    write_safetensors(path / WEIGHTS, tensors, {"format": "pt"})
    return path


def _edit_config(path, **changes):
    config = json.loads((path / CONFIG).read_text())
    config.update(changes)
    (path / CONFIG).write_text(json.dumps(config))
    return path


def _set(key, fn):
    def edit(tensors):
        tensors[key] = fn(tensors[key].copy())

    return edit


def _poke(value):
    def fn(x):
        x[1, 2] = value
        return x

    return fn


def _bad(name="bad", **kwargs):
    """A fresh adapter `in/bad` (task seed 7) to be broken by a case."""
    return write_adapter(Path("in") / name, seed=7, **kwargs)


def _merge(first, *flags, dirs=("in/task1", "in/task2"), out="out"):
    return ["merge", str(first), *dirs, "--out", out, *flags]


def _ok(*flags):
    return ["merge", "in/task0", "in/task1", "in/task2", "--out", "out", *flags]


def _plan(text):
    Path("plan.yaml").write_text(text)
    return _ok("--plan", "plan.yaml")


def _occupied():
    Path("out").mkdir()
    Path("out/notes.txt").write_text("mine")
    return _ok()


def _file_out():
    Path("out").write_text("mine")
    return _ok()


def _stale_checkpoint():
    Path("out.hydraopt-ckpt").mkdir()
    Path("out.hydraopt-ckpt/manifest.json").write_text("{}")
    return _ok("--solver", "als")


def _bundle():
    """A (module-less) bundle of the three tasks, written without solving anything."""
    from hydraopt_jax.io import Bundle, load_collection, save_bundle

    save_bundle(Bundle.empty(load_collection(["in/task0", "in/task1", "in/task2"])), "bundle")
    return "bundle"


def _export_occupied():
    bundle = _bundle()
    Path("peft").mkdir()
    Path("peft/notes.txt").write_text("mine")
    return ["export", bundle, "--to", "peft"]


def _file(name, text):
    Path(name).write_text(text)
    return name


def _plan_cmd(*flags, out="plan.yaml"):
    return ["plan", "in/task0", "in/task1", "in/task2", "--budget", "0.5", "--out", out, *flags]


def _calibration(covariances=True, weights=True, skip=None, d_in=None):
    """`calib.safetensors` for the three tasks' modules (leaving out `skip`)."""
    from hydraopt_jax.io import load_collection, save_calibration

    modules = load_collection(["in/task0", "in/task1", "in/task2"]).modules
    names = [m for m in modules if m != skip]
    covs = {m: np.eye(d_in or modules[m].d_in) for m in names} if covariances else None
    save_calibration("calib.safetensors", covs, {m: 1.0 for m in names} if weights else None)
    return "calib.safetensors"


def _file_in_bad(name, text):
    path = _bad()
    (path / name).write_text(text)
    return path


def _empty_q0(tensors):
    tensors[f"{PREFIX}{Q0}.lora_A.weight"] = np.zeros((4, 0), np.float32)
    tensors[f"{PREFIX}{Q0}.lora_B.weight"] = np.zeros((0, 4), np.float32)


def _edited_bundle(**changes):
    bundle = _bundle()
    meta = Path(bundle) / "hydraopt.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), **changes}))
    return bundle


# Each case: () -> (argv, [substrings the one-line message must contain]).
CASES = {
    # --- paths and files
    "nonexistent path": lambda: (_merge("in/nope"), ["in/nope", "no such adapter directory"]),
    "path is a file": lambda: (
        _merge(Path("in/task0") / CONFIG),
        [f"in/task0/{CONFIG}", "not a directory"],
    ),
    "missing adapter_config.json": lambda: (
        _merge((_bad() / CONFIG).unlink() or "in/bad"),
        [f"in/bad/{CONFIG}", "missing"],
    ),
    "invalid adapter_config.json": lambda: (
        _merge((_bad() / CONFIG).write_text('{"r": 4,') and "in/bad"),
        [f"in/bad/{CONFIG}", "not valid JSON"],
    ),
    "adapter_config.json nested too deeply": lambda: (
        _merge(_file_in_bad(CONFIG, "[" * 100_000)),
        [f"in/bad/{CONFIG}", "not valid JSON (nested too deeply)"],
    ),
    "adapter_config.json not an object": lambda: (
        _merge((_bad() / CONFIG).write_text("[4, 8]") and "in/bad"),
        [f"in/bad/{CONFIG}", "not a JSON object"],
    ),
    "missing safetensors": lambda: (
        _merge((_bad() / WEIGHTS).unlink() or "in/bad"),
        [f"in/bad/{WEIGHTS}", "missing"],
    ),
    "empty safetensors": lambda: (
        _merge((_bad() / WEIGHTS).write_bytes(b"") or "in/bad"),
        [f"in/bad/{WEIGHTS}", "not a readable safetensors file"],
    ),
    "truncated safetensors": lambda: (
        _merge(
            (_bad() / WEIGHTS).write_bytes((Path("in/task0") / WEIGHTS).read_bytes()[:700])
            and "in/bad"
        ),
        [f"in/bad/{WEIGHTS}", "not a readable safetensors file"],
    ),
    "garbage safetensors header": lambda: (
        _merge(
            (_bad() / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}!!!!!!")
            and "in/bad"
        ),
        [f"in/bad/{WEIGHTS}", "not a readable safetensors file"],
    ),
    # --- config fields
    "r not numeric": lambda: (
        _merge(_edit_config(_bad(), r="four")),
        [f"in/bad/{CONFIG}", "r must be a positive number", "'four'"],
    ),
    "r zero": lambda: (
        _merge(_edit_config(_bad(), r=0)),
        [f"in/bad/{CONFIG}", "r must be a positive number", "0"],
    ),
    "lora_alpha negative": lambda: (
        _merge(_edit_config(_bad(), lora_alpha=-8)),
        [f"in/bad/{CONFIG}", "lora_alpha must be a positive number", "-8"],
    ),
    "lora_alpha missing": lambda: (
        _merge(
            (
                lambda p: (
                    (p / CONFIG).write_text(
                        json.dumps(
                            {
                                k: v
                                for k, v in json.loads((p / CONFIG).read_text()).items()
                                if k != "lora_alpha"
                            }
                        )
                    )
                    and p
                )
            )(_bad())
        ),
        [f"in/bad/{CONFIG}", "lora_alpha must be a positive number", "None"],
    ),
    "alpha_pattern value not numeric": lambda: (
        _merge(_edit_config(_bad(), alpha_pattern={"q_proj": "x"})),
        [f"in/bad/{CONFIG}", "alpha_pattern['q_proj']", "positive number"],
    ),
    "rank_pattern key not a regex": lambda: (
        _merge(_edit_config(_bad(), rank_pattern={"q_proj(": 2})),
        [f"in/bad/{CONFIG}", "rank_pattern key 'q_proj('", "regular expression"],
    ),
    "config r differs from tensors": lambda: (
        _merge(_edit_config(_bad(), r=8)),
        [f"in/bad/{WEIGHTS}", "has rank 4", "r=8"],
    ),
    "DoRA config": lambda: (
        _merge(_edit_config(_bad(), use_dora=True)),
        [f"in/bad/{CONFIG}", "use_dora", "DoRA"],
    ),
    "LoRA bias config": lambda: (
        _merge(_edit_config(_bad(), lora_bias=True)),
        [f"in/bad/{CONFIG}", "lora_bias", "not supported"],
    ),
    # --- tensors
    "NaN in a factor": lambda: (
        _merge(_edit_tensors(_bad(), _set(f"{PREFIX}{K0}.lora_A.weight", _poke(np.nan)))),
        [f"in/bad/{WEIGHTS}", f"{PREFIX}{K0}.lora_A.weight", "NaN or Inf"],
    ),
    "Inf in a factor": lambda: (
        _merge(_edit_tensors(_bad(), _set(f"{PREFIX}{Q0}.lora_B.weight", _poke(np.inf)))),
        [f"in/bad/{WEIGHTS}", f"{PREFIX}{Q0}.lora_B.weight", "NaN or Inf"],
    ),
    "NaN found after a checkpoint": lambda: (
        _merge(
            _edit_tensors(_bad(), _set(f"{PREFIX}{Q0}.lora_B.weight", _poke(np.nan))),
            "--solver",
            "als",
            "--steps",
            "2",
            "--checkpoint-every",
            "1",
        ),
        [f"in/bad/{WEIGHTS}", f"{PREFIX}{Q0}.lora_B.weight", "NaN or Inf"],
    ),
    "NaN after a checkpoint, new nested output": lambda: (
        _merge(
            _edit_tensors(_bad(), _set(f"{PREFIX}{Q0}.lora_B.weight", _poke(np.nan))),
            *("--solver", "als", "--steps", "2", "--checkpoint-every", "1"),
            out="new/nested/out",
        ),
        [f"in/bad/{WEIGHTS}", "NaN or Inf"],  # and no new/ left behind
    ),
    "update too large for float32": lambda: (
        _merge(_edit_config(_bad(), lora_alpha=1e30)),
        [f"in/bad/{CONFIG}", "lora_alpha / r", "too large for float32"],
    ),
    "update too small for float32": lambda: (
        _merge(
            _edit_tensors(
                _bad(),
                lambda t: t.update({k: v * np.float32(1e-12) for k, v in t.items() if K0 in k}),
            )
        ),
        [f"in/bad/{WEIGHTS}", K0, "too small for float32"],
    ),
    "factor with an empty dimension": lambda: (
        _merge(_edit_tensors(_bad(), _empty_q0)),
        [f"in/bad/{WEIGHTS}", Q0, "empty dimension"],
    ),
    "factors overflow --dtype float16": lambda: (
        _merge(
            _edit_tensors(_bad(), _set(f"{PREFIX}{Q0}.lora_B.weight", lambda b: b * 1e6)),
            *("--dtype", "float16"),
        ),
        ["out", "overflows float16"],
    ),
    "lora_A / lora_B rank mismatch": lambda: (
        _merge(_edit_tensors(_bad(), _set(f"{PREFIX}{Q0}.lora_B.weight", lambda b: b[:, :3]))),
        [f"in/bad/{WEIGHTS}", f"{PREFIX}{Q0}.lora_B.weight", "[24, 3]", "expected [24, 4]"],
    ),
    "factor not 2-D": lambda: (
        _merge(_edit_tensors(_bad(), _set(f"{PREFIX}{Q0}.lora_A.weight", lambda a: a[..., None]))),
        [f"in/bad/{WEIGHTS}", f"{PREFIX}{Q0}.lora_A.weight", "2-D"],
    ),
    "lora_A without lora_B": lambda: (
        _merge(_edit_tensors(_bad(), lambda t: t.pop(f"{PREFIX}{Q0}.lora_B.weight"))),
        [f"in/bad/{WEIGHTS}", Q0, "no LoRA B factor"],
    ),
    "DoRA magnitude tensor": lambda: (
        _merge(
            _bad(
                extra_tensors={
                    f"{PREFIX}{Q0}.lora_magnitude_vector.default.weight": np.ones(24, np.float32)
                }
            )
        ),
        [f"in/bad/{WEIGHTS}", "lora_magnitude_vector", "DoRA"],
    ),
    "LoRA bias tensor": lambda: (
        _merge(_bad(extra_tensors={f"{PREFIX}{Q0}.lora_B.bias": np.ones(24, np.float32)})),
        [f"in/bad/{WEIGHTS}", f"{PREFIX}{Q0}.lora_B.bias", "LoRA bias"],
    ),
    "unknown tensor": lambda: (
        _merge(_bad(extra_tensors={f"{PREFIX}{Q0}.weight": np.ones((24, 24), np.float32)})),
        [f"in/bad/{WEIGHTS}", f"unknown tensor {PREFIX}{Q0}.weight"],
    ),
    "no LoRA tensors": lambda: (
        _merge(_bad(modules={})),
        [f"in/bad/{WEIGHTS}", "no LoRA factors found"],
    ),
    "bases of different shapes": lambda: (
        _merge(_bad(modules={Q0: (32, 32)})),
        [f"in/bad/{WEIGHTS}", Q0, "(32, 32)", "(24, 24)", "one base model"],
    ),
    "duplicate task names (--names)": lambda: (
        _ok("--names", "a,b,a"),
        ["in/task2", "duplicate task name 'a'"],
    ),
    "duplicate task names (directories)": lambda: (
        _merge(write_adapter(Path("other/task1"), seed=3), dirs=("in/task1",)),
        ["in/task1", "duplicate task name 'task1'", "--names"],
    ),
    # --- flags
    "--rank 0": lambda: (_ok("--rank", "0"), ["--rank", "1"]),
    "--steps 0": lambda: (_ok("--steps", "0"), ["--steps", "1"]),
    "--checkpoint-every -1": lambda: (_ok("--checkpoint-every", "-1"), ["--checkpoint-every"]),
    "unknown plan": lambda: (_ok("--plan", "shared-c"), ["--plan", "unknown plan 'shared-c'"]),
    "unknown solver": lambda: (_ok("--solver", "sgd"), ["--solver", "unknown solver 'sgd'"]),
    "unknown weighting": lambda: (
        _ok("--weighting", "equal"),
        ["--weighting", "unknown weighting 'equal'"],
    ),
    "bad dtype": lambda: (_ok("--dtype", "int8"), ["--dtype", "unknown dtype 'int8'"]),
    "bad --max-memory": lambda: (_ok("--max-memory", "lots"), ["--max-memory", "'lots'"]),
    "--max-memory past 8 EiB": lambda: (_ok("--max-memory", "1e400"), ["--max-memory", "'1e400'"]),
    "module does not fit --max-memory": lambda: (
        _ok("--max-memory", "5kB"),
        [K0, "needs about", "--max-memory"],
    ),
    "--names count": lambda: (_ok("--names", "a,b"), ["--names", "2 names for 3"]),
    # --- plan files
    "plan file missing": lambda: (
        _ok("--config", "none.yaml"),
        ["none.yaml", "no such plan file"],
    ),
    "plan file not YAML": lambda: (_plan("a_groups: [unclosed\n"), ["plan.yaml", "not valid YAML"]),
    "plan file nested too deeply": lambda: (
        _plan("[" * 100_000),
        ["plan.yaml", "not valid YAML (nested too deeply)"],
    ),
    "plan module pattern not a string": lambda: (
        _plan("modules: {5: {rank: 2}}\n"),
        ["plan.yaml", "modules must map module-name patterns"],
    ),
    "plan names unknown task": lambda: (
        _plan("b_group: {zz: 0}\n"),
        ["plan.yaml", "unknown task 'zz'"],
    ),
    "plan pattern matches no task": lambda: (
        _plan('a_groups:\n  es: "*_es"\n'),
        ["plan.yaml", "'*_es'", "matches no task"],
    ),
    "plan group ids out of range": lambda: (
        _plan("a_group: [0, 2, 2]\n"),
        ["plan.yaml", "out of range"],
    ),
    "plan with wrong number of ids": lambda: (
        _plan("a_group: [0, 1]\n"),
        ["plan.yaml", "2 ids for 3 tasks"],
    ),
    # --- outputs
    "output is a non-bundle directory": lambda: (
        _occupied(),
        ["out", "not a hydraopt bundle", "refusing to overwrite"],
    ),
    "output is a file": lambda: (_file_out(), ["out", "not a hydraopt bundle"]),
    "output below a file": lambda: (
        _merge("in/task0", out=f"in/task0/{CONFIG}/out"),
        [f"in/task0/{CONFIG} is not a directory"],
    ),
    "output in an unwritable place": lambda: (
        _merge("in/task0", out="/proc/hydraopt-out"),
        ["/proc/hydraopt-out", "cannot be written"],
    ),
    "checkpoint exists without --resume": lambda: (
        _stale_checkpoint(),
        ["out.hydraopt-ckpt", "pass --resume"],
    ),
    "export: not a bundle": lambda: (
        ["export", "in/task0", "--to", "peft"],
        ["in/task0/hydraopt.json", "not a hydraopt bundle"],
    ),
    "export: output occupied": lambda: (
        _export_occupied(),
        ["peft", "not a hydraopt export", "refusing to overwrite"],
    ),
    "export: over a directory of adapters": lambda: (
        ["export", _bundle(), "--to", "in"],
        ["in", "not a hydraopt export", "refusing to overwrite"],
    ),
    "export: bundle task name leaves the output": lambda: (
        ["export", _edited_bundle(tasks=["../task0", "task1", "task2"]), "--to", "peft"],
        ["bundle/hydraopt.json", "invalid task name '../task0'"],
    ),
    "export: bundle dtype unknown": lambda: (
        ["export", _edited_bundle(dtype="int8"), "--to", "peft"],
        ["bundle/hydraopt.json", "unknown dtype 'int8'"],
    ),
    "export: bundle tasks not a list": lambda: (
        ["export", _edited_bundle(tasks="task0"), "--to", "peft"],
        ["bundle/hydraopt.json", "tasks must be a list"],
    ),
    "plan: output is a foreign file": lambda: (
        _plan_cmd(out=_file("notes.yaml", "mine\n")),
        ["notes.yaml", "not a plan file written by hydraopt plan", "refusing to overwrite"],
    ),
    "plan: infinite rank multiplier": lambda: (
        _plan_cmd("--rank-multipliers", "1,inf"),
        ["--rank-multipliers", "'1,inf'"],
    ),
    "plan: budget not positive": lambda: (_plan_cmd("--budget", "0"), ["--budget", "positive"]),
    "sweep: plot over a foreign file": lambda: (
        ["sweep", "in/task0", "in/task1", "--plot", _file("photo.png", "not a png")],
        ["photo.png", "not a PNG image", "refusing to overwrite"],
    ),
    "export: unknown task": lambda: (
        ["export", _bundle(), "--to", "peft", "--task", "task9"],
        ["--task", "unknown task 'task9'"],
    ),
    "export: bad dtype": lambda: (
        ["export", _bundle(), "--to", "peft", "--dtype", "fp8"],
        ["--dtype", "unknown dtype 'fp8'"],
    ),
    "calibration file missing": lambda: (
        _ok("--calibration", "none.safetensors"),
        ["none.safetensors", "no such calibration file"],
    ),
    "calibration file not safetensors": lambda: (
        _ok("--calibration", _file("calib.safetensors", "{}")),
        ["calib.safetensors", "not a readable safetensors file"],
    ),
    "calibration lacks a module": lambda: (
        _plan_cmd("--calibration", _calibration(skip=Q0)),
        ["calib.safetensors", f"no input covariance for module '{Q0}'"],
    ),
    "calibration covariance of another size": lambda: (
        _ok("--calibration", _calibration(d_in=8)),
        ["calib.safetensors", "is 8 x 8; the adapters' d_in is 24"],
    ),
    "merge: calibration without covariances": lambda: (
        _ok("--calibration", _calibration(covariances=False)),
        ["calib.safetensors", "holds no input covariances"],
    ),
    "plan: calibration weights and --module-weighting": lambda: (
        _plan_cmd("--calibration", _calibration(), "--module-weighting", "size"),
        ["--module-weighting", "conflicts with the module weights"],
    ),
}


def _tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _run(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_collection(Path("in"))
    argv, needles = CASES[case]()
    before = _tree(tmp_path)
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err, needles, before


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_with_one_line(case, tmp_path, monkeypatch, capsys):
    rc, out, err, needles, before = _run(case, tmp_path, monkeypatch, capsys)
    assert rc == 2, (out, err)
    assert out == "" and err.startswith("hydraopt: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert _tree(tmp_path) == before  # nothing written, nothing removed, no temporaries
    _MESSAGES[case] = err.strip()


_MESSAGES: dict[str, str] = {}


def test_docs_errors_table_lists_every_case():
    """docs/errors.md has a row per case (regenerated with HYDRAOPT_WRITE_ERRORS_DOC=1)."""
    if os.environ.get("HYDRAOPT_WRITE_ERRORS_DOC"):
        assert len(_MESSAGES) == len(CASES), "run the whole module to regenerate the table"
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(_render(_MESSAGES))
    text = DOC.read_text()
    for case in CASES:
        assert f"| {case} |" in text, case
        if case in _MESSAGES:
            assert _escape(_MESSAGES[case]) in text, case


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _render(messages: dict[str, str]) -> str:
    rows = "\n".join(f"| {case} | `{_escape(msg)}` |" for case, msg in messages.items())
    return f"""# Refused inputs and their messages

Every bad input makes `hydraopt` print **one line** on stderr, `hydraopt: WHERE: cause`
(WHERE is the file, the file and tensor or field, or the flag at fault), exit with
status **2**, and leave nothing behind: no output directory, no temporary sibling, no
checkpoint. Ctrl-C exits with status 130 (an interrupted iterative merge keeps its
checkpoint for `--resume`); an internal error (a bug) exits with status 1 and one line
(`HYDRAOPT_DEBUG=1` shows the traceback).

The messages below are the real ones, produced by `tests/test_cli_errors.py` on
three small adapters `in/task0`, `in/task1`, `in/task2` (a broken copy is `in/bad`), run
from their parent directory; regenerate with
`HYDRAOPT_WRITE_ERRORS_DOC=1 pytest tests/test_cli_errors.py`.

| case | message |
| --- | --- |
{rows}

Corrupted inputs are also fuzzed (`tests/test_io_peft_fuzz.py`): random edits of
`adapter_config.json` and random damage to safetensors headers are refused the same way.
"""
