"""Storage vs score chart of the testbed results: one panel per collection.

    python -m benchmarks.testbed.chart            # testbed.md + testbed.png from the JSON files

HydraOpt points (blue) with their front (the best score at each storage or less, a step
line), baselines (orange), the own LoRAs (black star at storage 1).
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence

HYDRA_COLOR = "#1f77b4"
BASE_COLOR = "#ff7f0e"


def _short(method: str) -> str:
    return method.split(":", 1)[-1]


def _front_xy(rows: Sequence[dict]) -> tuple[list[float], list[float]]:
    pts = sorted(
        (r["storage_ratio"], r["score"]) for r in rows if r["method"].startswith("hydraopt:")
    )
    xs, ys, best = [], [], -math.inf
    for x, y in pts:
        if y > best:
            if xs:  # horizontal step to the new storage, then up
                xs.append(x)
                ys.append(best)
            xs.append(x)
            ys.append(y)
            best = y
    return xs, ys


def plot_panel(ax, result: dict, annotate: bool = True) -> None:
    rows = result["rows"]
    hyd = [r for r in rows if r["method"].startswith("hydraopt:")]
    base = [r for r in rows if r["method"].startswith("baseline:")]
    lora = [r for r in rows if r["method"] == "lora"]
    ref = [r for r in rows if r["method"].startswith("reference:")]
    xs, ys = _front_xy(rows)
    if xs:
        ax.plot(xs, ys, "-", color=HYDRA_COLOR, lw=1.2, alpha=0.7, label="HydraOpt front")
    ax.scatter(
        [r["storage_ratio"] for r in hyd], [r["score"] for r in hyd],
        color=HYDRA_COLOR, s=22, zorder=3, label="HydraOpt plans",
    )  # fmt: skip
    ax.scatter(
        [r["storage_ratio"] for r in base], [r["score"] for r in base],
        color=BASE_COLOR, marker="s", s=20, zorder=3, label="baselines",
    )  # fmt: skip
    if ref:
        ax.scatter(
            [r["storage_ratio"] for r in ref], [r["score"] for r in ref],
            color="grey", marker="D", s=20, zorder=3, label="per-task truncation (reference)",
        )  # fmt: skip
    if lora:
        ax.scatter(
            [lora[0]["storage_ratio"]], [lora[0]["score"]],
            color="black", marker="*", s=80, zorder=4, label="own LoRAs",
        )  # fmt: skip
    if annotate:
        for r in hyd + base + ref:
            ax.annotate(
                _short(r["method"]), (r["storage_ratio"], r["score"]), fontsize=5,
                xytext=(2, 2), textcoords="offset points",
                color=HYDRA_COLOR if r in hyd else BASE_COLOR if r in base else "grey",
            )  # fmt: skip
    ax.set_xscale("log")
    ax.axvline(0.55, color="grey", lw=0.6, ls=":")
    ax.axhline(0.98, color="grey", lw=0.6, ls=":")
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("storage ratio (log)")
    ax.set_ylabel("score (merged / own accuracy)")
    ax.set_title(f"{result['collection']} ({len(result['tasks'])} tasks)", fontsize=9)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)


def draw(results: Sequence[dict], annotate: bool = True):
    """A matplotlib figure with one panel per collection result."""
    import matplotlib.pyplot as plt

    n = len(results)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.8 * rows), squeeze=False)
    for ax, res in zip(axes.flat, results, strict=False):
        plot_panel(ax, res, annotate=annotate)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("HydraOpt vs classic merges: storage vs task score", fontsize=11)
    fig.tight_layout()
    return fig


def save_chart(results: Sequence[dict], path: str | pathlib.Path) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(results)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return pathlib.Path(path)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from . import evaluate_methods as EM

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=pathlib.Path, default=EM.RESULTS)
    args = parser.parse_args(argv)
    written = EM.write_reports(args.results)
    if written is None:
        raise SystemExit(f"no testbed_*.json in {args.results}")
    for res in EM.load_results(args.results):
        print(EM.format_summary(res))
    print("wrote", *written)


if __name__ == "__main__":
    main()
