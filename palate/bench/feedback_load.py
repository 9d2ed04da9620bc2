"""Load benchmark of the feedback service: simulated labellers on loopback, bounded in time and count.

The server runs as its own process (``python -m palate.feedback.server``) on 127.0.0.1, as in
production. Each simulated labeller has its own labeller token and keep-alive connection and does
what the page does: ``POST /api/next`` once, then ``POST /api/tasks/{id}/answer`` with
``next: true`` (store the answer, lease the next task, report progress) until time is up.

Two phases:

* **paced**: every labeller aims at a fixed rate (``target / labellers`` answers/s each, sends
  on a schedule, never bursts to catch up), so the offered load is the target and the reported
  latency is that of a service holding it;
* **saturation**: no pause at all (closed loop), which finds the ceiling; its latency is
  ``labellers / throughput`` by Little's law and says nothing about a paced service.

The load generator speaks HTTP/1.1 over raw asyncio streams instead of httpx: on a 2-core
machine the generator shares the CPU with the server, and a full client library would spend
more CPU per request than the server does, so the run would measure the client.

Afterwards the database is checked against the acknowledgements: every acknowledged answer
is stored once with the right task and labeller (zero lost), nothing else is stored and no
task has more answers than its redundancy (zero duplicated).

Run: ``python -m palate.bench.feedback_load [OUT_DIR]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from palate.feedback.store import Store
from palate.runs import atomic_write_text


@dataclass
class LoadConfig:
    labellers: int = 50
    """Concurrent simulated labellers, each with its own token and connection."""
    target_rate: float = 500.0
    """Offered answers/s in the paced phase (all labellers together)."""
    paced_seconds: float = 20.0
    """Length of the paced phase."""
    saturation_seconds: float = 10.0
    """Length of the closed-loop phase (0 skips it)."""
    tasks: int = 30_000
    """Tasks queued before the run (the phases stop early if they run out)."""
    rank_every: int = 5
    """Every n-th task is a 4-way ranking; the rest are text pairs."""
    synchronous: str = "normal"
    """SQLite fsync policy of the server under test."""
    timeout_s: float = 10.0
    """A request slower than this aborts the run (it is bounded)."""
    extra: dict[str, Any] = field(default_factory=dict)


class RawHTTP:
    """One keep-alive HTTP/1.1 connection; requests are sequential, as a labeller's are."""

    def __init__(self, host: str, port: int, token: str) -> None:
        self.host, self.port = host, port
        self.auth = f"Authorization: Bearer {token}\r\n".encode()

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        body = json.dumps(payload).encode()
        self.writer.write(
            b"POST "
            + path.encode()
            + b" HTTP/1.1\r\nHost: bench\r\n"
            + self.auth
            + b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection")
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        data = await self.reader.readexactly(length) if length else b""
        return status, json.loads(data) if data else {}

    def close(self) -> None:
        self.writer.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answer_for(task: dict[str, Any], n: int) -> dict[str, Any]:
    if task["mode"] == "pair":
        return {"choice": ("left", "right", "equal", "cant_tell")[n % 4]}
    k = len(task["items"])
    return {"ranking": [(i + n) % k for i in range(k)]}


async def _labeller(
    http: RawHTTP,
    name: str,
    interval: float,
    until: float,
    acked: list[tuple[int, int, str]],
    lat: list[float],
    cfg: LoadConfig,
) -> None:
    status, out = await asyncio.wait_for(http.post("/api/next", {}), cfg.timeout_s)
    if status != 200:
        raise RuntimeError(f"{name}: /api/next -> {status} {out}")
    task = out["task"]
    n = 0
    next_at = time.perf_counter()
    while task is not None and time.perf_counter() < until:
        if interval > 0:
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            next_at = max(next_at + interval, time.perf_counter() - interval)  # no catch-up bursts
        t0 = time.perf_counter()
        status, out = await asyncio.wait_for(
            http.post(
                f"/api/tasks/{task['id']}/answer",
                {"answer": _answer_for(task, n), "next": True, "duration_ms": 1000},
            ),
            cfg.timeout_s,
        )
        lat.append(time.perf_counter() - t0)
        if status != 201:
            raise RuntimeError(f"{name}: answer to task {task['id']} -> {status} {out}")
        acked.append((out["answer_id"], task["id"], name))
        task = out["task"]
        n += 1
    # Leave the last leased task unanswered: it simply expires.


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _phase(
    port: int, tokens: list[tuple[str, str]], rate: float, seconds: float, cfg: LoadConfig, server_pid: int
) -> dict[str, Any]:
    conns = [RawHTTP("127.0.0.1", port, tok) for _, tok in tokens]
    await asyncio.gather(*(c.open() for c in conns))
    acked: list[tuple[int, int, str]] = []
    lat: list[float] = []
    interval = len(tokens) / rate if rate > 0 else 0.0
    cpu0 = _cpu_seconds(server_pid)
    start = time.perf_counter()
    until = start + seconds
    try:
        await asyncio.gather(
            *(_labeller(c, name, interval, until, acked, lat, cfg) for c, (name, _) in zip(conns, tokens))
        )
    finally:
        for c in conns:
            c.close()
    elapsed = time.perf_counter() - start
    cpu1 = _cpu_seconds(server_pid)
    lat.sort()

    def pct(q: float) -> float:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3, 2) if lat else float("nan")

    return {
        "offered_answers_per_s": rate if rate > 0 else None,
        "seconds": round(elapsed, 2),
        "answers": len(acked),
        "answers_per_s": round(len(acked) / elapsed, 1),
        "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1.0)},
        # CPU the server spent per answer: what a dedicated core would sustain, whatever else
        # shares the machine during the run.
        "server_cpu_ms_per_answer": (
            round((cpu1 - cpu0) / len(acked) * 1e3, 3)
            if cpu0 is not None and cpu1 is not None and acked
            else None
        ),
        "_acked": acked,
    }


def _verify(db: Path, acked: list[tuple[int, int, str]]) -> dict[str, int]:
    con = sqlite3.connect(db)
    stored = {
        aid: (tid, name)
        for aid, tid, name in con.execute(
            "SELECT a.id, a.task_id, c.name FROM answers a JOIN accounts c ON c.id = a.account_id"
        )
    }
    over = con.execute(
        "SELECT COUNT(*) FROM tasks WHERE n_answers > redundancy OR n_answers != "
        "(SELECT COUNT(*) FROM answers a WHERE a.task_id = tasks.id)"
    ).fetchone()[0]
    con.close()
    ids = [a for a, _, _ in acked]
    lost = sum(1 for aid, tid, name in acked if stored.get(aid) != (tid, name))
    duplicated = (len(ids) - len(set(ids))) + (len(stored) - len(set(ids) & set(stored))) + over
    return {"acknowledged": len(ids), "stored": len(stored), "lost": lost, "duplicated": duplicated}


def run(out_dir: str | Path, config: LoadConfig | None = None) -> dict[str, Any]:
    """Run both phases against a fresh server; write ``feedback_load.json`` in ``out_dir``; return it."""
    cfg = config or LoadConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="feedback-load-", dir=out_dir))
    db = work / "feedback.sqlite"
    store = Store(db)
    tokens = [
        (f"labeller{i:02d}", store.create_token(f"labeller{i:02d}", "labeller", ["load"]))
        for i in range(cfg.labellers)
    ]
    pid = store.project_id("load")
    t0 = time.perf_counter()
    specs = [
        {"kind": "rank", "prompt": f"prompt {i}", "completions": [f"c{j} of {i}" for j in range(4)]}
        if i % cfg.rank_every == 0
        else {"kind": "pair", "prompt": f"prompt {i}", "left": f"left {i}", "right": f"right {i}"}
        for i in range(cfg.tasks)
    ]
    for i in range(0, len(specs), 1000):
        store.create_tasks(pid, specs[i : i + 1000])
    create_s = time.perf_counter() - t0
    store.close()

    port = _free_port()
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
            "--synchronous",
            cfg.synchronous,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"server did not start: {proc.stderr.read().decode()[-2000:]}"
                    ) from None
                time.sleep(0.05)
        load_before = os.getloadavg()
        paced = asyncio.run(_phase(port, tokens, cfg.target_rate, cfg.paced_seconds, cfg, proc.pid))
        saturation = (
            asyncio.run(_phase(port, tokens, 0.0, cfg.saturation_seconds, cfg, proc.pid))
            if cfg.saturation_seconds > 0
            else None
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()

    acked = paced.pop("_acked") + (saturation.pop("_acked") if saturation else [])
    check = _verify(db, acked)
    result = {
        "benchmark": "feedback_load",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            # Other jobs on a shared machine take CPU from both server and load generator.
            "loadavg_1min_before": round(load_before[0], 2),
            "loadavg_1min_after": round(os.getloadavg()[0], 2),
        },
        "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
        "task_creation_per_s": round(cfg.tasks / create_s, 1),
        "paced": paced,
        "saturation": saturation,
        "integrity": check,
        "target_met": bool(
            paced["answers_per_s"] >= 500
            and paced["latency_ms"]["p99"] < 100
            and check["lost"] == 0
            and check["duplicated"] == 0
        ),
    }
    atomic_write_text(out_dir / "feedback_load.json", json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m palate.bench.feedback_load [OUT_DIR]``: the load test, results in OUT_DIR."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m palate.bench.feedback_load", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", nargs="?", default="runs/bench",
                        help="where feedback_load.json is written (default: runs/bench)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.out_dir), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
