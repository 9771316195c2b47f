"""The real-LLM testbed's task grid: 5 applications x 8 languages of real words.

A task is one (application, language) cell, named `"<app>_<lang>"` (`correction_en` ...
`reply_zh`, 40 tasks). Every example is a chat turn in SmolLM2's own format (without the
default system prompt, to keep sequences short):

    <|im_start|>user\\n{instruction}\\n{text}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>

The instruction names the application; `text` is built from real words of the language and
`answer` is the one correct answer (so exact match is a fair metric):

* `correction`: one word of the text is written twice in a row; answer: the text without
  the repetition.
* `rephrasing`: a list of words; answer: the list as a phrase, `w1, w2 <and> w3`, with the
  language's own conjunction.
* `qa`: a list of distinct words and a question "Which word comes after X?"; answer: the
  word after `X`.
* `summarisation`: a text in which one word occurs three times and every other word once;
  answer: that word (the text's keyword).
* `reply`: a message; answer: the language's "thank you" reply naming the message's first
  word, e.g. `Danke für Licht!`.

Words come from `faker`'s locale word lists (offline, on PyPI). `ko_KR` has no Korean lorem
provider (it falls back to Latin filler), so Korean words come from faker's Korean country,
city, company-name and job-title lists, and Japanese adds faker's Japanese names, prefectures,
towns and countries to its short lorem list. Each language's words are split once, by a seeded
shuffle, into disjoint train / validation / test vocabularies: held-out inputs use words
never seen in training. Generation is deterministic given `(task, split, seed)`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re

import numpy as np

APPLICATIONS = ("correction", "rephrasing", "qa", "summarisation", "reply")
LANGUAGES = ("en", "de", "es", "fr", "it", "ja", "ko", "zh")
LOCALES = {
    "en": "en_US",
    "de": "de_DE",
    "es": "es_ES",
    "fr": "fr_FR",
    "it": "it_IT",
    "ja": "ja_JP",
    "ko": "ko_KR",
    "zh": "zh_CN",
}
INSTRUCTIONS = {
    "correction": "Correct the text.",
    "rephrasing": "Rephrase the list.",
    "qa": "Answer the question about the list.",
    "summarisation": "Summarise the text in one word.",
    "reply": "Suggest a reply to the message.",
}
AND = {"en": "and", "de": "und", "es": "y", "fr": "et", "it": "e", "ja": "と", "ko": "그리고",
       "zh": "和"}  # fmt: skip
REPLY = {
    "en": "Thanks for {}!",
    "de": "Danke für {}!",
    "es": "¡Gracias por {}!",
    "fr": "Merci pour {} !",
    "it": "Grazie per {}!",
    "ja": "{}をありがとう！",
    "ko": "{} 감사합니다!",
    "zh": "谢谢你的{}！",
}
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
NUM_TEST = 64
NUM_VAL = 32
_LATIN = re.compile(r"^[^\W\d_]+$")


@dataclasses.dataclass(frozen=True)
class Task:
    """One grid cell: an application in a language."""

    application: str
    language: str

    @property
    def name(self) -> str:
        return f"{self.application}_{self.language}"

    @property
    def index(self) -> int:
        return APPLICATIONS.index(self.application) * len(LANGUAGES) + LANGUAGES.index(
            self.language
        )

    @property
    def attributes(self) -> dict[str, str]:
        return {"application": self.application, "language": self.language}


def all_tasks() -> list[Task]:
    """The 40 tasks, application-major (`correction_en`, `correction_de`, ...)."""
    return [Task(app, lang) for app in APPLICATIONS for lang in LANGUAGES]


def task_from_name(name: str) -> Task:
    app, _, lang = name.rpartition("_")
    if app not in APPLICATIONS or lang not in LANGUAGES:
        raise ValueError(f"unknown task {name!r}: expected <application>_<language>")
    return Task(app, lang)


def _seed(*parts) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _japanese_words() -> list[str]:
    from faker.providers.address.ja_JP import Provider as Address
    from faker.providers.lorem.ja_JP import Provider as Lorem
    from faker.providers.person.ja_JP import Provider as Person

    words = list(Lorem.word_list) + list(Person.last_names) + list(Person.first_names)
    return words + list(Address.prefectures) + list(Address.towns) + list(Address.countries)


def _korean_words() -> list[str]:
    from faker.providers.address.ko_KR import Provider as Address
    from faker.providers.company.ko_KR import Provider as Company
    from faker.providers.job.ko_KR import Provider as Job

    words = list(Address.countries) + list(Company.company_name_words)
    words += [c for c in Address.cities if " " not in c]
    for job in Job.jobs:
        words += re.split(r"[\s/(),·]+", job)
    return words


# Longest word kept, in characters: SmolLM2's tokenizer spends 3 (ja, zh) to 6 (ko) tokens on
# a CJK character, so short words keep every language's sequences of similar length.
MAX_CHARS = {"ja": 3, "ko": 2, "zh": 3}
MAX_CHARS_LATIN = 8


def _is_word(word: str, language: str) -> bool:
    if not word or " " in word or len(word) > MAX_CHARS.get(language, MAX_CHARS_LATIN):
        return False
    if language in MAX_CHARS:
        # a real word of the script, no Latin filler
        return not re.search(r"[A-Za-z0-9]", word)
    return len(word) >= 3 and bool(_LATIN.match(word))


@functools.cache
def vocabulary(language: str) -> dict[str, tuple[str, ...]]:
    """The language's words, split into disjoint `train` / `val` / `test` vocabularies."""
    if language == "ko":
        raw = _korean_words()
    elif language == "ja":
        raw = _japanese_words()
    else:
        import importlib

        raw = importlib.import_module(
            f"faker.providers.lorem.{LOCALES[language]}"
        ).Provider.word_list
    seen, words = set(), []
    for w in raw:
        w = w.strip()
        key = w.casefold()
        if _is_word(w, language) and key not in seen:
            seen.add(key)
            words.append(w)
    words.sort()
    order = np.random.default_rng(_seed("vocabulary", language)).permutation(len(words))
    words = [words[i] for i in order]
    n_train = int(SPLIT_FRACTIONS[0] * len(words))
    n_val = int(SPLIT_FRACTIONS[1] * len(words))
    return {
        "train": tuple(words[:n_train]),
        "val": tuple(words[n_train : n_train + n_val]),
        "test": tuple(words[n_train + n_val :]),
    }


def make_example(task: Task, words: tuple[str, ...], rng: np.random.Generator) -> tuple[str, str]:
    """One `(text, answer)` pair of `task` drawn from `words`."""
    app, lang = task.application, task.language

    def pick(n):
        return [words[i] for i in rng.choice(len(words), size=n, replace=False)]

    if app == "correction":
        ws = pick(int(rng.integers(3, 6)))
        i = int(rng.integers(len(ws)))
        return " ".join(ws[: i + 1] + ws[i:]), " ".join(ws)
    if app == "rephrasing":
        ws = pick(int(rng.integers(3, 5)))
        return " ".join(ws), f"{', '.join(ws[:-1])} {AND[lang]} {ws[-1]}"
    if app == "qa":
        ws = pick(int(rng.integers(4, 7)))
        i = int(rng.integers(len(ws) - 1))
        return f"{' '.join(ws)}\nWhich word comes after {ws[i]}?", ws[i + 1]
    if app == "summarisation":
        ws = pick(int(rng.integers(3, 5)))
        text = ws + [ws[0], ws[0]]
        rng.shuffle(text)
        return " ".join(text), ws[0]
    if app == "reply":
        ws = pick(int(rng.integers(3, 5)))
        return " ".join(ws), REPLY[lang].format(ws[0])
    raise ValueError(f"unknown application {app!r}")


def prompt(task: Task, text: str) -> str:
    """The chat-formatted prompt, up to and including the assistant header."""
    instruction = INSTRUCTIONS[task.application]
    return f"<|im_start|>user\n{instruction}\n{text}<|im_end|>\n<|im_start|>assistant\n"


ANSWER_END = "<|im_end|>"


def examples(task: Task, split: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n` distinct `(prompt, answer)` pairs of `task` from `split`'s vocabulary."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    words = vocabulary(task.language)[split]
    rng = np.random.default_rng(_seed(task.name, split, seed))
    out, seen = [], set()
    for _ in range(50 * n):
        text, answer = make_example(task, words, rng)
        if text not in seen:
            seen.add(text)
            out.append((prompt(task, text), answer + ANSWER_END))
        if len(out) == n:
            return out
    raise RuntimeError(f"{task.name}/{split}: could not draw {n} distinct examples")


def heldout(task: Task, split: str = "test") -> list[tuple[str, str]]:
    """The fixed held-out examples of `task` (`NUM_TEST` test, `NUM_VAL` validation)."""
    return examples(task, split, NUM_TEST if split == "test" else NUM_VAL, seed=1)


class TrainStream:
    """An endless, deterministic stream of training batches of one task."""

    def __init__(self, task: Task, batch_size: int, seed: int):
        self.task, self.batch_size = task, batch_size
        self.words = vocabulary(task.language)["train"]
        self.rng = np.random.default_rng(_seed(task.name, "train", seed))

    def next_batch(self) -> list[tuple[str, str]]:
        pairs = [make_example(self.task, self.words, self.rng) for _ in range(self.batch_size)]
        return [(prompt(self.task, text), answer + ANSWER_END) for text, answer in pairs]
