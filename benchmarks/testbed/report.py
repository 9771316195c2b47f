"""Summarise the trained collections: base and own-LoRA accuracy, training time, overlaps.

python -m benchmarks.testbed.report            # every collection under adapters/
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from ..quality.overlap import drift_from_init, load_adapters, mean_pairwise_overlap
from ..quality.torch_lora import initial_lora_a
from . import model as M
from . import tasks as T
from .train import ADAPTERS, LORA


def per_kind_overlap(per_module: dict) -> dict:
    kinds: dict[str, list] = {}
    for module, value in per_module.items():
        kinds.setdefault(module.rsplit(".", 1)[-1], []).append(value)
    return {k: tuple(float(x) for x in np.mean(v, axis=0)) for k, v in kinds.items()}


def summarise(collection: pathlib.Path) -> dict:
    manifest = json.loads((collection / "manifest.json").read_text())
    entries = manifest["tasks"]
    own = [e["own_accuracy"] for e in entries.values()]
    base_by_app = {
        app: float(np.mean([e["base_accuracy"] for n, e in entries.items() if n.startswith(app)]))
        for app in T.APPLICATIONS
        if any(n.startswith(app + "_") for n in entries)
    }
    adapters = load_adapters(collection, entries)
    overlap = mean_pairwise_overlap(list(adapters.values()))
    base = M.load_base_model()
    return dict(
        collection=collection.name,
        num_tasks=len(own),
        own_min=float(np.min(own)),
        own_mean=float(np.mean(own)),
        base_by_app=base_by_app,
        train_seconds=float(np.sum([e["seconds"] for e in entries.values()])),
        seconds_per_task=float(np.mean([e["seconds"] for e in entries.values()])),
        overlap_a=overlap["a"],
        overlap_b=overlap["b"],
        random_a=overlap["a_random"],
        random_b=overlap["b_random"],
        per_kind=per_kind_overlap(overlap["per_module"]),
        **drift_from_init(
            adapters,
            lambda seed: initial_lora_a(base, LORA, seed),
            {n: e["seed"] for n, e in entries.items()},
        ),
    )


def main() -> None:
    rows = [summarise(c) for c in sorted(ADAPTERS.iterdir()) if (c / "manifest.json").exists()]
    print(
        "| collection | tasks | own acc min | own acc mean | train s (total, per task) "
        "| A overlap | B overlap | A drift from init | A overlap with init |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['collection']} | {r['num_tasks']} | {r['own_min']:.3f} | {r['own_mean']:.3f} "
            f"| {r['train_seconds']:.0f}, {r['seconds_per_task']:.1f} "
            f"| {r['overlap_a']:.3f} | {r['overlap_b']:.3f} "
            f"| {r['a_relative_drift']:.3f} | {r['a_init_overlap']:.3f} |"
        )
    print("\nper module kind, A / B overlap:\n")
    kinds = list(rows[0]["per_kind"]) if rows else []
    print("| collection | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for r in rows:
        cells = " | ".join(f"{r['per_kind'][k][0]:.2f} / {r['per_kind'][k][1]:.2f}" for k in kinds)
        print(f"| {r['collection']} | {cells} |")
    if rows:
        full = max(rows, key=lambda r: r["num_tasks"])
        print(
            "\nrandom-subspace expectation (r / d, mean over modules): "
            f"A {full['random_a']:.3f}, B {full['random_b']:.3f}; per kind A r/d_in, B r/d_out: "
            "q,o,gate,up A 0.125; down A 0.042; q,o,down B 0.125; k,v B 0.25; gate,up B 0.042"
        )
        print("base accuracy per application:", json.dumps(full["base_by_app"]))


if __name__ == "__main__":
    main()
