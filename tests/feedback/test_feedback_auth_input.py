"""Auth (401/403) and bad input (4xx): each refusal is clear and leaves the database unchanged."""

from __future__ import annotations

import sqlite3

import pytest

from palate.errors import FeedbackError
from palate.feedback.schema import MIGRATIONS, SCHEMA_VERSION
from palate.feedback.stats import agreement
from palate.feedback.store import Store
from palate.feedback.tasks import dense_ranks


@pytest.fixture
def seeded(env, media):
    """One pair task in project p, one in 'other', one uploaded clip; returns their ids."""
    sha = env.client.post("/api/media", content=media["mp4"], headers=env.admin).json()["sha256"]
    [tid] = env.client.post(
        "/api/projects/p/tasks",
        json={"tasks": [{"kind": "pair", "left": {"media": sha}, "right": "b"}]},
        headers=env.admin,
    ).json()["ids"]
    [other] = env.client.post(
        "/api/projects/other/tasks",
        json={"tasks": [{"kind": "pair", "left": "x", "right": "y"}]},
        headers=env.admin,
    ).json()["ids"]
    return {"task": tid, "other": other, "sha": sha}


def _requests(ids):
    """One request of every kind of endpoint."""
    t, sha = ids["task"], ids["sha"]
    return [
        ("post", "/api/next", {"json": {}}),
        ("post", f"/api/tasks/{t}/answer", {"json": {"answer": {"choice": "left"}}}),
        ("post", f"/api/tasks/{t}/release", {}),
        ("post", "/api/projects/p/tasks", {"json": {"tasks": [{"kind": "pair", "left": "a", "right": "b"}]}}),
        ("post", "/api/projects/p/tasks/cancel", {"json": {"ids": [t]}}),
        ("post", "/api/projects/p/tasks/status", {"json": {"ids": [t]}}),
        ("post", "/api/projects/p/tasks/find", {"json": {"external_ids": ["x"]}}),
        ("get", "/api/projects/p/answers", {}),
        ("get", "/api/projects/p/stats", {}),
        ("get", "/api/projects/p/export", {}),
        ("post", "/api/media", {"content": b"GIF89a" + b"\0" * 20}),
        ("get", f"/api/media/{sha}.mp4", {}),
        ("post", "/api/projects", {"json": {"name": "zzz"}}),
        ("get", "/api/me", {}),
        ("get", "/api/projects", {}),
    ]


@pytest.mark.parametrize("auth", [None, "Bearer nope", "Bearer ", "Basic abc", "plt_x"])
def test_no_or_wrong_token_is_401_and_writes_nothing(env, seeded, auth):
    before = env.snapshot()
    headers = {} if auth is None else {"Authorization": auth}
    for method, path, kw in _requests(seeded):
        r = getattr(env.client, method)(path, headers=headers, **kw)
        assert r.status_code == 401, (path, r.text)
        assert "token" in r.json()["detail"] and r.headers["www-authenticate"] == "Bearer"
    assert env.snapshot() == before
    assert env.client.post("/api/login", json={"token": "nope"}).status_code == 401


def test_revoked_token_is_401(env):
    env.client.app.state.store.revoke_token(env.tokens["bob"])
    assert env.client.get("/api/me", headers=env.bob).status_code == 401


def test_labeller_on_admin_endpoints_is_403_and_writes_nothing(env, seeded):
    before = env.snapshot()
    labeller_ok = {
        "/api/next",
        f"/api/tasks/{seeded['task']}/answer",
        f"/api/tasks/{seeded['task']}/release",
        f"/api/media/{seeded['sha']}.mp4",
        "/api/me",
        "/api/projects",
    }
    for method, path, kw in _requests(seeded):
        if path in labeller_ok:
            continue
        r = getattr(env.client, method)(path, headers=env.alice, **kw)
        assert r.status_code == 403, (path, r.text)
    assert env.snapshot() == before


def test_wrong_project_is_403_and_writes_nothing(env, seeded):
    before = env.snapshot()
    # carol is assigned to 'other' only
    r = env.client.post(
        f"/api/tasks/{seeded['task']}/answer", json={"answer": {"choice": "left"}}, headers=env.carol
    )
    assert r.status_code == 403 and "not assigned" in r.json()["detail"]
    r = env.client.post("/api/next", json={"project": "p"}, headers=env.carol)
    assert r.status_code == 403
    assert env.client.get(f"/api/media/{seeded['sha']}.mp4", headers=env.carol).status_code == 403
    # whether a project exists is not revealed to a labeller
    assert env.client.post("/api/next", json={"project": "nope"}, headers=env.carol).status_code == 403
    # carol's queue holds only her project's task
    assert env.client.post("/api/next", json={}, headers=env.carol).json()["task"]["id"] == seeded["other"]
    # an admin of one project cannot touch another
    store = env.client.app.state.store
    padmin = {"Authorization": "Bearer " + store.create_token("p-admin", "admin", ["p"])}
    before = env.snapshot()
    for path in ("/api/projects/other/tasks/cancel", "/api/projects/other/tasks/status"):
        assert env.client.post(path, json={"ids": [seeded["other"]]}, headers=padmin).status_code == 403
    assert env.client.get("/api/projects/other/answers", headers=padmin).status_code == 403
    assert env.client.post("/api/projects", json={"name": "q"}, headers=padmin).status_code == 403
    assert env.snapshot() == before


def test_bad_input_is_a_clear_4xx_and_writes_nothing(env, seeded, media):
    t = seeded["task"]
    assert (
        env.client.post(
            f"/api/tasks/{t}/answer", json={"answer": {"choice": "left"}}, headers=env.alice
        ).status_code
        == 201
    )
    before = env.snapshot()
    cases = [
        # unknown task
        ("post", "/api/tasks/999/answer", {"json": {"answer": {"choice": "left"}}}, env.alice, 404, "999"),
        # double answer
        (
            "post",
            f"/api/tasks/{t}/answer",
            {"json": {"answer": {"choice": "right"}}},
            env.alice,
            409,
            "already",
        ),
        # answers of the wrong shape
        ("post", f"/api/tasks/{t}/answer", {"json": {"answer": {"choice": "up"}}}, env.bob, 400, "choice"),
        ("post", f"/api/tasks/{t}/answer", {"json": {"answer": {"ranking": [0, 1]}}}, env.bob, 400, "choice"),
        ("post", f"/api/tasks/{t}/answer", {"json": {"answer": "left"}}, env.bob, 422, "answer"),
        (
            "post",
            f"/api/tasks/{t}/answer",
            {"json": {"answer": {"choice": "left"}, "duration_ms": -1}},
            env.bob,
            400,
            "duration_ms",
        ),
        ("post", "/api/tasks/abc/answer", {"json": {"answer": {"choice": "left"}}}, env.bob, 422, "task_id"),
        # malformed JSON
        (
            "post",
            f"/api/tasks/{t}/answer",
            {"content": b'{"answer": {"choice": "le', "headers_extra": True},
            env.bob,
            400,
            "not valid JSON",
        ),
        (
            "post",
            "/api/projects/p/tasks",
            {"content": b"[1, 2", "headers_extra": True},
            env.admin,
            400,
            "JSON",
        ),
        # bad task specs (all or nothing: the valid first task is not written either)
        (
            "post",
            "/api/projects/p/tasks",
            {"json": {"tasks": [{"kind": "pair", "left": "a", "right": "b"}, {"kind": "pair", "left": "a"}]}},
            env.admin,
            400,
            "tasks[1]: a pair task needs 'right'",
        ),
        (
            "post",
            "/api/projects/p/tasks",
            {"json": {"tasks": [{"kind": "rank", "prompt": "q", "completions": ["a"] * 10}]}},
            env.admin,
            400,
            "2..9",
        ),
        (
            "post",
            "/api/projects/p/tasks",
            {"json": {"tasks": [{"kind": "pair", "left": {"media": "0" * 64}, "right": "b"}]}},
            env.admin,
            400,
            "never uploaded",
        ),
        (
            "post",
            "/api/projects/p/tasks",
            {"json": {"tasks": [{"kind": "pair", "left": "a", "right": "b", "metadata": {"label": 1}}]}},
            env.admin,
            400,
            "reserved",
        ),
        ("post", "/api/projects/p/tasks", {"json": {"tasks": [{"kind": "movie"}]}}, env.admin, 400, "kind"),
        ("post", "/api/projects/p/tasks", {"json": {"tasks": []}}, env.admin, 422, "tasks"),
        (
            "post",
            "/api/projects/nope/tasks",
            {"json": {"tasks": [{"kind": "pair", "left": "a", "right": "b"}]}},
            env.admin,
            404,
            "does not exist",
        ),
        # uploads: not media, oversized (limit is 64 KiB in the fixture), empty, multipart without 'file'
        (
            "post",
            "/api/media",
            {"content": b"<html>not a clip</html>"},
            env.admin,
            400,
            "not a supported media",
        ),
        ("post", "/api/media", {"content": b"\x1a\x45\xdf\xa3matroska" + b"\0" * 40}, env.admin, 400, "webm"),
        ("post", "/api/media", {"content": media["mp4"] + b"\0" * 200_000}, env.admin, 413, "larger than"),
        (
            "post",
            "/api/media",
            {"files": {"file": ("a.mp4", media["mp4"] + b"\0" * 200_000)}},
            env.admin,
            413,
            "larger than",
        ),
        ("post", "/api/media", {"content": b""}, env.admin, 400, "empty"),
        ("post", "/api/media", {"files": {"other": ("a.gif", media["gif"])}}, env.admin, 400, "'file'"),
        ("get", "/api/media/../../feedback.sqlite", {}, env.admin, 404, ""),
        ("get", f"/api/media/{'0' * 64}.mp4", {}, env.admin, 404, "does not exist"),
        ("get", "/api/projects/p/export?format=csv", {}, env.admin, 400, "format"),
    ]
    for method, path, kw, who, status, text in cases:
        kw = dict(kw)
        headers = dict(who)
        if kw.pop("headers_extra", False):
            headers["Content-Type"] = "application/json"
        r = getattr(env.client, method)(path, headers=headers, **kw)
        assert r.status_code == status, (path, kw, r.text)
        if text:
            assert text in r.json()["detail"], (path, r.json())
    assert env.snapshot() == before
    assert sorted(p.name for p in (env.data_dir / "media").iterdir()) == [f"{seeded['sha']}.mp4"]


def test_migrations_are_versioned(tmp_path):
    db = tmp_path / "f.sqlite"
    store = Store(db)
    assert store.schema_version() == SCHEMA_VERSION == MIGRATIONS[-1][0]
    store.close()
    Store(db).close()  # reopening applies nothing twice
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == len(MIGRATIONS)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.execute("INSERT INTO schema_migrations VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    con.commit()
    con.close()
    with pytest.raises(FeedbackError, match="newer than this palate"):
        Store(db)


def test_ranking_helpers():
    assert dense_ranks([3, 0, 0, 7]) == [1, 0, 0, 2]
    out = agreement(
        [
            ("rank", [{"ranking": [0, 1, 2]}, {"ranking": [0, 2, 1]}]),
            ("best", [{"best": 1}, {"best": 1}, {"best": 0}]),
        ]
    )
    assert out["rank"] == {"agreement": pytest.approx(2 / 3), "labeller_pairs": 1, "tasks": 1}
    assert out["best"] == {"agreement": pytest.approx(1 / 3), "labeller_pairs": 3, "tasks": 1}
    # two "can't tell" agree with each other and with no order
    out = agreement([("rank", [{"cant_tell": True}, {"cant_tell": True}, {"ranking": [0, 1]}])])
    assert out["rank"]["agreement"] == pytest.approx(1 / 3)



def test_cant_tell_on_rankings_and_best_of_k_is_exactly_one_shape():
    from palate.feedback.errors import BadInput
    from palate.feedback.tasks import normalize_answer

    for mode in ("rank", "best"):
        assert normalize_answer(mode, 3, {"cant_tell": True}) == {"cant_tell": True}
        for bad in ({"cant_tell": False}, {"cant_tell": True, "best": 0}, {"cant_tell": 1}):
            with pytest.raises(BadInput, match="exactly \\{'cant_tell': true\\}"):
                normalize_answer(mode, 3, bad)
    with pytest.raises(BadInput, match="a pair task takes"):
        normalize_answer("pair", 2, {"cant_tell": True})  # pairs say it with a choice
