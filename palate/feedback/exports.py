"""Answers out to files and back: the trainer formats of export, and import of labelled files."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from palate.feedback.errors import BadInput
from palate.feedback.tasks import (
    EXPORT_FORMATS,
    HF_FORMAT,
    MAX_REDUNDANCY,
    RESERVED_KEYS,
    normalize_answer,
    normalize_task_spec,
    task_format,
)


def _item_value(item: dict[str, str], media_ext: dict[str, str]) -> str:
    """What an exported line shows for an item: its run-given id, else the media file, else the text."""
    if "id" in item:
        return item["id"]
    if "media" in item:
        sha = item["media"]
        return f"{sha}.{media_ext.get(sha, 'bin')}"
    return item["text"]


def preference_pairs(fmt: str, answer: dict[str, Any], values: list[str]) -> list[tuple[str, str]]:
    """The (chosen, rejected) pairs one answer states, as TRL's preference datasets hold them.

    A text pair gives its winner over its loser ('equal' and "can't tell" give nothing); a
    ranking gives every pair of completions it orders strictly, best first (tied completions
    form no pair), which is InstructGPT's K-choose-2 expansion; best of K gives the best over
    each of the others. Pairs come in the order of the completions shown, best-ranked first.
    """
    if answer.get("cant_tell"):
        return []
    if fmt == "text_pairs":
        choice = answer["choice"]
        if choice not in ("left", "right"):
            return []
        return [(values[0], values[1])] if choice == "left" else [(values[1], values[0])]
    if fmt == "rankings":
        ranks = answer["ranking"]
        order = sorted(range(len(values)), key=lambda i: (ranks[i], i))
        return [(values[i], values[j]) for a, i in enumerate(order) for j in order[a + 1 :] if ranks[i] < ranks[j]]
    if fmt == "best_of_k":
        best = answer["best"]
        return [(values[best], v) for i, v in enumerate(values) if i != best]
    return []


def _pair_lines(prompt: str, pairs: list[tuple[str, str]], labeller: str, cid: str) -> Iterator[dict[str, Any]]:
    """The ``text_pairs`` / ``hf`` line of each (chosen, rejected) pair."""
    for chosen, rejected in pairs:
        yield {"prompt": prompt, "chosen": chosen, "rejected": rejected, "labeller": labeller, "comparison_id": cid}


def _spec_from_export(obj: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Turn one exported line back into a task spec and its answer."""
    if "ranking" in obj:
        return (
            {
                "kind": "rank",
                "mode": "rank",
                "prompt": obj.get("prompt"),
                "completions": obj.get("completions"),
            },
            {"ranking": obj["ranking"]},
        )
    if "best" in obj:
        return (
            {
                "kind": "rank",
                "mode": "best",
                "prompt": obj.get("prompt"),
                "completions": obj.get("completions"),
            },
            {"best": obj["best"]},
        )
    if "chosen" in obj and "rejected" in obj:
        return (
            {"kind": "pair", "prompt": obj.get("prompt"), "left": obj["chosen"], "right": obj["rejected"]},
            {"choice": "left"},
        )
    if "left" in obj and "right" in obj and "label" in obj:
        metadata = {k: v for k, v in obj.items() if k not in RESERVED_KEYS}
        return (
            {
                "kind": "pair",
                "left": {"id": str(obj["left"]), "text": str(obj["left"])},
                "right": {"id": str(obj["right"]), "text": str(obj["right"])},
                "metadata": metadata,
            },
            {"choice": obj["label"]},
        )
    raise BadInput(
        f"{where}: not a known format; expected keys (comparison_id, left, right, label), (prompt, chosen, rejected), "
        "(prompt, completions, ranking) or (prompt, completions, best)"
    )


class ExportStore:
    """The part of :class:`~palate.feedback.store.Store` that writes and reads the export formats."""

    # Provided by Store: the connection, the lock every call holds, and the clock.
    _db: sqlite3.Connection
    _lock: threading.RLock
    clock: Callable[[], float]
    _write: Callable[[], Any]

    def export_rows(self, project_id: int, fmt: str | None = None) -> Iterator[dict[str, Any]]:
        """Every answer of a project as one line of a trainer format (one line per labeller's answer).

        ``fmt`` picks one of :data:`EXPORT_FORMATS`; without it the project must hold one format
        only, since a trainer reads one format per file. Text pairs answered 'equal' or
        'cant_tell' have no chosen/rejected and are left out of ``text_pairs``; rankings and
        best-of-K tasks answered "can't tell" are left out of theirs.

        ``hf`` is one ``{"prompt", "chosen", "rejected", "labeller", "comparison_id"}`` line per
        preference every text answer states (see :func:`preference_pairs`): the standard
        preference format of TRL's DPO and reward trainers, and of ``palate lm rm``. Tasks whose
        items are clips have no text to put there and are left out.
        """
        if fmt is not None and fmt not in EXPORT_FORMATS:
            raise BadInput(f"format {fmt!r}: use one of {list(EXPORT_FORMATS)}")
        with self._lock:
            rows = self._db.execute(
                "SELECT a.id, a.answer, c.name AS labeller, t.id AS task_id, t.mode, t.payload, t.metadata, "
                "t.external_id, p.name AS project FROM answers a JOIN tasks t ON t.id = a.task_id "
                "JOIN accounts c ON c.id = a.account_id JOIN projects p ON p.id = t.project_id "
                "WHERE a.project_id = ? ORDER BY a.id",
                (project_id,),
            ).fetchall()
            media_ext = {r[0]: r[1] for r in self._db.execute("SELECT sha256, ext FROM media")}
        parsed = [(r, json.loads(r["payload"])) for r in rows]
        formats = {task_format(r["mode"], p) for r, p in parsed}
        if fmt == HF_FORMAT:
            yield from self._hf_rows(parsed)
            return
        if fmt is None and len(formats) > 1:
            raise BadInput(
                f"project holds several formats {sorted(formats)}; export one at a time with --format NAME"
            )
        for r, payload in parsed:
            this = task_format(r["mode"], payload)
            if fmt is not None and this != fmt:
                continue
            answer = json.loads(r["answer"])
            cid = r["external_id"] if r["external_id"] is not None else f"{r['project']}:{r['task_id']}"
            values = [_item_value(it, media_ext) for it in payload["items"]]
            if this == "pairs":
                yield {
                    "comparison_id": cid,
                    "left": values[0],
                    "right": values[1],
                    "label": answer["choice"],
                    "labeller": r["labeller"],
                    **json.loads(r["metadata"]),
                }
            elif this == "text_pairs":
                yield from _pair_lines(payload["prompt"], preference_pairs(this, answer, values), r["labeller"], cid)
            elif answer.get("cant_tell"):
                continue
            elif this == "rankings":
                yield {
                    "prompt": payload["prompt"],
                    "completions": values,
                    "ranking": answer["ranking"],
                    "labeller": r["labeller"],
                    "comparison_id": cid,
                }
            else:
                yield {
                    "prompt": payload["prompt"],
                    "completions": values,
                    "best": answer["best"],
                    "labeller": r["labeller"],
                    "comparison_id": cid,
                }

    def _hf_rows(self, parsed: list[tuple[sqlite3.Row, dict[str, Any]]]) -> Iterator[dict[str, Any]]:
        for r, payload in parsed:
            this = task_format(r["mode"], payload)
            if this == "pairs" or not all("text" in it for it in payload["items"]):
                continue
            cid = r["external_id"] if r["external_id"] is not None else f"{r['project']}:{r['task_id']}"
            values = [it["text"] for it in payload["items"]]
            pairs = preference_pairs(this, json.loads(r["answer"]), values)
            yield from _pair_lines(payload["prompt"], pairs, r["labeller"], cid)

    def import_rows(self, project_id: int, rows: Iterable[tuple[int, Any]]) -> dict[str, int]:
        """Load labelled comparisons (the export formats) as completed tasks with their answers.

        ``rows`` yields ``(line_number, object)``. Lines with the same ``comparison_id`` become one
        task answered by several labellers; lines without one are grouped by their content. A
        comparison whose id already exists in the project is skipped, so re-importing a file is
        harmless. Labellers named in the file get accounts without tokens. One transaction.
        """
        groups: dict[str, dict[str, Any]] = {}
        for lineno, obj in rows:
            where = f"line {lineno}"
            if not isinstance(obj, dict):
                raise BadInput(f"{where}: expected a JSON object")
            spec, answer = _spec_from_export(obj, where)
            key = (
                str(obj["comparison_id"])
                if "comparison_id" in obj
                else "import:"
                + hashlib.sha256(
                    json.dumps(
                        [
                            spec["kind"],
                            spec.get("mode"),
                            spec.get("prompt"),
                            spec.get("left"),
                            spec.get("right"),
                            spec.get("completions"),
                        ],
                        sort_keys=True,
                    ).encode()
                ).hexdigest()[:24]
            )
            labeller = str(obj.get("labeller") or "imported")
            group = groups.setdefault(key, {"spec": spec, "answers": {}, "where": where})
            if "chosen" in obj and labeller in group["answers"]:
                raise BadInput(
                    f"{where}: comparison {key!r} answered twice by {labeller!r}: an `export --format hf` "
                    "file (a ranking expanded to pairs), which import cannot regroup; import the "
                    "project's rankings, best_of_k or text_pairs export instead"
                )
            group["answers"].setdefault(labeller, answer)
        created = skipped = answers = 0
        now = self.clock()
        with self._lock, self._write():
            for key, group in groups.items():
                if self._db.execute(
                    "SELECT 1 FROM tasks WHERE project_id = ? AND external_id = ?", (project_id, key)
                ).fetchone():
                    skipped += 1
                    continue
                spec = dict(
                    group["spec"], external_id=key, redundancy=min(len(group["answers"]), MAX_REDUNDANCY)
                )
                t = normalize_task_spec(spec, group["where"])
                k = len(t["payload"]["items"])
                n = len(group["answers"])
                tid = self._db.execute(
                    "INSERT INTO tasks (project_id, kind, mode, payload, metadata, external_id, priority, redundancy, "
                    "n_answers, status, created_at, closed_at) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, 'done', ?, ?)",
                    (
                        project_id,
                        t["kind"],
                        t["mode"],
                        json.dumps(t["payload"]),
                        json.dumps(t["metadata"]),
                        key,
                        n,
                        n,
                        now,
                        now,
                    ),
                ).lastrowid
                for labeller, answer in group["answers"].items():
                    normal = normalize_answer(t["mode"], k, answer)
                    acc = self._db.execute("SELECT id FROM accounts WHERE name = ?", (labeller,)).fetchone()
                    if acc is None:
                        acc_id = self._db.execute(
                            "INSERT INTO accounts (name, role, created_at) VALUES (?, 'labeller', ?)",
                            (labeller, now),
                        ).lastrowid
                    else:
                        acc_id = acc[0]
                    self._db.execute(
                        "INSERT INTO answers (task_id, account_id, project_id, answer, created_at) VALUES (?, ?, ?, ?, ?)",
                        (tid, acc_id, project_id, json.dumps(normal), now),
                    )
                    answers += 1
                created += 1
        return {"tasks": created, "answers": answers, "skipped": skipped}
