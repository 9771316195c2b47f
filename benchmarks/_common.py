"""Helpers shared by the speed / scale / solver benchmarks (not part of the package).

Import `hydraopt_jax` before any JAX computation (it sets an XLA flag that avoids a CPU
deadlock); every benchmark script does `import hydraopt_jax` first.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PREFIX = "base_model.model."


def header(title: str) -> None:
    import jax

    print(f"# {title}")
    print(
        f"# jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, "
        f"{os.cpu_count()} CPU cores, python {sys.version.split()[0]}"
    )


def interleaved(fns: Mapping[str, Callable[[], object]], reps: Mapping[str, int] | int = 3):
    """Time each callable `reps` times, interleaving them (round robin), so all see the same
    machine load. Returns `{name: [seconds...]}`; callers take medians."""
    if isinstance(reps, int):
        reps = dict.fromkeys(fns, reps)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(max(reps.values())):
        for name, fn in fns.items():
            if i < reps[name]:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def median(xs) -> float:
    return statistics.median(xs)


def write_peft_dir(path: Path, factors: Mapping[str, tuple[np.ndarray, np.ndarray]], r: int,
                   alpha: float | None = None, dtype=np.float32) -> Path:  # fmt: skip
    """A standard PEFT LoRA adapter dir: `{module: (A [r, d_in], B [d_out, r])}`.

    With `alpha=None`, `lora_alpha = r` (scale 1): the factors are written as given.
    """
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a, dtype)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b, dtype)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": r if alpha is None else alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in factors}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def write_collection(root: Path, collection, names) -> list[Path]:
    """Write a `{module: (A [T, r, d_in], B [T, d_out, r])}` collection as T PEFT dirs."""
    r = next(iter(collection.values()))[0].shape[1]
    return [
        write_peft_dir(root / name, {m: (a[t], b[t]) for m, (a, b) in collection.items()}, r)
        for t, name in enumerate(names)
    ]


def factored_sq_norm(left: np.ndarray, right: np.ndarray) -> float:
    """`||left @ right||_F^2 = tr((left^T left)(right right^T))`, float64, never dense."""
    left = np.asarray(left, np.float64)
    right = np.asarray(right, np.float64)
    return float(np.sum((left.T @ left) * (right @ right.T)))


def error_vs_mean(a_hat, b_hat, A, B) -> float:
    """`||b_hat a_hat - mean_t B_t A_t||_F / ||mean_t B_t A_t||_F`, in factored form."""
    num_tasks, r, d_in = A.shape
    mean_left = np.moveaxis(np.asarray(B, np.float64), 0, 1).reshape(B.shape[1], -1) / num_tasks
    mean_right = np.asarray(A, np.float64).reshape(num_tasks * r, d_in)
    left = np.concatenate([np.asarray(b_hat, np.float64), -mean_left], axis=1)
    right = np.concatenate([np.asarray(a_hat, np.float64), mean_right], axis=0)
    return float(np.sqrt(factored_sq_norm(left, right) / factored_sq_norm(mean_left, mean_right)))


def run_cmd(cmd: list[str], env: Mapping[str, str] | None = None, timeout: float = 1800):
    """Run a command, return `(seconds, stdout)`; raise with its stderr on failure."""
    cpu_before = _children_cpu_s()
    full_env = dict(os.environ)
    # the same hydraopt_jax as this process (a snapshot on PYTHONPATH, or this tree)
    import hydraopt_jax

    pkg_root = str(Path(hydraopt_jax.__file__).resolve().parent.parent)
    full_env["PYTHONPATH"] = pkg_root + os.pathsep + full_env.get("PYTHONPATH", "")
    if env:
        full_env.update(env)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
    seconds = time.perf_counter() - start
    LAST_CHILD["cpu_s"] = _children_cpu_s() - cpu_before
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed ({proc.returncode}):\n{proc.stderr}")
    return seconds, proc.stdout


LAST_CHILD: dict[str, float] = {}


def _children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def load_average() -> str:
    return "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def hydraopt_cmd() -> list[str]:
    """The `hydraopt` command of this working tree (not an installed copy)."""
    return [sys.executable, "-c", "import sys; from hydraopt_jax.cli import main; sys.exit(main())"]


def peak_rss_mb_of_children() -> float:
    """Peak resident memory (MB) of the largest finished child process (Linux ru_maxrss, KB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
