"""Durable labels: every answered comparison survives a crash and can train a later run.

Layout inside a run directory::

    labels.jsonl                one line per answer: {"id", "label", "mu", "labeller", "time",
                                "shard", "length", "env", ...}, appended and fsynced
    segments/00000.npz          compressed segment data of a batch of queries, keys
                                "<id>/left_obs", "<id>/left_actions", "<id>/left_true_rewards",
                                and the same for "right"

A query's segments are written (atomically) *before* the query goes to a labeller, so whenever
an answer arrives, however late, its segments are already on disk and the answer is kept: the
loop may drop clips it has not sent, never a label. ``--labels-from`` reads another run's
``labels.jsonl`` with its shards.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from palate.errors import PreferenceError
from palate.preferences.labellers import Answer, Query, label_to_mu
from palate.preferences.segments import Segment, SegmentPair
from palate.runs import atomic_write

log = logging.getLogger(__name__)

LABELS_FILE = "labels.jsonl"
SEGMENTS_DIR = "segments"
_FIELDS = ("obs", "actions", "true_rewards")


@dataclass
class LabelledComparison:
    """A comparison with its answer, ready for the reward model (mu None: "can't tell")."""

    id: str
    pair: SegmentPair
    label: str
    mu: float | None
    labeller: str = "synthetic"
    shard: str = ""  # the segment file it was read from ("" when built in memory)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LabelStore:
    """Writes queries' segments and answers' labels into a run directory; thread-safe.

    Args:
        run_dir: the run directory (created if needed).
        meta: extra fields written on every label line (env id, run name).
    """

    def __init__(self, run_dir: str | Path, meta: dict[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.segments_dir = self.run_dir / SEGMENTS_DIR
        self.segments_dir.mkdir(parents=True, exist_ok=True)
        self.labels_path = self.run_dir / LABELS_FILE
        self.meta = dict(meta or {})
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[SegmentPair, str]] = {}
        self._answered: dict[str, tuple[SegmentPair, str]] = {}
        existing = sorted(self.segments_dir.glob("*.npz"))
        self._next_shard = int(existing[-1].stem) + 1 if existing else 0

    # ---------------------------------------------------------------- writing
    def save_queries(self, queries: Sequence[Query]) -> str:
        """Write the segments of ``queries`` to a new shard; returns the shard's relative path."""
        if not queries:
            return ""
        with self._lock:
            shard = f"{SEGMENTS_DIR}/{self._next_shard:05d}.npz"
            self._next_shard += 1
        arrays: dict[str, np.ndarray] = {}
        for q in queries:
            if "/" in q.id:
                raise PreferenceError(f"comparison id {q.id!r} may not contain '/'")
            for side, seg in (("left", q.pair.left), ("right", q.pair.right)):
                for name in _FIELDS:
                    arrays[f"{q.id}/{side}_{name}"] = np.asarray(getattr(seg, name))

        def write(fh: Any) -> None:
            buf = io.BytesIO()
            np.savez_compressed(buf, **arrays)
            fh.write(buf.getvalue())

        atomic_write(self.run_dir / shard, write)
        _fsync_dir(self.segments_dir)
        with self._lock:
            for q in queries:
                self._pending[q.id] = (q.pair, shard)
        return shard

    def record(self, answer: Answer) -> LabelledComparison:
        """Append ``answer`` to labels.jsonl (fsynced) and return it with its segments.

        A comparison may be answered more than once (several people, ``redundancy`` > 1 on the
        feedback service): every answer is kept as its own line and its own training example.

        Raises:
            PreferenceError: the answer names a comparison this store never saved.
        """
        mu = label_to_mu(answer.label, answer.id)
        with self._lock:
            known = self._pending.pop(answer.id, None) or self._answered.get(answer.id)
            if known is None:
                raise PreferenceError(
                    f"label {answer.label!r} for comparison {answer.id!r}, which is unknown to this run; "
                    "labels must answer queries this run saved"
                )
            pair, shard = known
            self._answered[answer.id] = known
            line = {"id": answer.id, "label": answer.label, "mu": mu, "labeller": answer.labeller,
                    "time": answer.time, "shard": shard, "length": len(pair.left), **self.meta}
            if answer.meta:
                line["answer_meta"] = answer.meta
            self._append(line)
        return LabelledComparison(answer.id, pair, answer.label, mu, answer.labeller)

    def _append(self, line: dict[str, Any]) -> None:
        with open(self.labels_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def import_comparisons(self, comparisons: Sequence[LabelledComparison], source: str) -> None:
        """Copy labels from another run into this one, so the run directory is self-contained.

        Comparisons this store already holds are skipped, so importing twice is harmless.
        """
        fresh = [c for c in comparisons if not self.is_known(c.id)]
        if not fresh:
            return
        unique = {c.id: c for c in fresh}
        shard = self.save_queries([Query(c.id, c.pair) for c in unique.values()])
        for c in fresh:
            self.record(Answer(c.id, c.label, c.labeller, meta={"imported_from": source}))
        log.info("imported %d labels from %s into %s (%s)", len(fresh), source, self.labels_path, shard)

    def adopt(self, waiting: dict[str, tuple[SegmentPair, str]], answered: Sequence[LabelledComparison]) -> None:
        """Know the comparisons of this run's previous process again, so their answers can be recorded.

        A resumed run's store starts empty, yet people may still answer what the interrupted
        process asked: ``waiting`` (``{id: (pair, shard)}``, from :func:`load_query_segments`)
        become pending again; ``answered`` (read back from labels.jsonl) accept further answers
        (redundancy > 1) without counting as pending.
        """
        with self._lock:
            for c in answered:
                self._answered[c.id] = (c.pair, c.shard)
            for cid, known in waiting.items():
                if cid not in self._answered:
                    self._pending[cid] = known

    @property
    def pending(self) -> int:
        """Queries saved and sent whose answer has not arrived."""
        with self._lock:
            return len(self._pending)

    @property
    def pending_ids(self) -> list[str]:
        """Ids of the queries saved and sent whose answer has not arrived."""
        with self._lock:
            return list(self._pending)

    @property
    def next_shard(self) -> int:
        """Number of the next segment shard: every query saved so far is in a lower-numbered one."""
        with self._lock:
            return self._next_shard

    def is_known(self, comparison_id: str) -> bool:
        with self._lock:
            return comparison_id in self._pending or comparison_id in self._answered


# -------------------------------------------------------------------- reading


def shard_number(shard: str) -> int:
    """The number of a shard path as labels.jsonl names it (``segments/00012.npz`` -> 12)."""
    return int(Path(shard).stem)


def saved_comparison_ids(run_dir: str | Path) -> set[str]:
    """Ids of every comparison whose segments a run saved (asked, answered or not)."""
    ids: set[str] = set()
    for shard in sorted((Path(run_dir) / SEGMENTS_DIR).glob("*.npz")):
        with np.load(shard, allow_pickle=False) as npz:
            ids.update(key.split("/", 1)[0] for key in npz.files)
    return ids


def _read_segment(npz: Any, cid: str, side: str) -> Segment:
    """One side of comparison ``cid`` from an open shard (keys as :meth:`LabelStore.save_queries` writes them)."""
    return Segment(npz[f"{cid}/{side}_obs"], npz[f"{cid}/{side}_actions"],
                   npz[f"{cid}/{side}_true_rewards"].astype(np.float64), info={"comparison": cid, "side": side})


def load_query_segments(run_dir: str | Path, ids: set[str]) -> dict[str, tuple[SegmentPair, str]]:
    """The segments a run saved for the comparisons ``ids``: ``{id: (pair, shard)}`` (unknown ids omitted)."""
    out: dict[str, tuple[SegmentPair, str]] = {}
    for path in sorted((Path(run_dir) / SEGMENTS_DIR).glob("*.npz")) if ids else []:
        shard = f"{SEGMENTS_DIR}/{path.name}"
        with np.load(path, allow_pickle=False) as npz:
            for cid in {key.split("/", 1)[0] for key in npz.files} & ids:
                out[cid] = (SegmentPair(_read_segment(npz, cid, "left"), _read_segment(npz, cid, "right")), shard)
    return out


def label_lines(run_dir: str | Path) -> Iterator[dict[str, Any]]:
    """The raw lines of a run's labels.jsonl (none if it has no file), a torn last line ignored."""
    path = Path(run_dir) / LABELS_FILE
    if path.is_file():
        for _, data in _iter_lines(path):
            yield data


def drop_torn_tail(run_dir: str | Path) -> bool:
    """Cut a last label line torn by a crash mid-append, so new lines start on a line of their own.

    Readers already ignore such a line; a run that appends after it must not leave it in the
    middle of the file. Whole lines are never touched. Returns whether anything was cut.
    """
    path = Path(run_dir) / LABELS_FILE
    if not path.is_file():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    keep = data.rfind(b"\n") + 1
    log.warning("%s: dropping a torn last line (%d bytes) left by a crash", path, len(data) - keep)
    with open(path, "r+b") as fh:
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def labels_path(path: str | Path) -> Path:
    """``path`` itself if it is a labels file, else ``path/labels.jsonl`` (a run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / LABELS_FILE
    if not path.is_file():
        raise PreferenceError(
            f"no labels at {path}; pass --labels-from a run directory holding labels.jsonl or the file itself"
        )
    return path


def _iter_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, 1):
            raw = raw.strip()
            if not raw:
                continue
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as err:
                if fh.read().strip():
                    raise PreferenceError(f"{path}:{lineno}: not valid JSON ({err})") from err
                log.warning("%s:%d: torn last line (a crash while appending) ignored", path, lineno)
                return
            if not isinstance(data, dict) or "id" not in data or "label" not in data or "shard" not in data:
                raise PreferenceError(f"{path}:{lineno}: a label line needs 'id', 'label' and 'shard'")
            yield lineno, data


def load_labels(path: str | Path, obs_shape: tuple[int, ...] | None = None,
                include_cant_tell: bool = False) -> list[LabelledComparison]:
    """Read labelled comparisons from a run directory or a labels.jsonl file.

    Args:
        path: run directory or labels file.
        obs_shape: when given, every segment's observation shape must match it (labels from
            another environment would silently teach nonsense otherwise).
        include_cant_tell: keep "can't tell" answers (mu None); training drops them.

    Every line is one example: a comparison answered by two people gives two.

    Raises:
        PreferenceError: malformed line, missing shard, or a label whose comparison id has no
            segment data (the message names the id).
    """
    path = labels_path(path)
    root = path.parent
    shards: dict[str, Any] = {}
    out: list[LabelledComparison] = []
    try:
        for lineno, data in _iter_lines(path):
            cid, label, shard = str(data["id"]), str(data["label"]), str(data["shard"])
            mu = label_to_mu(label, cid)
            if mu is None and not include_cant_tell:
                continue
            if shard not in shards:
                shard_path = (root / shard).resolve()
                if root.resolve() not in shard_path.parents or not shard_path.is_file():
                    raise PreferenceError(
                        f"{path}:{lineno}: comparison {cid!r} refers to segment file {shard!r}, "
                        f"which is missing under {root}"
                    )
                shards[shard] = np.load(shard_path, allow_pickle=False)
            npz = shards[shard]
            sides = []
            for side in ("left", "right"):
                keys = [f"{cid}/{side}_{name}" for name in _FIELDS]
                missing = [k for k in keys if k not in npz.files]
                if missing:
                    raise PreferenceError(
                        f"{path}:{lineno}: label for unknown comparison id {cid!r}: {shard} holds no segment "
                        f"data for it (missing {missing[0]!r})"
                    )
                seg = _read_segment(npz, cid, side)
                if obs_shape is not None and tuple(seg.obs.shape[1:]) != tuple(obs_shape):
                    raise PreferenceError(
                        f"{path}:{lineno}: comparison {cid!r} has observations of shape {seg.obs.shape[1:]}, "
                        f"this environment's are {tuple(obs_shape)}; reuse labels only on the same environment"
                    )
                sides.append(seg)
            out.append(LabelledComparison(cid, SegmentPair(*sides), label, mu, str(data.get("labeller", "")), shard))
    finally:
        for npz in shards.values():
            npz.close()
    return out
