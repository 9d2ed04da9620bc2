"""People rank LM outputs: ``palate lm label --labeller human`` against a real feedback server.

Real parts throughout: the FastAPI server as a subprocess on a port, its SQLite file, a tiny
random model of SmolLM2's architecture, and (in the browser test) headless Chromium on the
ranking page. Scripted people answer; the tests check what reaches the comparisons JSONL.
"""

from __future__ import annotations

import os
import re
import shutil
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
import numpy as np
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


# --------------------------------------------------------------------------- a person in the browser

COLOURS = ("red", "green", "blue", "yellow")
MENTIONS_COLOUR = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-gpu"]


def _with_colours(groups: list[list[str]], rng: np.random.Generator) -> list[list[str]]:
    """Put a colour word at a random place in one or two of each group's completions.

    The tiny random model writes byte soup, so a rule about content needs content it can decide;
    the texts are otherwise the model's own samples.
    """
    out = []
    for group in groups:
        marked = set(rng.choice(len(group), size=int(rng.integers(1, 3)), replace=False).tolist())
        new = []
        for j, text in enumerate(group):
            if j in marked:
                words = text.split(" ")
                words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(COLOURS)))
                text = " ".join(words)
            new.append(text)
        out.append(new)
    return out


def _rank_by_colour(page, task_id: str) -> None:
    """The scripted person: completions that mention a colour first (tied), the rest after (tied)."""
    texts = page.locator("#rank-list li").all_inner_texts()  # shown in completion order until a key is pressed
    colour = [i for i, t in enumerate(texts) if MENTIONS_COLOUR.search(t)]
    plain = [i for i in range(len(texts)) if i not in colour]
    for group in (colour, plain):
        for n, i in enumerate(group):
            if n:
                page.keyboard.press("=")
            page.keyboard.press(str(i + 1))
    page.keyboard.press("Enter")
    page.wait_for_selector(f"body[data-last-answered='{task_id}']")


@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="needs Debian chromium (make setup)")
def test_a_person_in_the_browser_teaches_the_reward_model_a_new_rule(tmp_path, service, tiny_dir, monkeypatch,
                                                                     one_thread):
    """40 rankings by "prefers a colour" through the real page: the RM orders unseen completions by it."""
    sync_api = pytest.importorskip("playwright.sync_api")
    from palate.lm import demos
    from palate.lm.demos import LabelConfig, label_comparisons
    from palate.lm.reward import RMConfig, train_reward_model
    from palate.lm.reward_model import RewardModel

    n_tasks, k = 40, 4
    real_candidates = demos._candidates
    colour_rng = np.random.default_rng(11)

    def candidates(*args, **kwargs):
        task, prompts, grouped = real_candidates(*args, **kwargs)
        return task, prompts, _with_colours(grouped, colour_rng)

    monkeypatch.setattr(demos, "_candidates", candidates)
    monkeypatch.setenv("PALATE_FEEDBACK_TOKEN", service.admin)
    out = tmp_path / "people.jsonl"
    cfg = LabelConfig(model=str(tiny_dir), task="sentiment", limit=n_tasks, k=k, max_new_tokens=6, batch_size=64,
                      labeller="human", feedback_url=service.url, feedback_project="lm", out=str(out),
                      label_wait_s=240, poll_s=0.2, seed=5)
    result: dict[str, object] = {}
    worker = threading.Thread(target=lambda: result.update(path=label_comparisons(cfg)), daemon=True)
    worker.start()
    deadline = time.monotonic() + 120
    while service.rows("SELECT COUNT(*) FROM tasks")[0][0] < n_tasks and time.monotonic() < deadline:
        time.sleep(0.1)

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            page.goto(service.url + "/")
            page.fill("#token", service.people["alice"])
            page.click("button[type=submit]")
            page.wait_for_selector("body[data-ready='1']")
            for _ in range(n_tasks):
                page.wait_for_selector("#rank-list li")
                _rank_by_colour(page, page.get_attribute("body", "data-task-id"))
            page.wait_for_selector("#empty:not([hidden])")
        finally:
            browser.close()
    worker.join(timeout=60)
    assert result.get("path") == out

    comps = read_comparisons(out)
    assert len(comps) == n_tasks and {c.labeller for c in comps} == {"alice"}
    for c in comps:  # the page's answer reached the file against the right completions
        assert c.ranks == [0 if MENTIONS_COLOUR.search(t) else 1 for t in c.completions]

    run = train_reward_model(RMConfig(model=str(tiny_dir), train_data=str(out), features_layer=1, seed=0,
                                      runs_dir=str(tmp_path / "runs"), tensorboard=False))
    rm = RewardModel.from_pretrained(run / "model")
    # Unseen: other prompts, fresh samples of the same model, colours placed the same way.
    from palate.data.tasks import load_task
    from palate.lm.models import load_model
    from palate.lm.sft import sample_completions

    policy, tok = load_model(str(tiny_dir))
    prompts = load_task("sentiment").prompts("train")[n_tasks:n_tasks + 40]
    flat = sample_completions(policy, tok, [p for p in prompts for _ in range(k)], chat=False, max_new_tokens=6,
                              batch_size=64, temperature=1.0, top_p=1.0)
    groups = _with_colours([flat[i * k:(i + 1) * k] for i in range(len(prompts))], np.random.default_rng(12))
    correct = pairs = 0
    for prompt, group in zip(prompts, groups):
        scores = rm.score_texts([prompt] * k, group, tok, batch_size=k)
        colour = [bool(MENTIONS_COLOUR.search(t)) for t in group]
        for a in range(k):
            for b in range(k):
                if colour[a] and not colour[b]:
                    pairs += 1
                    correct += int(scores[a] > scores[b])
    assert pairs >= 100
    assert correct / pairs >= 0.8, f"the reward model orders {correct}/{pairs} unseen pairs by the rule"
