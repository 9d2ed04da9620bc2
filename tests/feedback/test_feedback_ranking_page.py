"""The ranking page in a real Chromium at phone and laptop width: long texts, keyboard, drag, can't tell, the count."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from palate.feedback.store import Store

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-gpu"]

pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="needs Debian chromium (make setup)")

LONG = ("The tide rises twice a day because the Moon pulls the near side of the ocean more than the "
        "Earth, and the Earth more than the far side.\n\n") * 12
TOKEN = "https://example.org/" + "a" * 600  # one unbroken "word" wider than any screen
TASKS = [
    # 1: long texts, ranked by keyboard only, with a tie
    {"kind": "rank", "prompt": "Explain the tides.\n" + TOKEN, "priority": 4, "external_id": "keys",
     "completions": [LONG, "Gravity. " + TOKEN, LONG[:400], "The Moon, twice a day."]},
    # 2: ranked by dragging a card to the top
    {"kind": "rank", "prompt": "Name a colour.", "priority": 3, "external_id": "drag",
     "completions": ["seven", "green", "blue"]},
    # 3: best of three by keyboard
    {"kind": "rank", "mode": "best", "prompt": "Pick a fruit.", "priority": 2, "external_id": "best",
     "completions": ["rock", "chair", "pear"]},
    # 4: the labeller cannot judge this one
    {"kind": "rank", "prompt": "Which is truer?", "priority": 1, "external_id": "cant",
     "completions": ["x", "y"]},
]


def _left(page) -> int:
    return int(page.get_attribute("#queue-left", "data-count"))


def _no_horizontal_scroll(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")


VIEWPORTS = {"phone": (375, 740), "laptop": (1366, 768)}


def test_ranking_page_at_phone_and_laptop_width_by_keyboard_and_drag_with_a_count(tmp_path: Path, make_server):
    sync_api = pytest.importorskip("playwright.sync_api")
    db = tmp_path / "feedback.sqlite"
    store = Store(db)
    people = {}
    for screen in VIEWPORTS:  # one labeller and one project per screen, one server and browser for both
        token = store.create_token(f"alice-{screen}", "labeller", [f"web-{screen}"])
        people[screen] = token, dict(zip([t["external_id"] for t in TASKS],
                                         store.create_tasks(store.project_id(f"web-{screen}"), TASKS)))
    store.close()
    server = make_server(db)

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            for screen, (width, height) in VIEWPORTS.items():
                token, ids = people[screen]
                touch = width < 500
                context = browser.new_context(viewport={"width": width, "height": height}, has_touch=touch,
                                              is_mobile=touch)
                _label_four_tasks(context.new_page(), server.url, token, ids, width, touch)
                context.close()
        finally:
            browser.close()

    con = sqlite3.connect(db)
    rows = {tid: json.loads(a) for tid, a in con.execute("SELECT task_id, answer FROM answers")}
    con.close()
    for _, ids in people.values():
        assert {tid: rows[tid] for tid in ids.values()} == {
            ids["keys"]: {"ranking": [1, 0, 2, 0]},
            ids["drag"]: {"ranking": [1, 2, 0]},
            ids["best"]: {"best": 2},
            ids["cant"]: {"cant_tell": True},
        }
    assert len(rows) == 8


def _label_four_tasks(page, url: str, token: str, ids: dict[str, int], width: int, touch: bool) -> None:
    """Rank by keys, drag (by touch on the phone), best of K, can't tell; the count goes 4, 3, 2, 1, 0."""
    page.set_default_timeout(15_000)
    page.goto(url + "/")
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_selector("body[data-ready='1']")

    # 1. Long texts: everything wraps inside the screen, the keys are on the page.
    page.wait_for_selector(f"body[data-task-id='{ids['keys']}']")
    assert _left(page) == 4 and "4 tasks left" in page.inner_text("#progress")
    assert _no_horizontal_scroll(page)
    for card in page.locator("#rank-list li").all():
        assert card.bounding_box()["width"] <= width
    help_text = page.inner_text("#rank-help")
    for key in ("=", "Backspace", "Esc", "Enter", "drag"):
        assert key in help_text
    # Keyboard only: 2 best, 4 tied with it, then 1; 3 follows by itself.
    # A slip (1) is undone with Backspace first.
    for key in ("1", "Backspace", "2", "=", "4", "1"):
        page.keyboard.press(key)
    assert [li.get_attribute("data-index") for li in page.locator("#rank-list li").all()] == \
        ["1", "3", "0", "2"]
    page.keyboard.press("Enter")
    page.wait_for_selector(f"body[data-last-answered='{ids['keys']}']")

    # 2. Drag the third card ("blue") above the first by its handle: a finger on the phone.
    page.wait_for_selector(f"body[data-task-id='{ids['drag']}']")
    assert _left(page) == 3
    assert _no_horizontal_scroll(page)
    cards = page.locator("#rank-list li")
    # On a phone the list starts below the fold: scroll it up, as a person would.
    page.evaluate("window.scrollTo(0, document.getElementById('rank-list').offsetTop - 8)")
    handle = cards.nth(2).locator(".handle").bounding_box()
    top = cards.nth(0).bounding_box()
    x, y = handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2
    if touch:  # a finger, through Chromium's touch input (Playwright has taps only)
        cdp = page.context.new_cdp_session(page)
        cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": y}]})
        for i in range(1, 13):
            point = {"x": x, "y": y + (top["y"] + 4 - y) * i / 12}
            cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [point]})
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    else:
        page.mouse.move(x, y)
        page.mouse.down()
        page.mouse.move(top["x"] + 40, top["y"] + 4, steps=12)
        page.mouse.up()
    assert [li.get_attribute("data-index") for li in cards.all()] == ["2", "0", "1"]
    page.click("#rank-submit")
    page.wait_for_selector(f"body[data-last-answered='{ids['drag']}']")

    # 3. Best of three: press 3, then Enter.
    page.wait_for_selector(f"body[data-task-id='{ids['best']}']")
    assert _left(page) == 2
    page.keyboard.press("3")
    page.keyboard.press("Enter")
    page.wait_for_selector(f"body[data-last-answered='{ids['best']}']")

    # 4. Can't tell (C): an answer, not a skip; the queue is empty afterwards.
    page.wait_for_selector(f"body[data-task-id='{ids['cant']}']")
    assert _left(page) == 1
    page.keyboard.press("c")
    page.wait_for_selector(f"body[data-last-answered='{ids['cant']}']")
    page.wait_for_selector("#empty:not([hidden])")
    assert _left(page) == 0
