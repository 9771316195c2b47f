"""What the real-LLM testbed's adapters are like: accuracies, training cost, and how alike
and how low-rank their updates are. Prints the markdown of `README.md`'s "Adapters" section.

    python -m benchmarks.llm_testbed.stats                 # both collections
    python -m benchmarks.llm_testbed.stats --collection same_seed
    python -m benchmarks.llm_testbed.stats --accuracies    # each task's own accuracy only

* own / base accuracy: teacher-forced exact match on each task's 64 test examples, with the
  task's own LoRA and with the base model (from `manifest.json`, written by `train.py`);
* training: steps and wall seconds per adapter (torch threads as recorded);
* A / B overlap: mean over task pairs and modules of the row-space overlap of the `A`
  factors and the column-space overlap of the `B` factors (`benchmarks.quality.overlap`;
  `r / d` for random subspaces);
* drift of `A` from its initialisation (`||A - A0|| / ||A0||`, and the A0/A overlap), with
  `A0` re-created from the recorded seed exactly as training initialised it
  (`quality.torch_lora.initial_lora_a`);
* update spectrum: the share of `||dW_t||_F^2` (`dW_t = s B_t A_t`) in its top 1, 2, 4 and 8
  singular directions, mean over tasks and modules (computed from the `r x r` core of two
  thin QRs, never a dense `dW`).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from ..quality import overlap as O
from ..quality.torch_lora import initial_lora_a
from . import model as M
from . import tasks as T
from . import train as TR

TOP = (1, 2, 4, 8)


def spectrum_shares(factors: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]) -> dict:
    """Mean share of `||B A||_F^2` in the top-`j` singular directions, for `j` in `TOP`."""
    shares = {j: [] for j in TOP}
    for modules in factors.values():
        for a, b in modules.values():
            _, ra = np.linalg.qr(a.astype(np.float64).T)  # A^T = Qa Ra
            _, rb = np.linalg.qr(b.astype(np.float64))  # B = Qb Rb
            s = np.linalg.svd(rb @ ra.T, compute_uv=False) ** 2  # dW = Qb (Rb Ra^T) Qa^T
            for j in TOP:
                shares[j].append(s[:j].sum() / s.sum())
    return {j: float(np.mean(v)) for j, v in shares.items()}


def collection_stats(name: str, base) -> dict:
    folder = TR.ADAPTERS / name
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = manifest["tasks"]
    factors = O.load_adapters(folder, rows)  # the tasks whose training finished
    seeds = {task: row["seed"] for task, row in rows.items()}
    own = [row["own_accuracy"] for row in rows.values()]
    base_acc = [row["base_accuracy"] for row in rows.values()]
    seconds = [row["seconds"] for row in rows.values()]
    overlap = O.mean_pairwise_overlap(list(factors.values()))
    drift = O.drift_from_init(factors, lambda seed: initial_lora_a(base, TR.LORA, seed), seeds)
    return dict(
        collection=name,
        tasks=len(rows),
        own_mean=float(np.mean(own)),
        own_min=float(np.min(own)),
        own_min_task=min(rows, key=lambda t: rows[t]["own_accuracy"]),
        base_mean=float(np.mean(base_acc)),
        base_max=float(np.max(base_acc)),
        steps=sorted({row["steps"] for row in rows.values()}),
        threads=sorted({row["torch_threads"] for row in rows.values()}),
        seconds_total=float(np.sum(seconds)),
        seconds_mean=float(np.mean(seconds)),
        a_overlap=overlap["a"],
        b_overlap=overlap["b"],
        a_random=overlap["a_random"],
        b_random=overlap["b_random"],
        **drift,
        spectrum=spectrum_shares(factors),
    )


def _join(values) -> str:
    return ", ".join(str(v) for v in values)


def markdown(stats: list[dict]) -> str:
    cols = [s["collection"] for s in stats]
    lines = ["| | " + " | ".join(f"`{c}`" for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]

    def row(label, fmt):
        lines.append(f"| {label} | " + " | ".join(fmt(s) for s in stats) + " |")

    row("adapters", lambda s: str(s["tasks"]))
    row("own accuracy, mean (min, task)",
        lambda s: f"{s['own_mean']:.3f} ({s['own_min']:.3f}, {s['own_min_task']})")  # fmt: skip
    row("base accuracy, mean (max)", lambda s: f"{s['base_mean']:.3f} ({s['base_max']:.3f})")
    row("training: steps; seconds per adapter (total)",
        lambda s: f"{_join(s['steps'])}; {s['seconds_mean']:.0f} ({s['seconds_total'] / 3600:.1f} h"
                  f" in all, {_join(s['threads'])} torch thread)")  # fmt: skip
    row("A overlap between tasks (random)", lambda s: f"{s['a_overlap']:.3f} ({s['a_random']:.3f})")
    row("B overlap between tasks (random)", lambda s: f"{s['b_overlap']:.3f} ({s['b_random']:.3f})")
    row("A drift from its init; A0/A overlap",
        lambda s: f"{s['a_relative_drift']:.3f}; {s['a_init_overlap']:.3f}")  # fmt: skip
    for j in TOP:
        row(f"share of `‖dW‖²` in the top {j} direction{'s' if j > 1 else ''}",
            lambda s, j=j: f"{s['spectrum'][j]:.3f}")  # fmt: skip
    return "\n".join(lines)


def accuracy_grid(collections) -> str:
    """Each task's own-LoRA accuracy, `same_seed / diff_seed` (application x language), read
    from the manifests (fast: no adapter is loaded); `-` for a task not trained."""
    own = {
        c: json.loads((TR.ADAPTERS / c / "manifest.json").read_text())["tasks"] for c in collections
    }
    lines = ["| | " + " | ".join(T.LANGUAGES) + " |", "|---" * (len(T.LANGUAGES) + 1) + "|"]
    for app in T.APPLICATIONS:
        cells = []
        for lang in T.LANGUAGES:
            values = [own[c].get(f"{app}_{lang}", {}).get("own_accuracy") for c in collections]
            cells.append(" / ".join("-" if v is None else f"{v:.2f}" for v in values))
        lines.append(f"| {app} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collection", action="append", choices=TR.COLLECTIONS)
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON too")
    parser.add_argument(
        "--accuracies", action="store_true",
        help="only the per-task own-accuracy grid (from the manifests, fast)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.accuracies:
        print(accuracy_grid(args.collection or TR.COLLECTIONS))
        return
    base, _tokenizer = M.load_base_model()
    stats = [collection_stats(c, base) for c in args.collection or TR.COLLECTIONS]
    if args.json:
        print(json.dumps(stats, indent=1))
    print(markdown(stats))


if __name__ == "__main__":
    main()
