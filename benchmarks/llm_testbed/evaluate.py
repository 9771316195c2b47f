"""Scoring on the real-LLM testbed: teacher-forced exact match of base + (merged) LoRA.

An example counts as correct when every answer token (the closing `<|im_end|>` included) is
the model's argmax given the prompt and the reference prefix: identical to greedy-decoding
exact match, at one forward pass per batch.

A LoRA is given factored, `{module: (A [k, d_in], B [d_out, k])}` with the scale folded into
`B`, module names without PEFT's `base_model.model.` prefix (as `hydraopt_jax.io` reads
them). The harness adds each as a float32 branch beside the frozen base layer (this is the
harness, not the merge engine).
"""

from __future__ import annotations

import numpy as np
import torch

from ..quality.torch_lora import load_adapter as load_adapter
from ..quality.torch_lora import lora_applied
from . import tasks as T

EVAL_BATCH = 64


def tokenize(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """`(prompt_ids, answer_ids)` per pair, tokenized separately (the sequence is their join)."""
    out = []
    for prompt, answer in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        out.append((p, a))
    return out


def batch_tensors(encoded: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded `input_ids`, `attention_mask` and `labels` (-100 outside the answers)."""
    n = max(len(p) + len(a) for p, a in encoded)
    ids = torch.full((len(encoded), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), n), dtype=torch.long)
    labels = torch.full((len(encoded), n), -100, dtype=torch.long)
    for i, (p, a) in enumerate(encoded):
        seq = p + a
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(a)
    return ids, mask, labels


def lm_loss(model, ids, mask, labels):
    """Mean cross-entropy over answer tokens."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


@torch.no_grad()
def answer_scores(model, encoded, pad_id: int, batch_size: int = EVAL_BATCH):
    """`(correct, nll)` per example: `correct` is 1.0 when every answer token is the argmax
    given the reference prefix; `nll` the mean negative log-likelihood (nats) of its answer
    tokens, a continuous measure that still moves where exact match is saturated.

    The base model runs under bfloat16 autocast (2.4x faster than float32 on this CPU);
    LoRA branches added by `lora_applied` run in float32, so a LoRA's update is never
    rounded to bfloat16 (the rounding of `W + B A` would blur differences between merges).
    Logits are computed only where an answer token is predicted: under autocast for the
    argmax (as every accuracy of the testbed was scored), and again in float32 for the
    likelihoods (bfloat16 logits would round them by ~0.1 nat).
    """
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    correct, nll = np.zeros(len(encoded)), np.zeros(len(encoded))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask, labels = batch_tensors([encoded[i] for i in idx], pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False)
            hidden = hidden.last_hidden_state[:, :-1]
            target = labels[:, 1:]
            where = target != -100
            answers, expected = hidden[where], target[where]
            pred = model.lm_head(answers).argmax(-1)
        logits = torch.nn.functional.linear(answers.float(), model.lm_head.weight.float())
        token_nll = torch.nn.functional.cross_entropy(logits, expected, reduction="none")
        ok = torch.ones_like(target, dtype=torch.bool)
        ok[where] = pred == expected
        per_row = torch.zeros(target.shape, dtype=torch.float32)
        per_row[where] = token_nll
        correct[idx] = ok.all(dim=1).float().numpy()
        nll[idx] = (per_row.sum(dim=1) / where.sum(dim=1).clamp(min=1)).numpy()
    return correct, nll


def exact_match(model, encoded, pad_id: int, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Per example: 1.0 when every answer token is the argmax given the reference prefix."""
    return answer_scores(model, encoded, pad_id, batch_size)[0]


class Scorer:
    """Held-out exact match of one base model on the grid's tasks, with tokenization cached."""

    def __init__(self, model, tokenizer, split: str = "test", limit: int | None = None):
        self.model, self.tokenizer, self.split, self.limit = model, tokenizer, split, limit
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._encoded: dict[str, list] = {}

    def encoded(self, task: T.Task):
        if task.name not in self._encoded:
            pairs = T.heldout(task, self.split)[: self.limit]
            self._encoded[task.name] = tokenize(self.tokenizer, pairs)
        return self._encoded[task.name]

    def evaluate(self, task: T.Task | str, lora: dict | None) -> dict[str, float]:
        """`{"accuracy", "answer_nll"}` on `task`'s held-out split with `lora` (None: the
        base): exact-match accuracy and the mean over examples of the answers' per-token
        negative log-likelihood."""
        if isinstance(task, str):
            task = T.task_from_name(task)
        with lora_applied(self.model, lora):
            correct, nll = answer_scores(self.model, self.encoded(task), self.pad_id)
        return {"accuracy": float(correct.mean()), "answer_nll": float(nll.mean())}

    def accuracy(self, task: T.Task | str, lora: dict | None) -> float:
        """Exact-match accuracy of `task`'s held-out split with `lora` (None: the base)."""
        return self.evaluate(task, lora)["accuracy"]
