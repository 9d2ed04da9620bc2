"""People rank language-model outputs through the feedback service (``palate lm label --labeller human``).

InstructGPT's comparisons came from people ranking K samples of one prompt; Ziegler et al.'s from
people picking the best of four. This module is the language-model side of that loop:
:class:`RankingQueue` posts ``rank`` tasks (``mode: rank`` or ``best``) to a project of the
feedback service and writes every answer to a comparisons JSONL, in the format
``palate lm rm`` reads, the moment it is read back.

Nothing a person did may be lost or counted twice when the labelling process stops (Ctrl-C,
kill -9, a machine reboot) and is started again:

* **Tasks are asked once.** Each comparison's ``external_id`` is derived from the run, the
  prompt's index and a hash of the prompt and its completions. The comparison is written to a
  manifest (``<out>.tasks.json``, atomically) *before* the task is created, so a restart knows
  every comparison that may exist in the service, and the service refuses a second task with the
  same ``external_id`` (409): a restart that asks again creates nothing.
* **Answers are written once.** Every line of the JSONL carries the service's ``answer_id``. A
  restart reads the project's answers from the beginning and skips those already in the file, so
  answers given while nothing was running are picked up and none is repeated. The file is
  rewritten atomically after each batch of answers, so a crash leaves the previous file.

With redundancy n > 1 every person's answer is its own line, ``labeller`` naming who answered;
:func:`agreement` measures how often two people order the same pair the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from palate.data.formats import Comparison, read_comparisons, write_comparisons
from palate.errors import ConfigError, FeedbackError
from palate.runs import atomic_write_json

log = logging.getLogger(__name__)

Mode = Literal["rank", "best"]
_MANIFEST_VERSION = 1
#: Tasks per creation request: keeps each request body far below the service's size limit.
_CREATE_BATCH = 64
#: Seconds between checks for tasks an admin cancelled (they will never be answered).
_CANCEL_CHECK_S = 30.0


class RankClient(Protocol):
    """What the queue uses of :class:`palate.feedback.client.FeedbackClient`."""

    def ensure_project(self, name: str, description: str = "") -> None: ...

    def create_tasks(self, project: str, tasks: list[dict[str, Any]]) -> list[int]: ...

    def answers_since(self, project: str, cursor: int = 0, limit: int = 500) -> tuple[list[dict[str, Any]], int]: ...

    def task_status(self, project: str, task_ids: list[int]) -> dict[int, dict[str, Any]]: ...


def comparison_id(run: str, index: int | str, prompt: str, completions: Sequence[str]) -> str:
    """The ``external_id`` of one comparison: run, index and a hash of what people are shown.

    The hash makes an id name its content: a restarted or resumed process that samples different
    completions for the same index asks a new question instead of adopting answers to texts it
    never saw.
    """
    digest = hashlib.sha256("\0".join([prompt, *completions]).encode()).hexdigest()[:12]
    return f"{run}:{index}:{digest}"


def manifest_path(out: str | os.PathLike[str]) -> Path:
    """Where the comparisons behind ``out``'s tasks are kept: ``<out without suffix>.tasks.json``."""
    return Path(out).with_suffix(".tasks.json")


def feedback_client(url: str, token_env: str) -> Any:
    """A :class:`~palate.feedback.client.FeedbackClient` with the admin token from ``$token_env``."""
    from palate.feedback.client import client_from_env

    return client_from_env(url, token_env, "the human labeller")


class RankingQueue:
    """Rank tasks in one feedback project and their answers in one comparisons JSONL, resumable.

    Args:
        client: a feedback client holding an admin token (see :func:`feedback_client`).
        project: the feedback project (created if missing; needs an all-projects admin token then).
        out: the comparisons JSONL answers are written to (read back on start).
        mode: ``rank`` (order all K, InstructGPT) or ``best`` (pick one, Ziegler et al.).
        redundancy: people asked per comparison; each answer becomes its own line.
        manifest: the task manifest (default :func:`manifest_path` of ``out``).
    """

    def __init__(self, client: RankClient, project: str, out: str | os.PathLike[str], *, mode: Mode = "rank",
                 redundancy: int = 1, manifest: str | os.PathLike[str] | None = None) -> None:
        if mode not in ("rank", "best"):
            raise ConfigError(f"mode must be 'rank' or 'best', got {mode!r}")
        if redundancy < 1:
            raise ConfigError(f"redundancy must be >= 1 (people per comparison), got {redundancy}")
        self.client, self.project, self.mode, self.redundancy = client, project, mode, redundancy
        self.out = Path(out)
        self.manifest = Path(manifest) if manifest is not None else manifest_path(out)
        self.tasks: dict[str, dict[str, Any]] = {}
        if self.manifest.is_file():
            self._load_manifest()
        self.comparisons: list[Comparison] = (
            read_comparisons(self.out) if self.out.is_file() and self.out.stat().st_size else [])
        self._written = {int(c.meta["answer_id"]) for c in self.comparisons if "answer_id" in c.meta}
        self.n_answers: Counter[str] = Counter()  # external id -> answers seen (ties and can't-tell included)
        self.cancelled: set[str] = set()
        self.foreign = 0  # answers in the project to tasks this queue never asked
        self.tied = 0
        self.cant_tell = 0  # answers "can't tell": counted as answered, nothing to learn
        self._cursor = 0  # every start reads the project from its first answer: see the module doc
        self._last_cancel_check = time.monotonic()
        self.cancel_check_s = _CANCEL_CHECK_S
        client.ensure_project(project, "palate: people rank language-model completions")

    # -- the manifest --------------------------------------------------------------------------

    def _load_manifest(self) -> None:
        data = json.loads(self.manifest.read_text())
        if data.get("version") != _MANIFEST_VERSION:
            raise ConfigError(f"{self.manifest}: unknown task manifest version {data.get('version')!r}")
        for key, want in (("project", self.project), ("mode", self.mode), ("redundancy", self.redundancy)):
            if data.get(key) != want:
                raise ConfigError(
                    f"{self.manifest} holds tasks asked with {key}={data.get(key)!r}, not {want!r}; keep "
                    f"{key}={data.get(key)!r} to go on with them, or write to another output file (a new round)")
        self.tasks = {t["external_id"]: t for t in data["tasks"]}

    def _save_manifest(self) -> None:
        atomic_write_json(self.manifest, {"version": _MANIFEST_VERSION, "project": self.project, "mode": self.mode,
                                          "redundancy": self.redundancy, "tasks": list(self.tasks.values())})

    # -- asking --------------------------------------------------------------------------------

    def submit(self, items: Sequence[tuple[str, str, Sequence[str]]], *, priority: int = 0,
               metadata: dict[str, Any] | None = None, extras: Sequence[dict[str, Any]] | None = None) -> int:
        """Ask people about ``(external_id, prompt, completions)`` items; returns how many tasks were created.

        Items already in the manifest are not asked again; those whose creation was cut short by a
        crash are created now (the service answers 409 for any that did reach it). ``extras`` (one
        dict per item) are kept in the manifest beside each comparison.
        """
        new = [(e, p, list(c), x) for (e, p, c), x in zip(items, extras or [{}] * len(items)) if e not in self.tasks]
        for ext, prompt, comps, extra in new:
            self.tasks[ext] = {"external_id": ext, "prompt": prompt, "completions": comps,
                               "created": False, "task_id": None, **extra}
        if new:
            self._save_manifest()  # before the service sees them: any answer can be attributed
        pending = [t for t in self.tasks.values() if not t["created"]]
        if not pending:
            return 0
        created = 0
        for start in range(0, len(pending), _CREATE_BATCH):
            created += self._create(pending[start:start + _CREATE_BATCH], priority, metadata or {})
            self._save_manifest()
        log.info("asked %d new comparisons in project %s (%d in all)", created, self.project, len(self.tasks))
        return created

    def _create(self, pending: list[dict[str, Any]], priority: int, metadata: dict[str, Any]) -> int:
        """Create one batch of tasks; a 409 (some exist already) falls back to one at a time."""
        specs = [{"kind": "rank", "prompt": t["prompt"], "completions": t["completions"], "mode": self.mode,
                  "redundancy": self.redundancy, "priority": priority, "external_id": t["external_id"],
                  "metadata": dict(metadata)} for t in pending]
        try:
            ids = self.client.create_tasks(self.project, specs)
        except FeedbackError as err:
            if getattr(err, "status", None) != 409:
                raise
        else:
            for t, tid in zip(pending, ids):
                t["created"], t["task_id"] = True, int(tid)
            return len(ids)
        # Some of them exist (a crash after the service committed): create the rest one by one.
        created = 0
        for t, spec in zip(pending, specs):
            try:
                t["task_id"] = int(self.client.create_tasks(self.project, [spec])[0])
                created += 1
            except FeedbackError as one:
                if getattr(one, "status", None) != 409:
                    raise
            t["created"] = True
        return created

    # -- answers -------------------------------------------------------------------------------

    def _to_comparison(self, raw: dict[str, Any], task: dict[str, Any]) -> Comparison | None:
        answer = raw.get("answer") or {}
        meta = {"comparison_id": task["external_id"], "answer_id": int(raw["id"]), "task_id": int(raw["task_id"]),
                "duration_ms": raw.get("duration_ms")}
        comps = list(task["completions"])
        who = str(raw.get("labeller"))
        if answer.get("cant_tell"):
            self.cant_tell += 1
            log.info("%s could not tell the completions of comparison %s apart: not written", who,
                     task["external_id"])
            return None
        if "best" in answer:
            best = int(answer["best"])
            return Comparison(task["prompt"], comps, [0 if i == best else 1 for i in range(len(comps))],
                              "best_of_k", best=best, labeller=who, meta=meta)
        ranks = [int(r) for r in answer["ranking"]]
        if len(set(ranks)) < 2:
            self.tied += 1
            log.warning("%s tied every completion of comparison %s: nothing to learn, not written", who,
                        task["external_id"])
            return None
        return Comparison(task["prompt"], comps, ranks, "ranking", labeller=who, meta=meta)

    def poll(self) -> list[Comparison]:
        """Read the answers given since the last call; write the new ones to ``out``; return them."""
        raw, self._cursor = self.client.answers_since(self.project, self._cursor)
        new: list[Comparison] = []
        for a in raw:
            task = self.tasks.get(str(a.get("external_id")))
            if task is None:
                self.foreign += 1
                if self.foreign == 1:
                    log.info("project %s holds answers to tasks this run did not ask (e.g. %s); they are left out",
                             self.project, a.get("external_id"))
                continue
            task["task_id"] = int(a["task_id"])
            self.n_answers[task["external_id"]] += 1
            if int(a["id"]) in self._written:
                continue
            comp = self._to_comparison(a, task)
            if comp is not None:
                new.append(comp)
                self._written.add(int(a["id"]))
        if new:
            self.comparisons.extend(new)
            write_comparisons(self.out, self.comparisons)
        self._check_cancelled()
        return new

    def _check_cancelled(self) -> None:
        """Count tasks an admin cancelled as finished, or a wait for all answers would never end."""
        if time.monotonic() - self._last_cancel_check < self.cancel_check_s:
            return
        self._last_cancel_check = time.monotonic()
        ids = {int(t["task_id"]): e for e, t in self.tasks.items()
               if t.get("task_id") is not None and e not in self.cancelled and not self._answered(e)}
        if not ids:
            return
        for tid, st in self.client.task_status(self.project, list(ids)).items():
            if st.get("status") == "cancelled":
                self.cancelled.add(ids[tid])
                log.info("comparison %s (task %d) was cancelled in the service", ids[tid], tid)

    def _answered(self, ext: str) -> bool:
        return self.n_answers[ext] >= self.redundancy

    @property
    def expected(self) -> int:
        """Answers still to come plus those received: redundancy per comparison not cancelled."""
        return sum(min(self.n_answers[e], self.redundancy) if e in self.cancelled else self.redundancy
                   for e in self.tasks)

    @property
    def received(self) -> int:
        return sum(min(n, self.redundancy) for e, n in self.n_answers.items() if e in self.tasks)

    @property
    def open_tasks(self) -> int:
        """Comparisons still waiting for someone."""
        return sum(1 for e in self.tasks if not self._answered(e) and e not in self.cancelled)

    def wait(self, timeout_s: float = 0.0, poll_s: float = 2.0, progress: bool = True) -> bool:
        """Poll until every comparison has its answers (True) or ``timeout_s`` passes (False; 0: no limit)."""
        from tqdm.auto import tqdm

        deadline = time.monotonic() + timeout_s if timeout_s > 0 else float("inf")
        self.poll()
        bar = tqdm(total=self.expected, initial=self.received, desc="answers", unit="answer", disable=not progress)
        try:
            while True:
                bar.total, bar.n = self.expected, self.received
                bar.set_postfix(queue=self.open_tasks, refresh=False)
                bar.refresh()
                if self.open_tasks == 0:
                    return True
                if time.monotonic() >= deadline:
                    return False
                time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))
                self.poll()
        finally:
            bar.close()


# --------------------------------------------------------------------------- palate lm label --labeller human


def label_with_people(cfg: Any) -> Path:
    """``palate lm label --labeller human``: ask people to rank K samples per prompt; wait for them.

    ``cfg`` is a :class:`palate.lm.demos.LabelConfig`. Completions are sampled only for prompts
    the manifest does not hold yet, so a restart neither resamples nor asks again.
    """
    from palate.data.tasks import load_task
    from palate.lm.demos import _candidates

    if not cfg.feedback_project:
        raise ConfigError("label: the human labeller needs --feedback-project NAME (the feedback project to fill)")
    client = feedback_client(cfg.feedback_url, cfg.feedback_token_env)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per poll would bury the progress bar
    queue = RankingQueue(client, cfg.feedback_project, cfg.out, mode=cfg.mode, redundancy=cfg.redundancy)
    prompts = load_task(cfg.task).prompts(cfg.split)
    n = min(cfg.limit, len(prompts)) if cfg.limit else len(prompts)
    run = cfg.feedback_run or f"{cfg.task}-{cfg.split}-s{cfg.seed}"
    other_k = sorted({len(t["completions"]) for t in queue.tasks.values()} - {cfg.k})
    if other_k:
        raise ConfigError(f"label: {queue.manifest} holds comparisons of k={other_k[0]} completions, not --k {cfg.k}; "
                          f"keep --k {other_k[0]} to go on with them, or write to another --out (a new round)")
    asked = {t.get("prompt_index") for t in queue.tasks.values()}
    if any(i not in asked for i in range(n)):
        _task, prompts, grouped = _candidates(cfg.model, cfg.cache_dir, cfg.task, cfg.split, n, cfg.k,
                                              cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size,
                                              cfg.seed)
        todo = [i for i in range(n) if i not in asked]
        items = [(comparison_id(run, i, prompts[i], grouped[i]), prompts[i], grouped[i]) for i in todo]
        queue.submit(items, metadata={"run": run, "task": cfg.task, "split": cfg.split},
                     extras=[{"prompt_index": i} for i in todo])
    else:
        queue.submit([])  # finish creations a crash cut short
    try:
        done = queue.wait(cfg.label_wait_s, cfg.poll_s, progress=True)
    except KeyboardInterrupt:
        log.warning("stopped: %d of %d answers are in %s; run the same command again to go on (no task is asked "
                    "twice, answers given meanwhile are picked up)", queue.received, queue.expected, cfg.out)
        raise
    finally:
        close = getattr(client, "close", None)
        if callable(close):
            close()
    if not done:
        raise FeedbackError(
            f"label: {queue.received} of {queue.expected} answers arrived within label_wait_s={cfg.label_wait_s:g} s "
            f"(written to {cfg.out}); the {queue.open_tasks} open comparisons stay queued in feedback project "
            f"{cfg.feedback_project!r}. Run the same command again to keep waiting and pick up the answers given "
            "meanwhile (no task is asked twice), or raise label_wait_s (0: no limit)")
    if not queue.comparisons:
        raise FeedbackError(f"label: no usable answer arrived in project {cfg.feedback_project!r} (tied, can't-tell or cancelled "
                            "tasks only); nothing to train on")
    log.info("%d answers from %d people written to %s", len(queue.comparisons),
             len({c.labeller for c in queue.comparisons}), cfg.out)
    return Path(cfg.out)


# --------------------------------------------------------------------------- online collection with people


class PeopleRanking:
    """People as the online labeller of PPO (``online_labeller: human``): ask now, learn when they answer.

    Unlike the synthetic panel, people answer minutes later, so :meth:`ask` only posts the round's
    comparisons and :meth:`arrived` returns whatever answers came in since the last call (from any
    earlier round); PPO goes on meanwhile. Answers are written to ``<run>/online_human.jsonl`` as
    they are read, so a resumed run still learns from those given while it was down.
    """

    name = "human"
    asynchronous = True

    def __init__(self, client: RankClient, project: str, run_dir: str | os.PathLike[str], *, run: str,
                 redundancy: int = 1, mode: Mode = "rank") -> None:
        self.run = run
        self.queue = RankingQueue(client, project, Path(run_dir) / "online_human.jsonl", mode=mode,
                                  redundancy=redundancy)
        self.delivered: set[int] = set()

    def ask(self, iteration: int, prompts: Sequence[str], groups: Sequence[Sequence[str]]) -> int:
        """Post one round's comparisons; returns how many tasks were created."""
        items = [(comparison_id(f"{self.run}:it{iteration}", j, p, c), p, c)
                 for j, (p, c) in enumerate(zip(prompts, groups)) if len(set(c)) > 1]
        return self.queue.submit(items, metadata={"run": self.run, "iteration": iteration})

    def arrived(self) -> list[Comparison]:
        """Answers not handed out before (those read by an earlier process of this run included)."""
        self.queue.poll()
        out = [c for c in self.queue.comparisons if int(c.meta["answer_id"]) not in self.delivered]
        self.delivered.update(int(c.meta["answer_id"]) for c in out)
        return out

    @property
    def pending(self) -> int:
        return self.queue.open_tasks

    def close(self) -> None:
        close = getattr(self.queue.client, "close", None)
        if callable(close):
            close()


# --------------------------------------------------------------------------- agreement between people


def agreement(comparisons: Sequence[Comparison]) -> dict[str, Any]:
    """Redundancy and inter-labeller agreement of comparisons answered by several people.

    Comparisons are grouped by ``comparison_id`` (the task); for every two people who answered
    the same task, every pair of completions both of them ordered strictly counts as agreeing when
    they ordered it the same way. 0.5 is what two people answering at random would reach.
    """
    by_task: dict[str, list[Comparison]] = defaultdict(list)
    for c in comparisons:
        key = c.meta.get("comparison_id")
        if key is not None:
            by_task[str(key)].append(c)
    agree = pairs = 0
    for answers in by_task.values():
        for a in range(len(answers)):
            for b in range(a + 1, len(answers)):
                ra, rb = answers[a].ranks, answers[b].ranks
                for i in range(len(ra)):
                    for j in range(i + 1, len(ra)):
                        if ra[i] == ra[j] or rb[i] == rb[j]:
                            continue
                        pairs += 1
                        agree += int((ra[i] < ra[j]) == (rb[i] < rb[j]))
    counts = Counter(len(v) for v in by_task.values())
    return {"comparisons": len(by_task), "answers": sum(len(v) for v in by_task.values()),
            "labellers": dict(Counter(str(c.labeller) for v in by_task.values() for c in v)),
            "answers_per_comparison": dict(sorted(counts.items())),
            "agreement": agree / pairs if pairs else None, "agreement_pairs": pairs}


def people_report_lines(sources: dict[str, Path]) -> list[str]:
    """The report's section on people's answers (``{what: comparisons JSONL}``); empty when none came from people."""
    rows = []
    for what, path in sources.items():
        if not path.is_file() or not path.stat().st_size:
            continue
        answers = [c for c in read_comparisons(path) if "answer_id" in c.meta]
        if not answers:
            continue
        s = agreement(answers)
        spread = ", ".join(f"{n} people: {m}" for n, m in s["answers_per_comparison"].items())
        who = ", ".join(f"{name} {n}" for name, n in sorted(s["labellers"].items()))
        agree = f"{s['agreement']:.3f} over {s['agreement_pairs']} pairs" if s["agreement"] is not None else "n/a"
        rows.append(f"| {what} | {s['comparisons']} | {s['answers']} ({spread}) | {who} | {agree} |")
    if not rows:
        return []
    return ["## People's labels", "",
            "Agreement: of the completion pairs two people both ordered (same task), the share they ordered the "
            "same way; 0.5 is chance. n/a: no task was answered by two people.", "",
            "| data | comparisons | answers (redundancy) | answers per person | agreement |", "|---|---|---|---|---|",
            *rows, ""]
