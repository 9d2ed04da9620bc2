"""The user docs hold together: every relative link in README.md and docs/*.md reaches an existing
file and, where it names one, a heading of that file; and no page tells the story of a work
session (the only "session" allowed is the feedback service's login cookie)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~)")
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"")


def _prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in _prose_lines(path):
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every relative link or image, a link's text may span lines."""
    numbered = dict(_prose_lines(path))
    last = max(numbered, default=0)
    text = "\n".join(numbered.get(n, "") for n in range(1, last + 1))  # fenced lines blanked
    text = CODE_SPAN.sub(lambda m: " " * len(m.group()), text)
    out = []
    for match in LINK.finditer(text):
        target = match.group(1)
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            out.append((text.count("\n", 0, match.start()) + 1, target))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for number, target in links(page):
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{page.name}:{number}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{page.name}:{number}: {target} (no heading with that anchor)")
    assert not broken, "\n".join(broken)


# The feedback service's technical senses: the login cookie and the API table's auth column.
ALLOWED_SESSION = re.compile(r"session cookie|\|\s*session\s*\|", re.IGNORECASE)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_work_session_history(page):
    hits = []
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        rest = ALLOWED_SESSION.sub("", line) if page.name == "feedback.md" else line
        if re.search(r"\bsessions?\b", rest, re.IGNORECASE):
            hits.append(f"{page.name}:{number}: {line.strip()}")
    assert not hits, "docs are a manual, history lives in git:\n" + "\n".join(hits)


def test_slug_matches_github():
    assert slug("PPO on the learned reward model (`make run`)") == "ppo-on-the-learned-reward-model-make-run"
    assert slug("Against imitation (Hopper-v4, PPO, 700 labels, 1M steps)") == (
        "against-imitation-hopper-v4-ppo-700-labels-1m-steps")
    assert slug("Several processes, GPUs, machines") == "several-processes-gpus-machines"
