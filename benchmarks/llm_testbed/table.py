"""The tables of the README's "Choosing a plan", built from the committed results.

    python -m benchmarks.llm_testbed.table            # prints the four markdown tables
    python -m benchmarks.llm_testbed.table --write    # puts them in the READMEs
    python -m benchmarks.llm_testbed.table --results DIR   # those of another results folder

The storage table: each cell is `label: same_seed / diff_seed` (score, three decimals; `-`
where a collection has no such row), asides in parentheses; an entry neither collection
has is left out (its scored asides, if any, then stand in its place); which methods go where
is `ROWS`, and a row's storage is its budget or, for named plans and baselines, read from the
results. The likelihood table: the answer NLL at each per-task truncation's storage. The
front table: at each per-task truncation's storage, the best HydraOpt row at that storage or
less (the front check's choice) and its margin over truncation, exact match and answer NLL,
paired over tasks. The margins table (the LLM README only): the same margins for the planner
with each of its objectives at each truncation's storage. Every number comes from
`benchmarks/results/llm_testbed_<collection>.json` (`tests/test_llm_testbed.py` checks that
the READMEs' tables are these).
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence

from ..quality.analysis import best_hydraopt_at, paired_margin, paired_nll
from ..quality.report import load_results, write_text_atomic

RESULTS = pathlib.Path(__file__).resolve().parent.parent / "results"
COLLECTIONS = ("same_seed", "diff_seed")
COLUMNS = ("truncation", "hydraopt", "merges")
HEADER = "| storage | per-task truncation (no sharing) | HydraOpt | classic merges |"

# (storage label, {column: [(label, method, asides)]}), asides = ((label, method), ...)
PLANNER = "planner"
ACT = "activation-aware"
FISHER = "Fisher-weighted"
ADAPTER = "whole-adapter weights"
ACT_ADAPTER = "activation-aware with whole-adapter weights"
ADAPTER_RANKS = "whole-adapter weights, a rank per task"


NESTED = "hydraopt:plan+nested"  # the planner with nested ranks, default objective


def _planner(budget: str, *asides: tuple[str, str]):
    return [(PLANNER, f"{NESTED}@{budget}", asides)]


# The planner's objectives beside the default one: (label, method prefix of a budget).
OBJECTIVES = (
    (ADAPTER, f"{NESTED}+adapter"),
    (ACT, f"{NESTED}+act"),
    (ACT_ADAPTER, f"{NESTED}+act+adapter"),
    (FISHER, f"{NESTED}+act+fisher"),
    (ADAPTER_RANKS, f"{NESTED}+adapter+task-ranks"),
)
PLANNERS = ((PLANNER, NESTED), *OBJECTIVES)  # the planner with each objective


def _output_aware(budget: str):
    """The planner at `budget` with each of its other objectives as an aside."""
    return _planner(budget, *((label, f"{prefix}@{budget}") for label, prefix in OBJECTIVES))


# A label that starts with a digit is a planner budget; any other label is a note after the
# storage of the row's methods (read from the results: it moves with the number of tasks).
ROWS: tuple[tuple[str, dict], ...] = (
    ("(one adapter)", {
        "hydraopt": [("`full-merge`", "hydraopt:full-merge", ()),
                     ("planner", "hydraopt:plan+nested@0.025", ())],
        "merges": [("linear", "baseline:linear", ()), ("TIES", "baseline:ties", ()),
                   ("DARE-TIES", "baseline:dare_ties", ()), ("SVD", "baseline:svd", ())],
    }),
    ("0.04", {"hydraopt": _planner("0.04", (FISHER, "hydraopt:plan+nested+act+fisher@0.04"))}),
    ("", {"hydraopt": [("`shared-a`, each task rank 1 inside",
                        "hydraopt:shared-a@k=r,j=r/16", ())]}),
    ("", {"merges": [("Compress-then-Serve `joint`", "baseline:joint", ()),
                     ("per-factor `pca`", "baseline:pca", ())]}),
    ("0.06", {"hydraopt": _planner("0.06")}),
    ("0.0625", {
        "truncation": [("rank 1", "reference:truncate-r/16", ())],
        "hydraopt": _output_aware("0.0625"),
    }),
    ("0.07", {"hydraopt": _planner("0.07")}),
    ("", {"hydraopt": [("`shared-a`, each task rank 2 inside",
                        "hydraopt:shared-a@k=r,j=r/8", ())]}),
    ("0.10", {"hydraopt": _planner("0.10", ("without nested ranks", "hydraopt:plan@0.10"))}),
    ("0.12", {"hydraopt": _planner("0.12")}),
    ("0.125", {
        "truncation": [("rank 2", "reference:truncate-r/8", ())],
        "hydraopt": _output_aware("0.125"),
    }),
    ("0.25", {
        "truncation": [("rank 4", "reference:truncate-r/4", ())],
        "hydraopt": _output_aware("0.25"),
    }),
    ("0.30", {"hydraopt": _planner("0.30")}),
    ("", {"hydraopt": [("`shared-a`", "hydraopt:shared-a",
                        ((ACT, "hydraopt:shared-a+act"),))]}),
    ("0.50", {
        "truncation": [("rank 8", "reference:truncate-r/2", ())],
        "hydraopt": _output_aware("0.50"),
    }),
    ("0.55", {"hydraopt": _planner("0.55")}),
)  # fmt: skip


def methods_in(cells: dict) -> list[str]:
    """Every method a row of `ROWS` names, main entries first."""
    mains = [main for entries in cells.values() for _, main, _ in entries]
    asides = [m for entries in cells.values() for _, _, a in entries for _, m in a]
    return mains + asides


def labelled_rows(results: Sequence[dict]) -> list[tuple[str, float, dict]]:
    """`(label, storage, cells)` of the rows of `ROWS` that name a scored method, by
    storage; `storage` is that of the first scored method the row names."""
    by = scores(results)
    out = []
    for label, cells in ROWS:
        found = [by[c][m] for m in methods_in(cells) for c in COLLECTIONS if m in by.get(c, {})]
        if not found:
            continue
        storage = found[0]["storage_ratio"]
        if not label[:1].isdigit():
            label = f"{storage:.3g}" + (f" {label}" if label else "")
        out.append((label, storage, cells))
    return sorted(out, key=lambda row: row[1])


def scores(results: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """`{collection: {method: row}}`."""
    return {res["collection"]: {r["method"]: r for r in res["rows"]} for res in results}


def _pair(by: dict[str, dict[str, dict]], method: str) -> str | None:
    values = [by.get(c, {}).get(method) for c in COLLECTIONS]
    if all(v is None for v in values):
        return None
    return " / ".join("-" if v is None else f"{v['score']:.3f}" for v in values)


def _cell(by, entries) -> str:
    parts = []
    for label, method, asides in entries:
        main = _pair(by, method)
        extra = [f"{a}: {p}" for a, m in asides if (p := _pair(by, m)) is not None]
        if main is None:  # the asides scored without their main entry stand on their own
            parts += [f"{label}, {e}" for e in extra]
            continue
        parts.append(f"{label}: {main}" + (f" ({'; '.join(extra)})" if extra else ""))
    return ", ".join(parts)


def markdown_table(results: Sequence[dict]) -> str:
    """The README's table; a row none of whose methods was scored is left out."""
    by = scores(results)
    lines = [HEADER, "|---|---|---|---|"]
    for label, _, cells in labelled_rows(results):
        row = [_cell(by, cells.get(col, [])) for col in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


# The answer-likelihood table: at each per-task truncation's storage, the mean answer NLL
# (nats per answer token) of truncation and of the planner with each objective.
NLL_HEADER = "| storage | per-task truncation | " + " | ".join(l for l, _ in PLANNERS) + " |"
NLL_ROWS = (("0.0625", "r/16"), ("0.125", "r/8"), ("0.25", "r/4"), ("0.50", "r/2"))


def _nll_pair(details: dict[str, dict], method: str) -> str:
    values = [details.get(c, {}).get(method, {}).get("answer_nll_mean") for c in COLLECTIONS]
    return " / ".join("-" if v is None else f"{v:.4f}" for v in values)


def nll_markdown_table(results: Sequence[dict]) -> str:
    """Answer NLL `same_seed / diff_seed` at truncation's storages, the own LoRAs' first."""
    details = {res["collection"]: res.get("details", {}) for res in results}
    own = _nll_pair(details, "lora")
    columns = 2 + len(PLANNERS)
    lines = [
        NLL_HEADER,
        "|---" * columns + "|",
        f"| own LoRA (1.0) | {own} |" + " |" * (columns - 2),
    ]
    for budget, rank in NLL_ROWS:
        methods = (f"reference:truncate-{rank}", *(f"{prefix}@{budget}" for _, prefix in PLANNERS))
        lines.append(f"| {budget} | " + " | ".join(_nll_pair(details, m) for m in methods)
                     + " |")  # fmt: skip
    return "\n".join(lines)


# The front against per-task truncation: at each truncation's storage, the best-scoring
# HydraOpt row at that storage or less (what the front check compares), paired over tasks.
FRONT_HEADER = (
    "| storage | per-task truncation | best HydraOpt row at this storage or less "
    "| margin ± s.e. | answer NLL difference ± s.e. |"
)


def _signed(pair: tuple[float, float] | None) -> str:
    # `round(x, 4) + 0.0`: a difference below 0.00005 prints +0.0000, not -0.0000
    return "-" if pair is None else f"{round(pair[0], 4) + 0.0:+.4f} ± {pair[1]:.4f}"


def front_markdown_table(results: Sequence[dict]) -> str:
    """Per truncation storage: truncation's score, the best HydraOpt row at that storage or
    less (`analysis.best_hydraopt_at`, the front check's choice), and HydraOpt minus
    truncation paired over tasks (exact-match ratio and answer NLL), `same_seed / diff_seed`."""
    by = {res["collection"]: res for res in results}
    lines = [FRONT_HEADER, "|---|---|---|---|---|"]
    for budget, rank in NLL_ROWS:
        rival = f"reference:truncate-{rank}"
        trunc, best, margin, nll = [], [], [], []
        for c in COLLECTIONS:
            res = by.get(c)
            row = None if res is None else scores([res])[c].get(rival)
            h = None if row is None else best_hydraopt_at(res["rows"], row["storage_ratio"] + 1e-9)
            trunc.append("-" if row is None else f"{row['score']:.3f}")
            best.append("-" if h is None else f"`{h['method'].removeprefix('hydraopt:')}` "
                        f"({h['storage_ratio']:.4f}): {h['score']:.3f}")  # fmt: skip
            margin.append(_signed(h and paired_margin(res, h["method"], rival)))
            nll.append(_signed(h and paired_nll(res, h["method"], rival)))
        if set(trunc) == {"-"}:
            continue
        cells = [f"rank {RANKS[rank]}: {' / '.join(trunc)}"] + [
            " / ".join(x) for x in (best, margin, nll)
        ]
        lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


RANKS = {"r/16": 1, "r/8": 2, "r/4": 4, "r/2": 8}

# Every objective of the planner against per-task truncation at its storage, paired over tasks.
MARGINS_HEADER = (
    "| storage | method | score | margin over truncation ± s.e. | answer NLL difference ± s.e. |"
)


def margins_markdown_table(results: Sequence[dict]) -> str:
    """Per truncation storage: truncation's score, then the planner with each objective at
    that budget, its score and its margin over truncation, exact-match ratio and answer NLL,
    paired over tasks, `same_seed / diff_seed`. A storage whose truncation neither collection
    has, and a method neither has, are left out; a margin needs both rows in the collection."""
    by, rows = {res["collection"]: res for res in results}, scores(results)
    lines = [MARGINS_HEADER, "|---|---|---|---|---|"]
    for budget, rank in NLL_ROWS:
        rival = f"reference:truncate-{rank}"
        if _pair(rows, rival) is None:
            continue
        lines.append(f"| {budget} | per-task truncation, rank {RANKS[rank]} | "
                     f"{_pair(rows, rival)} | | |")  # fmt: skip
        for label, prefix in PLANNERS:
            method = f"{prefix}@{budget}"
            if (score := _pair(rows, method)) is None:
                continue
            both = [c for c in COLLECTIONS if {method, rival} <= set(rows.get(c, {}))]
            margin, nll = (
                " / ".join(_signed(f(by[c], method, rival)) if c in both else "-"
                           for c in COLLECTIONS)
                for f in (paired_margin, paired_nll)
            )  # fmt: skip
            lines.append(f"| {budget} | {label} | {score} | {margin} | {nll} |")
    return "\n".join(lines)


ROOT = RESULTS.parent.parent
README, LLM_README = ROOT / "README.md", ROOT / "benchmarks" / "llm_testbed" / "README.md"
# the documents and the tables each holds (by header line)
IN_DOCUMENT = {
    README: (HEADER, NLL_HEADER, FRONT_HEADER),
    LLM_README: (HEADER, NLL_HEADER, FRONT_HEADER, MARGINS_HEADER),
}
DOCUMENTS = tuple(IN_DOCUMENT)


def tables(results: Sequence[dict]) -> dict[str, str]:
    """`{header line: table}` of the four tables."""
    return {
        HEADER: markdown_table(results),
        NLL_HEADER: nll_markdown_table(results),
        FRONT_HEADER: front_markdown_table(results),
        MARGINS_HEADER: margins_markdown_table(results),
    }


def replace_tables(text: str, new: dict[str, str]) -> str:
    """`text` with each table (from its header line to the next blank line) replaced."""
    for header, table in new.items():
        start = text.index(header)  # ValueError: the document lacks the table
        end = text.find("\n\n", start)
        text = text[:start] + table + (text[end:] if end >= 0 else "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    """Print the tables; `--write`: put them in the READMEs in place of the old ones;
    `--results DIR`: print those of DIR's result files (a run not committed yet)."""
    argv = sys.argv[1:] if argv is None else argv
    write = argv == ["--write"]
    folder = RESULTS
    if len(argv) == 2 and argv[0] == "--results":
        folder = pathlib.Path(argv[1])
    elif argv and not write:
        print("usage: python -m benchmarks.llm_testbed.table [--write | --results DIR]",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        results = load_results(folder, "llm_testbed", COLLECTIONS)
    except ValueError as e:  # a damaged result file
        print(e, file=sys.stderr)
        return 2
    if not results:
        print(f"{folder}: no llm_testbed_*.json (run python -m benchmarks.llm_testbed)",
              file=sys.stderr)  # fmt: skip
        return 2
    new = tables(results)
    if write:
        texts = {}
        for doc in DOCUMENTS:
            try:
                texts[doc] = replace_tables(doc.read_text(), {h: new[h] for h in IN_DOCUMENT[doc]})
            except ValueError:
                print(f"{doc}: lacks one of the tables (their header lines)", file=sys.stderr)
                return 2
        for doc, text in texts.items():  # every document checked before any is written
            print("wrote", write_text_atomic(doc, text), file=sys.stderr)
        return 0
    print(*new.values(), sep="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
