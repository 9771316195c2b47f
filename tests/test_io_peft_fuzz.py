"""Fuzzing: random edits of `adapter_config.json` and random damage to the safetensors header
are always answered cleanly: exit 2 with one line naming the adapter's file (or exit 0 when
the edit happens to be harmless), never a traceback or an internal error. Edits that are
certainly invalid must be refused.

The command's `main` runs in-process (`hydraopt inspect`, which reads and checks every
tensor like `merge` but solves nothing), with few, derandomised examples to stay fast.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hydraopt_jax.cli import main
from tests.helpers.files import write_adapter

MODULES = {"model.layers.0.q_proj": (8, 8), "model.layers.0.k_proj": (8, 4)}
FIELDS = [
    "r",
    "lora_alpha",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "fan_in_fan_out",
    "modules_to_save",
    "peft_type",
    "use_dora",
    "bias",
    "lora_bias",
    "init_lora_weights",
    "base_model_name_or_path",
    "target_parameters",
]
FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _positive_number(value) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and value > 0
    )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    return write_adapter(root / "good", seed=0, modules=MODULES), write_adapter(
        root / "victim", seed=1, modules=MODULES
    )


@contextlib.contextmanager
def _victim_copy(pristine):
    root = Path(tempfile.mkdtemp(prefix="hydraopt-fuzz-"))
    try:
        shutil.copytree(pristine[1], root / "victim")
        yield root / "victim"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _inspect(good, victim) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["inspect", str(good), str(victim), "--json"])
    return rc, out.getvalue(), err.getvalue()


def _assert_clean(rc, out, err, victim, must_refuse: bool):
    assert rc in (0, 2), (rc, err)
    assert "Traceback" not in err and "internal error" not in err, err
    if rc == 2:
        assert out == "" and err.startswith("hydraopt: ") and err.count("\n") == 1, err
        assert str(victim) in err, err  # names the file at fault
    else:
        assert not must_refuse, f"accepted an invalid input: {out[:200]}"
        json.loads(out)


edits = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(FIELDS), json_values),
    st.tuples(st.just("delete"), st.sampled_from(FIELDS), st.none()),
    st.tuples(st.just("replace"), st.none(), st.binary(max_size=40)),
    st.tuples(st.just("truncate"), st.none(), st.floats(0, 0.99)),
)


@FUZZ
@given(edit_list=st.lists(edits, min_size=1, max_size=3))
def test_fuzzed_adapter_config_is_refused_cleanly(pristine, edit_list):
    with _victim_copy(pristine) as victim:
        path = victim / "adapter_config.json"
        config = json.loads(path.read_text())
        text = None
        must_refuse = False
        for kind, field, value in edit_list:
            if kind == "set":
                config[field] = value
            elif kind == "delete":
                config.pop(field, None)
            elif kind == "replace":
                text = value
            else:
                full = json.dumps(config).encode()
                text = full[: int(len(full) * value)]  # never the whole document
        if text is not None:
            path.write_bytes(text)
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
            must_refuse = not isinstance(parsed, dict) or not _positive_number(parsed.get("r"))
        else:
            path.write_text(json.dumps(config))
            must_refuse = config.get("r") != 4 or not _positive_number(config.get("lora_alpha"))
        _assert_clean(*_inspect(pristine[0], victim), victim, must_refuse)


damage = st.one_of(
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("length-delta"), st.integers(-64, 64).filter(bool)),
    st.tuples(st.just("byte"), st.tuples(st.integers(0, 10**6), st.integers(0, 255))),
    st.tuples(
        st.just("insert"), st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=8))
    ),
    st.tuples(st.just("truncate"), st.floats(0, 0.999)),
)


@FUZZ
@given(hurt=damage)
def test_fuzzed_safetensors_header_is_refused_cleanly(pristine, hurt):
    with _victim_copy(pristine) as victim:
        path = victim / "adapter_model.safetensors"
        data = bytearray(path.read_bytes())
        (n,) = struct.unpack("<Q", data[:8])
        kind, value = hurt
        must_refuse = True
        if kind == "length":
            must_refuse = value != n
            data[:8] = struct.pack("<Q", value)
        elif kind == "length-delta":
            data[:8] = struct.pack("<Q", max(n + value, 0))
        elif kind == "byte":
            at, byte = value
            at = 8 + at % n  # somewhere in the JSON header
            must_refuse = False  # e.g. a change inside "__metadata__" is harmless
            data[at] = byte
        elif kind == "insert":
            at, extra = value
            at = 8 + at % n
            data[at:at] = extra  # header and data no longer line up
        else:
            data = data[: int(len(data) * value)]
        path.write_bytes(bytes(data))
        _assert_clean(*_inspect(pristine[0], victim), victim, must_refuse)
