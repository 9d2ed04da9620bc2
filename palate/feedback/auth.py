"""Who may do what: token hashing, principals, and the projects, accounts and tokens tables."""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from palate.feedback.errors import BadInput, Forbidden, NotFound, Unauthorized

#: How long a checked token is trusted without a lookup. Changes made through this process
#: (create-token, revoke) apply at once; those made by another process within this delay.
AUTH_CACHE_SECONDS = 5.0


def hash_token(token: str) -> str:
    """SHA-256 of a token. Tokens are 256-bit random strings, so no salt or slow hash is needed."""
    return hashlib.sha256(token.encode()).hexdigest()


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


class AccountStore:
    """The part of :class:`~palate.feedback.store.Store` that owns projects, accounts and tokens."""

    # Provided by Store: the connection, the lock every call holds, and the clock.
    _db: sqlite3.Connection
    _lock: threading.RLock
    clock: Callable[[], float]
    _auth_cache: dict[str, tuple[float, Principal]]

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
