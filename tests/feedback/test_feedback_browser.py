"""A real headless Chromium labels through the pages: keyboard pair, keyboard ranking, best of K, admin page."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from palate.feedback.store import Store

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-gpu",
]

pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="needs Debian chromium (make setup)")


def test_label_pair_and_rankings_with_the_keyboard(tmp_path: Path, make_server, media):
    sync_api = pytest.importorskip("playwright.sync_api")
    db = tmp_path / "feedback.sqlite"
    store = Store(db)
    labeller = store.create_token("alice", "labeller", ["web"])
    admin = store.create_token("trainer", "admin", all_projects=True)
    pid = store.project_id("web")
    data_dir = tmp_path / "feedback-data"
    from palate.feedback.media import store_media

    shas = []
    for data in (media["gif"], media["gif"] + b"\0"):  # two distinct files
        sha, ext = store_media(data_dir, data)
        store.add_media(sha, ext, len(data))
        shas.append(sha)
    pair, rank, best = store.create_tasks(
        pid,
        [
            {"kind": "pair", "left": {"media": shas[0]}, "right": {"media": shas[1]}, "priority": 3},
            {
                "kind": "rank",
                "prompt": "Write a greeting.",
                "completions": ["Hi!", "Go away.", "Hello, friend!", "Hey."],
                "priority": 2,
            },
            {
                "kind": "rank",
                "mode": "best",
                "prompt": "Pick one.",
                "completions": ["a", "b", "c"],
                "priority": 1,
            },
        ],
    )
    store.close()
    server = make_server(db)

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            page.goto(server.url + "/")
            assert page.url.endswith("/login")
            page.fill("#token", labeller)
            page.click("button[type=submit]")
            page.wait_for_selector("body[data-ready='1']")

            # Pair: two clips side by side; the left arrow says "left is better".
            assert page.get_attribute("body", "data-task-id") == str(pair)
            assert (
                page.locator("#pair-left img").count() == 1 and page.locator("#pair-right img").count() == 1
            )
            assert page.get_attribute("#queue-left", "data-count") == "3"
            assert "3 tasks left" in page.inner_text("#progress")
            page.keyboard.press("ArrowLeft")
            page.wait_for_selector(f"body[data-last-answered='{pair}']")

            # Ranking of 4: press 3, 1, '=' 4 (tied with 1); the last one (2) follows; Enter submits.
            page.wait_for_selector(f"body[data-task-id='{rank}']")
            assert page.locator("#rank-list li").count() == 4
            for key in ("3", "1", "=", "4"):
                page.keyboard.press(key)
            assert page.locator("#rank-list li").nth(0).get_attribute("data-index") == "2"
            page.keyboard.press("Enter")
            page.wait_for_selector(f"body[data-last-answered='{rank}']")

            # Best of K: press 2 then Enter.
            page.wait_for_selector(f"body[data-task-id='{best}']")
            page.keyboard.press("2")
            page.keyboard.press("Enter")
            page.wait_for_selector(f"body[data-last-answered='{best}']")
            page.wait_for_selector("#empty:not([hidden])")
            assert "answered today: 3" in page.inner_text("#progress")

            # The admin page shows the project's queue and throughput.
            admin_page = browser.new_page()
            admin_page.set_default_timeout(15_000)
            admin_page.goto(server.url + "/admin")
            admin_page.fill("#token", admin)
            admin_page.click("button[type=submit]")
            admin_page.wait_for_selector("body[data-ready='1']")
            assert admin_page.locator("#queue td").all_inner_texts() == ["0", "0", "3", "0"]
            assert "alice" in admin_page.inner_text("#labellers")
        finally:
            browser.close()

    con = sqlite3.connect(db)
    rows = {tid: json.loads(a) for tid, a in con.execute("SELECT task_id, answer FROM answers")}
    con.close()
    assert rows == {pair: {"choice": "left"}, rank: {"ranking": [1, 2, 0, 1]}, best: {"best": 1}}
