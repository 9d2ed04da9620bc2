"""JSON bodies over the limit get 413 before anything parses them, on a real server and in process."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator

import httpx
import pytest

from palate.errors import FeedbackError
from palate.feedback.server import create_app
from palate.feedback.store import Store

TEN_MB = 10 * 1000 * 1000


def _answer_body(size: int) -> bytes:
    """A syntactically valid answer padded to ``size`` bytes, so only its size can refuse it."""
    head = b'{"answer": {"choice": "left"}, "duration_ms": 5, "pad": "'
    return head + b"x" * (size - len(head) - 2) + b'"}'


def _chunks(body: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


def _rows(db, table):
    con = sqlite3.connect(db)
    try:
        return con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        con.close()


def test_ten_megabyte_and_chunked_bodies_are_refused_unread_on_a_real_server(tmp_path, make_server):
    db = tmp_path / "feedback.sqlite"
    store = Store(db)
    token = store.create_token("alice", "labeller", ["p"])
    admin = store.create_token("trainer", "admin", all_projects=True)
    [task] = store.create_tasks(store.project_id("p"), [{"kind": "pair", "left": "a", "right": "b"}])
    store.close()
    server = make_server(db, None, "--max-json-mb", "1")
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    url = f"{server.url}/api/tasks/{task}/answer"

    with httpx.Client(timeout=30) as http:
        # Declared length over the limit: refused from the headers alone.
        r = http.post(url, content=_answer_body(TEN_MB), headers=auth)
        assert r.status_code == 413, r.text
        assert "larger than the limit of 1.0 MiB" in r.json()["detail"] and "--max-json-mb" in r.json()["detail"]
        # No length (Transfer-Encoding: chunked): refused once the stream passes the limit.
        r = http.post(url, content=_chunks(_answer_body(TEN_MB)), headers=auth)
        assert r.status_code == 413, r.text
        assert r.request.headers.get("transfer-encoding") == "chunked"
        # Task creation (a pydantic-parsed route) is capped too.
        tasks = {"tasks": [{"kind": "pair", "left": "a" * 200_000, "right": "b"}] * 6}
        r = http.post(f"{server.url}/api/projects/p/tasks", json=tasks, headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 413, r.text
        assert _rows(db, "answers") == 0 and _rows(db, "tasks") == 1

        # A body just under the limit reaches the route whole: stored once; sent again chunked,
        # the route sees it too and refuses the second answer for what it is.
        small = _answer_body(1024 * 1024 - 1)
        r = http.post(url, content=small, headers=auth)
        assert r.status_code == 201, r.text
        r = http.post(url, content=_chunks(small), headers=auth)
        assert r.status_code == 409 and "already answered" in r.text, r.text
    assert _rows(db, "answers") == 1


def test_limit_is_set_by_the_app_factory_and_checked(tmp_path):
    from fastapi.testclient import TestClient

    app = create_app(tmp_path / "f.sqlite", max_json_bytes=4096)
    store = app.state.store
    token = store.create_token("bob", "labeller", ["p"])
    with TestClient(app) as client:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        r = client.post("/api/next", content=json.dumps({"project": "p" * 5000}), headers=headers)
        assert r.status_code == 413 and "limit of 4.0 KiB" in r.json()["detail"]
        assert client.post("/api/next", json={"project": "p"}, headers=headers).status_code == 200
        r = client.post("/api/login", content=b"{" + b" " * 5000 + b"}", headers={"Content-Type": "application/json"})
        assert r.status_code == 413
    with pytest.raises(FeedbackError, match="at least 1 KiB"):
        create_app(tmp_path / "g.sqlite", max_json_bytes=10)
