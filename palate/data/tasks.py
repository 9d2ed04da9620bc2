"""Built-in language tasks: prompts shipped with palate and a panel of synthetic labellers.

Each task has prompts in train/validation/test splits (fixed in the shipped files) and a
:class:`LabellerPanel`: several labellers who weigh the same features differently and answer with
different amounts of noise, like InstructGPT's contractors. One labeller is *held out*: it never
labels training data, so a reward model's accuracy on its judgements measures generalisation to
a person it has not seen (Ouyang et al. 2022, section 5).

* ``sentiment``: continue a review or story opening (raw text, no chat template). Labellers care
  mostly about positive sentiment as scored by VADER (Ziegler et al. 2019's mock sentiment task),
  some also about repetition and a clean ending. ``reward_fn`` is VADER's compound score.
* ``instruct``: short instructions (chat template) with a checkable rubric: the requested length
  or format, mentioning what was asked, no repetition, ending cleanly.

A labeller's utility is a weighted sum of features in [-1, 1]; its choices follow the
Plackett-Luce model of that utility at its temperature (Gumbel noise), which is exactly the
Bradley-Terry model the reward model assumes, so a perfect reward model has a known accuracy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, Literal

import numpy as np

from palate.errors import DataError

Split = Literal["train", "validation", "test"]
Features = Callable[[str, str], dict[str, float]]
_SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class Labeller:
    """A synthetic labeller: ``utility = sum_f weight_f * feature_f(prompt, completion)``.

    ``temperature`` is the scale of the Gumbel noise added to utilities before ranking, so
    P[a preferred to b] = sigmoid((u_a - u_b) / temperature); 0 gives a noiseless labeller.
    """

    name: str
    weights: dict[str, float]
    temperature: float
    features: Features

    def score(self, prompt: str, completion: str) -> float:
        """The deterministic utility of ``completion`` for ``prompt``."""
        feats = self.features(prompt, completion)
        return float(sum(w * feats[k] for k, w in self.weights.items()))

    def _noisy(self, prompt: str, completions: Sequence[str], rng: np.random.Generator) -> np.ndarray:
        utilities = np.array([self.score(prompt, c) for c in completions], dtype=np.float64)
        if self.temperature > 0:
            utilities = utilities + self.temperature * rng.gumbel(size=len(completions))
        # Identical texts are indistinguishable to a person: they get the same noise, hence a tie.
        first: dict[str, int] = {}
        for i, c in enumerate(completions):
            j = first.setdefault(c, i)
            utilities[i] = utilities[j]
        return utilities

    def compare(self, prompt: str, completions: Sequence[str], rng: np.random.Generator) -> list[int]:
        """A ranking of ``completions``: the rank of each one, 0 = best; equal ranks are ties."""
        noisy = self._noisy(prompt, completions, rng)
        distinct = sorted(set(noisy.tolist()), reverse=True)
        rank_of = {v: r for r, v in enumerate(distinct)}
        return [rank_of[v] for v in noisy.tolist()]

    def best_of(self, prompt: str, completions: Sequence[str], rng: np.random.Generator) -> int:
        """Index of the preferred completion (Ziegler et al.'s best-of-K question)."""
        return int(np.argmax(self._noisy(prompt, completions, rng)))


@dataclasses.dataclass
class LabellerPanel:
    """Labellers of one task; ``held_out`` never labels training data."""

    labellers: list[Labeller]
    held_out_name: str

    @property
    def held_out(self) -> Labeller:
        return self.get(self.held_out_name)

    @property
    def train_labellers(self) -> list[Labeller]:
        return [lab for lab in self.labellers if lab.name != self.held_out_name]

    def get(self, name: str) -> Labeller:
        for lab in self.labellers:
            if lab.name == name:
                return lab
        raise DataError(f"no labeller '{name}' in this panel; choose one of {[lab.name for lab in self.labellers]}")


@dataclasses.dataclass
class Task:
    """A built-in task: prompts per split, a labeller panel and a programmatic reward."""

    name: str
    chat: bool
    max_new_tokens: int
    panel: LabellerPanel
    records: list[dict[str, Any]]
    reward: Callable[[str, str], float]
    description: str = ""

    def prompts(self, split: Split) -> list[str]:
        """The prompts of one split, in file order (fixed: the split is part of the shipped data)."""
        if split not in _SPLITS:
            raise DataError(f"unknown split '{split}'; use one of {list(_SPLITS)}")
        return [r["prompt"] for r in self.records if r["split"] == split]

    def reward_fn(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """A programmatic reward per completion (sentiment: VADER compound; instruct: the rubric)."""
        return [self.reward(p, c) for p, c in zip(prompts, completions, strict=True)]


# --------------------------------------------------------------------------- features


@functools.lru_cache(maxsize=1)
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_compound(text: str) -> float:
    """VADER's compound sentiment in [-1, 1] (Hutto & Gilbert 2014), Ziegler's mock reward."""
    return float(_vader().polarity_scores(text)["compound"])


_WORD = re.compile(r"[A-Za-z0-9']+")


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def repetition(text: str, n: int = 3) -> float:
    """Fraction of repeated word n-grams, in [0, 1]: 0 = every n-gram distinct."""
    words = _words(text)
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def ends_cleanly(text: str) -> float:
    """1 when the text ends like a finished sentence or list item, 0 when it stops mid-phrase."""
    stripped = text.rstrip()
    if not stripped:
        return 0.0
    return 1.0 if stripped[-1] in ".!?\"')" else 0.0


def _sentences(text: str) -> int:
    return len([s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if _WORD.search(s)])


def _list_items(text: str) -> int:
    lines = [ln.strip() for ln in text.strip().splitlines() if _WORD.search(ln)]
    return len(lines)


def _closeness(actual: int, wanted: int) -> float:
    """1 at the requested count, falling by half per item off, never below 0."""
    return max(0.0, 1.0 - 0.5 * abs(actual - wanted))


def format_score(spec: dict[str, Any] | None, completion: str) -> float:
    """How well ``completion`` follows the requested length/format, in [0, 1]."""
    if not spec:
        return 1.0 if 1 <= len(_words(completion)) <= 80 else 0.0
    kind, n = spec["kind"], int(spec["n"])
    if kind == "sentences":
        return _closeness(_sentences(completion), n)
    if kind == "list":
        return _closeness(_list_items(completion), n)
    if kind == "max_words":
        count = len(_words(completion))
        if count == 0:
            return 0.0
        return 1.0 if count <= n else max(0.0, 1.0 - (count - n) / max(n, 4))
    raise DataError(f"unknown format kind '{kind}' in an instruct prompt; use sentences, list or max_words")


def mentions(keywords: Sequence[str], completion: str) -> float:
    """Fraction of the asked-about keywords (prefixes, case-insensitive) the completion mentions."""
    if not keywords:
        return 1.0
    words = _words(completion)
    hits = sum(any(w.startswith(k.lower()) for w in words) for k in keywords)
    return hits / len(keywords)


def _guess_keywords(prompt: str) -> list[str]:
    stop = {"write", "about", "the", "a", "an", "in", "one", "two", "three", "four", "five", "sentence",
            "sentences", "list", "name", "give", "short", "describe", "answer", "word", "words", "what",
            "which", "with", "and", "for", "of", "to", "is", "are", "at", "most", "per", "line", "why"}
    return [w for w in _words(prompt) if w not in stop and len(w) > 3][:3]


# --------------------------------------------------------------------------- tasks


def _read_records(name: str) -> list[dict[str, Any]]:
    path = resources.files("palate.data") / "tasks" / f"{name}.jsonl"
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec.get("split") not in _SPLITS or not isinstance(rec.get("prompt"), str):
            raise DataError(f"{path}:{i}: shipped task record needs 'prompt' and 'split'; reinstall palate")
        records.append(rec)
    return records


def _sentiment_task() -> Task:
    def features(prompt: str, completion: str) -> dict[str, float]:
        return {
            "sentiment": vader_compound(completion),
            "repetition": -repetition(completion),
            "clean_end": ends_cleanly(completion) - 0.5,
            "length": min(len(_words(completion)), 20) / 20.0,
        }

    panel = LabellerPanel(
        labellers=[
            Labeller("optimist", {"sentiment": 1.0, "repetition": 0.2}, 0.15, features),
            Labeller("editor", {"sentiment": 0.8, "repetition": 0.5, "clean_end": 0.2}, 0.2, features),
            Labeller("hurried", {"sentiment": 1.0, "length": 0.1}, 0.35, features),
            Labeller("careful", {"sentiment": 1.0, "repetition": 0.3, "clean_end": 0.1}, 0.1, features),
            Labeller("held_out", {"sentiment": 0.9, "repetition": 0.4, "clean_end": 0.15}, 0.2, features),
        ],
        held_out_name="held_out",
    )
    return Task(
        name="sentiment", chat=False, max_new_tokens=24, panel=panel, records=_read_records("sentiment"),
        reward=lambda p, c: vader_compound(c),
        description="continue a review or story opening positively (Ziegler et al. 2019's mock sentiment task)",
    )


def _instruct_task() -> Task:
    records = _read_records("instruct")
    specs = {r["prompt"]: r for r in records}

    def features(prompt: str, completion: str) -> dict[str, float]:
        rec = specs.get(prompt, {})
        keywords = rec.get("keywords") or _guess_keywords(prompt)
        return {
            "format": format_score(rec.get("format"), completion),
            "mentions": mentions(keywords, completion),
            "repetition": -repetition(completion),
            "clean_end": ends_cleanly(completion),
        }

    rubric = {"format": 1.0, "mentions": 1.0, "repetition": 1.0, "clean_end": 1.0}
    panel = LabellerPanel(
        labellers=[
            Labeller("stickler", {"format": 1.0, "mentions": 0.5, "repetition": 0.5, "clean_end": 0.3}, 0.15, features),
            Labeller("topical", {"format": 0.5, "mentions": 1.0, "repetition": 0.5, "clean_end": 0.3}, 0.2, features),
            Labeller("stylist", {"format": 0.6, "mentions": 0.6, "repetition": 1.0, "clean_end": 0.6}, 0.25, features),
            Labeller("balanced", {"format": 0.8, "mentions": 0.8, "repetition": 0.6, "clean_end": 0.4}, 0.2, features),
            Labeller("held_out", {"format": 0.9, "mentions": 0.7, "repetition": 0.7, "clean_end": 0.5}, 0.2, features),
        ],
        held_out_name="held_out",
    )

    def reward(prompt: str, completion: str) -> float:
        feats = features(prompt, completion)
        return sum(w * feats[k] for k, w in rubric.items()) / len(rubric)

    return Task(
        name="instruct", chat=True, max_new_tokens=64, panel=panel, records=records, reward=reward,
        description="short instructions with a rubric: length/format, mentions what was asked, "
        "no repetition, ends cleanly",
    )


_TASKS: dict[str, Callable[[], Task]] = {"sentiment": _sentiment_task, "instruct": _instruct_task}


def task_names() -> list[str]:
    """Names accepted by :func:`load_task`."""
    return sorted(_TASKS)


def load_task(name: str) -> Task:
    """A built-in task by name (``sentiment`` or ``instruct``)."""
    if name not in _TASKS:
        raise DataError(f"unknown task '{name}'; built-in tasks are {task_names()}")
    return _TASKS[name]()
