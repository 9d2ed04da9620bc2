"""Durable store of the feedback service: SQLite in WAL mode, versioned migrations, in-memory leases.

Why these choices:

* **SQLite, WAL, one commit per answer.** An answer is acknowledged to the labeller only after
  its transaction committed, so a crash of the server process (even SIGKILL, tested) never loses
  an answer that got a 2xx: with WAL the committed frames are in the OS page cache, which outlives
  the process. The default ``synchronous=NORMAL`` does not fsync each commit; an OS crash or power
  cut can lose the answers committed since the last checkpoint (the database stays consistent).
  ``synchronous=FULL`` fsyncs every commit and closes that gap, at a price that depends on the
  disk: 0.3 ms per commit on an idle disk here, 6-8 ms while other jobs write, which caps a
  single writer near 150 answers/s. Pick FULL where the host is not trusted to stay up.
* **One writer.** The service runs as one process; every call below holds ``self._lock`` and
  runs one short transaction, which is exactly SQLite's concurrency model and keeps answer ids
  (the export/fetch cursor) increasing in commit order.
* **Leases live in memory.** A lease is a 2-minute reservation, not a fact worth an fsync. If the
  server dies, its leases vanish and the tasks are back in the queue at once, the same outcome
  as an expiry, one commit per shown task cheaper.
* **Migrations are numbered** and each runs in its own transaction (:mod:`palate.feedback.schema`).

The store is one class, :class:`Store`, whose methods are grouped by table in their own modules:
projects, accounts and tokens in :mod:`~palate.feedback.auth`, the admin statistics in
:mod:`~palate.feedback.stats`, export and import in :mod:`~palate.feedback.exports`. Tasks,
leases and answers, the labelling path itself, are here.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from palate.errors import FeedbackError
from palate.feedback.auth import AccountStore, Principal
from palate.feedback.errors import BadInput, Conflict, Forbidden, NotFound
from palate.feedback.exports import ExportStore
from palate.feedback.schema import apply_migrations
from palate.feedback.stats import StatsStore, utc_midnight
from palate.feedback.tasks import normalize_answer, normalize_task_spec


class Store(AccountStore, StatsStore, ExportStore):
    """All state of the feedback service. Thread-safe; meant to be owned by one server process."""

    def __init__(
        self,
        db_path: str | Path,
        *,
        synchronous: str = "NORMAL",
        lease_seconds: float = 120.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if synchronous.upper() not in ("FULL", "NORMAL"):
            raise FeedbackError(f"synchronous={synchronous!r}: use 'full' (fsync each commit) or 'normal'")
        self.db_path = Path(db_path)
        self.lease_seconds = float(lease_seconds)
        self.clock = clock
        self._lock = threading.RLock()
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(
                self.db_path, isolation_level=None, check_same_thread=False, timeout=10
            )
        except sqlite3.Error as err:
            raise FeedbackError(f"cannot open database {self.db_path}: {err}; check the --db path") from err
        self._db.row_factory = sqlite3.Row
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise FeedbackError(
                f"database {self.db_path} cannot use WAL mode (got {mode}); put it on a local disk"
            )
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=10000")
        with self._lock:
            apply_migrations(self._db, self.db_path)
        # task_id -> {account_id: lease expiry}; account_id -> task_id it holds.
        self._leases: dict[int, dict[int, float]] = defaultdict(dict)
        self._held: dict[int, int] = {}
        # task_id -> redundancy - n_answers, kept while the task has leases: when the live leases
        # reach it the task is full and lease_next skips it.
        self._room: dict[int, int] = {}
        self._last_sweep = 0.0
        # project_id -> [time counted, open tasks]: the queue size on every labeller reply would
        # be a COUNT over all open tasks, too dear at hundreds of answers a second. This process
        # keeps the count exact for its own writes; a recount every few seconds picks up others'.
        self._open: dict[int, list[float]] = {}
        # account_id -> [UTC day start, answers that day], kept exact by submit_answer.
        self._today: dict[int, list[float]] = {}
        # token hash -> (monotonic time, principal); see auth.AUTH_CACHE_SECONDS.
        self._auth_cache: dict[str, tuple[float, Principal]] = {}

    # ---------------------------------------------------------------- plumbing

    def close(self) -> None:
        """Close the connection (checkpointing the WAL)."""
        with self._lock:
            self._db.close()

    def schema_version(self) -> int:
        """The highest migration applied to this database."""
        with self._lock:
            return self._db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0]

    def _write(self) -> _Txn:
        return _Txn(self._db)

    # ---------------------------------------------------------------- media

    def add_media(self, sha256: str, ext: str, size: int) -> None:
        """Record an uploaded file (already written by :func:`palate.feedback.media.store_media`)."""
        with self._lock, self._write():
            self._db.execute(
                "INSERT OR IGNORE INTO media (sha256, ext, size, created_at) VALUES (?, ?, ?, ?)",
                (sha256, ext, size, self.clock()),
            )

    def media_ext(self, sha256: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT ext FROM media WHERE sha256 = ?", (sha256,)).fetchone()
        return None if row is None else row[0]

    def may_view_media(self, principal: Principal, sha256: str) -> bool:
        """A labeller may fetch a clip only if it belongs to a task of one of their projects."""
        if principal.all_projects:
            return True
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT t.project_id FROM task_media m JOIN tasks t ON t.id = m.task_id WHERE m.sha256 = ?",
                (sha256,),
            ).fetchall()
        return any(principal.can_see(r[0]) for r in rows)

    # ---------------------------------------------------------------- tasks

    def create_tasks(self, project_id: int, specs: list[Any]) -> list[int]:
        """Validate and insert tasks in one transaction; all or nothing. Returns their ids in order."""
        if not isinstance(specs, list) or not specs:
            raise BadInput("tasks: expected a non-empty list of task objects")
        normal = [normalize_task_spec(s, f"tasks[{i}]") for i, s in enumerate(specs)]
        now = self.clock()
        ids: list[int] = []
        with self._lock:
            for i, t in enumerate(normal):
                for item in t["payload"]["items"]:
                    if "media" in item and self.media_ext(item["media"]) is None:
                        raise BadInput(
                            f"tasks[{i}]: media {item['media']} was never uploaded; POST it to /api/media first"
                        )
            self._open.pop(project_id, None)
            with self._write():
                for i, t in enumerate(normal):
                    try:
                        cur = self._db.execute(
                            "INSERT INTO tasks (project_id, kind, mode, payload, metadata, external_id, priority, "
                            "redundancy, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (
                                project_id,
                                t["kind"],
                                t["mode"],
                                json.dumps(t["payload"]),
                                json.dumps(t["metadata"]),
                                t["external_id"],
                                t["priority"],
                                t["redundancy"],
                                now,
                            ),
                        )
                    except sqlite3.IntegrityError as err:
                        raise Conflict(
                            f"tasks[{i}].external_id {t['external_id']!r} already exists in this project; "
                            "the task was created before (nothing was written)"
                        ) from err
                    ids.append(int(cur.lastrowid))
                    for sha in {it["media"] for it in t["payload"]["items"] if "media" in it}:
                        self._db.execute(
                            "INSERT INTO task_media (sha256, task_id) VALUES (?, ?)", (sha, cur.lastrowid)
                        )
        return ids

    def cancel_tasks(self, project_id: int, task_ids: list[int]) -> int:
        """Cancel open tasks of a project; answered ones stay. Returns how many were cancelled."""
        if not isinstance(task_ids, list) or not all(isinstance(i, int) for i in task_ids):
            raise BadInput("ids: expected a list of integer task ids")
        with self._lock:
            with self._write():
                n = 0
                for tid in task_ids:
                    n += self._db.execute(
                        "UPDATE tasks SET status = 'cancelled', closed_at = ? "
                        "WHERE id = ? AND project_id = ? AND status = 'open'",
                        (self.clock(), tid, project_id),
                    ).rowcount
            self._open.pop(project_id, None)
            for tid in task_ids:
                self._room.pop(tid, None)
                for account in self._leases.pop(tid, {}):
                    if self._held.get(account) == tid:
                        del self._held[account]
        return n

    def task_status(self, project_id: int, task_ids: list[int]) -> dict[int, dict[str, Any]]:
        """Status, answers so far and redundancy of the given tasks of a project (unknown ids omitted)."""
        out: dict[int, dict[str, Any]] = {}
        with self._lock:
            for tid in task_ids:
                row = self._db.execute(
                    "SELECT status, n_answers, redundancy FROM tasks WHERE id = ? AND project_id = ?",
                    (tid, project_id),
                ).fetchone()
                if row is not None:
                    out[tid] = dict(row)
        return out

    def find_tasks(self, project_id: int, external_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The tasks of a project with these external ids: ``{external_id: {id, status, n_answers,
        redundancy}}``, unknown ids omitted.

        How a restarted training run finds the tasks its previous process created (it knows
        its comparison ids, not the task ids the service gave them).
        """
        if not isinstance(external_ids, list) or not all(isinstance(e, str) for e in external_ids):
            raise BadInput("external_ids: expected a list of strings")
        out: dict[str, dict[str, Any]] = {}
        with self._lock:
            for ext in external_ids:
                row = self._db.execute(
                    "SELECT id, status, n_answers, redundancy FROM tasks WHERE project_id = ? AND external_id = ?",
                    (project_id, ext),
                ).fetchone()
                if row is not None:
                    out[ext] = dict(row)
        return out

    # ---------------------------------------------------------------- leases and answers

    def _live(self, task_id: int, now: float) -> dict[int, float]:
        holders = self._leases.get(task_id)
        if not holders:
            return {}
        for account, expiry in list(holders.items()):
            if expiry <= now:
                del holders[account]
                if self._held.get(account) == task_id:
                    del self._held[account]
        if not holders:
            self._leases.pop(task_id, None)
            self._room.pop(task_id, None)
        return holders

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < 10:
            return
        self._last_sweep = now
        for tid in list(self._leases):
            self._live(tid, now)

    def _labeller_view(self, row: sqlite3.Row, project: str, expiry: float) -> dict[str, Any]:
        payload = json.loads(row["payload"])
        items = []
        for it in payload["items"]:
            if "media" in it:
                ext = self.media_ext(it["media"]) or "bin"
                items.append({"media_url": f"/api/media/{it['media']}.{ext}", "media_ext": ext})
            else:
                items.append({"text": it["text"]})
        # External ids and metadata are not shown: they can name the policy that produced a clip.
        return {
            "id": row["id"],
            "kind": row["kind"],
            "mode": row["mode"],
            "project": project,
            "prompt": payload.get("prompt"),
            "items": items,
            "lease_expires_at": expiry,
            "lease_seconds": self.lease_seconds,
        }

    def lease_next(self, principal: Principal, project_id: int | None = None) -> dict[str, Any] | None:
        """Reserve the next task for ``principal`` and return it as the labeller sees it, or None.

        Order: the task this labeller already holds (a reload shows the same task), then open
        tasks by priority (high first) and age, skipping those answered by this labeller and
        those whose answers plus live leases already reach their redundancy. A lease lasts
        ``lease_seconds``; one labeller holds at most one.
        """
        now = self.clock()
        with self._lock:
            self._sweep(now)
            pids = [project_id] if project_id is not None else self._visible_project_ids(principal)
            if not pids:
                return None
            held = self._held.get(principal.account_id)
            if held is not None and principal.account_id in self._live(held, now):
                row = self._db.execute(
                    "SELECT t.*, p.name AS project FROM tasks t JOIN projects p ON p.id = t.project_id "
                    "WHERE t.id = ? AND t.status = 'open'",
                    (held,),
                ).fetchone()
                if row is not None and row["project_id"] in pids:
                    expiry = now + self.lease_seconds
                    self._leases[held][principal.account_id] = expiry
                    return self._labeller_view(row, row["project"], expiry)
                self._release(principal.account_id)
            # Tasks whose free slots are all leased are excluded inside SQLite, so 50 labellers
            # leasing the head of the queue do not cost every lease a Python loop over 50 rows.
            full = []
            for tid, holders in list(self._leases.items()):
                room = self._room.get(tid, 1)
                if len(holders) >= room and (
                    min(holders.values()) > now or len(self._live(tid, now)) >= room
                ):
                    full.append(tid)
            marks = ",".join("?" * len(pids))
            sql = (
                f"SELECT t.*, p.name AS project FROM tasks t JOIN projects p ON p.id = t.project_id "
                f"WHERE t.status = 'open' AND t.project_id IN ({marks}) "
                f"AND t.id NOT IN (SELECT value FROM json_each(?)) AND NOT EXISTS "
                f"(SELECT 1 FROM answers a WHERE a.task_id = t.id AND a.account_id = ?) "
                f"ORDER BY t.priority DESC, t.id LIMIT 1"
            )
            for _ in range(1000):
                row = self._db.execute(sql, (*pids, json.dumps(full), principal.account_id)).fetchone()
                if row is None:
                    return None
                if row["n_answers"] + len(self._live(row["id"], now)) < row["redundancy"]:
                    break
                full.append(row["id"])  # its room was not known; look further
            else:
                return None
            chosen = row["id"]
            self._release(principal.account_id)
            expiry = now + self.lease_seconds
            self._leases[chosen][principal.account_id] = expiry
            self._room[chosen] = row["redundancy"] - row["n_answers"]
            self._held[principal.account_id] = chosen
            return self._labeller_view(row, row["project"], expiry)

    def _release(self, account_id: int) -> None:
        tid = self._held.pop(account_id, None)
        if tid is not None:
            holders = self._leases.get(tid)
            if holders is not None:
                holders.pop(account_id, None)
                if not holders:
                    self._leases.pop(tid, None)
                    self._room.pop(tid, None)

    def release(self, principal: Principal, task_id: int) -> bool:
        """Give a leased task back to the queue now (the labeller skipped it)."""
        with self._lock:
            if self._held.get(principal.account_id) == task_id:
                self._release(principal.account_id)
                return True
            return False

    def submit_answer(
        self, principal: Principal, task_id: int, answer: Any, duration_ms: int | None = None
    ) -> int:
        """Validate and durably store one answer; return its id (the export cursor) after COMMIT.

        Accepted when the labeller holds a live lease, or when its lease lapsed but the task
        still has room (answers plus other live leases below redundancy): a slow human is not
        punished unless someone else took their place. Rejected, with nothing written: unknown
        task (404), another project (403), cancelled, completed or already answered by this
        labeller (409), or an answer of the wrong shape (400).
        """
        if duration_ms is not None and (not isinstance(duration_ms, int) or not 0 <= duration_ms < 2**31):
            raise BadInput("duration_ms: must be a non-negative integer (milliseconds on the task)")
        now = self.clock()
        with self._lock:
            row = self._db.execute(
                "SELECT project_id, mode, payload, redundancy, n_answers, status FROM tasks WHERE id = ?",
                (task_id,),
            ).fetchone()
            if row is None:
                raise NotFound(f"task {task_id} does not exist")
            if not principal.can_see(row["project_id"]):
                raise Forbidden(f"task {task_id} belongs to a project {principal.name!r} is not assigned to")
            k = len(json.loads(row["payload"])["items"])
            normal = normalize_answer(row["mode"], k, answer)
            if self._db.execute(
                "SELECT 1 FROM answers WHERE task_id = ? AND account_id = ?", (task_id, principal.account_id)
            ).fetchone():
                raise Conflict(
                    f"task {task_id} was already answered by {principal.name!r}; the first answer stands"
                )
            if row["status"] == "cancelled":
                raise Conflict(f"task {task_id} was cancelled by the training run; fetch the next task")
            live = self._live(task_id, now)
            holds = principal.account_id in live
            others = len(live) - int(holds)
            if row["status"] != "open" or (not holds and row["n_answers"] + others >= row["redundancy"]):
                raise Conflict(
                    f"the lease on task {task_id} expired and it went to someone else; fetch the next task"
                )
            with self._write():
                cur = self._db.execute(
                    "INSERT INTO answers (task_id, account_id, project_id, answer, duration_ms, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (task_id, principal.account_id, row["project_id"], json.dumps(normal), duration_ms, now),
                )
                self._db.execute(
                    "UPDATE tasks SET n_answers = n_answers + 1, "
                    "status = CASE WHEN n_answers + 1 >= redundancy THEN 'done' ELSE status END, "
                    "closed_at = CASE WHEN n_answers + 1 >= redundancy THEN ? ELSE closed_at END WHERE id = ?",
                    (now, task_id),
                )
            if row["n_answers"] + 1 >= row["redundancy"]:
                self._open_changed(row["project_id"], -1)
            today = self._today.get(principal.account_id)
            if today is not None and today[0] == utc_midnight(now):
                today[1] += 1
            if task_id in self._room:
                self._room[task_id] -= 1
            if holds:
                self._release(principal.account_id)
            return int(cur.lastrowid)

    def _open_tasks(self, project_id: int, now: float) -> int:
        entry = self._open.get(project_id)
        if entry is None or now - entry[0] > 5.0 or now < entry[0]:
            count = self._db.execute(
                "SELECT COUNT(*) FROM tasks WHERE status = 'open' AND project_id = ?", (project_id,)
            ).fetchone()[0]
            entry = self._open[project_id] = [now, count]
        return int(entry[1])

    def _open_changed(self, project_id: int, delta: int) -> None:
        if project_id in self._open:
            self._open[project_id][1] += delta

    def progress(self, principal: Principal, project_id: int | None = None) -> dict[str, int]:
        """What the labeller page shows: answers this UTC day and open tasks in their projects.

        The queue size may be up to a second old (see ``_queue_cache``).
        """
        now = self.clock()
        with self._lock:
            pids = [project_id] if project_id is not None else self._visible_project_ids(principal)
            day = utc_midnight(now)
            cached = self._today.get(principal.account_id)
            if cached is None or cached[0] != day:
                count = self._db.execute(
                    "SELECT COUNT(*) FROM answers WHERE account_id = ? AND created_at >= ?",
                    (principal.account_id, day),
                ).fetchone()[0]
                cached = self._today[principal.account_id] = [day, count]
            today = int(cached[1])
            queue = sum(self._open_tasks(pid, now) for pid in pids)
        return {"answered_today": today, "queue": queue}

    # ---------------------------------------------------------------- reading answers

    def answers_since(
        self, project_id: int, cursor: int = 0, limit: int = 500
    ) -> tuple[list[dict[str, Any]], int, bool]:
        """Answers of a project with id > ``cursor``, oldest first: ``(answers, new_cursor, has_more)``.

        Ids increase in commit order (one writer; answers are never deleted, so a new rowid is
        always max + 1), so a run that keeps the last cursor sees every answer exactly once.
        """
        limit = max(1, min(int(limit), 5000))
        with self._lock:
            rows = self._db.execute(
                "SELECT a.id, a.task_id, a.answer, a.duration_ms, a.created_at, c.name AS labeller, "
                "t.external_id, t.kind, t.mode, t.metadata FROM answers a "
                "JOIN tasks t ON t.id = a.task_id JOIN accounts c ON c.id = a.account_id "
                "WHERE a.project_id = ? AND a.id > ? ORDER BY a.id LIMIT ?",
                (project_id, int(cursor), limit + 1),
            ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        out = [
            {
                "id": r["id"],
                "task_id": r["task_id"],
                "external_id": r["external_id"],
                "kind": r["kind"],
                "mode": r["mode"],
                "labeller": r["labeller"],
                "answer": json.loads(r["answer"]),
                "duration_ms": r["duration_ms"],
                "created_at": r["created_at"],
                "metadata": json.loads(r["metadata"]),
            }
            for r in rows
        ]
        return out, (rows[-1]["id"] if rows else int(cursor)), more


class _Txn:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK`` on any exception): one durable unit."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> _Txn:
        self.db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
