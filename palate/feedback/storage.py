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
* **Migrations are numbered** and each runs in its own transaction, recorded in
  ``schema_migrations``; a database written by a newer palate is refused instead of misread.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import combinations
from pathlib import Path
from typing import Any

from palate.errors import FeedbackError
from palate.feedback.media import SHA256_RE

# --------------------------------------------------------------------------------------------
# Errors the HTTP layer turns into status codes. All are FeedbackError: a user mistake.


class BadInput(FeedbackError):
    """The request or file is malformed (400)."""

    status = 400


class Unauthorized(FeedbackError):
    """No token, or a token that is unknown or revoked (401)."""

    status = 401


class Forbidden(FeedbackError):
    """A valid token acting outside its role or projects (403)."""

    status = 403


class NotFound(FeedbackError):
    """An unknown task, project or media file (404)."""

    status = 404


class Conflict(FeedbackError):
    """The request contradicts the stored state: double answer, cancelled task, lost lease (409)."""

    status = 409


# --------------------------------------------------------------------------------------------
# Schema

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE projects (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            description TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL
        );
        CREATE TABLE accounts (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            role TEXT NOT NULL CHECK (role IN ('labeller', 'admin')),
            all_projects INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL
        );
        CREATE TABLE tokens (
            token_hash TEXT PRIMARY KEY,
            account_id INTEGER NOT NULL REFERENCES accounts(id),
            created_at REAL NOT NULL,
            revoked_at REAL
        );
        CREATE TABLE account_projects (
            account_id INTEGER NOT NULL REFERENCES accounts(id),
            project_id INTEGER NOT NULL REFERENCES projects(id),
            PRIMARY KEY (account_id, project_id)
        ) WITHOUT ROWID;
        CREATE TABLE media (
            sha256 TEXT PRIMARY KEY,
            ext TEXT NOT NULL,
            size INTEGER NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE tasks (
            id INTEGER PRIMARY KEY,
            project_id INTEGER NOT NULL REFERENCES projects(id),
            kind TEXT NOT NULL CHECK (kind IN ('pair', 'rank')),
            mode TEXT NOT NULL CHECK (mode IN ('pair', 'rank', 'best')),
            payload TEXT NOT NULL,
            metadata TEXT NOT NULL DEFAULT '{}',
            external_id TEXT,
            priority INTEGER NOT NULL DEFAULT 0,
            redundancy INTEGER NOT NULL DEFAULT 1,
            n_answers INTEGER NOT NULL DEFAULT 0,
            status TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'done', 'cancelled')),
            created_at REAL NOT NULL,
            closed_at REAL
        );
        CREATE INDEX tasks_queue ON tasks (status, project_id, priority DESC, id);
        CREATE UNIQUE INDEX tasks_external ON tasks (project_id, external_id)
            WHERE external_id IS NOT NULL;
        CREATE TABLE task_media (
            sha256 TEXT NOT NULL REFERENCES media(sha256),
            task_id INTEGER NOT NULL REFERENCES tasks(id),
            PRIMARY KEY (sha256, task_id)
        ) WITHOUT ROWID;
        CREATE TABLE answers (
            -- No AUTOINCREMENT: answers are never deleted, so max(id) + 1 already increases
            -- (the cursor needs that), and AUTOINCREMENT costs a page write per answer.
            id INTEGER PRIMARY KEY,
            task_id INTEGER NOT NULL REFERENCES tasks(id),
            account_id INTEGER NOT NULL REFERENCES accounts(id),
            project_id INTEGER NOT NULL REFERENCES projects(id),
            answer TEXT NOT NULL,
            duration_ms INTEGER,
            created_at REAL NOT NULL,
            UNIQUE (task_id, account_id)
        );
        CREATE INDEX answers_project ON answers (project_id, id);
        CREATE INDEX answers_account_time ON answers (account_id, created_at);
        """,
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

PAIR_CHOICES = ("left", "right", "equal", "cant_tell")
MAX_K = 9
MAX_TEXT = 200_000
MAX_REDUNDANCY = 20
#: Keys an exported control-pair line owns; task metadata may not shadow them.
RESERVED_KEYS = frozenset(
    {
        "comparison_id",
        "left",
        "right",
        "label",
        "labeller",
        "prompt",
        "chosen",
        "rejected",
        "completions",
        "ranking",
        "best",
    }
)
EXPORT_FORMATS = ("pairs", "text_pairs", "rankings", "best_of_k")
#: How long a checked token is trusted without a lookup. Changes made through this process
#: (create-token, revoke) apply at once; those made by another process within this delay.
AUTH_CACHE_SECONDS = 5.0


def hash_token(token: str) -> str:
    """SHA-256 of a token. Tokens are 256-bit random strings, so no salt or slow hash is needed."""
    return hashlib.sha256(token.encode()).hexdigest()


def utc_midnight(now: float) -> float:
    """Start of the UTC day containing ``now``: "answered today" counts from here."""
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day.timestamp()


@dataclass(frozen=True)
class Principal:
    """Who a token belongs to and what it may see."""

    account_id: int
    name: str
    role: str
    all_projects: bool
    project_ids: frozenset[int]

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def can_see(self, project_id: int) -> bool:
        return self.all_projects or project_id in self.project_ids


# --------------------------------------------------------------------------------------------
# Validation of task specs and answers (shared by the API and import).


def _item(value: Any, where: str) -> dict[str, str]:
    if isinstance(value, str):
        value = {"text": value}
    if not isinstance(value, dict):
        raise BadInput(f"{where}: expected a string or an object {{'text': ...}} / {{'media': sha256}}")
    unknown = set(value) - {"text", "media", "id"}
    if unknown:
        raise BadInput(f"{where}: unknown keys {sorted(unknown)}; an item has 'text' or 'media', and 'id'")
    if ("text" in value) == ("media" in value):
        raise BadInput(f"{where}: give exactly one of 'text' or 'media' (the sha256 from POST /api/media)")
    out: dict[str, str] = {}
    if "text" in value:
        if not isinstance(value["text"], str) or len(value["text"]) > MAX_TEXT:
            raise BadInput(f"{where}.text: must be a string of at most {MAX_TEXT} characters")
        out["text"] = value["text"]
    else:
        if not isinstance(value["media"], str) or not SHA256_RE.match(value["media"]):
            raise BadInput(f"{where}.media: must be the 64-hex sha256 returned by POST /api/media")
        out["media"] = value["media"]
    if "id" in value:
        if not isinstance(value["id"], str | int) or len(str(value["id"])) > 200:
            raise BadInput(f"{where}.id: must be a string or integer of at most 200 characters")
        out["id"] = str(value["id"])
    return out


def normalize_task_spec(spec: Any, where: str = "task") -> dict[str, Any]:
    """Check one task as a training run describes it and return the stored form.

    Pair: ``{"kind": "pair", "left": item, "right": item, "prompt"?: str}``. Rank:
    ``{"kind": "rank", "prompt": str, "completions": [item, ...2..9], "mode"?: "rank"|"best"}``.
    An item is a string, ``{"text": ...}`` or ``{"media": sha256}``, with an optional ``"id"`` the
    run uses to recognise it in the export. Common optional keys: ``priority`` (higher first),
    ``redundancy`` (labellers per task), ``metadata`` (object, echoed in exports),
    ``external_id`` (unique per project; makes retried creations idempotent).
    """
    if not isinstance(spec, dict):
        raise BadInput(f"{where}: expected a JSON object")
    kind = spec.get("kind")
    common = {"kind", "priority", "redundancy", "metadata", "external_id", "prompt"}
    if kind == "pair":
        allowed = common | {"left", "right"}
        for key in ("left", "right"):
            if key not in spec:
                raise BadInput(f"{where}: a pair task needs '{key}'")
        items = [_item(spec["left"], f"{where}.left"), _item(spec["right"], f"{where}.right")]
        mode = "pair"
    elif kind == "rank":
        allowed = common | {"completions", "mode"}
        comps = spec.get("completions")
        if not isinstance(comps, list) or not 2 <= len(comps) <= MAX_K:
            raise BadInput(f"{where}.completions: a rank task needs a list of 2..{MAX_K} completions")
        items = [_item(c, f"{where}.completions[{i}]") for i, c in enumerate(comps)]
        mode = spec.get("mode", "rank")
        if mode not in ("rank", "best"):
            raise BadInput(f"{where}.mode: must be 'rank' (order all, ties allowed) or 'best' (best of K)")
        if not isinstance(spec.get("prompt"), str):
            raise BadInput(f"{where}.prompt: a rank task needs the prompt as a string")
    else:
        raise BadInput(f"{where}.kind: must be 'pair' or 'rank', got {kind!r}")
    unknown = set(spec) - allowed
    if unknown:
        raise BadInput(f"{where}: unknown keys {sorted(unknown)}")
    prompt = spec.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or len(prompt) > MAX_TEXT):
        raise BadInput(f"{where}.prompt: must be a string of at most {MAX_TEXT} characters")
    priority = spec.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool) or abs(priority) > 2**31:
        raise BadInput(f"{where}.priority: must be an integer (higher is shown first)")
    redundancy = spec.get("redundancy", 1)
    if (
        not isinstance(redundancy, int)
        or isinstance(redundancy, bool)
        or not 1 <= redundancy <= MAX_REDUNDANCY
    ):
        raise BadInput(f"{where}.redundancy: must be an integer 1..{MAX_REDUNDANCY} (labellers per task)")
    metadata = spec.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise BadInput(f"{where}.metadata: must be a JSON object")
    clash = RESERVED_KEYS & set(metadata)
    if clash:
        raise BadInput(
            f"{where}.metadata: keys {sorted(clash)} are reserved by the export format; rename them"
        )
    external_id = spec.get("external_id")
    if external_id is not None and (not isinstance(external_id, str | int) or len(str(external_id)) > 200):
        raise BadInput(f"{where}.external_id: must be a string of at most 200 characters")
    return {
        "kind": kind,
        "mode": mode,
        "payload": {"prompt": prompt, "items": items},
        "metadata": metadata,
        "external_id": None if external_id is None else str(external_id),
        "priority": priority,
        "redundancy": redundancy,
    }


def dense_ranks(values: list[int]) -> list[int]:
    """Map any ranks (lower is better, equal values tie) to dense ranks 0, 1, 2, ..."""
    order = {v: i for i, v in enumerate(sorted(set(values)))}
    return [order[v] for v in values]


def normalize_answer(mode: str, k: int, answer: Any) -> dict[str, Any]:
    """Check an answer against its task and return the stored form.

    Pair: ``{"choice": "left"|"right"|"equal"|"cant_tell"}``. Rank: ``{"ranking": [r_0..r_{K-1}]}``,
    the rank of each completion in the order shown, 0 best, equal numbers for ties (stored as
    dense ranks). Best of K: ``{"best": index}``.
    """
    if not isinstance(answer, dict):
        raise BadInput("answer: expected a JSON object")
    if mode == "pair":
        choice = answer.get("choice")
        if choice not in PAIR_CHOICES or set(answer) != {"choice"}:
            raise BadInput(f"answer: a pair task takes {{'choice': one of {list(PAIR_CHOICES)}}}")
        return {"choice": choice}
    if mode == "rank":
        ranking = answer.get("ranking")
        if (
            set(answer) != {"ranking"}
            or not isinstance(ranking, list)
            or len(ranking) != k
            or not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < k for r in ranking)
        ):
            raise BadInput(
                f"answer: a rank task takes {{'ranking': [{k} integers in 0..{k - 1}]}}, the rank of each "
                "completion in the order shown (0 best, equal numbers for ties)"
            )
        return {"ranking": dense_ranks(ranking)}
    best = answer.get("best")
    if set(answer) != {"best"} or not isinstance(best, int) or isinstance(best, bool) or not 0 <= best < k:
        raise BadInput(f"answer: a best-of-K task takes {{'best': index in 0..{k - 1}}}")
    return {"best": best}


def task_format(mode: str, payload: dict[str, Any]) -> str:
    """Which trainer format a task exports to (see :data:`EXPORT_FORMATS`)."""
    if mode == "rank":
        return "rankings"
    if mode == "best":
        return "best_of_k"
    if payload.get("prompt") is not None and all("text" in it for it in payload["items"]):
        return "text_pairs"
    return "pairs"


def _item_value(item: dict[str, str], media_ext: dict[str, str]) -> str:
    """What an exported line shows for an item: its run-given id, else the media file, else the text."""
    if "id" in item:
        return item["id"]
    if "media" in item:
        sha = item["media"]
        return f"{sha}.{media_ext.get(sha, 'bin')}"
    return item["text"]


# --------------------------------------------------------------------------------------------


class Store:
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
        self._migrate()
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
        # token hash -> (monotonic time, principal); see AUTH_CACHE_SECONDS.
        self._auth_cache: dict[str, tuple[float, Principal]] = {}

    # ---------------------------------------------------------------- plumbing

    def close(self) -> None:
        """Close the connection (checkpointing the WAL)."""
        with self._lock:
            self._db.close()

    def _migrate(self) -> None:
        with self._lock:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            have = self._db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]
            if have > SCHEMA_VERSION:
                raise FeedbackError(
                    f"database {self.db_path} has schema version {have}, newer than this palate's "
                    f"{SCHEMA_VERSION}; upgrade palate"
                )
            for version, sql in MIGRATIONS:
                if version <= have:
                    continue
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in sql.split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                    self._db.execute(
                        "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                        (version, time.time()),
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

    def schema_version(self) -> int:
        """The highest migration applied to this database."""
        with self._lock:
            return self._db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0]

    def _write(self) -> _Txn:
        return _Txn(self._db)

    # ---------------------------------------------------------------- projects and accounts

    def ensure_project(self, name: str, description: str = "") -> int:
        """Id of project ``name``, creating it if needed."""
        if not isinstance(name, str) or not name or len(name) > 100 or "/" in name:
            raise BadInput(f"project name {name!r}: use 1..100 characters without '/'")
        with self._lock:
            row = self._db.execute("SELECT id FROM projects WHERE name = ?", (name,)).fetchone()
            if row:
                return row[0]
            with self._write():
                cur = self._db.execute(
                    "INSERT INTO projects (name, description, created_at) VALUES (?, ?, ?)",
                    (name, description, self.clock()),
                )
            return int(cur.lastrowid)

    def project_id(self, name: str) -> int:
        """Id of an existing project; :class:`NotFound` names it otherwise."""
        with self._lock:
            row = self._db.execute("SELECT id FROM projects WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(
                f"project {name!r} does not exist; create it with POST /api/projects or create-token"
            )
        return int(row[0])

    def resolve_project(self, principal: Principal, name: str) -> int:
        """Project id ``principal`` may use, 403 if it is not theirs (hiding whether it exists)."""
        with self._lock:
            row = self._db.execute("SELECT id FROM projects WHERE name = ?", (name,)).fetchone()
        if row is not None and principal.can_see(row[0]):
            return int(row[0])
        if principal.all_projects:
            raise NotFound(f"project {name!r} does not exist; create it with POST /api/projects")
        raise Forbidden(f"token of {principal.name!r} is not assigned to project {name!r}")

    def projects_for(self, principal: Principal) -> list[dict[str, Any]]:
        """Projects the principal may see, with their open-queue size."""
        with self._lock:
            rows = self._db.execute(
                "SELECT p.id, p.name, p.description, "
                "(SELECT COUNT(*) FROM tasks t WHERE t.status = 'open' AND t.project_id = p.id) AS open "
                "FROM projects p ORDER BY p.name"
            ).fetchall()
        return [
            {"name": r["name"], "description": r["description"], "open_tasks": r["open"]}
            for r in rows
            if principal.can_see(r["id"])
        ]

    def create_token(
        self, name: str, role: str, projects: Iterable[str] = (), all_projects: bool = False
    ) -> str:
        """Create (or extend) account ``name`` and return a new token for it; only its hash is stored.

        A labeller sees only the ``projects`` given here (created if missing); an admin either
        the same or, with ``all_projects``, every project and the right to create new ones.
        """
        if role not in ("labeller", "admin"):
            raise BadInput(f"role {role!r}: use 'labeller' or 'admin'")
        if not isinstance(name, str) or not name.strip() or len(name) > 100:
            raise BadInput(f"account name {name!r}: use 1..100 characters")
        projects = list(projects)
        if role == "labeller" and all_projects:
            raise BadInput("--all-projects is for admins; assign a labeller with --project NAME")
        if not projects and not all_projects:
            raise BadInput(
                f"account {name!r} would see no project: pass --project NAME (or --all-projects for an admin)"
            )
        project_ids = [self.ensure_project(p) for p in projects]
        token = "plt_" + secrets.token_urlsafe(32)
        now = self.clock()
        self._auth_cache.clear()  # project assignments may change
        with self._lock, self._write():
            row = self._db.execute("SELECT id, role FROM accounts WHERE name = ?", (name,)).fetchone()
            if row is None:
                account_id = self._db.execute(
                    "INSERT INTO accounts (name, role, all_projects, created_at) VALUES (?, ?, ?, ?)",
                    (name, role, int(all_projects), now),
                ).lastrowid
            else:
                account_id = row["id"]
                if row["role"] != role:
                    raise BadInput(f"account {name!r} exists with role {row['role']!r}; pick another name")
                if all_projects:
                    self._db.execute("UPDATE accounts SET all_projects = 1 WHERE id = ?", (account_id,))
            for pid in project_ids:
                self._db.execute(
                    "INSERT OR IGNORE INTO account_projects (account_id, project_id) VALUES (?, ?)",
                    (account_id, pid),
                )
            self._db.execute(
                "INSERT INTO tokens (token_hash, account_id, created_at) VALUES (?, ?, ?)",
                (hash_token(token), account_id, now),
            )
        return token

    def revoke_token(self, token: str) -> bool:
        """Revoke one token; True if it existed."""
        self._auth_cache.clear()
        with self._lock, self._write():
            cur = self._db.execute(
                "UPDATE tokens SET revoked_at = ? WHERE token_hash = ? AND revoked_at IS NULL",
                (self.clock(), hash_token(token)),
            )
        return cur.rowcount == 1

    def authenticate(self, token: str | None) -> Principal:
        """The principal a token belongs to; :class:`Unauthorized` for none, unknown or revoked."""
        if not token:
            raise Unauthorized(
                "no token: send 'Authorization: Bearer <token>' (create one with create-token)"
            )
        digest = hash_token(token)
        now = time.monotonic()
        cached = self._auth_cache.get(digest)
        if cached is not None and now - cached[0] < AUTH_CACHE_SECONDS:
            return cached[1]
        with self._lock:
            row = self._db.execute(
                "SELECT a.id, a.name, a.role, a.all_projects FROM tokens t JOIN accounts a ON a.id = t.account_id "
                "WHERE t.token_hash = ? AND t.revoked_at IS NULL",
                (digest,),
            ).fetchone()
            if row is None:
                raise Unauthorized("token is unknown or revoked; ask an admin for a new one")
            pids = frozenset(
                r[0]
                for r in self._db.execute(
                    "SELECT project_id FROM account_projects WHERE account_id = ?", (row[0],)
                )
            )
        principal = Principal(row[0], row[1], row[2], bool(row[3]), pids)
        if len(self._auth_cache) > 10_000:
            self._auth_cache.clear()
        self._auth_cache[digest] = (now, principal)
        return principal

    def _visible_project_ids(self, principal: Principal) -> list[int]:
        if principal.all_projects:
            return [r[0] for r in self._db.execute("SELECT id FROM projects")]
        return sorted(principal.project_ids)

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

    def stats(self, project_id: int) -> dict[str, Any]:
        """What the admin page shows: queue, throughput, per-labeller counts, inter-labeller agreement."""
        now = self.clock()
        with self._lock:
            status = {
                r[0]: r[1]
                for r in self._db.execute(
                    "SELECT status, COUNT(*) FROM tasks WHERE project_id = ? GROUP BY status", (project_id,)
                )
            }
            leased = 0
            for tid in list(self._leases):
                if self._live(tid, now):
                    row = self._db.execute("SELECT project_id FROM tasks WHERE id = ?", (tid,)).fetchone()
                    leased += int(row is not None and row[0] == project_id)

            def count_since(t0: float) -> int:
                return self._db.execute(
                    "SELECT COUNT(*) FROM answers WHERE project_id = ? AND created_at >= ?", (project_id, t0)
                ).fetchone()[0]

            throughput = {
                "last_minute": count_since(now - 60),
                "last_hour": count_since(now - 3600),
                "today": count_since(utc_midnight(now)),
                "total": count_since(0),
            }
            labellers = [
                dict(r)
                for r in self._db.execute(
                    "SELECT c.name AS labeller, COUNT(*) AS answers, "
                    "SUM(a.created_at >= ?) AS today, AVG(a.duration_ms) AS mean_duration_ms, "
                    "MAX(a.created_at) AS last_answer_at "
                    "FROM answers a JOIN accounts c ON c.id = a.account_id WHERE a.project_id = ? "
                    "GROUP BY c.name ORDER BY answers DESC",
                    (utc_midnight(now), project_id),
                )
            ]
            multi = self._db.execute(
                "SELECT t.id, t.mode, GROUP_CONCAT(a.answer, char(10)) AS answers FROM tasks t "
                "JOIN answers a ON a.task_id = t.id WHERE t.project_id = ? AND t.n_answers >= 2 "
                "GROUP BY t.id ORDER BY t.id DESC LIMIT 5000",
                (project_id,),
            ).fetchall()
        return {
            "queue": {
                "open": status.get("open", 0),
                "leased": leased,
                "done": status.get("done", 0),
                "cancelled": status.get("cancelled", 0),
            },
            "throughput": throughput,
            "labellers": labellers,
            "agreement": agreement(
                [(r["mode"], [json.loads(a) for a in r["answers"].split("\n")]) for r in multi]
            ),
        }

    # ---------------------------------------------------------------- export / import

    def export_rows(self, project_id: int, fmt: str | None = None) -> Iterator[dict[str, Any]]:
        """Every answer of a project as one line of a trainer format (one line per labeller's answer).

        ``fmt`` picks one of :data:`EXPORT_FORMATS`; without it the project must hold one format
        only, since a trainer reads one format per file. Text pairs answered 'equal' or
        'cant_tell' have no chosen/rejected and are left out of ``text_pairs``.
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
                if answer["choice"] not in ("left", "right"):
                    continue
                chosen, rejected = values if answer["choice"] == "left" else values[::-1]
                yield {
                    "prompt": payload["prompt"],
                    "chosen": chosen,
                    "rejected": rejected,
                    "labeller": r["labeller"],
                    "comparison_id": cid,
                }
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


def agreement(tasks: list[tuple[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Inter-labeller agreement over tasks answered by several labellers, per task mode.

    For every pair of labellers on a task: pairs agree when the choices are equal; best-of-K
    when the same index is picked; rankings score the fraction of completion pairs (i, j) that
    both order the same way (ties count as an order), i.e. a pairwise accuracy in [0, 1].
    """
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0])  # score, labeller pairs, tasks
    for mode, answers in tasks:
        acc = sums[mode]
        acc[2] += 1
        for a, b in combinations(answers, 2):
            if mode == "pair":
                score = float(a["choice"] == b["choice"])
            elif mode == "best":
                score = float(a["best"] == b["best"])
            else:
                ra, rb = a["ranking"], b["ranking"]
                pairs = list(combinations(range(len(ra)), 2))
                score = sum(
                    (ra[i] > ra[j]) - (ra[i] < ra[j]) == (rb[i] > rb[j]) - (rb[i] < rb[j]) for i, j in pairs
                ) / len(pairs)
            acc[0] += score
            acc[1] += 1
    return {
        mode: {"agreement": (s / n if n else None), "labeller_pairs": n, "tasks": t}
        for mode, (s, n, t) in sums.items()
    }


class _Txn:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK`` on any exception): one durable unit."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> _Txn:
        self.db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
