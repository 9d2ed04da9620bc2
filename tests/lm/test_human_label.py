"""People rank LM outputs: ``palate lm label --labeller human`` against a real feedback server.

Real parts throughout: the FastAPI server as a subprocess on a port, its SQLite file, a tiny
random model of SmolLM2's architecture, and (in the browser test) headless Chromium on the
ranking page. Scripted people answer; the tests check what reaches the comparisons JSONL.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import palate
from palate.data.formats import read_comparisons
from palate.feedback.client import FeedbackClient
from palate.feedback.store import Store
from palate.lm.human_label import agreement

REPO = Path(palate.__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """A feedback server subprocess with an admin and two labeller tokens for project ``lm``."""

    def __init__(self, tmp: Path) -> None:
        self.db = tmp / "feedback.sqlite"
        store = Store(self.db)
        self.admin = store.create_token("trainer", "admin", all_projects=True)
        self.people = {name: store.create_token(name, "labeller", ["lm"]) for name in ("alice", "bob")}
        store.close()
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "palate.feedback.server", "--db", str(self.db),
                                      "--port", str(port), "--host", "127.0.0.1"], cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        self.proc.kill()
        raise RuntimeError("feedback server did not start within 30 s")

    def rows(self, sql: str) -> list[tuple]:
        con = sqlite3.connect(self.db)
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    s = Service(tmp_path)
    yield s
    s.stop()


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    from palate.lm.testing import tiny_causal_lm

    model, tok = tiny_causal_lm(seed=3)
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _label_cmd(tiny_dir: Path, service: Service, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "palate.cli", "lm", "label", "--labeller", "human", "--model", str(tiny_dir),
            "--task", "sentiment", "--k", "3", "--max-new-tokens", "6", "--batch-size", "64",
            "--feedback-url", service.url, "--feedback-project", "lm", "--out", str(out), "--poll-s", "0.1", *extra]


class ScriptedPerson(threading.Thread):
    """Answers rank tasks through the API as the page does (next, then answer), remembering each 201."""

    def __init__(self, url: str, token: str, name: str, pause_s: float) -> None:
        super().__init__(daemon=True)
        self.client, self.name, self.pause_s = FeedbackClient(url, token), name, pause_s
        self.acked: list[tuple[int, int, str]] = []  # (answer id, task id, who)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            task, _ = self.client.next_task("lm")
            if task is None:
                time.sleep(0.05)
                continue
            texts = [it["text"] for it in task["items"]]
            order = sorted(range(len(texts)), key=lambda i: (-len(texts[i]), i))  # longest first
            ranks = [order.index(i) for i in range(len(texts))]
            reply = self.client.answer(task["id"], {"ranking": ranks})
            self.acked.append((int(reply["answer_id"]), int(task["id"]), self.name))
            time.sleep(self.pause_s)
        self.client.close()


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_sigkill_and_restart_keep_every_answer_once_and_ask_nothing_twice(tmp_path, service, tiny_dir):
    """kill -9 while people answer; the restart writes each acknowledged answer exactly once."""
    out = tmp_path / "human.jsonl"
    n_prompts, redundancy = 10, 2
    cmd = _label_cmd(tiny_dir, service, out, "--limit", str(n_prompts), "--redundancy", str(redundancy))
    env = {**os.environ, "PALATE_FEEDBACK_TOKEN": service.admin, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    people = [ScriptedPerson(service.url, tok, name, pause_s=0.3) for name, tok in service.people.items()]
    for p in people:
        p.start()
    deadline = time.monotonic() + 120
    while _lines(out) < 4 and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.02)
    assert first.poll() is None, first.stderr.read().decode()[-2000:]
    assert 4 <= _lines(out) < n_prompts * redundancy, "the kill must come while answers are still arriving"
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    first.stderr.close()
    before_restart = sum(len(p.acked) for p in people)
    time.sleep(0.5)  # people go on answering while nothing reads their answers

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    for p in people:
        p.stop.set()
        p.join(timeout=10)
    assert second.returncode == 0, second.stderr[-2000:]

    acked = Counter((task, who) for p in people for _, task, who in p.acked)
    assert sum(acked.values()) == n_prompts * redundancy and before_restart < n_prompts * redundancy
    comps = read_comparisons(out)
    written = Counter((c.meta["task_id"], c.labeller) for c in comps)
    assert written == acked  # every acknowledged answer, exactly once, with who gave it
    assert len({c.meta["answer_id"] for c in comps}) == len(comps)
    # No task twice: one task per prompt, each external id once.
    tasks = service.rows("SELECT external_id, redundancy, n_answers FROM tasks")
    assert len(tasks) == n_prompts and len({t[0] for t in tasks}) == n_prompts
    assert all(r == redundancy and n == redundancy for _, r, n in tasks)
    for c in comps:  # the JSONL is in the format palate lm rm reads, ranks as the people gave them
        assert c.kind == "ranking" and len(c.completions) == 3
    stats = agreement(comps)
    assert stats["answers_per_comparison"] == {redundancy: n_prompts} and set(stats["labellers"]) == {"alice", "bob"}
