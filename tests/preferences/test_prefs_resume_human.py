"""`palate prefs resume` with people labelling: the open clip pairs are adopted, none dropped or asked twice.

A real feedback service (the FastAPI app, SQLite) serves a run whose labeller is a person
answering in a thread; the run is killed after asking a round of pairs and before its
checkpoint, people answer while it is down, and the resumed run must end with every answer the
service holds in labels.jsonl exactly once, and one task per comparison.
"""

import hashlib
import json
import sqlite3
import threading
import time

import pytest
from fastapi.testclient import TestClient

from palate.feedback.client import FeedbackClient
from palate.feedback.server import create_app
from palate.preferences.config import PreferenceConfig
from palate.preferences.labellers import HumanLabeller
from palate.preferences.trainer import PreferenceTrainer

PROJECT = "resume-prefs"
GIF = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"


def _clip(segment) -> bytes:
    """A valid GIF, distinct per segment: the service only sniffs the header."""
    return GIF + hashlib.sha256(segment.obs.tobytes()).digest()


def _cfg(tmp_path, **kw):
    base = dict(env="Pendulum-v1", labels=16, steps=768, chunk_steps=256, segment_length=10, random_steps=400,
                rm_epochs=1, rm_initial_epochs=1, eval_episodes=0, progress=False, initial_wait_s=60.0,
                label_wait_s=60.0, max_pending=64, runs_dir=str(tmp_path), run_name="human",
                rl={"n_envs": 2, "n_steps": 64, "batch_size": 64, "n_epochs": 1})
    base.update(kw)
    return PreferenceConfig(**base)


class CrashBeforeThirdCheckpoint(PreferenceTrainer):
    """Dies after the round at step 512 asked its pairs and they reached the service, before its checkpoint."""

    def save_checkpoint(self, store, channel):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 3:
            deadline = time.monotonic() + 30
            while len(_service_answers(self.db)[1]) < self.asked and time.monotonic() < deadline:
                time.sleep(0.05)
            raise KeyboardInterrupt
        return super().save_checkpoint(store, channel)


class Person(threading.Thread):
    """Answers whatever the page would show, until told to stop or ``limit`` answers are given."""

    def __init__(self, client, limit=None):
        super().__init__(daemon=True)
        self.client, self.limit, self.given, self.stop = client, limit, 0, threading.Event()

    def run(self):
        while not self.stop.is_set() and (self.limit is None or self.given < self.limit):
            task, _ = self.client.next_task(PROJECT)
            if task is None:
                time.sleep(0.05)
                continue
            self.client.answer(task["id"], {"choice": "left" if task["id"] % 2 else "right"})
            self.given += 1


@pytest.fixture
def service(tmp_path):
    db = tmp_path / "fb.sqlite"
    app = create_app(db, data_dir=tmp_path / "fb-data")
    admin = app.state.store.create_token("trainer", "admin", all_projects=True)
    alice = app.state.store.create_token("alice", "labeller", [PROJECT])
    with TestClient(app) as person_http:
        # Each run's labeller closes its client when the run ends: a fresh connection per run.
        yield db, (lambda: FeedbackClient("http://testserver", admin, http=TestClient(app))), \
            FeedbackClient("http://testserver", alice, http=person_http)


def _labeller(make_client):
    return HumanLabeller(make_client(), _clip, project=PROJECT, poll_interval=0.05)


def _service_answers(db):
    con = sqlite3.connect(db)
    try:
        answers = con.execute("SELECT a.task_id, c.name FROM answers a JOIN accounts c ON c.id = a.account_id").fetchall()
        tasks = con.execute("SELECT external_id, status FROM tasks").fetchall()
    finally:
        con.close()
    return answers, tasks


def test_resume_adopts_open_pairs_and_every_answer_reaches_labels_once(tmp_path, service):
    db, make_client, alice = service
    person = Person(alice, limit=4)  # the 4 random-policy pairs (25% of 16), then she leaves
    person.start()
    doomed = CrashBeforeThirdCheckpoint(_cfg(tmp_path), labeller=_labeller(make_client))
    doomed.db = db
    with pytest.raises(KeyboardInterrupt):
        doomed.train()
    person.join(timeout=30)
    run = tmp_path / "human"
    before = [json.loads(x) for x in (run / "labels.jsonl").read_text().splitlines()]
    assert len(before) == 4
    _, tasks = _service_answers(db)
    open_before = [t for t in tasks if t[1] == "open"]
    assert len(open_before) >= 4  # pairs of the rounds at 256 (checkpointed) and 512 (not)

    # While the run is down, Alice answers three of the open pairs.
    while_down = Person(alice, limit=3)
    while_down.run()
    answered_while_down, _ = _service_answers(db)

    person = Person(alice)
    person.start()
    try:
        summary = PreferenceTrainer.resume(run, labeller=_labeller(make_client)).train()
    finally:
        person.stop.set()
        person.join(timeout=30)

    answers, tasks = _service_answers(db)
    lines = [json.loads(x) for x in (run / "labels.jsonl").read_text().splitlines()]
    recorded = [(x["answer_meta"]["task_id"], x["answer_meta"]["labeller_id"]) for x in lines]
    # Every answer the service holds is in labels.jsonl, exactly once: those given while the
    # run was down included; the lines written before the crash are kept as they were.
    assert sorted(recorded) == sorted(answers) and len(set(recorded)) == len(recorded)
    assert set(answered_while_down) <= set(recorded)
    assert lines[: len(before)] == before
    # One task per comparison, none created twice; the budget is spent exactly, nothing left open.
    ext_ids = [t[0] for t in tasks]
    assert len(ext_ids) == len(set(ext_ids)) == 16 == summary["labels_asked"] == summary["answers"]
    assert {x["id"] for x in lines} == set(ext_ids)
    assert all(status == "done" for _, status in tasks)
