"""The quality harness (`benchmarks.quality`) and the fast testbed's use of it: scoring,
method grid, front check (baselines and per-task truncation), reports, CLI rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.quality import analysis, report
from benchmarks.quality.run import (
    ROW_KEYS,
    evaluate_collection,
    make_row,
    score_accuracies,
    split_scores,
)
from benchmarks.testbed import evaluate_methods as EM

TESTBED = EM.TESTBED

COLLECTION = "small_lr_same_seed"
TWO_TASKS = ["reverse_L1", "sort_L2"]
FOUR_TASKS = ["reverse_L1", "reverse_L2", "sort_L1", "sort_L2"]  # two applications x two languages


@pytest.fixture(scope="module")
def base_model():
    from benchmarks.testbed import model as M

    return M.load_base_model(pretrain_if_missing=False)


def _row(method, storage, score, worst=None):
    return make_row(method, "c", storage, score, score if worst is None else worst)


# ---------------------------------------------------------------------------- pure logic
def test_score_is_mean_and_min_of_ratios():
    score, worst, ratios = score_accuracies({"a": 0.5, "b": 0.9}, {"a": 1.0, "b": 0.9})
    assert ratios == {"a": 0.5, "b": 1.0}
    assert score == pytest.approx(0.75) and worst == pytest.approx(0.5)


def test_a_scorer_may_return_further_measures_beside_the_accuracy():
    accuracy, extra = split_scores({"a": 0.5, "b": {"accuracy": 0.75, "answer_nll": 0.25}})
    assert accuracy == {"a": 0.5, "b": 0.75}
    assert extra == {"answer_nll": {"b": 0.25}}


def test_row_keys():
    row = make_row("hydraopt:shared-a", "small_lr_same_seed", 0.52, 0.97, 0.9)
    assert tuple(row) == ROW_KEYS
    assert json.loads(json.dumps(row)) == row


def test_budget_tags_keep_two_decimals_and_every_digit_of_the_budget():
    from benchmarks.quality.methods import budget_tag

    tags = [budget_tag(b) for b in (0.3, 0.025, 0.0625, 0.125, 0.5)]
    assert tags == ["0.30", "0.025", "0.0625", "0.125", "0.50"]


def test_methods_option_splits_at_commas_between_names_only():
    from benchmarks.quality.run import split_methods

    text = "lora,hydraopt:shared-a@k=r,j=r/4,reference:truncate-r/2,baseline:ties"
    names = split_methods(text)
    assert names == ["lora", "hydraopt:shared-a@k=r,j=r/4", "reference:truncate-r/2",
                     "baseline:ties"]  # fmt: skip
    assert [m.name for m in EM.GRID.by_name(names, sweep=True)] == names


def test_method_grid_names():
    from hydraopt_jax.baselines import BASELINES

    names = [m.name for m in EM.GRID.methods()]
    assert len(names) == len(set(names))
    required = [
        "lora",
        "hydraopt:shared-a",
        "hydraopt:shared-b",
        "hydraopt:full-merge",
        "hydraopt:shared-a-2r",
        "hydraopt:a-per-lang",
        "hydraopt:b-per-app",
        "hydraopt:a-lang-b-app",
        "hydraopt:shared-a+act",
        "hydraopt:full-merge+act",
    ] + [f"baseline:{b}" for b in BASELINES]
    assert set(required) <= set(names)
    quick = [m.name for m in EM.GRID.methods(sweep=False)]
    assert set(required) <= set(quick) and set(quick) <= set(names)
    # rank sweep: k in r/2, r, 2r, 4r for shared-a and full-merge
    by = {m.name: m for m in EM.GRID.methods()}
    plain_shared_a = [
        m for m in by.values() if m.plan == "shared_a" and not m.activation and not m.task_rank_mult
    ]
    assert sorted(m.rank(8) for m in plain_shared_a) == [4, 8, 16, 32]
    # nested ranks: shared A of rank r with every task at r/4 and r/2 inside it
    nested = sorted((m.rank(8), m.task_rank(8)) for m in by.values() if m.task_rank_mult)
    assert nested == [(8, 2), (8, 4)]
    assert {"reference:truncate-r/2", "reference:truncate-r/4", "reference:truncate-r/8"} <= set(
        names
    )
    assert sorted(
        m.rank(8) for m in by.values() if m.plan == "full_merge" and not m.activation
    ) == [4, 8, 16, 32]
    with pytest.raises(ValueError, match="unknown method"):
        EM.GRID.by_name(["hydraopt:nope"])


def test_front_check_and_summary():
    rows = [
        _row("lora", 1.0, 1.0),
        _row("hydraopt:full-merge", 0.025, 0.30),
        _row("hydraopt:shared-a", 0.52, 0.97),
        _row("hydraopt:shared-a-2r", 1.02, 0.995),
        _row("baseline:linear", 0.025, 0.10),
        _row("baseline:ties", 0.025, 0.20),
        _row("baseline:joint", 0.60, 0.90),
    ]
    fc = analysis.front_check(rows)
    assert fc["passed"] and fc["checked"] == 3
    assert [r["method"] for r in analysis.hydraopt_front(rows)] == [
        "hydraopt:full-merge",
        "hydraopt:shared-a",
        "hydraopt:shared-a-2r",
    ]
    s = analysis.summarize(rows)
    assert s["best_hydraopt_at_055"]["method"] == "hydraopt:shared-a"
    assert s["one_adapter"]["passed"] and s["one_adapter"]["best_rival"] == "baseline:ties"
    # a baseline better than everything HydraOpt has at its storage or less is a violation,
    # even if HydraOpt beats it at a larger storage
    rows.append(_row("baseline:pca", 0.30, 0.50))
    fc = analysis.front_check(rows)
    assert not fc["passed"]
    assert [v["baseline"] for v in fc["violations"]] == ["baseline:pca"]
    assert fc["violations"][0]["hydraopt"] == "hydraopt:full-merge"
    # equal storage counts as covered when the score is at least as high
    assert analysis.front_check([_row("hydraopt:x", 0.3, 0.5), _row("baseline:y", 0.3, 0.5)])[
        "passed"
    ]
    text = analysis.format_summary(dict(collection="c", tasks=["t"], rows=rows))
    assert "FAIL" in text and "baseline:pca" in text
    # baselines only (a run with --methods): no HydraOpt row to compare with
    only = [r for r in rows if r["method"].startswith("baseline:")]
    assert "FAIL" in analysis.format_summary(dict(collection="c", tasks=["t"], rows=only))
    md = report.markdown([dict(collection="c", tasks=["t"], rows=only)], "t", "cmd")
    assert "| c | 1 | - | - |" in md


def test_per_task_truncation_is_a_rival_of_the_front():
    """Truncating each adapter on its own is what sharing must beat: the front check counts
    it like a baseline and reports the margin at its storage."""
    rows = [
        _row("hydraopt:shared-a", 0.40, 0.95),
        _row("hydraopt:plan@0.23", 0.23, 0.90),
        _row("reference:truncate-r/2", 0.50, 0.99),
        _row("reference:truncate-r/4", 0.25, 0.85),
    ]
    fc = analysis.front_check(rows)
    assert not fc["passed"] and fc["checked"] == 2
    assert [v["baseline"] for v in fc["violations"]] == ["reference:truncate-r/2"]
    margins = {m["rival"]: round(m["margin"], 6) for m in fc["margins"]}
    assert margins == {"reference:truncate-r/2": -0.04, "reference:truncate-r/4": 0.05}
    # a rival below HydraOpt's smallest storage has nothing to be compared with: said so
    rows.append(_row("reference:truncate-r/16", 0.0625, 0.5))
    text = analysis.format_summary(dict(collection="c", tasks=["t"], rows=rows))
    assert "r/16 storage 0.0625 score 0.5000 > no HydraOpt point at storage <= 0.0625" in text


def test_a_front_failure_is_reported_with_its_paired_standard_error():
    """The margin of a violation is the mean of the per-task ratio differences; its standard
    error over tasks says whether it is more than noise."""
    own = {"t1": 0.5, "t2": 1.0, "t3": 1.0}
    details = {
        "hydraopt:plan@0.25": {"accuracy": {"t1": 0.5, "t2": 0.9, "t3": 1.0}},  # 1, .9, 1
        "reference:truncate-r/4": {"accuracy": {"t1": 0.45, "t2": 1.0, "t3": 1.0}},  # .9, 1, 1
    }
    rows = [
        _row("hydraopt:plan@0.25", 0.25, 29 / 30),
        _row("reference:truncate-r/4", 0.25, 29 / 30 + 1e-3),
    ]
    result = dict(collection="c", tasks=list(own), rows=rows, details=details,
                  config=dict(own_accuracy=own))  # fmt: skip
    margin, se = analysis.paired_margin(result, "hydraopt:plan@0.25", "reference:truncate-r/4")
    diffs = np.array([0.1, -0.1, 0.0])
    assert margin == pytest.approx(diffs.mean(), abs=1e-12)
    assert se == pytest.approx(diffs.std(ddof=1) / np.sqrt(3))
    assert "paired s.e. over tasks 0.0577" in analysis.format_summary(result)
    assert "± 0.0577 s.e." in report.markdown([result], "t", "cmd")
    # without per-task accuracies (rows only) nothing is claimed
    assert analysis.paired_margin(dict(result, details={}), *details) is None
    assert "s.e." not in analysis.format_summary(dict(result, details={}))


def test_two_results_are_compared_pair_by_pair():
    """Regenerated against scored adapters: per (method, task) pair, whether exact match is
    the same, the change of the score ratio (each against its own LoRA) and of the NLL."""
    old = dict(
        tasks=["t1", "t2"], config=dict(own_accuracy={"t1": 1.0, "t2": 0.5}),
        details={
            "lora": {"accuracy": {"t1": 1.0, "t2": 0.5}, "answer_nll": {"t1": 0.1, "t2": 0.2}},
            "m": {"accuracy": {"t1": 0.5, "t2": 0.5}, "answer_nll": {"t1": 0.4, "t2": 0.2}},
        },
    )  # fmt: skip
    new = dict(
        tasks=["t1", "t2", "t3"], config=dict(own_accuracy={"t1": 1.0, "t2": 0.25, "t3": 1.0}),
        details={
            "lora": {"accuracy": {"t1": 1.0, "t2": 0.25, "t3": 1.0},
                     "answer_nll": {"t1": 0.1, "t2": 0.3, "t3": 0.0}},
            "m": {"accuracy": {"t1": 0.75, "t2": 0.25, "t3": 0.0},
                  "answer_nll": {"t1": 0.3, "t2": 0.2, "t3": 0.0}},
            "only-new": {"accuracy": {}},
        },
    )  # fmt: skip
    c = analysis.compare_results(new, old)
    assert c["methods"] == ["lora", "m"] and c["tasks"] == ["t1", "t2"] and c["pairs"] == 4
    assert c["equal_accuracy"] == 1  # only lora on t1; t2's own accuracy moved
    # ratio changes: lora 0, 0; m: 0.75 - 0.5 = 0.25 and 1.0 - 1.0 = 0
    assert c["ratio_max"] == pytest.approx(0.25)
    assert c["ratio_sd"] == pytest.approx(np.std([0, 0, 0.25, 0], ddof=1))
    # NLL changes 0, 0.1, 0.1, 0: median 0.05; relative 0, 0.5, 0.25, 0
    assert c["nll_max"] == pytest.approx(0.1) and c["nll_median"] == pytest.approx(0.05)
    assert c["nll_rel_max"] == pytest.approx(0.5)
    assert c["nll_rel_median"] == pytest.approx(0.125)


def test_every_row_at_a_truncations_storage_is_compared_with_it_pair_by_pair():
    """At each per-task truncation's storage (within 1%), every HydraOpt row with its paired
    score margin and answer-NLL difference; rows at other storages are not compared."""
    own = {"t1": 1.0, "t2": 1.0}
    details = {
        "hydraopt:plan@0.125": {"accuracy": {"t1": 1.0, "t2": 0.8},
                                "answer_nll": {"t1": 0.10, "t2": 0.30}},
        "hydraopt:plan+act@0.125": {"accuracy": {"t1": 0.9, "t2": 0.9},
                                    "answer_nll": {"t1": 0.20, "t2": 0.20}},
        "reference:truncate-r/8": {"accuracy": {"t1": 0.9, "t2": 0.8},
                                   "answer_nll": {"t1": 0.15, "t2": 0.40}},
    }  # fmt: skip
    rows = [
        _row("hydraopt:plan@0.125", 0.1249, 0.9),
        _row("hydraopt:plan+act@0.125", 0.1250, 0.9),
        _row("hydraopt:plan@0.20", 0.20, 0.95),
        _row("reference:truncate-r/8", 0.125, 0.85),
    ]
    result = dict(collection="c", tasks=list(own), rows=rows, details=details,
                  config=dict(own_accuracy=own))  # fmt: skip
    found = analysis.truncation_margins(result)
    assert [m["method"] for m in found] == ["hydraopt:plan@0.125", "hydraopt:plan+act@0.125"]
    first = found[0]
    assert first["margin"][0] == pytest.approx(0.05) and first["margin"][1] == pytest.approx(0.05)
    assert first["nll"][0] == pytest.approx(-0.075)
    assert first["nll"][1] == pytest.approx(np.std([-0.05, -0.10], ddof=1) / np.sqrt(2))
    md = report.markdown([result], "t", "cmd")
    assert "## c: against per-task truncation at its storage" in md
    assert "| reference:truncate-r/8 | 0.8500 | hydraopt:plan@0.125 | 0.1249 | 0.9000 | " in md
    # without per-task NLLs the difference is "-", not a number
    no_nll = {m: {"accuracy": d["accuracy"]} for m, d in details.items()}
    assert analysis.truncation_margins(dict(result, details=no_nll))[0]["nll"] is None


def test_markdown_and_chart(tmp_path):
    rows = [
        _row("lora", 1.0, 1.0),
        _row("hydraopt:full-merge", 0.025, 0.3),
        _row("hydraopt:shared-a", 0.52, 0.97),
        _row("baseline:linear", 0.025, 0.1),
    ]
    result = dict(collection="small_lr_same_seed", tasks=["a", "b"], rows=rows, details={})
    report.write_result(result, tmp_path, "testbed")
    assert report.load_results(tmp_path, "testbed")[0]["rows"] == rows
    md, png = TESTBED.write_reports(tmp_path)
    text = md.read_text()
    assert "| **hydraopt:shared-a** | 0.5200 | 0.9700 |" in text
    assert "answer NLL" not in text
    assert png.read_bytes()[:4] == b"\x89PNG"
    # further measures in the details get their own column, "-" where a row has none
    result["details"] = {"hydraopt:shared-a": {"answer_nll_mean": 0.125}}
    report.write_result(result, tmp_path, "testbed")
    text = TESTBED.write_reports(tmp_path)[0].read_text()
    assert "| 0.125 |" not in text and "| 0.1250 |" in text
    assert "| lora | 1.0000 | 1.0000 | 1.0000 | - | - |" in text


def test_combine_results():
    a = dict(collection="c", tasks=["t"], rows=[_row("baseline:linear", 0.1, 0.2)],
             details={"baseline:linear": {"x": 1}})  # fmt: skip
    b = dict(collection="c", tasks=["t"], rows=[_row("hydraopt:plan@0.30", 0.05, 0.9)],
             details={"hydraopt:plan@0.30": {"x": 2}}, complete=False)  # fmt: skip
    c = report.combine_results(a, b, TESTBED.order())
    assert [r["method"] for r in c["rows"]] == ["hydraopt:plan@0.30", "baseline:linear"]
    assert set(c["details"]) == {"baseline:linear", "hydraopt:plan@0.30"}
    assert c["complete"] is False and c["summary"]["front_check"]["passed"]
    # complete: every method of the grid (here: of `order`) has its row
    order = {"hydraopt:plan@0.30": 0, "baseline:linear": 1}
    assert report.combine_results(a, b, order)["complete"] is True
    with pytest.raises(ValueError):
        report.combine_results(a, dict(b, tasks=["u"]), TESTBED.order())
    # the adapters digest of whichever records it; no config on either: none made up
    assert "config" not in c
    named = report.combine_results(a, dict(b, config=dict(adapters="d" * 16)), order)
    assert named["config"] == {"adapters": "d" * 16}


# ---------------------------------------------------------------------------- real adapters
def test_lora_scores_exactly_one_and_separate_reproduces_own(base_model):
    methods = EM.GRID.by_name(["lora", "hydraopt:separate"])
    result = evaluate_collection(
        TESTBED, COLLECTION, tasks=TWO_TASKS, methods=methods, base_model=base_model
    )
    by = {r["method"]: r for r in result["rows"]}
    assert all(tuple(r) == ROW_KEYS for r in result["rows"])
    assert by["lora"]["score"] == 1.0 and by["lora"]["min_task_ratio"] == 1.0
    assert by["lora"]["storage_ratio"] == 1.0
    assert result["complete"] is False  # two of the grid's methods: not the whole grid
    sep = by["hydraopt:separate"]
    assert sep["storage_ratio"] == pytest.approx(1.0)
    own = result["config"]["own_accuracy"]
    acc = result["details"]["hydraopt:separate"]["accuracy"]
    # exact reconstruction (up to float32 rounding): the same greedy decisions
    for t in TWO_TASKS:
        assert abs(acc[t] - own[t]) <= 1 / 256, (t, acc[t], own[t])
    assert sep["score"] == pytest.approx(1.0, abs=1 / 256)
    assert result["details"]["hydraopt:separate"]["relative_error_mean"] < 1e-4


def test_resume_reuses_rows_of_the_same_tasks_only(base_model):
    lora, separate = EM.GRID.by_name(["lora", "hydraopt:separate"])
    first = evaluate_collection(
        TESTBED, COLLECTION, tasks=TWO_TASKS, methods=[lora, separate], base_model=base_model
    )
    logs = []
    again = evaluate_collection(
        TESTBED, COLLECTION, tasks=TWO_TASKS, methods=[lora], base_model=base_model,
        previous=first, log=logs.append,
    )  # fmt: skip
    assert again["rows"] == first["rows"]  # lora reused, separate kept from the previous
    assert again["details"] == first["details"]
    assert any("reused" in line for line in logs)
    # the partial result written after each method already carries every previous row
    partial = []
    evaluate_collection(
        TESTBED, COLLECTION, tasks=TWO_TASKS, methods=[separate, lora], base_model=base_model,
        previous=dict(first, rows=first["rows"][:1]), on_progress=partial.append,
    )  # fmt: skip
    assert [r["method"] for r in partial[0]["rows"]] == ["lora", "hydraopt:separate"]
    assert partial[0]["complete"] is False
    # a previous result on other tasks is not mixed in: only the method asked for is there
    other = evaluate_collection(
        TESTBED, COLLECTION, tasks=TWO_TASKS[:1], methods=[lora], base_model=base_model,
        previous=first, log=logs.append,
    )  # fmt: skip
    assert [r["method"] for r in other["rows"]] == ["lora"]
    assert other["tasks"] == TWO_TASKS[:1] and "hydraopt:separate" not in other["details"]


def test_rows_name_the_adapters_they_were_scored_on(base_model):
    """Each row records a digest of the adapter files actually read (not of a manifest), so
    a resumed run on other adapters (e.g. regenerated with other bits) keeps old rows marked
    as such, and the report says which rows belong to which set."""
    from benchmarks.quality.collection import adapters_digest, tensors_sha256

    (lora,) = EM.GRID.by_name(["lora"])
    coll = EM.load_testbed_collection(COLLECTION, TWO_TASKS)
    digest = adapters_digest({t: tensors_sha256(coll.path / t) for t in TWO_TASKS})
    assert coll.digest == digest and len(digest) == 16
    assert adapters_digest({TWO_TASKS[0]: coll.checksums[TWO_TASKS[0]]}) != digest
    first = evaluate_collection(
        TESTBED, COLLECTION, tasks=TWO_TASKS, methods=[lora], base_model=base_model
    )
    assert first["details"]["lora"]["adapters"] == first["config"]["adapters"] == digest
    md = report.markdown([first], "t", "cmd")
    assert f"Scored on adapters `{digest}` (1 row)." in md and "more than one set" not in md
    # resuming a result scored on other adapters would mix two sets in the checks: refused
    stale = dict(first, details={"lora": dict(first["details"]["lora"], adapters="0" * 16)})
    with pytest.raises(ValueError, match="scored on other adapters"):
        evaluate_collection(
            TESTBED, COLLECTION, tasks=TWO_TASKS, methods=[], base_model=base_model,
            previous=stale,
        )  # fmt: skip
    # rows that record no digest (scored before digests existed) are resumed as they are
    unrecorded = dict(first, details={"lora": {k: v for k, v in first["details"]["lora"].items()
                                               if k != "adapters"}})  # fmt: skip
    again = evaluate_collection(
        TESTBED, COLLECTION, tasks=TWO_TASKS, methods=[], base_model=base_model,
        previous=unrecorded,
    )  # fmt: skip
    assert again["rows"] == first["rows"] and again["config"]["adapters"] == digest
    mixed = dict(again, details=dict(again["details"], x=dict(adapters=digest)))
    assert "`unrecorded` (1 row)" in report.markdown([mixed], "t", "cmd")
    assert "more than one set" in report.markdown([mixed], "t", "cmd")


def test_own_accuracy_is_the_one_recorded_for_the_tensors_read(tmp_path):
    """A regenerated adapter is divided by its own recorded accuracy, not the lost one's; an
    adapter the manifest does not describe is refused."""
    from benchmarks.quality.collection import _own_accuracy

    row = dict(own_accuracy=0.96875, sha256="a" * 64,
               regenerated=dict(own_accuracy=0.984375, sha256="b" * 64))  # fmt: skip
    assert _own_accuracy(tmp_path, row, "a" * 64) == 0.96875
    assert _own_accuracy(tmp_path, row, "b" * 64) == 0.984375
    assert _own_accuracy(tmp_path, dict(own_accuracy=0.5), "c" * 64) == 0.5  # no checksum
    with pytest.raises(ValueError, match="match neither"):
        _own_accuracy(tmp_path, row, "c" * 64)


def test_redo_re_scores_the_listed_rows_in_place_and_keeps_the_others(base_model):
    lora, separate = EM.GRID.by_name(["lora", "hydraopt:separate"])
    first = evaluate_collection(
        TESTBED, COLLECTION, tasks=TWO_TASKS, methods=[lora, separate], base_model=base_model
    )
    # a previous file whose separate row is stale (a detail the harness did not yet record)
    stale = json.loads(json.dumps(first))
    del stale["details"]["hydraopt:separate"]["eval_seconds"]
    stale["details"]["lora"]["marker"] = "kept"
    logs = []
    again = evaluate_collection(
        TESTBED, COLLECTION, tasks=TWO_TASKS, methods=[separate], base_model=base_model,
        previous=stale, redo={"hydraopt:separate"}, log=logs.append,
    )  # fmt: skip
    assert [r["method"] for r in again["rows"]] == ["lora", "hydraopt:separate"]
    assert again["rows"] == first["rows"]  # re-scored: the same score, storage and worst task
    assert "eval_seconds" in again["details"]["hydraopt:separate"]  # recomputed, not carried
    assert again["details"]["lora"]["marker"] == "kept"  # not listed: carried as it was
    assert not any("reused" in line for line in logs)


def test_an_interrupted_redo_loses_no_row(base_model):
    """Rows listed for re-scoring stay in every partial write until their new row replaces
    them: a run stopped half-way leaves the file with all its rows."""
    lora, separate = EM.GRID.by_name(["lora", "hydraopt:separate"])
    first = evaluate_collection(
        TESTBED, COLLECTION, tasks=TWO_TASKS, methods=[lora, separate], base_model=base_model
    )
    partial = []
    evaluate_collection(
        TESTBED, COLLECTION, tasks=TWO_TASKS, methods=[separate, lora], base_model=base_model,
        previous=first, redo={"lora", "hydraopt:separate"}, on_progress=partial.append,
    )  # fmt: skip
    # after separate is redone, lora (listed, not yet redone) is still carried
    assert [r["method"] for r in partial[0]["rows"]] == ["lora", "hydraopt:separate"]
    assert partial[0]["details"]["lora"] == first["details"]["lora"]


def test_resume_runs_on_the_files_tasks_and_refuses_others(capsys, tmp_path):
    """`--resume` without `--tasks` resumes on the tasks of the result file; with other
    tasks it would replace the file's rows, so it stops (status 2) and writes nothing."""
    from benchmarks.testbed.__main__ import main

    row = make_row("lora", COLLECTION, 1.0, 1.0, 1.0)
    saved = dict(collection=COLLECTION, tasks=["reverse_L1"], complete=True, rows=[row],
                 details={"lora": {"accuracy": {"reverse_L1": 1.0}}},
                 config={}, summary={})  # fmt: skip
    path = tmp_path / f"testbed_{COLLECTION}.json"
    path.write_text(json.dumps(saved))
    before = path.read_text()
    common = ["--collection", COLLECTION, "--methods", "lora", "--out", str(tmp_path),
              "--resume", "--threads", "1"]  # fmt: skip
    assert main([*common, "--tasks", "sort_L2"]) == 2
    assert "holds other tasks" in capsys.readouterr().err and path.read_text() == before
    path.write_text("{not json")  # a damaged file: one line naming it, nothing written
    assert main(common) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and path.read_text() == "{not json"
    path.write_text(before)
    assert main([*common, "--json", "--no-write"]) == 0
    assert json.loads(capsys.readouterr().out) == [row]  # reused: the file's one task
    # a task without an adapter (e.g. not regenerated yet): one line naming the folder
    saved["tasks"] = ["reverse_L1", "no_such_task"]
    path.write_text(json.dumps(saved))
    assert main(common) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no adapter for task(s) no_such_task" in err


def test_combine_adds_another_runs_rows_to_the_result_files(capsys, tmp_path):
    """`--combine DIR`: a run made elsewhere (another process, another machine) joins the
    result file of the same collection and tasks; other tasks: status 2, nothing written."""
    from benchmarks.testbed.__main__ import main

    def result(tasks, *rows):
        return dict(collection=COLLECTION, tasks=tasks, complete=True, rows=list(rows),
                    details={r["method"]: {"accuracy": {}} for r in rows}, config={},
                    summary={})  # fmt: skip

    lora = make_row("lora", COLLECTION, 1.0, 1.0, 1.0)
    sep = make_row("hydraopt:separate", COLLECTION, 1.0, 0.99, 0.98)
    main_dir, other, odd = tmp_path / "main", tmp_path / "other", tmp_path / "odd"
    for folder, res in [(main_dir, result(TWO_TASKS, lora)), (other, result(TWO_TASKS, sep)),
                        (odd, result(TWO_TASKS[:1], sep))]:  # fmt: skip
        report.write_result(res, folder, "testbed")
    path = main_dir / f"testbed_{COLLECTION}.json"
    assert main(["--combine", str(odd), "--out", str(main_dir)]) == 2
    assert "other tasks" in capsys.readouterr().err
    regenerated = tmp_path / "regenerated"  # the same tasks scored on other adapters
    report.write_result(dict(result(TWO_TASKS, sep), config=dict(adapters="1" * 16)),
                        regenerated, "testbed")  # fmt: skip
    report.write_result(dict(result(TWO_TASKS, lora), config=dict(adapters="0" * 16)),
                        main_dir, "testbed")  # fmt: skip
    assert main(["--combine", str(regenerated), "--out", str(main_dir)]) == 2
    assert "scored on other adapters than" in capsys.readouterr().err
    report.write_result(result(TWO_TASKS, lora), main_dir, "testbed")
    assert [r["method"] for r in json.loads(path.read_text())["rows"]] == ["lora"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / f"testbed_{COLLECTION}.json").write_text("{not json")
    assert main(["--combine", str(broken), "--out", str(main_dir)]) == 2
    assert "not a readable JSON file" in capsys.readouterr().err
    (broken / f"testbed_{COLLECTION}.json").write_text("[]")  # JSON, not a result
    assert main(["--combine", str(broken), "--out", str(main_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a result file" in err and str(broken) in err
    with pytest.raises(SystemExit):  # it takes only --out
        main(["--combine", str(other), "--out", str(main_dir), "--no-write"])
    assert "--combine takes only --out" in capsys.readouterr().err
    assert main(["--combine", str(main_dir), "--out", str(main_dir)]) == 2  # itself
    assert "is --out itself" in capsys.readouterr().err
    assert main(["--combine", str(other), "--out", str(main_dir)]) == 0
    combined = json.loads(path.read_text())
    assert combined["rows"] == [lora, sep] and set(combined["details"]) == {"lora", sep["method"]}
    assert "replaced" not in capsys.readouterr().err
    assert main(["--combine", str(other), "--out", str(main_dir)]) == 0  # again: says so
    assert f"replaced by {other}'s row: testbed_{COLLECTION}.json: {sep['method']}" in (
        capsys.readouterr().err
    )
    assert (main_dir / "testbed.md").exists()


def test_redo_without_resume_and_methods_is_a_usage_error(capsys):
    from benchmarks.testbed.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--redo", "--resume", "--no-write"])
    assert e.value.code == 2
    assert "--redo needs --resume and --methods" in capsys.readouterr().err


def test_the_fisher_planner_takes_the_testbeds_module_weights(base_model, monkeypatch):
    """`module_weighting="fisher"` asks the testbed for its output sensitivities once, gives
    them to the planner and records them with the row; weights all 1 choose what equal
    weighting chooses."""
    import dataclasses

    import hydraopt_jax.planner as P
    from benchmarks.quality.methods import Method

    def plan(weighting, budget=0.3):
        return Method(f"hydraopt:plan+nested+act{weighting}@{budget}", "planner",
                      budget=budget, nested=True, activation=True,
                      module_weighting="fisher" if weighting else "equal")  # fmt: skip

    given, calls, logs = [], [], []
    options = P.collection_options

    def spy(*args, **kwargs):  # the planner's options, with the module weights noted
        given.append(kwargs["module_weights"])
        return options(*args, **kwargs)

    monkeypatch.setattr(P, "collection_options", spy)

    def weights(value):
        def sensitivities(base, coll):
            calls.append(coll.tasks)
            return {m: value(i) for i, m in enumerate(coll.modules)}

        return dataclasses.replace(TESTBED, sensitivities=sensitivities)

    result = evaluate_collection(
        weights(lambda i: 1.0), COLLECTION, tasks=TWO_TASKS,
        methods=[plan(""), plan("+fisher"), plan("+fisher", 0.2)],
        base_model=base_model, log=logs.append,
    )  # fmt: skip
    equal, fisher, fisher2 = result["rows"]
    assert calls == [TWO_TASKS] and any("output sensitivities" in line for line in logs)
    assert given[0] == "equal" and given[1] == dict.fromkeys(given[1], 1.0) and len(given) == 2
    assert fisher["storage_ratio"] == equal["storage_ratio"] <= 0.30
    assert fisher["score"] == equal["score"] and fisher2["storage_ratio"] <= 0.20
    d = result["details"]
    assert d[fisher["method"]]["num_params"] == d[equal["method"]]["num_params"]
    recorded = d[fisher["method"]]["module_weights"]  # what the planner was given
    assert len(recorded) == 14 and set(recorded.values()) == {1.0}
    assert "module_weights" not in d[equal["method"]]
    # skewed weights reach the planner as they are
    given.clear()
    skewed = evaluate_collection(
        weights(lambda i: 10.0**-i), COLLECTION, tasks=TWO_TASKS, methods=[plan("+fisher")],
        base_model=base_model,
    )  # fmt: skip
    assert sorted(given[0].values(), reverse=True) == [10.0**-i for i in range(14)]
    assert skewed["details"][plan("+fisher").name]["module_weights"] == {
        m: round(w, 6) for m, w in given[0].items()
    }
    # a testbed that has no sensitivities says so
    with pytest.raises(ValueError, match="has no sensitivities"):
        evaluate_collection(
            dataclasses.replace(TESTBED, sensitivities=None), COLLECTION, tasks=TWO_TASKS,
            methods=[plan("+fisher")], base_model=base_model,
        )  # fmt: skip


def test_collection_loading_and_activation_covariances(base_model):
    coll = EM.load_testbed_collection(COLLECTION, TWO_TASKS)
    assert coll.tasks == TWO_TASKS and coll.rank == 8 and len(coll.modules) == 14
    m = "model.layers.0.self_attn.k_proj"
    assert coll.A[m].shape == (2, 8, 64) and coll.B[m].shape == (2, 32, 8)
    np.testing.assert_allclose(coll.scales[m], 2.0)  # lora_alpha 16 / r 8
    assert coll.attributes()[1] == {"application": "sort", "language": 2}
    covs = EM.activation_covariances(base_model, coll, batches=1, batch_size=8)
    c = covs["model.layers.1.mlp.down_proj"]
    assert c.shape == (192, 192)
    np.testing.assert_allclose(c, c.T, rtol=1e-5, atol=1e-7)
    assert np.linalg.eigvalsh(c.astype(np.float64)).min() > -1e-5 * np.trace(c)
    w = EM.output_sensitivities(base_model, coll)  # each task's own LoRA, its own inputs
    assert set(w) == set(coll.modules) and np.mean(list(w.values())) == pytest.approx(1.0)
    assert min(w.values()) > 0 and w == EM.output_sensitivities(base_model, coll)  # seeded


def test_cli_json_prints_only_rows(capsys, tmp_path):
    from benchmarks.testbed.__main__ import main

    rc = main(
        ["--json", "--collection", COLLECTION, "--tasks", "reverse_L1", "--methods", "lora",
         "--out", str(tmp_path), "--no-write", "--threads", "1"]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    rows = json.loads(out)
    assert rows == [make_row("lora", COLLECTION, 1.0, 1.0, 1.0)]
    assert not list(tmp_path.iterdir())


def test_a_full_run_scores_the_priority_methods_first(monkeypatch):
    import dataclasses

    from benchmarks.quality import run as R

    first = ("hydraopt:full-merge", "lora")
    bed = dataclasses.replace(TESTBED, priority=first)
    seen = []

    def stop(testbed, name, *, methods, **kwargs):
        seen.append([m.name for m in methods])
        raise ValueError("stop")

    monkeypatch.setattr(R, "evaluate_collection", stop)
    assert R.main(bed, ["--collection", COLLECTION, "--no-write"]) == 2
    grid = [m.name for m in TESTBED.grid.methods()]
    assert seen == [[*first, *(n for n in grid if n not in first)]]
    # methods named on the command line keep the order given
    named = ["--collection", COLLECTION, "--no-write", "--methods", "lora,hydraopt:shared-a"]
    assert R.main(bed, named) == 2
    assert seen[-1] == ["lora", "hydraopt:shared-a"]
    with pytest.raises(ValueError, match="no grid method"):
        dataclasses.replace(TESTBED, priority=("hydraopt:nonsense",)).scoring_order([])


def test_rows_record_the_planner_options_time_and_the_solver_iterations(base_model):
    # every budget's plan is chosen from one set of options: the first budget computes them
    # (its `options_seconds`, part of `merge_seconds`), the next one of the same objective
    # reuses them; another objective computes its own
    names = ["hydraopt:plan@0.30", "hydraopt:plan@0.55", "hydraopt:plan+size@0.30"]
    result = evaluate_collection(
        TESTBED, COLLECTION, tasks=TWO_TASKS, methods=EM.GRID.by_name(names),
        base_model=base_model,
    )  # fmt: skip
    d = result["details"]
    assert 0 < d[names[0]]["options_seconds"] <= d[names[0]]["merge_seconds"]
    assert d[names[1]]["options_seconds"] < 0.01 * d[names[0]]["options_seconds"]
    assert 0 < d[names[2]]["options_seconds"] <= d[names[2]]["merge_seconds"]
    lora = evaluate_collection(
        TESTBED, COLLECTION, tasks=TWO_TASKS, methods=EM.GRID.by_name(["lora"]),
        base_model=base_model,
    )  # fmt: skip
    assert lora["details"]["lora"]["options_seconds"] == 0.0  # no planner
    # and the iterations of the solves: none for closed forms, some for an alternation
    methods = EM.GRID.by_name(["hydraopt:shared-a", "hydraopt:a-lang-b-app", "baseline:joint"])
    steps = evaluate_collection(
        TESTBED, COLLECTION, tasks=FOUR_TASKS, methods=methods, base_model=base_model
    )["details"]  # fmt: skip
    assert steps["hydraopt:shared-a"]["solver_steps_max"] == 0  # the exact closed form
    for name in ("hydraopt:a-lang-b-app", "baseline:joint"):  # ALS, joint's alternation
        d = steps[name]
        assert 1 <= d["solver_steps_mean"] <= d["solver_steps_max"], (name, d)


def test_report_rebuilds_from_the_result_files_and_names_a_damaged_one(capsys, tmp_path):
    """`--report` writes md + png from the folder's result files; no file, or a damaged one
    (named), is one line and status 2 with nothing written."""
    from benchmarks.testbed.__main__ import main

    assert main(["--report", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    row = make_row("lora", COLLECTION, 1.0, 1.0, 1.0)
    saved = dict(collection=COLLECTION, tasks=["reverse_L1"], complete=True, rows=[row],
                 details={"lora": {"accuracy": {"reverse_L1": 1.0}}},
                 config={}, summary={})  # fmt: skip
    (tmp_path / f"testbed_{COLLECTION}.json").write_text(json.dumps(saved))
    assert main(["--report", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "testbed.md").exists() and (tmp_path / "testbed.png").exists()
    capsys.readouterr()
    for name in ("testbed.md", "testbed.png"):
        (tmp_path / name).unlink()
    damaged = tmp_path / "testbed_other.json"
    damaged.write_text('{"rows": 1}')
    assert main(["--report", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(damaged) in err and "not a result file" in err
    assert not (tmp_path / "testbed.md").exists()
    # a run into that folder writes its result, then says which file kept the reports back
    run = ["--collection", COLLECTION, "--methods", "lora", "--tasks", "reverse_L1",
           "--out", str(tmp_path), "--threads", "1"]  # fmt: skip
    assert main(run) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if str(damaged) in line]
    assert len(lines) == 1 and "not a result file" in lines[0]
    assert json.loads((tmp_path / f"testbed_{COLLECTION}.json").read_text())["tasks"] == [
        "reverse_L1"
    ]
    assert not (tmp_path / "testbed.md").exists() and not list(tmp_path.glob(".*.tmp*"))
