"""Small PEFT adapter directories written directly (numpy + safetensors, no torch), so
subprocess runs start fast; running the command in or out of process; file digests."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from hydraopt_jax.io import write_safetensors

PREFIX = "base_model.model."


# Two shape groups (q/v: 24 -> 24, k: 24 -> 12) over two layers: 3 shape-group modules.
MODULES = {
    "model.layers.0.self_attn.q_proj": (24, 24),
    "model.layers.1.self_attn.q_proj": (24, 24),
    "model.layers.0.self_attn.v_proj": (24, 24),
    "model.layers.0.self_attn.k_proj": (24, 12),
    "model.layers.1.self_attn.k_proj": (24, 12),
}


def write_adapter(
    path: Path,
    seed: int = 0,
    *,
    r: int = 4,
    alpha: float = 8,
    modules=None,
    config_extra: dict | None = None,
    extra_tensors: dict | None = None,
    dtype=np.float32,
    scale: float = 1.0,
) -> Path:
    """A PEFT LoRA adapter directory with random factors (`modules`: name -> (d_in, d_out))."""
    rng = np.random.default_rng(seed)
    modules = MODULES if modules is None else modules
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (d_in, d_out) in modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = (rng.normal(size=(r, d_in)) * scale).astype(
            dtype
        )
        tensors[f"{PREFIX}{name}.lora_B.weight"] = (rng.normal(size=(d_out, r)) * 0.5).astype(dtype)
    tensors.update(extra_tensors or {})
    write_safetensors(path / "adapter_model.safetensors", tensors, {"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted({n.rsplit(".", 1)[1] for n in modules}),
        "base_model_name_or_path": "tiny-test-model",
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    config.update(config_extra or {})
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def write_collection(root: Path, num_tasks: int = 3, **kwargs) -> list[Path]:
    return [write_adapter(Path(root) / f"task{t}", seed=t, **kwargs) for t in range(num_tasks)]


def run_cli(*argv, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -m hydraopt_jax.cli ARGV` in a fresh process (same JAX settings as the tests)."""
    full_env = dict(os.environ)
    full_env.update({"JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"})
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "hydraopt_jax.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def bundle_arrays(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(Path(path) / "factors.safetensors"))


def listing(root: Path) -> list[str]:
    """Every entry directly under `root`, hidden ones included, sorted."""
    return sorted(p.name for p in Path(root).iterdir())


def run_main(capsys, *argv):
    """`hydraopt ARGV` in this process: `(status, stdout, stderr)`."""
    from hydraopt_jax.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def tree_digest(path) -> dict[str, str]:
    """`{relative path: SHA-256}` of every file under `path`."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }
