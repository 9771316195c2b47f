"""The real-LLM testbed (`benchmarks/llm_testbed`): its task grid, and the whole pipeline
on SmolLM2-135M in quick mode (train 4 tasks for 10 steps, merge, score)."""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest

from benchmarks.llm_testbed import tasks as T
from benchmarks.quality import analysis

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_grid_is_five_applications_by_eight_languages():
    tasks = T.all_tasks()
    assert len(tasks) == 40 and len({t.name for t in tasks}) == 40
    assert [t.index for t in tasks] == list(range(40))
    assert T.task_from_name("qa_ja") == T.Task("qa", "ja")
    with pytest.raises(ValueError, match="unknown task"):
        T.task_from_name("qa_xx")


@pytest.mark.parametrize("language", T.LANGUAGES)
def test_vocabularies_are_real_words_split_disjointly(language):
    v = T.vocabulary(language)
    train, val, test = (set(v[s]) for s in T.SPLITS)
    assert not (train & val or train & test or val & test)
    assert len(test) >= 30 and len(train) >= 100
    for word in v["test"]:
        if language in ("ja", "ko", "zh"):  # the script's own characters, no Latin filler
            assert not re.search(r"[A-Za-z0-9]", word), word
        else:
            assert re.fullmatch(r"[^\W\d_]{3,8}", word), word


@pytest.mark.parametrize("application", T.APPLICATIONS)
def test_each_example_has_one_answer_and_held_out_inputs_use_held_out_words(application):
    task = T.Task(application, "de")
    test = T.heldout(task)
    assert len(test) == T.NUM_TEST and len({p for p, _ in test}) == T.NUM_TEST
    assert test == T.heldout(task)  # deterministic
    train_words = set(T.vocabulary("de")["train"])
    for prompt, answer in test:
        assert prompt.startswith("<|im_start|>user\n" + T.INSTRUCTIONS[application])
        assert answer.endswith(T.ANSWER_END)
        text = prompt.split("\n")[2].removesuffix("<|im_end|>")
        assert not set(text.split()) & train_words
    # the answer is a function of the text: the generator agrees with its own rule
    rng = np.random.default_rng(0)
    for _ in range(20):
        text, answer = T.make_example(task, T.vocabulary("de")["train"], rng)
        words = text.split("\n")[0].split()
        if application == "correction":
            assert answer.split() == [w for i, w in enumerate(words) if i == 0 or w != words[i - 1]]
        elif application == "summarisation":
            assert words.count(answer) == 3
        elif application == "qa":
            asked = text.split("after ")[1].rstrip("?")
            assert words[words.index(asked) + 1] == answer


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers / PEFT deprecations
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_quick_pipeline_on_smollm2(capsys):
    """Quick mode: the GGUF model dequantised (once per cache), 4 tasks trained for 10 steps,
    the reduced method grid merged through the package and scored (< 3 minutes on 2 cores)."""
    from benchmarks.llm_testbed.__main__ import main

    assert main(["--quick", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by = {r["method"]: r for r in rows}
    assert by["lora"]["score"] == 1.0 and by["lora"]["storage_ratio"] == 1.0
    for name in ("hydraopt:shared-a", "hydraopt:plan@0.10", "hydraopt:plan+nested@0.10",
                 "reference:truncate-r/16", "baseline:ties"):  # fmt: skip
        assert 0.0 <= by[name]["score"] <= 1.5 and 0 < by[name]["storage_ratio"] < 1
    assert by["hydraopt:plan+nested@0.10"]["storage_ratio"] <= 0.10 + 1e-9


def test_update_spectrum_shares_from_the_factors():
    from benchmarks.llm_testbed.stats import spectrum_shares

    rng = np.random.default_rng(0)
    u, v = rng.normal(size=(48, 1)), rng.normal(size=(1, 32))
    a_rank1 = np.vstack([v, 2 * v, 0 * v, -v])  # [r = 4, d_in]: B A = (B [:, 0] + ...) v
    b = rng.normal(size=(48, 4))
    s = np.array([3.0, 2.0, 1.0, 0.5])
    qa, _ = np.linalg.qr(rng.normal(size=(32, 4)))
    qb, _ = np.linalg.qr(rng.normal(size=(48, 4)))
    shares = spectrum_shares(
        {"t0": {"m": (a_rank1, b)}, "t1": {"m": (qa.T, qb * s)}, "t2": {"m": (v, u)}}
    )
    energy = s**2 / np.sum(s**2)
    # rank-1 updates hold everything in their top direction; the mean is over the three
    np.testing.assert_allclose(shares[1], (1 + energy[0] + 1) / 3, rtol=1e-10)
    np.testing.assert_allclose(shares[2], (1 + energy[:2].sum() + 1) / 3, rtol=1e-10)
    np.testing.assert_allclose(shares[8], 1.0, rtol=1e-12)


def test_rank_allocation_orders_truncation_below_uneven_ranks():
    """Every task at rank j is truncation (dense SVD here); one rank per module, then one per
    module and task, can only lower the summed squared errors at the same storage (modules
    of one shape: the greedy allocation is then optimal), and the storage is kept."""
    from benchmarks.llm_testbed.stats import rank_allocation

    rng = np.random.default_rng(3)
    r, d_in, d_out = 4, 12, 10
    factors = {
        f"t{t}": {
            m: (rng.normal(size=(r, d_in)) * rng.uniform(0.1, 2.0, size=(r, 1)),
                rng.normal(size=(d_out, r)) * rng.uniform(0.1, 3.0))
            for m in ("q", "k", "v")
        }
        for t in range(5)
    }  # fmt: skip
    rows = rank_allocation(factors, fractions=(0.25, 0.5))
    for row, j in zip(rows, (1, 2), strict=True):
        errs = []
        for mods in factors.values():
            num = den = 0.0
            for a, b in mods.values():
                sv = np.linalg.svd(b @ a, compute_uv=False) ** 2
                num, den = num + sv[j:].sum(), den + sv.sum()
            errs.append(np.sqrt(num / den))
        assert row["uniform"]["mean"] == pytest.approx(np.mean(errs), rel=1e-9)
        assert row["uniform"]["storage"] == pytest.approx(j / r)
        u, pm, pt = (row[k] for k in ("uniform", "per_module", "per_module_task"))
        assert pt["sum_sq"] <= pm["sum_sq"] + 1e-12 <= u["sum_sq"] + 2e-12
        assert pm["storage"] <= j / r + 1e-12 and pt["storage"] <= j / r + 1e-12


def _tiny_llama():
    """A random 2-layer Llama (vocabulary 32, hidden 16), seeded, in eval mode."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def test_answer_scores_are_exact_match_and_the_answers_likelihood():
    """On a tiny random Llama: an example is correct when every answer token is the argmax,
    and its NLL is the mean cross-entropy of its answer tokens (each example alone, float32
    logits), whatever the padding of its batch."""
    import torch

    from benchmarks.llm_testbed.evaluate import answer_scores

    model = _tiny_llama()
    rng = np.random.default_rng(0)
    encoded = [
        (rng.integers(1, 32, size=n).tolist(), rng.integers(1, 32, size=m).tolist())
        for n, m in [(3, 1), (5, 2), (2, 4), (6, 1)]
    ]
    # an answer the model gets right: its own greedy continuation
    prompt = encoded[0][0]
    with torch.no_grad():
        greedy = model(torch.tensor([prompt])).logits[0, -1].argmax().item()
    encoded.append((prompt, [greedy]))
    correct, nll = answer_scores(model, encoded, pad_id=0, batch_size=3)
    for i, (p, a) in enumerate(encoded):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.model(torch.tensor([p + a])).last_hidden_state[0, len(p) - 1 : -1]
        logits = hidden.float() @ model.lm_head.weight.float().T
        expected = torch.nn.functional.cross_entropy(logits, torch.tensor(a)).item()
        assert nll[i] == pytest.approx(expected, abs=0.05)
        assert correct[i] == float(logits.argmax(-1).tolist() == a)
    assert correct[-1] == 1.0 and np.all(nll > 0)


def test_both_grids_offer_the_fisher_planner_at_their_variant_budgets():
    from benchmarks.llm_testbed.bench import GRID, TESTBED, VARIANT_BUDGETS
    from benchmarks.quality.methods import budget_tag
    from benchmarks.testbed.evaluate_methods import GRID as TINY

    fisher = {m.name: m for m in GRID.methods() if m.module_weighting == "fisher"}
    assert set(fisher) == {
        f"hydraopt:plan+nested+act+fisher@{budget_tag(b)}" for b in VARIANT_BUDGETS
    }
    assert all(m.nested and m.activation for m in fisher.values())
    ranks = [m for m in GRID.methods() if m.per_task_ranks]
    assert ranks and all(m.nested and m.task_weighting == "adapter" for m in ranks)
    # every objective at each per-task truncation's storage (1 / 16 ... 1 / 2 of r = 16)
    names = {m.name for m in GRID.methods()}
    for suffix in ("+act", "+adapter", "+act+adapter", "+act+fisher", "+adapter+task-ranks"):
        for b in (0.0625, 0.125, 0.25, 0.50):
            assert f"hydraopt:plan+nested{suffix}@{budget_tag(b)}" in names
    assert TESTBED.sensitivities is not None
    from benchmarks.testbed.evaluate_methods import NESTED_BUDGETS as TINY_BUDGETS
    from benchmarks.testbed.evaluate_methods import TESTBED as TINY_TESTBED

    tiny = {m.name for m in TINY.methods() if m.module_weighting == "fisher"}
    assert tiny == {f"hydraopt:plan+nested+act+fisher@{budget_tag(b)}" for b in TINY_BUDGETS}
    assert TINY_TESTBED.sensitivities is not None


def test_a_full_run_scores_the_references_and_the_front_check_rows_first():
    from benchmarks.llm_testbed.bench import TESTBED

    order = [m.name for m in TESTBED.scoring_order(TESTBED.grid.methods())]
    assert sorted(order) == sorted(m.name for m in TESTBED.grid.methods())  # all, once
    assert order[:5] == ["lora", *(f"reference:truncate-r/{d}" for d in (2, 4, 8, 16))]
    first = order[: order.index("hydraopt:shared-a") + 1]
    for name in ("hydraopt:plan+nested@0.125", "hydraopt:full-merge", "baseline:svd"):
        assert name in first
    # the slowest merge after the planner's objectives; the rank sweeps after the priority
    assert order.index("baseline:joint") == len(TESTBED.priority) - 1
    assert order.index("baseline:joint@k=2r") > order.index("baseline:joint")
    # the planner's rows of one objective stand together (other rows may come between):
    # a run keeps one objective's options at a time, so each is computed once
    by_name = {m.name: m for m in TESTBED.grid.methods()}
    objectives = [by_name[n].objective for n in order if by_name[n].kind == "planner"]
    runs = [o for i, o in enumerate(objectives) if i == 0 or o != objectives[i - 1]]
    assert len(runs) == len(set(runs)) >= 9


def test_readme_storage_table_is_the_committed_llm_results():
    """The README's "Choosing a plan" tables (and the LLM testbed README's) are
    `benchmarks.llm_testbed.table`'s, from the committed results, and each row's storage
    label is the storage of what it names (rows in storage order)."""
    from benchmarks.llm_testbed import table
    from benchmarks.quality.report import load_results

    readme = (ROOT / "README.md").read_text()
    results = load_results(table.RESULTS, "llm_testbed", table.COLLECTIONS)
    tables = table.tables(results)
    assert set(table.IN_DOCUMENT[table.LLM_README]) == set(tables)  # it holds all of them
    assert table.MARGINS_HEADER not in readme  # a copy --write would never refresh
    for path, headers in table.IN_DOCUMENT.items():
        doc, held = path.read_text(), {h: tables[h] for h in headers}
        for header, generated in held.items():
            start = doc.index(header)
            assert doc[start : doc.index("\n\n", start)] == generated
        assert table.replace_tables(doc, held) == doc  # what --write would leave as it is
    # --write replaces a stale table up to the blank line and keeps the rest
    two = {h: tables[h] for h in (table.HEADER, table.NLL_HEADER)}
    stale = f"intro\n\n{table.HEADER}\n|---|\n| old |\n\nafter\n\n{table.NLL_HEADER}\n| x |\n"
    assert table.replace_tables(stale, two) == (
        f"intro\n\n{tables[table.HEADER]}\n\nafter\n\n{tables[table.NLL_HEADER]}\n"
    )
    with pytest.raises(ValueError):  # a document without one of the tables
        table.replace_tables(stale, tables)
    assert table.DOCUMENTS[0].read_text() == readme
    storages = [storage for _, storage, _ in table.labelled_rows(results)]
    assert storages == sorted(storages) and len(storages) > 5
    nll = {b: (f"reference:truncate-{r}", f"hydraopt:plan+nested@{b}") for b, r in table.NLL_ROWS}
    for res in results:
        by = {r["method"]: r for r in res["rows"]}
        for label, _, cells in table.labelled_rows(results):
            for method in table.methods_in(cells) + list(nll.get(label, ())):
                if method in by:
                    assert abs(by[method]["storage_ratio"] - float(label.split()[0])) < 1e-3, (
                        label, method, by[method]["storage_ratio"],
                    )  # fmt: skip
    # the front table's rows are the front check's comparisons with per-task truncation
    front = tables[table.FRONT_HEADER].splitlines()[2:]
    assert [line.split(" | ")[0] for line in front] == [f"| {b}" for b, _ in table.NLL_ROWS]
    for i, res in enumerate(results):
        checked = {m["rival"]: m for m in analysis.front_check(res["rows"])["margins"]}
        for line, (_, rank) in zip(front, table.NLL_ROWS, strict=True):
            m = checked[f"reference:truncate-{rank}"]
            best = line.split(" | ")[2].split(" / ")[i]
            assert best.startswith(f"`{m['hydraopt'].removeprefix('hydraopt:')}`")
            assert best.endswith(f": {m['hydraopt_score']:.3f}")
            margin = float(line.split(" | ")[3].split(" / ")[i].split(" ± ")[0])
            assert margin == pytest.approx(m["margin"], abs=5e-5)  # paired mean = difference
            nll = analysis.paired_nll(res, m["hydraopt"], m["rival"])
            cell = line.split(" | ")[4].removesuffix(" |").split(" / ")[i]
            assert cell == f"{round(nll[0], 4) + 0.0:+.4f} ± {nll[1]:.4f}"
    # the margins table: each objective's margin over truncation at its storage, paired
    prefixes = dict(table.PLANNERS)
    rival = {b: f"reference:truncate-{r}" for b, r in table.NLL_ROWS}
    compared = 0
    for line in tables[table.MARGINS_HEADER].splitlines()[2:]:
        storage, label, score, margin, nll = (c.strip() for c in line.strip("|").split("|"))
        if label.startswith("per-task truncation"):
            assert margin == nll == ""
            continue
        method = f"{prefixes[label]}@{storage}"
        for res in results:
            i = table.COLLECTIONS.index(res["collection"])
            got = [x.split(" / ")[i] for x in (score, margin, nll)]
            row = {r["method"]: r for r in res["rows"]}.get(method)
            if row is None:  # scored in the other collection only
                assert got == ["-", "-", "-"]
                continue
            assert got[0] == f"{row['score']:.3f}"
            for cell, f in zip(got[1:], (analysis.paired_margin, analysis.paired_nll), strict=True):
                m = f(res, method, rival[storage])
                assert cell == f"{round(m[0], 4) + 0.0:+.4f} ± {m[1]:.4f}"
            compared += 1
    assert compared >= 20


def test_the_margins_table_pairs_only_the_rows_a_collection_holds():
    from benchmarks.llm_testbed import table

    def result(collection, rows):  # rows: {method: per-task accuracy}, own accuracy 1.0
        return dict(
            collection=collection, tasks=["a", "b"],
            rows=[dict(method=m, collection=collection, storage_ratio=0.125,
                       score=float(np.mean(list(acc.values()))), min_task_ratio=0.0)
                  for m, acc in rows.items()],
            details={m: dict(accuracy=acc, answer_nll={"a": 0.1, "b": 0.3 - acc["b"] / 10})
                     for m, acc in rows.items()},
            config=dict(own_accuracy={"a": 1.0, "b": 1.0}),
        )  # fmt: skip

    trunc, plan = "reference:truncate-r/8", "hydraopt:plan+nested@0.125"
    same = result("same_seed", {trunc: {"a": 0.5, "b": 0.5}, plan: {"a": 1.0, "b": 0.5}})
    diff = result("diff_seed", {plan: {"a": 1.0, "b": 1.0}})  # no truncation row: no margin
    lines = table.margins_markdown_table([same, diff]).splitlines()[2:]
    # per-task differences 0.5 and 0.0: mean 0.25, standard error 0.25; NLL equal on both
    assert lines == [
        "| 0.125 | per-task truncation, rank 2 | 0.500 / - | | |",
        "| 0.125 | planner | 0.750 / 1.000 | +0.2500 ± 0.2500 / - | +0.0000 ± 0.0000 / - |",
    ]
    assert table.margins_markdown_table([diff]).splitlines()[2:] == []  # no truncation at all


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers / PEFT deprecations
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_lost_adapter_is_regenerated_bit_for_bit_and_its_record_kept(tmp_path):
    """Adapters are not committed: retraining one the manifest records gives the same tensor
    checksum (same library versions, one torch thread), and the recorded row is kept."""
    import torch

    from benchmarks.llm_testbed import train as TR

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hp = dict(TR.QUICK_TRAIN, steps=2, warmup=1)
        task = [T.task_from_name("correction_en")]
        first = TR.train_collection("same_seed", task, tmp_path, hp, log=lambda s: None)
        row = dict(first["tasks"]["correction_en"])
        assert row["versions"] == TR.library_versions()
        (tmp_path / "correction_en" / "adapter_model.safetensors").unlink()
        again = TR.train_collection("same_seed", task, tmp_path, hp, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    kept = again["tasks"]["correction_en"]
    assert {k: kept[k] for k in row} == row
    assert kept["regenerated"]["sha256"] == row["sha256"]
    assert TR.regeneration_note(kept) == "regenerated bit for bit"
    assert json.loads((tmp_path / "manifest.json").read_text()) == again
    other = dict(kept, regenerated=dict(kept["regenerated"], sha256="0" * 64))
    assert "regenerated with other bits: final loss" in TR.regeneration_note(other)
    # another recipe in the same folder is refused, not recorded as a regeneration
    with pytest.raises(ValueError, match="train into another folder"):
        TR.train_collection("same_seed", task, tmp_path, dict(hp, steps=3), log=lambda s: None)


def test_a_quick_cache_of_another_recipe_is_retrained_not_reused(tmp_path):
    """`--quick`'s collection is a cache: trained by another recipe (e.g. before the quick
    settings changed) it is dropped and retrained; trained by this one it is kept."""
    from benchmarks.llm_testbed import train as TR

    logs = []
    for recipe, kept in ((TR.QUICK_TRAIN, True), (dict(TR.QUICK_TRAIN, steps=3), False)):
        out = tmp_path / str(kept)
        out.mkdir()
        (out / "manifest.json").write_text(json.dumps(dict(train=recipe, lora=TR.LORA, tasks={})))
        TR._drop_stale_cache(out, TR.QUICK_TRAIN, logs.append)
        assert out.exists() is kept
    assert logs == [f"{tmp_path / 'False'}: trained by another recipe; retraining"]


def test_regeneration_figures_are_the_committed_comparison(capsys, tmp_path):
    """`stats --compare` on the committed regenerated results gives the README's counts; a
    missing folder or a damaged file is one line and status 2."""
    from benchmarks.llm_testbed.stats import main

    main(["--compare", str(ROOT / "benchmarks" / "results" / "llm_testbed_regenerated")])
    out = capsys.readouterr().out
    pairs = [tuple(map(int, m)) for m in re.findall(r"equal in (\d+) of (\d+) pairs", out)]
    assert len(pairs) == 2
    equal, total = map(sum, zip(*pairs, strict=True))
    readme = (ROOT / "benchmarks" / "llm_testbed" / "README.md").read_text()
    assert f"exact match is the same in {equal} of the {total} (method, task) pairs" in " ".join(
        readme.split()
    )
    # --against names the reference folder (default: the committed results)
    main(["--compare", str(ROOT / "benchmarks" / "results" / "llm_testbed_regenerated"),
          "--against", str(ROOT / "benchmarks" / "results")])  # fmt: skip
    assert capsys.readouterr().out == out
    regenerated = str(ROOT / "benchmarks" / "results" / "llm_testbed_regenerated")
    main(["--compare", regenerated, "--against", regenerated])  # a folder against itself
    itself = capsys.readouterr().out
    assert re.findall(r"equal in (\d+) of \1 pairs", itself) and "s.d. 0.0000" in itself
    for args, cause in (
        (["--compare", str(tmp_path / "none")], "not a folder"),
        (["--compare", str(tmp_path), "--against", str(tmp_path / "none")], "not a folder"),
        (["--compare", str(tmp_path)], "not a readable"),
    ):
        if cause == "not a readable":
            (tmp_path / "llm_testbed_same_seed.json").write_text("{bad")
        with pytest.raises(SystemExit) as exit_:
            main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and cause in err
    with pytest.raises(SystemExit) as exit_:
        main(["--against", str(tmp_path)])  # a usage error (argparse's status 2)
    assert exit_.value.code == 2 and "--against needs --compare" in capsys.readouterr().err


def test_training_into_a_folder_of_another_recipe_is_one_line_and_status_2(
    capsys, tmp_path, monkeypatch
):
    from benchmarks.llm_testbed import train as TR

    monkeypatch.setattr(TR, "ADAPTERS", tmp_path)
    (tmp_path / "same_seed").mkdir()
    manifest = dict(collection="same_seed", lora=TR.LORA, train=dict(TR.TRAIN, steps=3), tasks={})
    (tmp_path / "same_seed" / "manifest.json").write_text(json.dumps(manifest))
    before = (tmp_path / "same_seed" / "manifest.json").read_text()
    assert TR.main(["--collection", "same_seed", "--tasks", "correction_en"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train into another folder" in err
    assert str(tmp_path / "same_seed" / "manifest.json") in err
    assert (tmp_path / "same_seed" / "manifest.json").read_text() == before


def test_table_prints_the_tables_of_another_results_folder(capsys, tmp_path):
    """`table --results DIR` prints DIR's tables (a run not committed yet); an empty folder, a
    damaged file (named) or an unknown option is one line and status 2."""
    import shutil

    from benchmarks.llm_testbed import table

    assert table.main([]) == 0
    committed = capsys.readouterr().out
    for c in table.COLLECTIONS:
        name = f"llm_testbed_{c}.json"
        shutil.copy(table.RESULTS / name, tmp_path / name)
    assert table.main(["--results", str(tmp_path)]) == 0
    assert capsys.readouterr().out == committed
    (tmp_path / "llm_testbed_same_seed.json").write_text("{bad")
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, needle in (
        (["--results", str(tmp_path)], "llm_testbed_same_seed.json: not a readable"),
        (["--results", str(empty)], "no llm_testbed_*.json"),
        (["--bogus"], "usage:"),
    ):
        assert table.main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err


def test_stats_describe_the_adapters_on_disk_with_their_own_record(tmp_path, monkeypatch):
    """A retrained adapter (other bits) is described by its `regenerated` entry, an original
    one by its row; a task without an adapter is left out of the statistics (the accuracy
    grid shows the row that was scored), and so is an adapter not recorded yet (`train.py`
    writes its row after scoring it)."""
    from safetensors.numpy import save_file

    from benchmarks.llm_testbed import stats as S
    from benchmarks.llm_testbed import train as TR
    from benchmarks.quality.collection import tensors_sha256

    folder = tmp_path / "same_seed"

    def adapter(task, value):
        (folder / task).mkdir(parents=True, exist_ok=True)
        path = folder / task / "adapter_model.safetensors"
        save_file({"w": np.full((2, 2), value, np.float32)}, str(path))
        (folder / task / "adapter_config.json").write_text("{}")
        return tensors_sha256(path)

    old, new = adapter("qa_en", 1.0), adapter("qa_en", 2.0)  # qa_en now holds the new bits
    kept = adapter("qa_de", 3.0)
    rows = {
        "qa_en": dict(
            sha256=old, own_accuracy=0.5, regenerated=dict(sha256=new, own_accuracy=0.75)
        ),
        "qa_de": dict(sha256=kept, own_accuracy=0.25),
        "qa_fr": dict(sha256="lost", own_accuracy=0.125),  # trained, scored, adapter gone
    }
    (folder / "manifest.json").write_text(json.dumps(dict(tasks=rows)))
    entries = S.on_disk_entries(folder)
    assert {t: e["own_accuracy"] for t, e in entries.items()} == {"qa_en": 0.75, "qa_de": 0.25}
    monkeypatch.setattr(TR, "ADAPTERS", tmp_path)
    grid = S.accuracy_grid(["same_seed"])
    qa = next(line for line in grid.splitlines() if line.startswith("| qa |")).split(" | ")
    languages = list(T.LANGUAGES)
    cell = {lang: qa[1 + languages.index(lang)] for lang in ("en", "de", "fr", "es")}
    assert cell == {"en": "0.75", "de": "0.25", "fr": "0.12", "es": "-"}
    adapter("qa_de", 4.0)  # tensors the manifest does not record (yet)
    assert list(S.on_disk_entries(folder)) == ["qa_en"]
