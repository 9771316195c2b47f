"""The testbed's tiny base causal LM: a `transformers` Llama built from a config.

The base model is pretrained once on *generic* transformations over all eight alphabets
(`tasks.PRETRAIN_TASKS`: rotate, swap pairs, sort descending, shift -1, list the
repeated tokens), never on the five
applications, so it knows the token embeddings and how to attend over a prompt but scores
near zero on the applications until a LoRA teaches them.

    python -m benchmarks.testbed.model            # pretrain (or load) and report accuracies
    python -m benchmarks.testbed.model --force    # retrain and overwrite the fixture

The weights live in `fixtures/base_model.safetensors` (+ `base_config.json`), committed, and
are copied to the gitignored `_cache/`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import tasks as T

HERE = pathlib.Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
CACHE = HERE / "_cache"
WEIGHTS = "base_model.safetensors"
CONFIG = "base_config.json"

MODEL_CONFIG = dict(
    vocab_size=T.VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention: k_proj/v_proj are 64 -> 32
    max_position_embeddings=32,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    pad_token_id=T.PAD,
    bos_token_id=T.BOS,
    eos_token_id=T.EOS,
)

PRETRAIN = dict(steps=4000, batch_size=128, lr=3e-3, weight_decay=0.01, warmup=200, seed=1234)


def build_model(config: dict | None = None):
    """A freshly initialised `LlamaForCausalLM` with the testbed config (float32, eval)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**(config or MODEL_CONFIG))
    cfg._attn_implementation = "eager"  # tiny sequences: eager is fastest and deterministic
    return LlamaForCausalLM(cfg).eval()


def _weights_path() -> pathlib.Path | None:
    for folder in (CACHE, FIXTURES):
        if (folder / WEIGHTS).exists() and (folder / CONFIG).exists():
            return folder
    return None


def load_base_model(pretrain_if_missing: bool = True):
    """The pretrained base model (from `_cache/` or the committed fixture)."""
    folder = _weights_path()
    if folder is None:
        if not pretrain_if_missing:
            raise FileNotFoundError(f"no {WEIGHTS} in {CACHE} or {FIXTURES}")
        return pretrain()
    config = json.loads((folder / CONFIG).read_text())
    model = build_model(config)
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    return model.eval()


def lm_loss(model, ids: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    out = model(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        labels=torch.from_numpy(labels),
        use_cache=False,
    )
    return out.loss


def pretrain(log=print):
    """Pretrain the base model on the generic tasks, save it, and return it."""
    torch.manual_seed(PRETRAIN["seed"])
    model = build_model().train()
    pre_tasks = [T.Task(name, lang) for name in T.PRETRAIN_TASKS for lang in range(T.NUM_LANGUAGES)]
    stream = T.TrainStream(pre_tasks, PRETRAIN["batch_size"], seed=PRETRAIN["seed"])
    opt = torch.optim.AdamW(
        model.parameters(), lr=PRETRAIN["lr"], weight_decay=PRETRAIN["weight_decay"]
    )
    steps, warmup = PRETRAIN["steps"], PRETRAIN["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)),
    )
    t0 = time.time()
    for step in range(steps):
        loss = lm_loss(model, *stream.next_batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"pretrain step {step:5d} loss {loss.item():.4f} {time.time() - t0:7.1f}s")
    model.eval()
    save_base_model(model)
    return model


def save_base_model(model) -> None:
    FIXTURES.mkdir(exist_ok=True)
    CACHE.mkdir(exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(FIXTURES / WEIGHTS))
    (FIXTURES / CONFIG).write_text(json.dumps(MODEL_CONFIG, indent=2) + "\n")
    for name in (WEIGHTS, CONFIG):
        shutil.copy(FIXTURES / name, CACHE / name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="retrain even if saved")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from .evaluate import evaluate_task

    model = pretrain() if args.force else load_base_model()
    for name in T.PRETRAIN_TASKS:
        accs = [evaluate_task(model, T.Task(name, l), None) for l in range(T.NUM_LANGUAGES)]
        print(f"pretrain task {name:9s} acc mean {np.mean(accs):.3f} min {np.min(accs):.3f}")
    for app in T.APPLICATIONS:
        accs = [evaluate_task(model, T.Task(app, l), None) for l in range(T.NUM_LANGUAGES)]
        print(f"application {app:9s} base acc mean {np.mean(accs):.3f} max {np.max(accs):.3f}")


if __name__ == "__main__":
    main()
