"""API behaviour: create, lease, answer, expiry, redundancy, cancel, cursor, export/import, client."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from palate.errors import FeedbackError
from palate.feedback import cli
from palate.feedback.client import FeedbackClient
from palate.feedback.store import Store


def create(env, tasks, project="p"):
    r = env.client.post(f"/api/projects/{project}/tasks", json={"tasks": tasks}, headers=env.admin)
    assert r.status_code == 201, r.text
    return r.json()["ids"]


def lease(env, who, project=None):
    r = env.client.post("/api/next", json={"project": project}, headers=who)
    assert r.status_code == 200, r.text
    return r.json()["task"]


def answer(env, who, task_id, ans, **kw):
    return env.client.post(f"/api/tasks/{task_id}/answer", json={"answer": ans, **kw}, headers=who)


def test_create_lease_answer_and_fetch_since_cursor(env):
    ids = create(
        env,
        [
            {"kind": "pair", "left": "a", "right": "b", "prompt": "q", "priority": 0},
            {"kind": "pair", "left": "c", "right": "d", "priority": 5, "metadata": {"run": "x"}},
            {"kind": "rank", "prompt": "p", "completions": ["1", "2", "3", "4"]},
        ],
    )
    # Highest priority first, then oldest.
    t = lease(env, env.alice)
    assert t["id"] == ids[1] and t["items"] == [{"text": "c"}, {"text": "d"}]
    assert "metadata" not in t  # labellers do not see what produced a clip
    # Leasing again returns the same task (a page reload), not a second one.
    assert lease(env, env.alice)["id"] == ids[1]
    # Bob gets the next one while alice holds hers.
    assert lease(env, env.bob)["id"] == ids[0]
    r = answer(env, env.alice, ids[1], {"choice": "left"}, duration_ms=1500, next=True)
    assert r.status_code == 201
    assert r.json()["task"]["id"] == ids[2]  # next task in the same round trip
    assert r.json()["progress"] == {"answered_today": 1, "queue": 2}
    assert answer(env, env.alice, ids[2], {"ranking": [2, 0, 0, 3]}).status_code == 201
    assert answer(env, env.bob, ids[0], {"choice": "cant_tell"}).status_code == 201

    r = env.client.get("/api/projects/p/answers", params={"since": 0, "limit": 2}, headers=env.admin).json()
    assert [a["task_id"] for a in r["answers"]] == [ids[1], ids[2]] and r["has_more"]
    assert r["answers"][0]["metadata"] == {"run": "x"} and r["answers"][0]["duration_ms"] == 1500
    assert r["answers"][1]["answer"] == {"ranking": [1, 0, 0, 2]}  # stored as dense ranks
    r2 = env.client.get("/api/projects/p/answers", params={"since": r["cursor"]}, headers=env.admin).json()
    assert [a["task_id"] for a in r2["answers"]] == [ids[0]] and not r2["has_more"]
    assert lease(env, env.alice) is None


def test_lease_expires_and_task_returns_to_queue(env):
    [tid] = create(env, [{"kind": "pair", "left": "a", "right": "b"}])
    assert lease(env, env.alice)["id"] == tid
    assert lease(env, env.bob) is None  # reserved for alice
    env.clock.advance(119)
    assert lease(env, env.bob) is None
    env.clock.advance(2)
    assert lease(env, env.bob)["id"] == tid  # alice's 2 minutes are over
    # Alice answers late: bob now holds the only slot, so hers is refused and nothing is written.
    before = env.snapshot()
    r = answer(env, env.alice, tid, {"choice": "left"})
    assert r.status_code == 409 and "expired" in r.json()["detail"]
    assert env.snapshot() == before
    assert answer(env, env.bob, tid, {"choice": "right"}).status_code == 201


def test_late_answer_accepted_when_nobody_took_the_task(env):
    [tid] = create(env, [{"kind": "pair", "left": "a", "right": "b"}])
    lease(env, env.alice)
    env.clock.advance(600)
    assert answer(env, env.alice, tid, {"choice": "equal"}).status_code == 201


def test_redundancy_gives_a_task_to_n_distinct_labellers(env, tmp_path):
    store = env.client.app.state.store
    dave = {"Authorization": "Bearer " + store.create_token("dave", "labeller", ["p"])}
    [tid] = create(env, [{"kind": "pair", "left": "a", "right": "b", "redundancy": 2}])
    assert lease(env, env.alice)["id"] == tid
    assert lease(env, env.bob)["id"] == tid  # same task, second labeller
    assert lease(env, dave) is None  # two slots, both leased
    assert answer(env, env.alice, tid, {"choice": "left"}).status_code == 201
    assert lease(env, env.alice) is None  # never the same task twice to one labeller
    assert answer(env, env.bob, tid, {"choice": "left"}).status_code == 201
    status = env.client.post("/api/projects/p/tasks/status", json={"ids": [tid]}, headers=env.admin).json()
    assert status["tasks"][str(tid)] == {"status": "done", "n_answers": 2, "redundancy": 2}
    stats = env.client.get("/api/projects/p/stats", headers=env.admin).json()
    assert stats["agreement"]["pair"] == {"agreement": 1.0, "labeller_pairs": 1, "tasks": 1}
    assert stats["queue"]["done"] == 1 and stats["throughput"]["total"] == 2


def test_cancel_removes_open_tasks_from_the_queue(env):
    ids = create(
        env, [{"kind": "pair", "left": "a", "right": "b"}, {"kind": "pair", "left": "c", "right": "d"}]
    )
    assert lease(env, env.alice)["id"] == ids[0]
    r = env.client.post("/api/projects/p/tasks/cancel", json={"ids": ids}, headers=env.admin)
    assert r.json() == {"cancelled": 2}
    r = answer(env, env.alice, ids[0], {"choice": "left"})
    assert r.status_code == 409 and "cancelled" in r.json()["detail"]
    assert lease(env, env.alice) is None


def test_media_upload_and_labeller_access(env, media):
    shas = {}
    for ext, data in media.items():
        r = env.client.post("/api/media", content=data, headers=env.admin)
        assert r.status_code == 201 and r.json()["ext"] == ext
        shas[ext] = r.json()["sha256"]
        assert (env.data_dir / "media" / f"{shas[ext]}.{ext}").read_bytes() == data
    # multipart works too, and the client's file name is ignored
    r = env.client.post(
        "/api/media", files={"file": ("../../etc/passwd.mp4", media["gif"])}, headers=env.admin
    )
    assert r.status_code == 201 and r.json() == {
        "sha256": shas["gif"],
        "ext": "gif",
        "size": len(media["gif"]),
    }
    [tid] = create(
        env,
        [
            {
                "kind": "pair",
                "left": {"media": shas["mp4"], "id": "seg-1"},
                "right": {"media": shas["webm"], "id": "seg-2"},
            }
        ],
    )
    t = lease(env, env.alice)
    assert t["id"] == tid and t["items"][0]["media_url"] == f"/api/media/{shas['mp4']}.mp4"
    r = env.client.get(t["items"][0]["media_url"], headers=env.alice)
    assert r.status_code == 200 and r.content == media["mp4"] and r.headers["content-type"] == "video/mp4"
    # carol (other project) may not fetch it; a gif in no task of hers neither
    assert env.client.get(t["items"][0]["media_url"], headers=env.carol).status_code == 403
    assert env.client.get(f"/api/media/{shas['gif']}.gif", headers=env.alice).status_code == 403
    assert env.client.get("/api/media/..%2Ffeedback.sqlite", headers=env.admin).status_code == 404
    # export names the items by the run's ids
    answer(env, env.alice, tid, {"choice": "right"})
    line = env.client.get("/api/projects/p/export", headers=env.admin).text.strip()
    assert json.loads(line) == {
        "comparison_id": f"p:{tid}",
        "left": "seg-1",
        "right": "seg-2",
        "label": "right",
        "labeller": "alice",
    }


def _label_everything(env):
    create(
        env,
        [
            {
                "kind": "pair",
                "left": {"text": "L", "id": "s1"},
                "right": {"text": "R", "id": "s2"},
                "external_id": "cmp-1",
                "metadata": {"env": "Hopper-v5", "step": 3},
                "redundancy": 2,
            },
            {"kind": "pair", "prompt": "Say hi", "left": "hi", "right": "go away"},
            {"kind": "pair", "prompt": "Say hi", "left": "hello", "right": "hey"},
            {"kind": "rank", "prompt": "Q", "completions": ["a", "b", "c"], "external_id": "r-1"},
            {"kind": "rank", "mode": "best", "prompt": "Q2", "completions": ["x", "y", "z", "w"]},
        ],
    )
    for who in (env.alice, env.bob):
        while (t := lease(env, who)) is not None:
            if t["mode"] == "pair":
                choice = (
                    "equal" if t["items"][0]["text"] == "hello" else ("right" if who is env.bob else "left")
                )
                ans = {"choice": choice}
            elif t["mode"] == "rank":
                ans = {"ranking": [1, 0, 1]}
            else:
                ans = {"best": 2}
            assert answer(env, who, t["id"], ans).status_code == 201


def test_export_formats_match_what_trainers_read(env):
    _label_everything(env)

    def get(fmt):
        r = env.client.get("/api/projects/p/export", params={"format": fmt}, headers=env.admin)
        return [json.loads(x) for x in r.text.splitlines()]

    pairs = get("pairs")
    assert pairs == [
        {
            "comparison_id": "cmp-1",
            "left": "s1",
            "right": "s2",
            "label": "left",
            "labeller": "alice",
            "env": "Hopper-v5",
            "step": 3,
        },
        {
            "comparison_id": "cmp-1",
            "left": "s1",
            "right": "s2",
            "label": "right",
            "labeller": "bob",
            "env": "Hopper-v5",
            "step": 3,
        },
    ]
    text = get("text_pairs")  # the 'equal' answer has no chosen/rejected and is left out
    assert [(t["prompt"], t["chosen"], t["rejected"]) for t in text] == [("Say hi", "hi", "go away")]
    [rank] = get("rankings")
    assert rank | {"labeller": None} == {
        "prompt": "Q",
        "completions": ["a", "b", "c"],
        "ranking": [1, 0, 1],
        "labeller": None,
        "comparison_id": "r-1",
    }
    [best] = get("best_of_k")
    assert best["completions"] == ["x", "y", "z", "w"] and best["best"] == 2
    # a mixed project needs a format: a trainer reads one format per file
    r = env.client.get("/api/projects/p/export", headers=env.admin)
    assert r.status_code == 400 and "--format" in r.json()["detail"]


def test_cli_export_import_round_trip(env, tmp_path):
    _label_everything(env)
    env.client.app.state.store.close()  # the CLI opens the database itself
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    other = tmp_path / "other.sqlite"
    for fmt in ("pairs", "text_pairs", "rankings", "best_of_k"):
        out = tmp_path / f"{fmt}.jsonl"
        args = parser.parse_args(
            ["feedback", "export", "--db", str(env.db), "--project", "p", "--out", str(out), "--format", fmt]
        )
        assert args.func(args) == 0
        for _ in range(2):  # importing twice is harmless
            args = parser.parse_args(
                ["feedback", "import", "--db", str(other), "--project", "shared", str(out)]
            )
            assert args.func(args) == 0
        args = parser.parse_args(
            [
                "feedback",
                "export",
                "--db",
                str(other),
                "--project",
                "shared",
                "--out",
                str(tmp_path / "again.jsonl"),
                "--format",
                fmt,
            ]
        )
        assert args.func(args) == 0
        first = sorted(
            json.dumps({k: v for k, v in json.loads(x).items() if k != "comparison_id"}, sort_keys=True)
            for x in out.read_text().splitlines()
        )
        again = sorted(
            json.dumps({k: v for k, v in json.loads(x).items() if k != "comparison_id"}, sort_keys=True)
            for x in (tmp_path / "again.jsonl").read_text().splitlines()
        )
        assert first == again, fmt
    store = Store(other)
    assert store.stats(store.project_id("shared"))["agreement"]["pair"]["agreement"] == 0.0
    store.close()


def test_cli_create_token_and_errors(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    db = tmp_path / "f.sqlite"
    args = parser.parse_args(["feedback", "create-token", "--db", str(db), "--name", "ann", "--project", "p"])
    assert args.func(args) == 0
    token = capsys.readouterr().out.strip()
    store = Store(db)
    who = store.authenticate(token)
    assert who.name == "ann" and who.role == "labeller" and who.project_ids == {store.project_id("p")}
    # only the hash is stored
    assert token not in json.dumps([list(r) for r in store._db.execute("SELECT * FROM tokens")])
    store.close()
    args = parser.parse_args(["feedback", "revoke-token", "--db", str(db), "--token", token])
    assert args.func(args) == 0
    with pytest.raises(FeedbackError, match="unknown or already revoked"):
        args.func(args)
    args = parser.parse_args(["feedback", "create-token", "--db", str(db), "--name", "bo"])
    with pytest.raises(FeedbackError, match="--project"):
        args.func(args)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "a", "rejected": "b"}\n{oops\n')
    args = parser.parse_args(["feedback", "import", "--db", str(db), "--project", "p", str(bad)])
    with pytest.raises(FeedbackError, match="bad.jsonl:2"):
        args.func(args)
    args = parser.parse_args(["feedback", "export", "--db", str(db), "--project", "nope", "--out", str(bad)])
    with pytest.raises(FeedbackError, match="'nope' does not exist"):
        args.func(args)


def test_python_client(env, media, tmp_path):
    fb = FeedbackClient("http://testserver", env.tokens["admin"], http=env.client)
    fb.ensure_project("runs")
    sha = fb.upload_media(media["mp4"])
    sha2 = fb.upload_media(media["webm"])
    ids = fb.create_pair_tasks(
        "runs", [{"left": {"media": sha}, "right": {"media": sha2}, "external_id": "c1"}], priority=3
    )
    rid = fb.create_rank_task("runs", "Q", ["a", "b"], best_of=True)
    clip = tmp_path / "seg-9.gif"
    clip.write_bytes(media["gif"])
    [from_path] = fb.create_pair_tasks("runs", [{"left": clip, "right": "text"}], priority=-1)
    with pytest.raises(FeedbackError, match="409.*already exists"):
        fb.create_pair_tasks("runs", [{"left": "a", "right": "b", "external_id": "c1"}])
    admin_as_labeller = FeedbackClient("http://testserver", env.tokens["admin"], http=env.client)
    task, progress = admin_as_labeller.next_task("runs")
    assert task["id"] == ids[0] and progress["queue"] == 3
    admin_as_labeller.answer(task["id"], {"choice": "left"})
    assert fb.cancel("runs", [rid, from_path]) == 2
    got = fb.wait_for_answers("runs", ids + [rid], timeout=5, poll_interval=0.01)
    assert [a["answer"] for a in got[ids[0]]] == [{"choice": "left"}] and got[rid] == []
    answers, cursor = fb.answers_since("runs")
    assert len(answers) == 1 and fb.answers_since("runs", cursor) == ([], cursor)
    assert fb.stats("runs")["queue"] == {"open": 0, "leased": 0, "done": 1, "cancelled": 2}
    assert fb.task_status("runs", [from_path])[from_path]["status"] == "cancelled"
    [still_open] = fb.create_pair_tasks("runs", [{"left": "a", "right": "b"}])
    assert fb.wait_for_answers("runs", [still_open], timeout=0.05, poll_interval=0.01) == {still_open: []}
    with pytest.raises(FeedbackError, match="not in project"):
        fb.wait_for_answers("runs", [10_000], timeout=0.05)
    assert fb.export("runs")[0]["label"] == "left"


def test_projects_and_pages(env):
    assert env.client.get("/", follow_redirects=False).status_code == 303
    env.client.post("/api/login", json={"token": env.tokens["alice"]})  # sets the cookie
    assert env.client.get("/").status_code == 200
    assert env.client.get("/admin").status_code == 403
    assert [p["name"] for p in env.client.get("/api/projects").json()] == ["p"]
    env.client.post("/api/logout")
    env.client.cookies.clear()
    assert env.client.get("/api/me").status_code == 401
    assert env.client.post("/api/projects", json={"name": "new"}, headers=env.admin).status_code == 201
    assert "new" in [p["name"] for p in env.client.get("/api/projects", headers=env.admin).json()]


def test_static_assets_are_shipped():
    static = Path(__file__).parents[2] / "palate" / "feedback" / "static"
    assert {"label.html", "label.js", "admin.html", "admin.js", "login.html", "login.js", "style.css"} <= {
        p.name for p in static.iterdir()
    }


def test_find_tasks_by_external_id(env):
    ids = env.client.post(
        "/api/projects/p/tasks",
        json={"tasks": [{"kind": "pair", "left": "a", "right": "b", "external_id": "c-1", "redundancy": 2},
                        {"kind": "pair", "left": "c", "right": "d"}]},
        headers=env.admin,
    ).json()["ids"]
    fb = FeedbackClient("http://testserver", env.tokens["admin"], http=env.client)
    assert fb.find_tasks("p", ["c-1", "unknown"]) == {
        "c-1": {"id": ids[0], "status": "open", "n_answers": 0, "redundancy": 2}
    }
    assert fb.find_tasks("other", ["c-1"]) == {}  # external ids are per project
