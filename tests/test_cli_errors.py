"""Every bad input: exit status 2, one line on stderr naming the file (or flag) and the
cause, no traceback, and nothing left behind."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_io_helpers import hand_bundle, llama_adapters, make_adapter, tiny_llama

from hydraopt_jax.cli import main
from hydraopt_jax.io import load_peft_adapter, save_bundle
from hydraopt_jax.io._files import read_safetensors, write_safetensors


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


def _occupied(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    return out


CASES = {
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
        ["merge", *dirs, "--out", _occupied(tp)],
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


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line(case, tmp_path, capsys):
    argv, needles = CASES[case](tmp_path, list(llama_adapters()))
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
    import types

    called = []
    fake = types.ModuleType("hydraopt_jax._demo")
    fake.run_demo = lambda: called.append(True)
    monkeypatch.setitem(__import__("sys").modules, "hydraopt_jax._demo", fake)
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
