"""Crash safety: SIGKILL the server while labellers answer; after a restart every 2xx answer is there."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest

from palate.feedback.store import Store

N_LABELLERS = 8


def _labeller(url: str, token: str, acked: list, stop: threading.Event) -> None:
    """Answer as fast as possible; record (answer_id, task_id, choice) only for 201 replies."""
    choices = ("left", "right", "equal", "cant_tell")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=5) as http:
        try:
            task = http.post("/api/next", json={}).json()["task"]
            while task is not None and not stop.is_set():
                choice = choices[task["id"] % 4]
                r = http.post(
                    f"/api/tasks/{task['id']}/answer", json={"answer": {"choice": choice}, "next": True}
                )
                if r.status_code != 201:
                    return
                body = r.json()
                acked.append((body["answer_id"], task["id"], choice))
                task = body["task"]
        except (httpx.TransportError, ValueError):
            return  # the server died under us: whatever was not acknowledged may be lost


@pytest.mark.parametrize("synchronous", ["full", "normal"])
def test_sigkill_loses_no_acknowledged_answer(tmp_path: Path, make_server, synchronous):
    db = tmp_path / "feedback.sqlite"
    store = Store(db)
    tokens = [store.create_token(f"lab{i}", "labeller", ["crash"]) for i in range(N_LABELLERS)]
    store.create_tasks(
        store.project_id("crash"), [{"kind": "pair", "left": f"a{i}", "right": f"b{i}"} for i in range(3000)]
    )
    store.close()

    server = make_server(db, None, "--synchronous", synchronous)
    acked: list[tuple[int, int, str]] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_labeller, args=(server.url, tok, acked, stop)) for tok in tokens]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(acked) < 200 and time.monotonic() < deadline:
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGKILL)  # mid-flight: no shutdown hook runs
    server.proc.wait(timeout=10)
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert len(acked) >= 50, f"only {len(acked)} answers before the kill"

    # Restart on the same database: every acknowledged answer is there, exactly once.
    server = make_server(db)
    con = sqlite3.connect(db)
    stored = {
        aid: (tid, json.loads(ans)["choice"])
        for aid, tid, ans in con.execute("SELECT id, task_id, answer FROM answers")
    }
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    missing = [(aid, tid, c) for aid, tid, c in acked if stored.get(aid) != (tid, c)]
    assert not missing, f"{len(missing)} acknowledged answers lost, e.g. {missing[:3]}"
    # In-flight answers may have committed without their reply; nothing else is there, and the
    # per-task counters agree with the answers table.
    assert len(stored) - len(acked) <= N_LABELLERS
    bad = con.execute(
        "SELECT COUNT(*) FROM tasks t WHERE n_answers != "
        "(SELECT COUNT(*) FROM answers a WHERE a.task_id = t.id)"
    ).fetchone()[0]
    assert bad == 0
    con.close()
    # Leases died with the process: the restarted server hands out work at once.
    r = httpx.post(server.url + "/api/next", json={}, headers={"Authorization": f"Bearer {tokens[0]}"})
    assert r.status_code == 200 and r.json()["task"] is not None
