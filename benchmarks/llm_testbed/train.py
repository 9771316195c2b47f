"""Train the real-LLM testbed's PEFT LoRAs on SmolLM2-135M, one per task, as users do.

    python -m benchmarks.llm_testbed.train --collection same_seed          # 40 adapters
    python -m benchmarks.llm_testbed.train --collection diff_seed --tasks qa_en,qa_de
    python -m benchmarks.llm_testbed.train --quick                          # CI-sized

`LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=q,k,v,o)`; AdamW, linear
warm-up then linear decay, loss on the answer tokens only, batch 8, a fixed number of steps
(no early stopping). `same_seed` initialises every task's LoRA from torch seed 42 (what a
trainer's fixed default seed gives: one `lora_A` init for all tasks); `diff_seed` uses
`1000 + task index`. The data stream of a task is the same in both collections.

Each adapter is written with `save_pretrained` to `adapters/<collection>/<task>/` (a
temporary name, then renamed) and its row of `manifest.json` (steps, seconds, final loss,
own and base accuracy on the test split, a SHA-256 of its tensors, the library versions and
base weights' checksum) right after it: an interrupted run resumes at the first task without
a recorded adapter; another recipe in the same folder is refused. A task the manifest already
records whose adapter is gone (adapters are not committed) is retrained, and its row stays the
record of the adapter that was scored: the new stats go under `regenerated`, and the log says
whether the tensors came back bit for bit (they do for the same library versions and base
weights; one and two torch threads gave the same bits). `--quick` trains a
small grid for 10 steps into `_cache/quick/` (for the test suite).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

import numpy as np

from ..quality.collection import tensors_sha256
from ..quality.torch_lora import lora_training
from . import evaluate as E
from . import model as M
from . import tasks as T

HERE = pathlib.Path(__file__).resolve().parent
ADAPTERS = HERE / "adapters"
COLLECTIONS = ("same_seed", "diff_seed")
SAME_SEED = 42
LORA = dict(
    r=16,
    lora_alpha=32,
    lora_dropout=0.05,
    target_modules=list(M.TARGET_MODULES),
    bias="none",
)
TRAIN = dict(lr=5e-4, steps=150, warmup=15, batch_size=8, weight_decay=0.0)
# --quick (the test suite): the applications SmolLM2 learns in a few steps
QUICK_TASKS = ("correction_en", "correction_de", "summarisation_en", "summarisation_de")
# own and base accuracy on the first 16 test examples: the ones the quick grid is scored on
QUICK_TRAIN = dict(TRAIN, steps=10, warmup=2, test_examples=16)


# Training order: every application in four languages first (en, ja, de, zh), then the
# other four, so that a long run yields a usable 5 x 4 sub-grid half-way.
LANGUAGE_ORDER = ("en", "ja", "de", "zh", "es", "ko", "fr", "it")


def training_order(tasks: list[T.Task]) -> list[T.Task]:
    return sorted(tasks, key=lambda t: (LANGUAGE_ORDER.index(t.language), t.index))


def lora_seed(task: T.Task, collection: str) -> int:
    if collection == "same_seed":
        return SAME_SEED
    if collection == "diff_seed":
        return 1000 + task.index
    raise ValueError(f"collection must be one of {COLLECTIONS}, got {collection!r}")


def train_lora(base, tokenizer, task: T.Task, seed: int, hp: dict = TRAIN, log=print):
    """A fresh PEFT LoRA fine-tuned on `task`; returns `(peft_model, stats)`."""
    steps = hp["steps"]
    model, _params, opt, sched = lora_training(
        base, LORA, seed, lr=hp["lr"], weight_decay=hp["weight_decay"], steps=steps,
        warmup=hp["warmup"],
    )  # fmt: skip
    stream = T.TrainStream(task, hp["batch_size"], seed=0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    t0 = time.perf_counter()
    losses = []
    for step in range(1, steps + 1):
        batch = E.batch_tensors(E.tokenize(tokenizer, stream.next_batch()), pad_id)
        loss = E.lm_loss(model, *batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (step % 25 == 0 or step == steps):
            log(f"  {task.name} step {step:4d} loss {np.mean(losses[-25:]):.4f} "
                f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    model.eval()
    stats = dict(
        steps=steps,
        seconds=round(time.perf_counter() - t0, 1),
        final_loss=round(float(np.mean(losses[-10:])), 5),
        seed=seed,
    )
    return model, stats


def library_versions() -> dict:
    """What decides an adapter's bits (float32 CPU training is deterministic for one set of
    them; one and two torch threads gave the same bits): the library versions and the float32
    base weights (dequantised from the GGUF by `transformers`), as `tensors_sha256` of the
    cached file."""
    import peft
    import torch
    import transformers

    return dict(torch=torch.__version__, peft=peft.__version__,
                transformers=transformers.__version__,
                base_sha256=tensors_sha256(M.cache_dir() / M.WEIGHTS))  # fmt: skip


def regeneration_note(row: dict) -> str:
    """One line comparing a manifest row with its `regenerated` entry."""
    new = row["regenerated"]
    if new["sha256"] == row["sha256"]:
        return "regenerated bit for bit"
    return (
        f"regenerated with other bits: final loss {new['final_loss']} (recorded "
        f"{row['final_loss']}), own accuracy {new['own_accuracy']:.4f} (recorded "
        f"{row['own_accuracy']:.4f})"
    )


def _write_json(path: pathlib.Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def train_collection(
    collection: str,
    tasks: list[T.Task] | None = None,
    out: pathlib.Path | None = None,
    hp: dict = TRAIN,
    log=print,
) -> dict:
    """Train every task's adapter that `out` does not hold yet; returns the manifest."""
    import torch

    tasks = tasks or T.all_tasks()
    out = out or ADAPTERS / collection
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = (
        json.loads(manifest_path.read_text())
        if manifest_path.exists()
        else dict(collection=collection, lora=LORA, train=hp, tasks={})
    )
    if not _same_recipe(manifest, hp):
        raise ValueError(
            f"{manifest_path}: trained with {manifest['lora']} / {manifest['train']}, not "
            f"{LORA} / {hp}; train into another folder (or delete this one)"
        )
    base, tokenizer = M.load_base_model(log=log)
    scorer = E.Scorer(base, tokenizer, limit=hp.get("test_examples"))  # None: the whole split
    versions = library_versions()  # recorded in each row this run writes
    for task in training_order(tasks):
        final = out / task.name
        recorded = manifest["tasks"].get(task.name)
        if recorded is not None and (final / "adapter_model.safetensors").exists():
            known = {recorded["sha256"], recorded.get("regenerated", {}).get("sha256")}
            if tensors_sha256(final) in known:
                continue  # else written but never recorded (a run stopped in between): redo
        seed = lora_seed(task, collection)
        model, stats = train_lora(base, tokenizer, task, seed, hp, log=log)
        tmp = out / f".{task.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        del model
        own = scorer.accuracy(task, E.load_adapter(final))
        stats.update(
            torch_threads=torch.get_num_threads(),
            own_accuracy=own,
            base_accuracy=scorer.accuracy(task, None),
            sha256=tensors_sha256(final),
            versions=versions,
        )
        if recorded is None:
            manifest["tasks"][task.name] = stats
        else:
            # The row describes the adapter that was scored: keep it, and say how this
            # regeneration compares (bit for bit, or by its loss and accuracy)
            recorded["regenerated"] = stats
        _write_json(manifest_path, manifest)
        log(f"{collection}/{task.name}: own {own:.3f} base {stats['base_accuracy']:.3f} "
            f"loss {stats['final_loss']:.4f} ({stats['seconds']} s)"
            + ("" if recorded is None else f"; {regeneration_note(recorded)}"))  # fmt: skip
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.llm_testbed.train")
    parser.add_argument("--collection", choices=COLLECTIONS, action="append")
    parser.add_argument("--tasks", help="comma-separated task names (default: all 40)")
    parser.add_argument("--quick", action="store_true", help="4 tasks, 10 steps, into _cache/")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [T.task_from_name(n) for n in args.tasks.split(",")] if args.tasks else None
    if args.quick:
        tasks = tasks or [T.task_from_name(n) for n in QUICK_TASKS]

    def log(s):
        print(s, file=sys.stderr, flush=True)

    for collection in args.collection or ["same_seed"]:
        out = HERE / "_cache" / "quick" / collection if args.quick else None
        if args.quick:
            _drop_stale_cache(out, QUICK_TRAIN, log)
        try:  # a folder trained by another recipe: one line, status 2
            train_collection(collection, tasks, out, QUICK_TRAIN if args.quick else TRAIN, log)
        except ValueError as e:
            print(e, file=sys.stderr)
            return 2
    return 0


def _same_recipe(manifest: dict, hp: dict) -> bool:
    """Whether a manifest's adapters were trained by this LoRA config and `hp`."""
    return manifest.get("train") == hp and manifest.get("lora") == LORA


def _drop_stale_cache(out: pathlib.Path, hp: dict, log) -> None:
    """The quick collection is a cache: one trained by another recipe is retrained, not
    refused (a real collection's folder is refused by `train_collection`)."""
    path = out / "manifest.json"
    if path.exists() and not _same_recipe(json.loads(path.read_text()), hp):
        log(f"{out}: trained by another recipe; retraining")
        shutil.rmtree(out)


if __name__ == "__main__":
    sys.exit(main())
