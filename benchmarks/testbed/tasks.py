"""Synthetic "applications x languages" task grid for the quality testbed.

A *language* is a disjoint alphabet of `ALPHABET_SIZE` tokens; an *application* is a
sequence transformation. A task is one (application, language) cell, named
`"<app>_L<lang>"` (`copy_L0` ... `dedup_L7`, 40 tasks). Examples are token sequences

    [BOS, APP, x_1 .. x_n, SEP, y_1 .. y_m, EOS]          n in [MIN_LEN, MAX_LEN]

where `APP` is the application's task token (so that one merged adapter can in principle
serve every task), `x` is drawn uniformly with replacement from the language's alphabet and
`y = app(x)`. The base model is pretrained on *other* transformations (`PRETRAIN_TASKS`,
with their own task tokens) and never sees an application token.

Generation is deterministic given `(task, split, seed)`; the held-out test and validation
inputs are disjoint from every training input of the same task.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

PAD, BOS, SEP, EOS = 0, 1, 2, 3
APPLICATIONS = ("copy", "reverse", "sort", "shift", "dedup")
APP_TOKEN = {app: 4 + i for i, app in enumerate(APPLICATIONS)}  # 4..8
PRETRAIN_TASKS = ("rotate", "swap", "sortdesc", "unshift", "repeats")
PRETRAIN_TOKEN = {name: 9 + i for i, name in enumerate(PRETRAIN_TASKS)}  # 9..13
NUM_LANGUAGES = 8
ALPHABET_SIZE = 8
ALPHABET_START = 16
VOCAB_SIZE = ALPHABET_START + NUM_LANGUAGES * ALPHABET_SIZE  # 80
MIN_LEN, MAX_LEN = 4, 7
SEQ_LEN = 2 + MAX_LEN + 1 + MAX_LEN + 1  # 18: longest example, no padding needed
NUM_TEST = 256
NUM_VAL = 128


def alphabet(lang: int) -> np.ndarray:
    """Token ids of language `lang`: `ALPHABET_SIZE` consecutive ids."""
    start = ALPHABET_START + lang * ALPHABET_SIZE
    return np.arange(start, start + ALPHABET_SIZE)


def _shift(x: list[int], by: int) -> list[int]:
    # cyclic shift *within* the token's own alphabet
    out = []
    for t in x:
        base = ALPHABET_START + ((t - ALPHABET_START) // ALPHABET_SIZE) * ALPHABET_SIZE
        out.append(base + (t - base + by) % ALPHABET_SIZE)
    return out


def _dedup(x: list[int]) -> list[int]:
    # keep the first occurrence of every token, drop all later repeats (order kept)
    seen: set[int] = set()
    out = []
    for t in x:
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def _repeats(x: list[int]) -> list[int]:
    # the tokens that dedup drops: every occurrence after the first (possibly empty)
    seen: set[int] = set()
    out = []
    for t in x:
        if t in seen:
            out.append(t)
        seen.add(t)
    return out


def _swap(x: list[int]) -> list[int]:
    out = list(x)
    for i in range(0, len(x) - 1, 2):
        out[i], out[i + 1] = x[i + 1], x[i]
    return out


TRANSFORMS = {
    # the five applications
    "copy": lambda x: list(x),
    "reverse": lambda x: list(x)[::-1],
    "sort": lambda x: sorted(x),
    "shift": lambda x: _shift(x, 1),
    "dedup": _dedup,
    # generic pretraining transformations (none equals an application on typical inputs)
    "rotate": lambda x: list(x[1:]) + [x[0]],
    "swap": _swap,
    "sortdesc": lambda x: sorted(x, reverse=True),
    "unshift": lambda x: _shift(x, -1),
    "repeats": _repeats,
}


@dataclasses.dataclass(frozen=True)
class Task:
    """One cell of the grid: an application on a language."""

    app: str
    lang: int

    @property
    def name(self) -> str:
        return f"{self.app}_L{self.lang}"

    @property
    def index(self) -> int:
        """Position in `all_tasks()` (application-major)."""
        return APPLICATIONS.index(self.app) * NUM_LANGUAGES + self.lang

    @property
    def task_token(self) -> int:
        return APP_TOKEN[self.app] if self.app in APP_TOKEN else PRETRAIN_TOKEN[self.app]

    def transform(self, x: list[int]) -> list[int]:
        return TRANSFORMS[self.app](x)


def all_tasks(
    apps: tuple[str, ...] = APPLICATIONS, langs: tuple[int, ...] | range = range(NUM_LANGUAGES)
) -> list[Task]:
    """The grid, application-major: `copy_L0, copy_L1, ..., dedup_L7`."""
    return [Task(a, l) for a in apps for l in langs]


def task_from_name(name: str) -> Task:
    """Inverse of `Task.name`: `"sort_L3" -> Task("sort", 3)`."""
    app, _, lang = name.rpartition("_L")
    if app not in TRANSFORMS or not lang.isdigit() or not 0 <= int(lang) < NUM_LANGUAGES:
        raise ValueError(f"unknown task name {name!r}, expected '<app>_L<0..7>'")
    return Task(app, int(lang))


def _rng(*key: object) -> np.random.Generator:
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def sample_inputs(lang: int, num: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """`num` random input sequences over language `lang` (lengths uniform in range)."""
    letters = alphabet(lang)
    lengths = rng.integers(MIN_LEN, MAX_LEN + 1, size=num)
    return [tuple(int(t) for t in rng.choice(letters, size=n)) for n in lengths]


def encode(task: Task, x: tuple[int, ...] | list[int]) -> tuple[list[int], int]:
    """Full example `[BOS, TASK, x, SEP, y, EOS]` and the prompt length (up to SEP)."""
    prompt = [BOS, task.task_token, *x, SEP]
    return prompt + task.transform(list(x)) + [EOS], len(prompt)


def heldout_inputs(task: Task, split: str = "test", seed: int = 0) -> list[tuple[int, ...]]:
    """Distinct held-out inputs of `task` for `split` in {"test", "val"}; disjoint splits."""
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    rng = _rng("heldout", task.name, seed)
    # one stream for both splits, deduplicated, so test and val never share an input
    pool: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    while len(pool) < NUM_TEST + NUM_VAL:
        for x in sample_inputs(task.lang, NUM_TEST + NUM_VAL, rng):
            if x not in seen and len(pool) < NUM_TEST + NUM_VAL:
                seen.add(x)
                pool.append(x)
    return pool[:NUM_TEST] if split == "test" else pool[NUM_TEST:]


class TrainStream:
    """Deterministic infinite stream of training batches that avoids held-out inputs.

    Each batch is `(input_ids [b, SEQ_LEN], labels [b, SEQ_LEN], attention_mask)` as int64
    numpy arrays, right-padded; labels are -100 except on the answer tokens and EOS, so the
    loss is on the answer only (inputs are shifted inside the model as usual).
    """

    def __init__(self, tasks: list[Task], batch_size: int, seed: int = 0, heldout_seed: int = 0):
        self.tasks = list(tasks)
        self.batch_size = batch_size
        self.rng = _rng("train", tuple(t.name for t in self.tasks), seed)
        self.excluded = {
            t.name: set(heldout_inputs(t, "test", heldout_seed))
            | set(heldout_inputs(t, "val", heldout_seed))
            for t in self.tasks
        }

    def next_batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = np.full((self.batch_size, SEQ_LEN), PAD, dtype=np.int64)
        labels = np.full((self.batch_size, SEQ_LEN), -100, dtype=np.int64)
        mask = np.zeros((self.batch_size, SEQ_LEN), dtype=np.int64)
        which = self.rng.integers(0, len(self.tasks), size=self.batch_size)
        for row, ti in enumerate(which):
            task = self.tasks[ti]
            while True:
                (x,) = sample_inputs(task.lang, 1, self.rng)
                if x not in self.excluded[task.name]:
                    break
            seq, prompt_len = encode(task, x)
            ids[row, : len(seq)] = seq
            labels[row, prompt_len : len(seq)] = seq[prompt_len:]
            mask[row, : len(seq)] = 1
        return ids, labels, mask
