"""The feedback database's tables, as numbered migrations.

Each migration runs in its own transaction and is recorded in ``schema_migrations``; a database
written by a newer palate is refused instead of misread. A change is a new ``(version, sql)``
entry at the end; one that has shipped is never edited.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from palate.errors import FeedbackError

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


def apply_migrations(db: sqlite3.Connection, db_path: Path) -> None:
    """Bring ``db`` up to :data:`SCHEMA_VERSION` (``db_path`` names it in errors)."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    have = db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]
    if have > SCHEMA_VERSION:
        raise FeedbackError(
            f"database {db_path} has schema version {have}, newer than this palate's "
            f"{SCHEMA_VERSION}; upgrade palate"
        )
    for version, sql in MIGRATIONS:
        if version <= have:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in sql.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                (version, time.time()),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
