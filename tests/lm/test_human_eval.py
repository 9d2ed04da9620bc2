"""``palate lm eval --judge human``: blind pair tasks in the real feedback service, judged by a script.

The service is the real FastAPI app under uvicorn on a port, with its SQLite store; the policy and
the SFT model are tiny random models of SmolLM2's architecture. The scripted judge knows which
text is the policy's only from the evaluation's own samples (what the page shows carries nothing
that says it) and prefers the policy with a known probability; some of it answers through
Chromium on the real label page. The test then checks that the win rate written equals the
judge's choices, un-blinded correctly, and that restarting creates no task twice.
"""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from palate.errors import ConfigError
from palate.feedback.client import FeedbackClient
from palate.feedback.server import create_app
from palate.lm.config import EvalConfig
from palate.lm.human_eval import PAIRS_FILE, evaluate_with_people, summarise, unblind
from palate.lm.testing import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")
CHROMIUM = "/usr/bin/chromium"
PROJECT = "judge-smollm"
P_POLICY = 0.75  # the judge prefers the policy's completion with this probability, when it decides


def test_unblind_maps_sides_to_models():
    assert [unblind(c, "left") for c in ("left", "right", "equal", "cant_tell")] == \
        ["policy", "reference", "tie", "cant_tell"]
    assert [unblind(c, "right") for c in ("left", "right", "equal", "cant_tell")] == \
        ["reference", "policy", "tie", "cant_tell"]


def test_summary_averages_a_pairs_answers_before_the_standard_error():
    pairs = [{"external_id": e, "policy_side": s, "held_out_prefers": h}
             for e, s, h in (("a", "left", "policy"), ("b", "right", "reference"), ("c", "left", "policy"))]
    answers = [{"external_id": e, "verdict": v, "labeller": who, "duration_ms": ms}
               for e, v, who, ms in (("a", "policy", "ann", 1000), ("a", "tie", "bo", 3000),
                                     ("b", "policy", "ann", 2000), ("b", "cant_tell", "bo", None),
                                     ("c", "cant_tell", "ann", 4000))]
    h = summarise(pairs, answers, redundancy=2)
    # pair a: (1 + 0.5) / 2; pair b: 1 (can't tell is left out); pair c: nothing said, not counted
    assert h["win_rate"] == pytest.approx((0.75 + 1.0) / 2)
    assert h["win_rate_stderr"] == pytest.approx(np.std([0.75, 1.0]) / np.sqrt(2))
    assert (h["wins"], h["losses"], h["ties"], h["cant_tell"], h["n_answers"]) == (2, 0, 1, 2, 5)
    assert h["judges"] == {"ann": 3, "bo": 2} and h["n_judges"] == 2
    assert (h["pairs_done"], h["pairs_open"], h["complete"]) == (2, 1, False)
    assert h["agreement_with_held_out"] == pytest.approx(0.5)  # a agrees, b disagrees
    assert h["median_answer_s"] == pytest.approx(2.5)


@pytest.fixture
def service(tmp_path: Path):
    """The feedback app served by uvicorn on a free port; yields (url, tokens, db path)."""
    import uvicorn

    db = tmp_path / "feedback.sqlite"
    app = create_app(db, data_dir=tmp_path / "feedback-data")
    store = app.state.store
    tokens = {"admin": store.create_token("trainer", "admin", all_projects=True),
              "alice": store.create_token("alice", "labeller", [PROJECT]),
              "bob": store.create_token("bob", "labeller", [PROJECT])}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", tokens, db
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    dirs = []
    for name, seed in (("policy", 0), ("sft", 1)):
        model, tok = tiny_causal_lm(seed=seed)
        path = tmp_path / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        dirs.append(path)
    return dirs[0], dirs[1]


class ScriptedJudge:
    """Knows the policy's completions from the evaluation's samples, never from the task.

    When it decides (80% of answers) it prefers the policy with probability ``P_POLICY``; 10% of
    answers are "equally good" and 10% "can't tell". Every answer is recorded in the policy's terms.
    """

    def __init__(self, samples: list[dict], seed: int) -> None:
        self.policy_of = {(s["prompt"], s["policy"], s["reference"]): s["policy"] for s in samples}
        self.policy_of.update({(s["prompt"], s["reference"], s["policy"]): s["policy"] for s in samples})
        self.rng = np.random.default_rng(seed)
        self.verdicts: list[str] = []

    def choose(self, prompt: str, left: str, right: str) -> str:
        policy = self.policy_of[(prompt, left, right)]
        u = self.rng.random()
        if left == right or 0.8 <= u < 0.9:
            choice = "equal"
        elif u >= 0.9:
            choice = "cant_tell"
        else:
            wants_policy = u < 0.8 * P_POLICY
            choice = "left" if (left == policy) == wants_policy else "right"
        verdict = {"equal": "tie", "cant_tell": "cant_tell"}.get(choice)
        self.verdicts.append(verdict or ("policy" if (choice == "left") == (left == policy) else "reference"))
        return choice


def _answer_by_http(url: str, token: str, judge: ScriptedJudge, n: int) -> None:
    with FeedbackClient(url, token) as person:
        for _ in range(n):
            task, _ = person.next_task(PROJECT)
            assert task is not None
            # What a judge is shown: the prompt and two texts; no ids, no metadata, no model names.
            assert set(task) == {"id", "kind", "mode", "project", "prompt", "items", "lease_expires_at",
                                 "lease_seconds"}
            assert all(set(item) == {"text"} for item in task["items"])
            choice = judge.choose(task["prompt"], task["items"][0]["text"], task["items"][1]["text"])
            person.answer(task["id"], {"choice": choice})


def _answer_in_chromium(url: str, token: str, judge: ScriptedJudge, n: int) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    keys = {"left": "ArrowLeft", "right": "ArrowRight", "equal": "ArrowUp", "cant_tell": "ArrowDown"}
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            page.goto(url + "/")
            page.fill("#token", token)
            page.click("button[type=submit]")
            page.wait_for_selector("body[data-ready='1']")
            for _ in range(n):
                page.wait_for_selector("#pair:not([hidden])")
                task_id = page.get_attribute("body", "data-task-id")
                texts = [page.locator(sel).text_content() for sel in
                         ("#pair-prompt", "#pair-left .text", "#pair-right .text")]
                page.keyboard.press(keys[judge.choose(*texts)])
                page.wait_for_selector(f"body[data-last-answered='{task_id}']")
        finally:
            browser.close()


def _n_tasks(db: Path) -> int:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
    finally:
        con.close()


def test_people_judge_blind_pairs_and_a_restart_picks_up_their_answers(tmp_path, service, models, monkeypatch,
                                                                        capsys):
    from palate.cli import main

    url, tokens, db = service
    policy, sft = models
    monkeypatch.setenv("PALATE_FEEDBACK_TOKEN", tokens["admin"])
    out = tmp_path / "eval"
    cfg = EvalConfig(run=str(policy), reference=str(sft), task="sentiment", n_prompts=6, samples_per_prompt=2,
                     max_new_tokens=4, max_ppl_blocks=1, batch_size=12, out=str(out), judge="human",
                     feedback_url=url, feedback_project=PROJECT, wait_s=0.0)

    # 1. Sample, post the 12 pairs, nothing answered yet: the labeller's fields and an open human block.
    first = evaluate_with_people(cfg)
    assert 0.0 <= first["win_rate"] <= 1.0 and first["n_comparisons"] == 12 and "kl" in first
    h = first["human"]
    assert (h["n_pairs"], h["n_answers"], h["pairs_open"], h["complete"]) == (12, 0, 12, False)
    assert 0.0 < h["policy_left_fraction"] < 1.0  # both sides occur
    assert _n_tasks(db) == 12
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    judge = ScriptedJudge(samples, seed=7)

    # 2. Alice answers 5 while nothing waits. A run killed after creating its tasks but before
    # saving that (simulated: the pair file forgets it posted them) is restarted through the CLI.
    _answer_by_http(url, tokens["alice"], judge, 5)
    state = json.loads((out / PAIRS_FILE).read_text())
    for p in state["pairs"]:
        p["posted"], p["task_id"] = False, None
    (out / PAIRS_FILE).write_text(json.dumps(state))
    assert main(["lm", "eval", str(policy), "--reference", str(sft), "--task", "sentiment", "--n-prompts", "6",
                 "--samples-per-prompt", "2", "--max-new-tokens", "4", "--max-ppl-blocks", "1", "--batch-size",
                 "12", "--out", str(out), "--judge", "human", "--feedback-url", url, "--feedback-project", PROJECT,
                 "--wait-s", "0"]) == 0
    printed = capsys.readouterr().out
    assert "win rate vs SFT (people)" in printed and "7 of 12 pairs still wait" in printed
    assert _n_tasks(db) == 12  # no task created twice
    second = json.loads((out / "summary.json").read_text())
    assert second["human"]["n_answers"] == 5 and second["win_rate"] == first["win_rate"]

    # 3. While the command waits, Alice answers 4 more over HTTP and Bob the last 3 on the real
    # page (last, because the page leases the next task as soon as one is answered).
    result: dict = {}
    waiting = threading.Thread(target=lambda: result.update(
        evaluate_with_people(EvalConfig(**{**vars(cfg), "wait_s": 120.0}), poll_interval=0.2)))
    waiting.start()
    deadline = time.monotonic() + 20
    while (out / "summary.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (out / "summary.json").exists()  # "done" only when the wait is over
    _answer_by_http(url, tokens["alice"], judge, 4)
    if shutil.which(CHROMIUM):
        _answer_in_chromium(url, tokens["bob"], judge, 3)
    else:
        _answer_by_http(url, tokens["bob"], judge, 3)
    waiting.join(timeout=60)
    assert not waiting.is_alive()

    h = result["human"]
    v = judge.verdicts
    assert len(v) == 12 and h["complete"] and h["pairs_open"] == 0
    assert (h["wins"], h["losses"], h["ties"], h["cant_tell"]) == \
        (v.count("policy"), v.count("reference"), v.count("tie"), v.count("cant_tell"))
    scored = [{"policy": 1.0, "reference": 0.0, "tie": 0.5}[x] for x in v if x != "cant_tell"]
    assert h["win_rate"] == pytest.approx(np.mean(scored))
    assert h["win_rate_stderr"] == pytest.approx(np.std(scored) / np.sqrt(len(scored)))
    assert h["judges"] == {"alice": 9, "bob": 3} and h["n_judges"] == 2
    assert json.loads((out / "summary.json").read_text())["human"] == h
    answers = [json.loads(line) for line in (out / "human_answers.jsonl").read_text().splitlines()]
    assert sorted(a["verdict"] for a in answers) == sorted(v)
    assert _n_tasks(db) == 12

    # Another evaluation into the same directory is refused rather than credited with these answers.
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        evaluate_with_people(EvalConfig(**{**vars(cfg), "samples_per_prompt": 1}))

    # The pipeline report's headline carries people's verdicts beside the labeller's.
    from palate.lm.report import write_report

    shutil.copytree(out, tmp_path / "pipe" / "eval")
    report = write_report(tmp_path / "pipe").read_text()
    assert (f"| win rate vs SFT, people (12 answers: {h['wins']} for PPO, {h['losses']} for SFT, {h['ties']} ties, "
            f"{h['cant_tell']} can't tell; judges: alice 9, bob 3) | {h['win_rate']:.3f} ±") in report
