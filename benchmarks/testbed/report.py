"""Summarise the trained collections: base and own-LoRA accuracy, training time, overlaps.

python -m benchmarks.testbed.report            # every collection under adapters/
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from . import tasks as T
from .overlap import collection_overlap
from .train import ADAPTERS


def summarise(collection: pathlib.Path) -> dict:
    manifest = json.loads((collection / "manifest.json").read_text())
    entries = manifest["tasks"]
    own = [e["own_accuracy"] for e in entries.values()]
    base_by_app = {
        app: float(np.mean([e["base_accuracy"] for n, e in entries.items() if n.startswith(app)]))
        for app in T.APPLICATIONS
        if any(n.startswith(app + "_") for n in entries)
    }
    overlap = collection_overlap(collection)
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
    )


def main() -> None:
    rows = [summarise(c) for c in sorted(ADAPTERS.iterdir()) if (c / "manifest.json").exists()]
    print(
        "| collection | tasks | own acc min | own acc mean | train s (total, per task) "
        "| A overlap | B overlap |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['collection']} | {r['num_tasks']} | {r['own_min']:.3f} | {r['own_mean']:.3f} "
            f"| {r['train_seconds']:.0f}, {r['seconds_per_task']:.1f} "
            f"| {r['overlap_a']:.3f} | {r['overlap_b']:.3f} |"
        )
    if rows:
        print(
            "\nrandom-subspace expectation: "
            f"A {rows[0]['random_a']:.3f}, B {rows[0]['random_b']:.3f}"
        )
        print("base accuracy per application:", json.dumps(rows[0]["base_by_app"]))


if __name__ == "__main__":
    main()
