"""Fixtures of the feedback-service tests: an in-process app with a fake clock, tokens, servers."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from palate.feedback.server import create_app

# A valid 1x1 GIF89a (header, screen descriptor, 2-colour table, image, LZW data, trailer).
GIF_1PX = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00"
    b"\x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02\x44\x01\x00\x3b"
)
# An mp4 is recognised by its 'ftyp' box; the rest of a real file does not matter to the server.
MP4_HEAD = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00" * 64
WEBM_HEAD = (
    b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\xf7\x81\x01\x42\xf2\x81\x04\x42\xf3\x81\x08\x42\x82\x84webm"
)


class FakeClock:
    """Time that moves only when a test says so, to test lease expiry without sleeping."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Env:
    client: TestClient
    clock: FakeClock
    db: Path
    data_dir: Path
    admin: dict[str, str]
    alice: dict[str, str]
    bob: dict[str, str]
    carol: dict[str, str]  # labeller of project "other" only
    tokens: dict[str, str]

    def snapshot(self) -> dict[str, list[tuple]]:
        """Every row of every table, read through a separate connection: "nothing was written"."""
        con = sqlite3.connect(self.db)
        try:
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            return {
                t: con.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall()
                if t not in ("account_projects", "task_media")
                else con.execute(f"SELECT * FROM {t}").fetchall()
                for t in tables
            }
        finally:
            con.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    clock = FakeClock()
    db = tmp_path / "feedback.sqlite"
    data_dir = tmp_path / "data"
    app = create_app(db, data_dir=data_dir, lease_seconds=120, max_upload_bytes=64 * 1024, clock=clock)
    store = app.state.store
    tokens = {
        "admin": store.create_token("trainer", "admin", all_projects=True),
        "alice": store.create_token("alice", "labeller", ["p"]),
        "bob": store.create_token("bob", "labeller", ["p"]),
        "carol": store.create_token("carol", "labeller", ["other"]),
    }
    with TestClient(app) as client:
        yield Env(
            client,
            clock,
            db,
            data_dir,
            *({"Authorization": f"Bearer {tokens[k]}"} for k in ("admin", "alice", "bob", "carol")),
            tokens,
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    db: Path
    proc: subprocess.Popen
    port: int


def start_server(db: Path, port: int, *extra: str) -> subprocess.Popen:
    """``python -m palate.feedback.server`` on 127.0.0.1:port; returns once /healthz answers."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "palate.feedback.server",
            "--db",
            str(db),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    # 90 s: importing the server's stack takes over 30 s when both cores are busy with other jobs.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not start within 90 s")


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator:
    """Start (and always stop) real server subprocesses."""
    procs: list[subprocess.Popen] = []

    def make(db: Path, port: int | None = None, *extra: str) -> LiveServer:
        port = port or free_port()
        proc = start_server(db, port, *extra)
        procs.append(proc)
        return LiveServer(f"http://127.0.0.1:{port}", db, proc, port)

    yield make
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)
        if p.stderr:
            p.stderr.close()


@pytest.fixture
def media() -> dict[str, bytes]:
    """Minimal files each media sniffer accepts."""
    return {"gif": GIF_1PX, "mp4": MP4_HEAD, "webm": WEBM_HEAD}
