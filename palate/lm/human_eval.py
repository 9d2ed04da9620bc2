"""People judge a policy against its SFT model: blind pair tasks in the feedback service.

``palate lm eval RUN --judge human`` first runs the usual evaluation (samples of both models on
the test prompts, the held-out labeller's verdicts, KL, reward, perplexity), then posts each
(policy, SFT) pair of completions to the feedback service as a ``pair`` task and waits for
people's answers. The evaluation is blind:

* Which side shows the policy is drawn per pair from ``cfg.seed`` and recorded only on palate's
  side, in ``<out>/human_pairs.json``; the task carries the prompt and the two texts, no item ids
  and no metadata (the service never shows external ids or metadata to labellers anyway).
* The external id of a task (unique per project) is built from the run, the prompt index, the
  sample index and a digest of what the page shows, so it says nothing about the sides either.

It is also restartable: the external ids and the pair file make a second run of the same command
create no task twice, and every answer ever given to these tasks is read back from the start of
the project's answer log, so answers given while nothing was waiting are counted.

People's win rate counts "equally good" as one half (as the labeller's does) and leaves "can't
tell" out: it says nothing about which completion is better. With ``judge_redundancy`` n > 1 the
answers to one pair are averaged first, so the standard error is over pairs, the unit that was
sampled, not over correlated answers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from palate.errors import ConfigError, DataError, FeedbackError
from palate.lm.config import EvalConfig
from palate.runs import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["PAIRS_FILE", "ANSWERS_FILE", "run_label", "blind_pairs", "unblind", "summarise", "post_pairs",
           "collect_answers", "evaluate_with_people"]

#: The palate-side record of the pairs: texts, which side is the policy, task ids. Never sent.
PAIRS_FILE = "human_pairs.json"
#: Every answer people gave to this evaluation's tasks, un-blinded (rewritten whole, atomically).
ANSWERS_FILE = "human_answers.jsonl"
#: EvalConfig fields that decide which pairs are shown: a pair file made under other values is refused.
_PAIR_FIELDS = ("run", "reference", "task", "split", "n_prompts", "samples_per_prompt", "max_new_tokens",
                "temperature", "seed", "judge_redundancy")
#: Tasks per creation request, so a long evaluation stays far below the service's request-size limit.
_POST_CHUNK = 50
_VERDICT = {"left": "policy", "right": "reference", "equal": "tie", "cant_tell": "cant_tell"}


def run_label(run: str | Path) -> str:
    """The run's name in external ids and the default project: its last two path components."""
    parts = Path(run).resolve().parts[-2:]
    return "/".join(parts)[-100:]


def _external_id(label: str, prompt_index: int, sample_index: int, prompt: str, left: str, right: str) -> str:
    # The digest makes an id name exactly what the page shows: a pair file lost and rebuilt with
    # other texts or another order can never be credited with answers given to the old task.
    digest = hashlib.sha256(json.dumps([prompt, left, right]).encode()).hexdigest()[:16]
    return f"palate-lm-eval:{label}:p{prompt_index}:s{sample_index}:{digest}"


def blind_pairs(samples: Sequence[dict[str, Any]], samples_per_prompt: int, seed: int,
                label: str) -> list[dict[str, Any]]:
    """One blind pair per evaluation sample, the policy's side drawn from ``seed``.

    ``samples`` are ``samples.jsonl`` rows of :func:`palate.lm.evaluate.evaluate_models`, in its
    order: prompt after prompt, ``samples_per_prompt`` rows each.
    """
    if len(samples) % samples_per_prompt:
        raise DataError(f"{len(samples)} evaluation samples are not a whole number of prompts x "
                        f"{samples_per_prompt} samples each; rerun palate lm eval into an empty --out")
    # A stream of its own (the second key word), apart from the sampling that ``seed`` also seeds.
    policy_left = np.random.default_rng([seed, 0x6A75]).random(len(samples)) < 0.5
    pairs = []
    for i, (s, on_left) in enumerate(zip(samples, policy_left, strict=True)):
        left, right = (s["policy"], s["reference"]) if on_left else (s["reference"], s["policy"])
        p, k = divmod(i, samples_per_prompt)
        pairs.append({"external_id": _external_id(label, p, k, s["prompt"], left, right),
                      "prompt_index": p, "sample_index": k, "prompt": s["prompt"], "left": left, "right": right,
                      "policy_side": "left" if on_left else "right",
                      "held_out_prefers": s.get("held_out_prefers"), "posted": False, "task_id": None})
    return pairs


def unblind(choice: str, policy_side: str) -> str:
    """A pair answer in the policy's terms: ``policy``, ``reference``, ``tie`` or ``cant_tell``."""
    verdict = _VERDICT[choice]
    if policy_side == "right" and verdict in ("policy", "reference"):
        verdict = "reference" if verdict == "policy" else "policy"
    return verdict


def summarise(pairs: Sequence[dict[str, Any]], answers: Sequence[dict[str, Any]], redundancy: int,
              cancelled: int = 0) -> dict[str, Any]:
    """The ``human`` block of ``summary.json`` from the pairs and their un-blinded answers.

    ``answers`` carry ``external_id``, ``verdict`` (see :func:`unblind`), ``labeller`` and
    ``duration_ms``.
    """
    by_pair: dict[str, list[dict[str, Any]]] = {p["external_id"]: [] for p in pairs}
    for a in answers:
        by_pair[a["external_id"]].append(a)
    counts = Counter(a["verdict"] for a in answers)
    value = {"policy": 1.0, "reference": 0.0, "tie": 0.5}
    pair_means = [float(np.mean(v)) for v in
                  ([value[a["verdict"]] for a in got if a["verdict"] in value] for got in by_pair.values()) if v]
    n = len(pair_means)
    held = {p["external_id"]: p.get("held_out_prefers") for p in pairs}
    decided = [(a["verdict"], held[a["external_id"]]) for a in answers
               if a["verdict"] in ("policy", "reference") and held[a["external_id"]] in ("policy", "reference")]
    judges = Counter(str(a["labeller"]) for a in answers)
    durations = [a["duration_ms"] for a in answers if a.get("duration_ms") is not None]
    done = sum(len(v) >= redundancy for v in by_pair.values())
    return {
        "win_rate": float(np.mean(pair_means)) if n else float("nan"),
        "win_rate_stderr": float(np.std(pair_means) / np.sqrt(n)) if n > 1 else float("nan"),
        "n_pairs_judged": n,
        "n_answers": len(answers),
        "wins": counts["policy"],
        "losses": counts["reference"],
        "ties": counts["tie"],
        "cant_tell": counts["cant_tell"],
        "n_judges": len(judges),
        "judges": dict(sorted(judges.items())),
        "redundancy": redundancy,
        "n_pairs": len(pairs),
        "pairs_done": done,
        "pairs_open": len(pairs) - done - cancelled,
        "pairs_cancelled": cancelled,
        "complete": done + cancelled == len(pairs),
        "policy_left_fraction": float(np.mean([p["policy_side"] == "left" for p in pairs])) if pairs else float("nan"),
        "agreement_with_held_out": float(np.mean([v == h for v, h in decided])) if decided else None,
        "median_answer_s": float(np.median(durations) / 1000.0) if durations else None,
    }


def _task_spec(pair: dict[str, Any], redundancy: int) -> dict[str, Any]:
    # Nothing but what a judge must see: no item ids and no metadata, which could name a model.
    return {"kind": "pair", "prompt": pair["prompt"], "left": {"text": pair["left"]},
            "right": {"text": pair["right"]}, "external_id": pair["external_id"], "redundancy": redundancy}


def post_pairs(client: Any, project: str, pairs: list[dict[str, Any]], redundancy: int,
               save: Callable[[], None]) -> int:
    """Create the tasks of the pairs not yet posted; returns how many were created now.

    ``save`` is called after each request, so the pair file knows what exists. A pair whose task
    already exists (a run killed between creating it and saving) is refused by the service with
    409; it is then marked posted without a task id, and its answers are still found by external id.
    """
    known = [p["task_id"] for p in pairs if p["posted"] and p["task_id"] is not None]
    status = client.task_status(project, known) if known else {}
    for p in pairs:
        if p["posted"] and p["task_id"] is not None and p["task_id"] not in status:
            # Not in this service's project (another database, say): post it again.
            p["posted"], p["task_id"] = False, None
    created = 0
    todo = [p for p in pairs if not p["posted"]]
    for start in range(0, len(todo), _POST_CHUNK):
        chunk = todo[start:start + _POST_CHUNK]
        try:
            ids: list[int | None] = list(client.create_tasks(project, [_task_spec(p, redundancy) for p in chunk]))
            created += len(chunk)
        except FeedbackError as err:
            if getattr(err, "status", None) != 409:
                raise
            ids = []
            for p in chunk:  # some of this chunk exist: one at a time, the existing ones refused alone
                try:
                    ids.append(client.create_tasks(project, [_task_spec(p, redundancy)])[0])
                    created += 1
                except FeedbackError as one:
                    if getattr(one, "status", None) != 409:
                        raise
                    ids.append(None)
        for p, tid in zip(chunk, ids, strict=True):
            p["posted"], p["task_id"] = True, tid
        save()
    return created


def collect_answers(client: Any, project: str, pairs: list[dict[str, Any]], redundancy: int, wait_s: float,
                    on_update: Callable[[list[dict[str, Any]], int], None], poll_interval: float = 2.0,
                    progress: bool = True) -> tuple[list[dict[str, Any]], int]:
    """Read every answer to the pairs' tasks, waiting up to ``wait_s`` for the open ones.

    Returns ``(un-blinded answers, cancelled tasks)``; ``on_update`` gets the same after every poll
    that brought something new, so what has arrived can be saved as it comes.
    """
    from tqdm.auto import tqdm

    by_id = {p["external_id"]: p for p in pairs}
    answers: list[dict[str, Any]] = []
    cursor, cancelled = 0, 0
    deadline = time.monotonic() + wait_s
    bar = tqdm(total=len(pairs) * redundancy, desc="answers from people", unit="answer", disable=not progress)
    try:
        while True:
            raw, cursor = client.answers_since(project, cursor)
            new = []
            for a in raw:
                pair = by_id.get(a.get("external_id"))
                if pair is None or a.get("kind") != "pair":
                    continue  # another run's task in a shared project
                if pair["task_id"] is None:
                    pair["task_id"] = int(a["task_id"])
                new.append({"external_id": pair["external_id"], "prompt_index": pair["prompt_index"],
                            "sample_index": pair["sample_index"], "task_id": int(a["task_id"]),
                            "labeller": a.get("labeller"), "choice": a["answer"]["choice"],
                            "verdict": unblind(a["answer"]["choice"], pair["policy_side"]),
                            "duration_ms": a.get("duration_ms"), "created_at": a.get("created_at")})
            answers += new
            counts = Counter(a["external_id"] for a in answers)
            waiting = [p for p in pairs if counts[p["external_id"]] < redundancy]
            ids = [p["task_id"] for p in waiting if p["task_id"] is not None]
            status = client.task_status(project, ids) if ids else {}
            cancelled = sum(s["status"] == "cancelled" for s in status.values())
            bar.update(len(answers) - bar.n)
            bar.set_postfix(open=len(waiting) - cancelled)
            if new:
                on_update(answers, cancelled)
            if len(waiting) == cancelled or time.monotonic() >= deadline:
                return answers, cancelled
            time.sleep(min(poll_interval, max(0.0, deadline - time.monotonic())))
    finally:
        bar.close()


def _client(cfg: EvalConfig) -> Any:
    from palate.feedback.client import client_from_env

    return client_from_env(cfg.feedback_url, cfg.feedback_token_env, "the human judge")


def _load_pairs(path: Path, cfg: EvalConfig, project: str) -> dict[str, Any] | None:
    """The pair file, if this evaluation made it; one made under other settings is refused."""
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not readable JSON ({err}); restore it, or evaluate into another --out") from err
    wanted = {f: getattr(cfg, f) for f in _PAIR_FIELDS}
    differ = sorted(f for f in _PAIR_FIELDS if state.get("settings", {}).get(f) != wanted[f])
    if differ:
        raise ConfigError(
            f"{path} holds the pairs people judge for another evaluation (it differs in {', '.join(differ)}); "
            "use the same settings to pick up its answers, or another --out for a new human evaluation")
    if state.get("project") != project:
        raise ConfigError(f"{path} was posted to feedback project {state.get('project')!r}, not {project!r}; "
                          f"pass --feedback-project {state.get('project')}, or use another --out")
    return state


def evaluate_with_people(cfg: EvalConfig, poll_interval: float = 2.0) -> dict[str, Any]:
    """``palate lm eval --judge human``: the usual evaluation, then people's verdicts on the same pairs.

    Writes ``human_pairs.json`` (with the labeller's summary), ``human_answers.jsonl`` (after
    every poll that brought answers) and, once the wait ends, ``summary.json``: the usual fields
    and a ``human`` block (:func:`summarise`). While the command waits there is no
    ``summary.json``, so a pipeline stopped meanwhile runs its eval stage again, which resumes
    here. When the wait ends with tasks still open, the block says so (``complete: false``) and
    running the same command again picks up the later answers.
    """
    from palate.lm.evaluate import eval_out_dir, evaluate

    cfg.validate()
    out = eval_out_dir(cfg)
    project = cfg.feedback_project or run_label(cfg.run).replace("/", "-") + "-eval"
    pairs_path, summary_path = out / PAIRS_FILE, out / "summary.json"
    client = _client(cfg)
    try:
        client.ensure_project(project, "palate lm eval: is the policy's completion better than the SFT model's?")
        state = _load_pairs(pairs_path, cfg, project)
        if state is None:
            # Sampling and the labeller's verdicts as without people, then the pairs people see.
            labeller = evaluate(dataclasses.replace(cfg, judge="labeller"))
            samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines() if line.strip()]
            state = {"settings": {f: getattr(cfg, f) for f in _PAIR_FIELDS}, "project": project,
                     "feedback_url": cfg.feedback_url, "labeller_summary": labeller,
                     "pairs": blind_pairs(samples, cfg.samples_per_prompt, cfg.seed, run_label(cfg.run))}
        pairs = state["pairs"]

        def save_pairs() -> None:
            atomic_write_json(pairs_path, state)

        save_pairs()
        created = post_pairs(client, project, pairs, cfg.judge_redundancy, save_pairs)
        log.info("%d pair tasks in feedback project %r at %s (%d created now)", len(pairs), project,
                 cfg.feedback_url, created)

        def save_answers(answers: list[dict[str, Any]], cancelled: int) -> None:
            atomic_write_text(out / ANSWERS_FILE, "".join(json.dumps(a) + "\n" for a in answers))

        summary_path.unlink(missing_ok=True)  # "done" only once the wait is over (see the docstring)
        answers, cancelled = collect_answers(client, project, pairs, cfg.judge_redundancy, cfg.wait_s,
                                             save_answers, poll_interval=poll_interval)
        save_pairs()  # task ids learnt from answers
        save_answers(answers, cancelled)
    finally:
        client.close()
    summary = {**state["labeller_summary"],
               "human": {**summarise(pairs, answers, cfg.judge_redundancy, cancelled), "project": project,
                         "feedback_url": cfg.feedback_url}}
    atomic_write_json(summary_path, summary)
    h = summary["human"]
    log.info("win rate vs SFT by people %.3f +- %.3f over %d answers from %d judges (%d ties, %d can't tell); "
             "%d of %d pairs still open", h["win_rate"], h["win_rate_stderr"], h["n_answers"], h["n_judges"],
             h["ties"], h["cant_tell"], h["pairs_open"], h["n_pairs"])
    return summary
