"""What the real-LLM testbed's adapters are like: accuracies, training cost, and how alike
and how low-rank their updates are. Prints the markdown of `README.md`'s "Adapters" section.

    python -m benchmarks.llm_testbed.stats                 # both collections
    python -m benchmarks.llm_testbed.stats --collection same_seed
    python -m benchmarks.llm_testbed.stats --accuracies    # each task's own accuracy only
    python -m benchmarks.llm_testbed.stats --ranks         # what uneven ranks could add
    python -m benchmarks.llm_testbed.stats --compare DIR   # DIR's rows against results/
    python -m benchmarks.llm_testbed.stats --compare DIR --against DIR2

* every figure describes the adapters on disk: own / base accuracy and training time are the
  manifest's record of those tensors (a regenerated adapter's `regenerated` entry, not the
  lost original's row);
* own / base accuracy: teacher-forced exact match on each task's 64 test examples, with the
  task's own LoRA and with the base model (from `manifest.json`, written by `train.py`);
* training: steps and wall seconds per adapter (torch threads as recorded);
* A / B overlap: mean over task pairs and modules of the row-space overlap of the `A`
  factors and the column-space overlap of the `B` factors (`benchmarks.quality.overlap`;
  `r / d` for random subspaces);
* drift of `A` from its initialisation (`||A - A0|| / ||A0||`, and the A0/A overlap), with
  `A0` re-created from the recorded seed exactly as training initialised it
  (`quality.torch_lora.initial_lora_a`);
* `--compare DIR`: another run's result files (e.g. scored on regenerated adapters) against
  the committed ones (or `--against DIR2`'s), pair by pair
  (`quality.analysis.compare_results`);
* update spectrum: the share of `||dW_t||_F^2` (`dW_t = s B_t A_t`) in its top 1, 2, 4 and 8
  singular directions, mean over tasks and modules (computed from the `r x r` core of two
  thin QRs, never a dense `dW`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from ..quality import overlap as O
from ..quality.analysis import compare_results
from ..quality.collection import recorded_entry, tensors_sha256
from ..quality.report import load_results
from ..quality.torch_lora import initial_lora_a
from . import model as M
from . import tasks as T
from . import train as TR

TOP = (1, 2, 4, 8)


def squared_singular_values(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The squared singular values of `dW = B A` from its `r x r` core (two thin QRs)."""
    _, ra = np.linalg.qr(a.astype(np.float64).T)  # A^T = Qa Ra
    _, rb = np.linalg.qr(b.astype(np.float64))  # B = Qb Rb
    return np.linalg.svd(rb @ ra.T, compute_uv=False) ** 2  # dW = Qb (Rb Ra^T) Qa^T


def spectrum_shares(factors: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]) -> dict:
    """Mean share of `||B A||_F^2` in the top-`j` singular directions, for `j` in `TOP`."""
    shares = {j: [] for j in TOP}
    for modules in factors.values():
        for a, b in modules.values():
            s = squared_singular_values(a, b)
            for j in TOP:
                shares[j].append(s[:j].sum() / s.sum())
    return {j: float(np.mean(v)) for j, v in shares.items()}


def _squared_spectra(factors) -> tuple[dict[str, np.ndarray], dict[str, int], list[str]]:
    """`({module: [T, r] squared singular values of dW_{m,t}}, {module: d_in + d_out}, tasks)`
    (0 rows for a task that does not adapt the module)."""
    tasks = list(factors)
    modules = sorted({m for mods in factors.values() for m in mods})
    spectra, cost = {}, {}
    for m in modules:
        a0, b0 = next(factors[t][m] for t in tasks if m in factors[t])
        r = max(factors[t][m][0].shape[0] for t in tasks if m in factors[t])
        rows = np.zeros((len(tasks), r))
        for i, t in enumerate(tasks):
            if m in factors[t]:
                sv = squared_singular_values(*factors[t][m])
                rows[i, : len(sv)] = sv
        spectra[m], cost[m] = rows, a0.shape[1] + b0.shape[0]
    return spectra, cost, tasks


def rank_allocation(factors, fractions=(1 / 16, 1 / 8, 1 / 4, 1 / 2)) -> list[dict]:
    """What uneven ranks could add to per-task truncation, in each task's relative error of
    its whole update (the `"adapter"` weighting's `err_t`): at each storage `f` (a fraction
    of the adapters' parameters), every task at rank `f r` on every module (`uniform`); one
    rank per module, the same for every task (`per_module`: what plans without nested ranks
    can express); one rank per module and task (`per_module_task`). The last two are greedy
    allocations of rank units by error removed per parameter, with every task weighted by
    `1 / ||dW_t||^2` (optimal for these concave gains up to one unit per module).
    **Returns** one `{fraction, <allocation>: {storage, mean, max, sum_sq}}` per fraction."""
    import heapq

    spectra, cost, tasks = _squared_spectra(factors)
    total = sum(s.sum(1) for s in spectra.values())  # [T] ||dW_t||^2 over modules
    w = np.where(total > 0, 1 / np.where(total > 0, total, 1), 0.0)
    original = sum(cost[m] * np.count_nonzero(s.any(1)) * s.shape[1] for m, s in spectra.items())

    def summary(ranks):  # {module: [T] ranks}
        kept = sum(np.take_along_axis(np.cumsum(np.pad(s, ((0, 0), (1, 0))), 1),
                                      ranks[m][:, None], 1)[:, 0]
                   for m, s in spectra.items())  # fmt: skip
        err = np.sqrt(np.maximum(total - kept, 0) * w)
        params = sum(cost[m] * ranks[m][spectra[m].any(1)].sum() for m in spectra)
        return dict(storage=params / original, mean=float(err.mean()), max=float(err.max()),
                    sum_sq=float(np.sum(err**2)))  # fmt: skip

    def greedy(units, budget):  # units: {key: (module, task rows)}; one rank unit at a time
        ranks = {m: np.zeros(len(tasks), int) for m in spectra}
        heap, used = [], 0.0

        def push(key):  # noqa: E306
            m, rows = units[key]
            j = ranks[m][rows[0]]
            if j < spectra[m].shape[1]:
                gain = float((w[rows] * spectra[m][rows, j]).sum())
                heapq.heappush(heap, (-gain / (cost[m] * len(rows)), key))

        for key in units:
            push(key)
        while heap:
            _, key = heapq.heappop(heap)
            m, rows = units[key]
            if used + cost[m] * len(rows) <= budget:
                used += cost[m] * len(rows)
                ranks[m][rows] += 1
                push(key)
        return ranks

    out = []
    for f in fractions:
        budget = f * original * (1 + 1e-12)
        present = {m: np.flatnonzero(s.any(1)) for m, s in spectra.items()}
        uniform = {
            m: np.full(len(tasks), max(1, round(f * s.shape[1]))) for m, s in spectra.items()
        }
        per_module = greedy({m: (m, present[m]) for m in spectra}, budget)
        per_task = greedy({(m, t): (m, np.array([t])) for m in spectra for t in present[m]},
                          budget)  # fmt: skip
        out.append(dict(fraction=f, uniform=summary(uniform), per_module=summary(per_module),
                        per_module_task=summary(per_task)))  # fmt: skip
    return out


def on_disk_entries(folder: pathlib.Path) -> dict[str, dict]:
    """`{task: entry}` for every adapter in a collection folder that its manifest records:
    the manifest's record of *those* tensors (`recorded_entry`: the row, or its `regenerated`
    entry when the adapter was retrained with other bits). An adapter the manifest does not
    record (yet: `train.py` writes the row after scoring it) is left out."""
    rows = json.loads((folder / "manifest.json").read_text())["tasks"]
    entries = {}
    for task, row in rows.items():
        if (folder / task / "adapter_config.json").exists():  # as `load_adapters` finds them
            try:
                entries[task] = recorded_entry(folder / task, row, tensors_sha256(folder / task))
            except ValueError:
                continue
    return entries


def collection_stats(name: str, base) -> dict:
    """Statistics of the adapters in `adapters/<name>/`, with what the manifest records of
    those tensors (a retrained adapter's own accuracy and time, not the lost one's)."""
    folder = TR.ADAPTERS / name
    rows = on_disk_entries(folder)
    factors = O.load_adapters(folder, rows)
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
    """Each task's own-LoRA accuracy, `same_seed / diff_seed` (application x language), from
    the manifests: that of the adapter on disk (`on_disk_entries`), else the row's (the
    adapter that was trained and scored, lost since); `-` for a task not trained."""
    own = {}
    for c in collections:
        folder = TR.ADAPTERS / c
        own[c] = json.loads((folder / "manifest.json").read_text())["tasks"] | on_disk_entries(
            folder
        )
    lines = ["| | " + " | ".join(T.LANGUAGES) + " |", "|---" * (len(T.LANGUAGES) + 1) + "|"]
    for app in T.APPLICATIONS:
        cells = []
        for lang in T.LANGUAGES:
            values = [own[c].get(f"{app}_{lang}", {}).get("own_accuracy") for c in collections]
            cells.append(" / ".join("-" if v is None else f"{v:.2f}" for v in values))
        lines.append(f"| {app} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def allocation_markdown(name: str, rows: list[dict]) -> str:
    """`rank_allocation`'s rows as a table: mean (worst) per-task error of each allocation."""
    lines = [f"| {name}: storage | every task rank f r | one rank per module "
             "| one rank per module and task |", "|---|---|---|---|"]  # fmt: skip
    for row in rows:
        cells = [f"{row[k]['mean']:.4f} ({row[k]['max']:.3f})"
                 for k in ("uniform", "per_module", "per_module_task")]  # fmt: skip
        lines.append(f"| {row['uniform']['storage']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_markdown(new_dir: pathlib.Path, old_dir: pathlib.Path) -> str:
    """One line per collection that both folders hold: `compare_results` of new vs old."""
    from .bench import TESTBED  # (imports the package and JAX: only here)

    # ValueError naming a damaged file of either folder
    old = {r["collection"]: r for r in load_results(old_dir, TESTBED.name)}
    lines = []
    for new in load_results(new_dir, TESTBED.name):
        if new["collection"] not in old:
            continue
        ref = old[new["collection"]]
        c = compare_results(new, ref)
        if not c["pairs"]:
            lines.append(f"* `{new['collection']}`: no (method, task) pair in both")
            continue
        lines.append(
            f"* `{new['collection']}`, adapters `{new.get('config', {}).get('adapters')}` against "
            f"`{ref.get('config', {}).get('adapters')}` (digests of each file's tasks): "
            f"{len(c['methods'])} methods x "
            f"{len(c['tasks'])} tasks; exact match equal in {c['equal_accuracy']} of "
            f"{c['pairs']} pairs; score-ratio change s.d. {c['ratio_sd']:.4f} (largest "
            f"{c['ratio_max']:.4f}); answer NLL change median {c['nll_median']:.5f} "
            f"({c['nll_rel_median']:.1%}), largest {c['nll_max']:.4f} ({c['nll_rel_max']:.0%})"
        )
    return "\n".join(lines) or f"no collection in both {new_dir} and {old_dir}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collection", action="append", choices=TR.COLLECTIONS)
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON too")
    parser.add_argument(
        "--accuracies", action="store_true",
        help="only the per-task own-accuracy grid (from the manifests; no model is loaded)",
    )  # fmt: skip
    parser.add_argument(
        "--ranks", action="store_true",
        help="only what uneven ranks could add to per-task truncation (rank_allocation)",
    )  # fmt: skip
    parser.add_argument(
        "--compare", type=pathlib.Path, metavar="DIR",
        help="DIR's result files against the committed ones, row by row and task by task",
    )  # fmt: skip
    parser.add_argument(
        "--against", type=pathlib.Path, metavar="DIR2",
        help="with --compare: against DIR2's result files instead of the committed ones",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.compare and (args.accuracies or args.ranks or args.collection):
        parser.error("--compare takes no other option but --against")
    if args.against and not args.compare:
        parser.error("--against needs --compare")
    if args.compare:
        from .bench import RESULTS

        against = args.against or RESULTS
        for folder in (args.compare, against):
            if not folder.is_dir():
                print(f"{folder}: not a folder of result files", file=sys.stderr)
                sys.exit(2)
        try:
            print(compare_markdown(args.compare, against))
        except ValueError as e:
            print(e, file=sys.stderr)
            sys.exit(2)
        return
    if args.accuracies:
        print(accuracy_grid(args.collection or TR.COLLECTIONS))
        return
    if args.ranks:
        for c in args.collection or TR.COLLECTIONS:
            folder = TR.ADAPTERS / c
            rows = json.loads((folder / "manifest.json").read_text())["tasks"]
            print(allocation_markdown(c, rank_allocation(O.load_adapters(folder, rows))) + "\n")
        return
    base, _tokenizer = M.load_base_model()
    stats = [collection_stats(c, base) for c in args.collection or TR.COLLECTIONS]
    if args.json:
        print(json.dumps(stats, indent=1))
    print(markdown(stats))


if __name__ == "__main__":
    main()
