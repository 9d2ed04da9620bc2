"""People rank LM outputs: ``palate lm label --labeller human`` against a real feedback server.

Real parts throughout: the FastAPI server as a subprocess on a port, its SQLite file, a tiny
random model of SmolLM2's architecture, and (in the browser test) headless Chromium on the
ranking page. Scripted people answer; the tests check what reaches the comparisons JSONL.
"""

from __future__ import annotations

import json
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
from palate.lm.human_label import RankingQueue, agreement, comparison_id

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
    people = [ScriptedPerson(service.url, tok, name, pause_s=0.4) for name, tok in service.people.items()]
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


# --------------------------------------------------------------------------- the pipeline and PPO with people


def _answer_everything(url: str, token: str, name: str) -> int:
    """One person answers every task they may (longest completion first); returns how many."""
    person = ScriptedPerson(url, token, name, pause_s=0.0)
    n = 0
    while True:
        task, _ = person.client.next_task("lm")
        if task is None:
            person.client.close()
            return n
        texts = [it["text"] for it in task["items"]]
        order = sorted(range(len(texts)), key=lambda i: (-len(texts[i]), i))
        person.client.answer(task["id"], {"ranking": [order.index(i) for i in range(len(texts))]})
        n += 1


def test_pipeline_label_stage_waits_for_people_then_resumes(tmp_path, service, tiny_dir, monkeypatch, one_thread):
    """label: {labeller: human}: a timeout stops with how to resume; the rerun takes the answers given meanwhile."""
    from palate.config import config_from_dict
    from palate.errors import FeedbackError
    from palate.lm.pipeline import PipelineConfig, run_pipeline, stage_done
    from palate.lm.report import write_report

    monkeypatch.setenv("PALATE_FEEDBACK_TOKEN", service.admin)
    cfg = config_from_dict(PipelineConfig, {
        "name": "lm", "runs_dir": str(tmp_path / "runs"), "task": "sentiment", "stages": ["label"],
        "label": {"model": str(tiny_dir), "labeller": "human", "feedback_url": service.url, "limit": 3, "k": 2,
                  "max_new_tokens": 4, "redundancy": 2, "label_wait_s": 0.5, "poll_s": 0.1}})
    with pytest.raises(FeedbackError, match="0 of 6 answers arrived.*Run the same command again"):
        run_pipeline(cfg)
    root = cfg.root
    assert not stage_done(root, "label")
    assert {name: _answer_everything(service.url, tok, name) for name, tok in service.people.items()} == \
        {"alice": 3, "bob": 3}
    run_pipeline(cfg)
    assert stage_done(root, "label")
    assert json.loads((root / "label" / "summary.json").read_text())["records"] == 6
    assert service.rows("SELECT COUNT(*) FROM tasks") == [(3,)]  # the rerun asked nothing again
    report = write_report(root).read_text()
    assert "## People's labels" in report and "alice 3, bob 3" in report and "1.000 over 3 pairs" in report


def test_ppo_goes_on_while_people_answer_and_learns_from_what_arrived(tmp_path, service, monkeypatch, one_thread):
    """online_labeller: human: rounds post tasks and retrain on arrived answers; a restart re-reads none twice."""
    import copy

    import torch

    from palate.data.tasks import load_task
    from palate.lm.online import OnlineCollector
    from palate.lm.ppo import LMPPOConfig, LMPPOTrainer, ValueModel, read_metrics
    from palate.lm.reward_model import RewardModel
    from palate.lm.testing import tiny_causal_lm
    from palate.runs import seed_everything

    monkeypatch.setenv("PALATE_FEEDBACK_TOKEN", service.admin)
    seed_everything(0)
    model, tok = tiny_causal_lm()
    rm = RewardModel.from_causal_lm(copy.deepcopy(model))
    rm.eval()
    cfg = LMPPOConfig(reward_model="unused", batch_size=4, mini_batch_size=4, iterations=4, max_new_tokens=6,
                      device="cpu", ppo_epochs=1, online_every=1, online_prompts=2, online_k=3,
                      online_rm_learning_rate=1e-3, online_labeller="human", feedback_url=service.url,
                      feedback_project="lm", runs_dir=str(tmp_path), run_name="ppo")
    task = load_task("sentiment")
    collector = OnlineCollector.from_config(cfg, rm, tok, task)
    prompts = task.prompts("train")[:6]
    trainer = LMPPOTrainer(cfg, model, tok, ValueModel.from_reward_model(rm),
                           lambda p, c: rm.score_texts(list(p), list(c), tok, batch_size=4), prompts,
                           lambda p: tok.encode(p), reference=copy.deepcopy(model), online=collector)
    head_before = rm.head.weight.detach().clone()
    person = ScriptedPerson(service.url, service.people["alice"], "alice", pause_s=0.0)
    person.start()
    try:
        trainer.train(cfg.run_dir)
        online = read_metrics(cfg.run_dir, phase="online")
        assert [r["step"] for r in online] == [1, 2, 3]  # one round per iteration, none waited for people
        assert sum(r["online/asked"] for r in online) == 6
        assert sum(r["online/labels"] for r in online) == len(collector.comparisons) > 0
        assert {c.labeller for c in collector.comparisons} == {"alice"}
        assert not torch.equal(rm.head.weight, head_before)  # retrained on people's answers
        deadline = time.monotonic() + 30
        while service.rows("SELECT COUNT(*) FROM answers") != [(6,)] and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        person.stop.set()
        person.join(timeout=10)
    # A resumed run (new process): answers after the checkpoint are handed out, those in it are not.
    state = torch.load(cfg.run_dir / "checkpoint.pt", weights_only=False)["online"]
    resumed = OnlineCollector.from_config(cfg, copy.deepcopy(rm), tok, task)
    resumed.load_state_dict(state)
    late = resumed.labeller.arrived()
    in_checkpoint = {c.meta["answer_id"] for c in resumed.comparisons}
    assert in_checkpoint.isdisjoint(c.meta["answer_id"] for c in late)
    assert in_checkpoint | {c.meta["answer_id"] for c in late} == {r[0] for r in service.rows("SELECT id FROM answers")}


# --------------------------------------------------------------------------- the queue alone (in-process service)


def test_best_of_k_tasks_and_a_creation_cut_short_by_a_crash(tmp_path):
    """--mode best writes best_of_k lines; a manifest that missed the 201 re-creates nothing (409 adopted)."""
    from fastapi.testclient import TestClient

    from palate.errors import ConfigError
    from palate.feedback.server import create_app

    app = create_app(tmp_path / "fb.sqlite", data_dir=tmp_path / "data")
    store = app.state.store
    admin = store.create_token("trainer", "admin", all_projects=True)
    alice = store.create_token("alice", "labeller", ["lm"])
    out = tmp_path / "best.jsonl"
    items = [(comparison_id("r", i, p, c), p, c) for i, (p, c) in enumerate([("Say hi.", ["hi", "go away", "hello"]),
                                                                            ("Count.", ["1 2 3", "one"])])]
    with TestClient(app) as http_admin, TestClient(app) as http_alice:
        fb = FeedbackClient("http://testserver", admin, http=http_admin)
        person = FeedbackClient("http://testserver", alice, http=http_alice)
        queue = RankingQueue(fb, "lm", out, mode="best")
        assert queue.submit(items) == 2 and queue.open_tasks == 2
        # A crash between the service's COMMIT and the manifest's update: the manifest says "not created".
        manifest = json.loads(queue.manifest.read_text())
        for t in manifest["tasks"]:
            t["created"] = False
        queue.manifest.write_text(json.dumps(manifest))
        task, _ = person.next_task("lm")
        person.answer(task["id"], {"best": 2 if len(task["items"]) == 3 else 0})

        again = RankingQueue(fb, "lm", out, mode="best")
        assert again.submit(items) == 0  # both exist: 409, adopted, nothing queued twice
        assert again.wait(timeout_s=0.2, poll_s=0.05, progress=False) is False and again.open_tasks == 1
        [comp] = read_comparisons(out)
        assert comp.kind == "best_of_k" and comp.labeller == "alice" and comp.best in (0, 2)
        # An admin cancels the open task: it will never be answered, so the wait ends.
        again.cancel_check_s = 0.0
        open_id = next(t["task_id"] for e, t in again.tasks.items() if not again.n_answers[e])
        assert fb.cancel("lm", [open_id]) == 1
        assert again.wait(timeout_s=5, poll_s=0.05, progress=False) is True and again.expected == 1
        # "Can't tell" is an answer (the task is done) that teaches nothing: no line is written for it.
        queue3 = RankingQueue(fb, "lm", tmp_path / "cant.jsonl", mode="best")
        assert queue3.submit([(comparison_id("r3", 0, "Pick.", ["a", "b"]), "Pick.", ["a", "b"])]) == 1
        task, _ = person.next_task("lm")
        person.answer(task["id"], {"cant_tell": True})
        assert queue3.wait(timeout_s=5, poll_s=0.05, progress=False) is True
        assert queue3.cant_tell == 1 and queue3.comparisons == []
        with pytest.raises(ConfigError, match="mode='best', not 'rank'"):
            RankingQueue(fb, "lm", out, mode="rank")
    con = sqlite3.connect(tmp_path / "fb.sqlite")
    assert con.execute("SELECT COUNT(*) FROM tasks").fetchall() == [(3,)]
    con.close()


def test_agreement_counts_pairs_both_people_ordered():
    from palate.data.formats import Comparison

    def answer(who: str, ranks: list[int]) -> Comparison:
        return Comparison("p", ["a", "b", "c"], ranks, "ranking", labeller=who, meta={"comparison_id": "t1"})

    # Pairs (a,b), (a,c), (b,c): alice 0<1<2; bob ties a and b, then c last: (a,c) and (b,c) agree.
    stats = agreement([answer("alice", [0, 1, 2]), answer("bob", [0, 0, 1]), answer("carol", [2, 1, 0])])
    # alice-bob: 2 of 2; alice-carol: 0 of 3; bob-carol: 0 of 2.
    assert stats["agreement"] == pytest.approx(2 / 7) and stats["agreement_pairs"] == 7
    assert stats["answers_per_comparison"] == {3: 1} and stats["labellers"] == {"alice": 1, "bob": 1, "carol": 1}


def test_human_label_names_the_missing_project_and_token(tmp_path, monkeypatch):
    from palate.errors import ConfigError
    from palate.lm.demos import LabelConfig, label_comparisons

    monkeypatch.delenv("PALATE_FEEDBACK_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="--feedback-project NAME"):
        label_comparisons(LabelConfig(labeller="human", out=str(tmp_path / "x.jsonl")))
    with pytest.raises(ConfigError, match=r"\$PALATE_FEEDBACK_TOKEN.*create-token"):
        label_comparisons(LabelConfig(labeller="human", feedback_project="p", out=str(tmp_path / "x.jsonl")))
    with pytest.raises(ConfigError, match="--mode best"):
        LabelConfig(labeller="human", format="best_of_k").validate()
