"""Labellers: who answers "which of these two clips is better?".

Every labeller takes :class:`Query` objects through ``submit`` and hands back :class:`Answer`
objects through ``collect``. The synthetic oracle answers at once; a human answers whenever she
gets to it, so the loop never assumes an answer arrives in order, or at all.

Answers are one of ``left``, ``right``, ``equal`` (each segment preferred with probability 1/2)
and ``cant_tell`` (recorded, then dropped from training, as in Christiano et al. 2017).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from palate.errors import PreferenceError
from palate.preferences.segments import Segment, SegmentPair

log = logging.getLogger(__name__)

#: Label -> probability that the left segment is preferred (None: dropped).
LABEL_MU: dict[str, float | None] = {"left": 1.0, "right": 0.0, "equal": 0.5, "cant_tell": None}


def label_to_mu(label: str, comparison_id: str = "") -> float | None:
    """mu of the paper's cross-entropy for ``label``; None for "can't tell"."""
    try:
        return LABEL_MU[label]
    except KeyError:
        where = f" (comparison {comparison_id!r})" if comparison_id else ""
        raise PreferenceError(f"unknown label {label!r}{where}; expected one of {sorted(LABEL_MU)}") from None


def new_comparison_id() -> str:
    """A globally unique comparison id, so labels from several runs can be pooled without clashes."""
    return uuid.uuid4().hex


@dataclass
class Query:
    """One comparison to be labelled."""

    id: str
    pair: SegmentPair
    created: float = field(default_factory=time.time)

    @classmethod
    def new(cls, pair: SegmentPair) -> Query:
        return cls(new_comparison_id(), pair)


@dataclass
class Answer:
    """A labeller's verdict on comparison ``id``."""

    id: str
    label: str
    labeller: str = "synthetic"
    time: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Labeller(Protocol):
    """Receives queries, returns answers whenever they are ready.

    ``asynchronous`` labellers (humans) are driven from a background thread by the loop, with a
    bounded queue of pending queries in front of them.
    """

    name: str
    asynchronous: bool

    def submit(self, queries: Sequence[Query]) -> None: ...

    def collect(self, timeout: float = 0.0) -> list[Answer]: ...

    def close(self) -> None: ...


class _RunningMoments:
    """Welford mean and variance, for the oracle's scale of segment returns."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: np.ndarray) -> None:
        for v in np.asarray(values, dtype=np.float64).reshape(-1):
            self.n += 1
            delta = v - self.mean
            self.mean += delta / self.n
            self.m2 += delta * (v - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 1.0


class SyntheticOracle:
    """Answers from the true reward, noisily, like a person would.

    P[left] = sigma((R1 - R2) / (std_R * temperature)), where R are the true segment returns and
    std_R is a running standard deviation of every segment return seen so far; then, with
    probability ``error_rate``, the answer is replaced by a fair coin (the paper's error model).

    Normalising by std_R is the point: a Boltzmann oracle applied to raw returns (as in the
    ``imitation`` library) is almost deterministic on MuJoCo, where returns differ by tens, and
    nearly random on a task whose rewards are tiny; here ``temperature`` means the same on every
    task: at 0.1, about 4% of answers on random pairs come out wrong, nearly all between clips of
    similar value.

    Args:
        temperature: Boltzmann temperature on normalised returns (0 gives exact answers).
        error_rate: probability of a uniformly random answer.
        rng: the random generator (seeded by the loop).
        equal_margin: answer ``equal`` when the normalised return gap is below this (0: never).
    """

    name = "synthetic"
    asynchronous = False

    def __init__(self, temperature: float = 0.1, error_rate: float = 0.1,
                 rng: np.random.Generator | None = None, equal_margin: float = 0.0) -> None:
        if temperature < 0:
            raise PreferenceError(f"oracle temperature must be >= 0, got {temperature}")
        if not 0.0 <= error_rate <= 1.0:
            raise PreferenceError(f"oracle error_rate must lie in [0, 1], got {error_rate}")
        self.temperature = float(temperature)
        self.error_rate = float(error_rate)
        self.equal_margin = float(equal_margin)
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.moments = _RunningMoments()
        self._ready: list[Answer] = []

    def preference_probability(self, left: Segment, right: Segment) -> float:
        """P[left preferred] before the error model, on the current return scale."""
        gap = (left.true_return - right.true_return) / max(self.moments.std, 1e-8)
        if self.temperature == 0:
            return 1.0 if gap > 0 else 0.0 if gap < 0 else 0.5
        return float(1.0 / (1.0 + math.exp(-np.clip(gap / self.temperature, -60, 60))))

    def label(self, pair: SegmentPair) -> str:
        """One answer for ``pair``."""
        if self.rng.random() < self.error_rate:
            return "left" if self.rng.random() < 0.5 else "right"
        gap = (pair.left.true_return - pair.right.true_return) / max(self.moments.std, 1e-8)
        if abs(gap) < self.equal_margin:
            return "equal"
        return "left" if self.rng.random() < self.preference_probability(pair.left, pair.right) else "right"

    def submit(self, queries: Sequence[Query]) -> None:
        # The scale includes the batch being labelled, so the very first batch has one too.
        self.moments.update(np.array([[q.pair.left.true_return, q.pair.right.true_return] for q in queries]))
        self._ready.extend(Answer(q.id, self.label(q.pair), self.name) for q in queries)

    def collect(self, timeout: float = 0.0) -> list[Answer]:
        ready, self._ready = self._ready, []
        return ready

    def close(self) -> None:
        self._ready = []

    def state_dict(self) -> dict[str, Any]:
        """The RNG and the running return scale: what a resumed run needs to answer as this one would."""
        return {"rng": self.rng.bit_generator.state,
                "moments": (self.moments.n, self.moments.mean, self.moments.m2)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.moments.n, self.moments.mean, self.moments.m2 = state["moments"]


# --------------------------------------------------------------------------- human labeller


@runtime_checkable
class FeedbackClient(Protocol):
    """What the human labeller uses of ``palate.feedback.client.FeedbackClient``."""

    def ensure_project(self, name: str, description: str = "") -> None: ...

    def upload_media(self, clip: bytes) -> str: ...

    def create_pair_tasks(self, project: str, pairs: list[dict[str, Any]], **common: Any) -> list[int]: ...

    def answers_since(self, project: str, cursor: int = 0, limit: int = 500) -> tuple[list[dict[str, Any]], int]: ...

    def find_tasks(self, project: str, external_ids: list[str]) -> dict[str, dict[str, Any]]: ...


#: Renders a segment to a playable clip (mp4, webm or gif bytes).
ClipRenderer = Callable[[Segment], bytes]


class HumanLabeller:
    """Sends rendered clip pairs to the feedback service and collects people's answers.

    ``submit`` renders both clips of each query, uploads them and creates one pair task per
    query, with the comparison id as the task's ``external_id`` (so a retried creation is not
    queued twice); ``collect`` reads the project's answers since its cursor. Answers already in
    the project when the labeller starts belong to earlier runs and are skipped; an answer that
    arrives later for a task this labeller never created raises :class:`PreferenceError` naming
    it (two runs must not share a project, or one would learn from the other's clips). A resumed
    run's labeller first takes back the tasks its previous process created (:meth:`adopt`).

    Args:
        client: a :class:`palate.feedback.client.FeedbackClient` (or anything with its methods).
        render: turns a segment into clip bytes (see :mod:`palate.preferences.render`).
        project: the feedback-service project the tasks go to (created if missing).
        prompt: the question shown with each pair.
        redundancy: people asked per comparison; each answer becomes its own label.
        poll_interval: seconds between polls while ``collect`` waits.
    """

    name = "human"
    asynchronous = True

    def __init__(self, client: FeedbackClient, render: ClipRenderer, project: str,
                 prompt: str = "Which clip shows the better behaviour?", redundancy: int = 1,
                 poll_interval: float = 2.0) -> None:
        self.client = client
        self.render = render
        self.project = project
        self.prompt = prompt
        self.redundancy = redundancy
        self.poll_interval = poll_interval
        self._task_to_query: dict[int, str] = {}
        # (task id, labeller) of answers a previous process already wrote to labels.jsonl.
        self._recorded: set[tuple[int, str]] = set()
        client.ensure_project(project, "palate preference learning: compare two clips")
        _, self._cursor = client.answers_since(project, 0)
        # Answers up to here were given before this labeller existed.
        self._start = self._cursor

    def submit(self, queries: Sequence[Query]) -> None:
        specs = []
        for q in queries:
            left = self.client.upload_media(self.render(q.pair.left))
            right = self.client.upload_media(self.render(q.pair.right))
            specs.append({"left": {"media": left, "id": f"{q.id}:left"},
                          "right": {"media": right, "id": f"{q.id}:right"},
                          "prompt": self.prompt, "external_id": q.id, "redundancy": self.redundancy})
        if not specs:
            return
        ids = self.client.create_pair_tasks(self.project, specs)
        for q, task_id in zip(queries, ids):
            self._task_to_query[int(task_id)] = q.id
            log.debug("comparison %s is task %s of project %s", q.id, task_id, self.project)

    def adopt(self, comparison_ids: Iterable[str], recorded: Iterable[tuple[int, str]] = ()) -> dict[str, int]:
        """Take over the tasks a previous process of this run created for ``comparison_ids``.

        A resumed run starts a new labeller; the tasks of the interrupted process are still in
        the service, open or answered while the run was down. This finds them by external id
        (the comparison id), so their answers are collected as this labeller's own, and
        rewinds the cursor so that answers given while the run was down are read too.
        ``recorded`` names the answers already in labels.jsonl as ``(task id, labeller)``;
        they are not handed out again, so every answer reaches the run exactly once.

        Returns ``{comparison_id: answers in the service}`` for the comparisons that may still
        bring answers: their task is open, or it has answers. Cancelled tasks without answers,
        and comparisons that never became tasks (the process died between saving and
        creating them), are left out.
        """
        ids = sorted(set(comparison_ids))
        found = self.client.find_tasks(self.project, ids) if ids else {}
        alive: dict[str, int] = {}
        for ext, task in found.items():
            self._task_to_query[int(task["id"])] = ext
            if task["status"] == "open" or int(task["n_answers"]) > 0:
                alive[ext] = int(task["n_answers"])
        self._recorded.update((int(t), str(who)) for t, who in recorded)
        self._cursor = 0
        log.info("adopted %d tasks of project %s from the interrupted run (%d may still bring answers)",
                 len(found), self.project, len(alive))
        return alive

    def collect(self, timeout: float = 0.0) -> list[Answer]:
        deadline = time.monotonic() + timeout
        while True:
            raw, self._cursor = self.client.answers_since(self.project, self._cursor)
            answers = [a for a in map(self._to_answer, raw) if a is not None]
            if answers or time.monotonic() >= deadline:
                return answers
            time.sleep(min(self.poll_interval, max(0.0, deadline - time.monotonic())))

    def _to_answer(self, raw: dict[str, Any]) -> Answer | None:
        task_id = int(raw["task_id"])
        comparison = self._task_to_query.get(task_id)
        if comparison is None and int(raw.get("id", self._start + 1)) <= self._start:
            return None  # given before this labeller started, to a task it did not adopt
        if comparison is None:
            raise PreferenceError(
                f"the feedback service returned a label for task {task_id} (comparison "
                f"{raw.get('external_id')!r}), which this run never created; give each run its own "
                f"project (this one is {self.project!r})"
            )
        if (task_id, str(raw.get("labeller"))) in self._recorded:
            return None  # written to labels.jsonl before the run was resumed
        label = str((raw.get("answer") or {}).get("choice"))
        label_to_mu(label, comparison)
        return Answer(comparison, label, self.name,
                      meta={"task_id": task_id, "labeller_id": raw.get("labeller"), "answer_id": raw.get("id"),
                            "duration_ms": raw.get("duration_ms")})

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if callable(close):
            close()
