"""Train one real PEFT LoRA per task of the grid, the way PEFT users do.

    python -m benchmarks.testbed.train --regime small_lr --seed-variant same_seed
    python -m benchmarks.testbed.train --regime large_lr --seed-variant diff_seed --tasks sort_L3
    python -m benchmarks.testbed.train --regime small_lr --seed-variant same_seed --quick

Regimes (AdamW, linear warm-up then linear decay, loss on answer tokens only):

* `small_lr`: a typical LLM LoRA learning rate; `lora_A` stays near its initialisation.
* `large_lr`: ten times larger; `lora_A` drifts far from its initialisation.

Seed variants: `same_seed` initialises every task's LoRA from the same torch seed (what a
trainer's fixed default seed gives: identical `lora_A` init across tasks); `diff_seed` uses
seed = task index. Adapters are written with `save_pretrained` to
`adapters/<regime>_<seed_variant>/<task>/`, with a `manifest.json` of own-LoRA and base
accuracies. Tasks whose adapter directory already exists are skipped (resumable).
`--quick` trains a 3 applications x 2 languages sub-grid into `_cache/quick/` (for CI).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np
import torch

from ..quality.torch_lora import lora_training
from . import evaluate as E
from . import model as M
from . import tasks as T

HERE = pathlib.Path(__file__).resolve().parent
ADAPTERS = HERE / "adapters"

LORA = dict(
    r=8,
    lora_alpha=16,
    lora_dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    bias="none",
)
# `steps` is the schedule length and the cap; training stops early once the accuracy on the
# task's validation split (disjoint from train and test) reaches `target_val_accuracy`,
# checked every `eval_every` steps, as a user watching a validation metric would.
REGIMES = {
    "small_lr": dict(
        lr=1e-3,
        steps=1200,
        batch_size=64,
        warmup=30,
        weight_decay=0.0,
        eval_every=50,
        min_steps=100,
        target_val_accuracy=0.98,
        max_grad_norm=None,
    ),
    "large_lr": dict(
        lr=1e-2,
        steps=800,
        batch_size=64,
        warmup=30,
        weight_decay=0.0,
        eval_every=50,
        min_steps=100,
        target_val_accuracy=0.98,
        # without clipping, lr 1e-2 blew up on some shift tasks (loss stuck near 1.7)
        max_grad_norm=1.0,
    ),
}
SEED_VARIANTS = ("same_seed", "diff_seed")
SAME_SEED = 42
QUICK_APPS = ("copy", "reverse", "sort")
QUICK_LANGS = (0, 1)


def lora_seed(task: T.Task, seed_variant: str) -> int:
    if seed_variant == "same_seed":
        return SAME_SEED
    if seed_variant == "diff_seed":
        return task.index
    raise ValueError(f"seed variant must be one of {SEED_VARIANTS}, got {seed_variant!r}")


def train_lora(base_model, task: T.Task, regime: str, seed: int, log=print):
    """Fine-tune a fresh LoRA on `task`; returns the `PeftModel` and training stats."""
    hp = REGIMES[regime]
    steps = hp["steps"]
    model, params, opt, sched = lora_training(
        base_model, LORA, seed, lr=hp["lr"], weight_decay=hp["weight_decay"], steps=steps,
        warmup=hp["warmup"],
    )  # fmt: skip
    stream = T.TrainStream([task], hp["batch_size"], seed=seed)
    val_inputs = T.heldout_inputs(task, "val")
    t0 = time.time()
    losses = []
    val_acc = float("nan")
    for step in range(1, steps + 1):
        loss = M.lm_loss(model, *stream.next_batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if hp["max_grad_norm"] is not None:
            torch.nn.utils.clip_grad_norm_(params, hp["max_grad_norm"])
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % hp["eval_every"] == 0 or step == steps:
            val_acc = E.greedy_accuracy(model, task, val_inputs)
            model.train()
            if log:
                log(
                    f"  {task.name} step {step:4d} loss {losses[-1]:.4f} val {val_acc:.3f} "
                    f"{time.time() - t0:6.1f}s"
                )
            if step >= hp["min_steps"] and val_acc >= hp["target_val_accuracy"]:
                break
    model.eval()
    stats = dict(
        steps=step,
        seconds=time.time() - t0,
        final_loss=float(np.mean(losses[-20:])),
        val_accuracy=val_acc,
    )
    return model, stats


def collection_dir(regime: str, seed_variant: str, root: pathlib.Path = ADAPTERS) -> pathlib.Path:
    return root / f"{regime}_{seed_variant}"


def train_collection(
    regime: str,
    seed_variant: str,
    tasks: list[T.Task],
    root: pathlib.Path = ADAPTERS,
    log=print,
) -> dict:
    """Train (or reuse) every task's adapter and update the collection's `manifest.json`."""
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {tuple(REGIMES)}, got {regime!r}")
    base = M.load_base_model()
    out = collection_dir(regime, seed_variant, root)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.update(
        regime=regime,
        seed_variant=seed_variant,
        hyperparameters=dict(REGIMES[regime], optimizer="AdamW", schedule="warmup-linear"),
        lora=LORA,
        base_model="benchmarks/testbed/fixtures/base_model.safetensors",
    )
    manifest.setdefault("tasks", {})
    for task in tasks:
        adapter = out / task.name
        if (adapter / "adapter_model.safetensors").exists() and task.name in manifest["tasks"]:
            log(f"{task.name}: cached")
            continue
        seed = lora_seed(task, seed_variant)
        peft_model, stats = train_lora(base, task, regime, seed, log=log)
        tmp = out / f".{task.name}.tmp"
        peft_model.save_pretrained(str(tmp))
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's generated model card
        if adapter.exists():
            import shutil

            shutil.rmtree(adapter)
        tmp.rename(adapter)
        # score through the harness, exactly as merged adapters will be scored
        own = E.evaluate_task(base, task, E.load_adapter_factors(adapter))
        base_acc = E.evaluate_task(base, task, None)
        manifest["tasks"][task.name] = dict(
            own_accuracy=own, base_accuracy=base_acc, seed=seed, **stats
        )
        log(f"{task.name}: own {own:.3f} base {base_acc:.3f} ({stats['seconds']:.1f}s)")
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    accs = [v["own_accuracy"] for v in manifest["tasks"].values()]
    manifest["summary"] = dict(
        num_tasks=len(accs),
        own_accuracy_min=float(np.min(accs)),
        own_accuracy_mean=float(np.mean(accs)),
        base_accuracy_max=float(np.max([v["base_accuracy"] for v in manifest["tasks"].values()])),
        train_seconds_total=float(np.sum([v["seconds"] for v in manifest["tasks"].values()])),
    )
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the testbed's LoRA collections.")
    parser.add_argument("--regime", choices=tuple(REGIMES), required=True)
    parser.add_argument("--seed-variant", choices=SEED_VARIANTS, default="same_seed")
    parser.add_argument("--tasks", nargs="*", help="task names (default: all 40)")
    parser.add_argument("--quick", action="store_true", help="3x2 sub-grid into _cache/quick")
    parser.add_argument("--out", type=pathlib.Path, help="root folder for collections")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.tasks:
        tasks = [T.task_from_name(n) for n in args.tasks]
    elif args.quick:
        tasks = T.all_tasks(QUICK_APPS, QUICK_LANGS)
    else:
        tasks = T.all_tasks()
    root = args.out or (M.CACHE / "quick" if args.quick else ADAPTERS)
    t0 = time.time()
    manifest = train_collection(args.regime, args.seed_variant, tasks, root)
    print(json.dumps(manifest["summary"], indent=2), f"\nwall {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
