"""What the admin page shows: queue, throughput, per-labeller counts and inter-labeller agreement."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from itertools import combinations
from typing import Any


def utc_midnight(now: float) -> float:
    """Start of the UTC day containing ``now``: "answered today" counts from here."""
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day.timestamp()


def agreement(tasks: list[tuple[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Inter-labeller agreement over tasks answered by several labellers, per task mode.

    For every pair of labellers on a task: pairs agree when the choices are equal; best-of-K
    when the same index is picked; rankings score the fraction of completion pairs (i, j) that
    both order the same way (ties count as an order), i.e. a pairwise accuracy in [0, 1]. On a
    ranking or best-of-K task, two "can't tell" answers agree and one disagrees with any order.
    """
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0])  # score, labeller pairs, tasks
    for mode, answers in tasks:
        acc = sums[mode]
        acc[2] += 1
        for a, b in combinations(answers, 2):
            if a.get("cant_tell") or b.get("cant_tell"):
                score = float(a.get("cant_tell", False) == b.get("cant_tell", False))
            elif mode == "pair":
                score = float(a["choice"] == b["choice"])
            elif mode == "best":
                score = float(a["best"] == b["best"])
            else:
                ra, rb = a["ranking"], b["ranking"]
                pairs = list(combinations(range(len(ra)), 2))
                score = sum(
                    (ra[i] > ra[j]) - (ra[i] < ra[j]) == (rb[i] > rb[j]) - (rb[i] < rb[j]) for i, j in pairs
                ) / len(pairs)
            acc[0] += score
            acc[1] += 1
    return {
        mode: {"agreement": (s / n if n else None), "labeller_pairs": n, "tasks": t}
        for mode, (s, n, t) in sums.items()
    }


class StatsStore:
    """The part of :class:`~palate.feedback.store.Store` that counts for the admin page."""

    # Provided by Store: the connection, the lock every call holds, and the clock.
    _db: sqlite3.Connection
    _lock: threading.RLock
    clock: Callable[[], float]
    _leases: dict[int, dict[int, float]]
    _live: Callable[[int, float], dict[int, float]]

    def stats(self, project_id: int) -> dict[str, Any]:
        """What the admin page shows: queue, throughput, per-labeller counts, inter-labeller agreement."""
        now = self.clock()
        with self._lock:
            status = {
                r[0]: r[1]
                for r in self._db.execute(
                    "SELECT status, COUNT(*) FROM tasks WHERE project_id = ? GROUP BY status", (project_id,)
                )
            }
            leased = 0
            for tid in list(self._leases):
                if self._live(tid, now):
                    row = self._db.execute("SELECT project_id FROM tasks WHERE id = ?", (tid,)).fetchone()
                    leased += int(row is not None and row[0] == project_id)

            def count_since(t0: float) -> int:
                return self._db.execute(
                    "SELECT COUNT(*) FROM answers WHERE project_id = ? AND created_at >= ?", (project_id, t0)
                ).fetchone()[0]

            throughput = {
                "last_minute": count_since(now - 60),
                "last_hour": count_since(now - 3600),
                "today": count_since(utc_midnight(now)),
                "total": count_since(0),
            }
            labellers = [
                dict(r)
                for r in self._db.execute(
                    "SELECT c.name AS labeller, COUNT(*) AS answers, "
                    "SUM(a.created_at >= ?) AS today, AVG(a.duration_ms) AS mean_duration_ms, "
                    "MAX(a.created_at) AS last_answer_at "
                    "FROM answers a JOIN accounts c ON c.id = a.account_id WHERE a.project_id = ? "
                    "GROUP BY c.name ORDER BY answers DESC",
                    (utc_midnight(now), project_id),
                )
            ]
            multi = self._db.execute(
                "SELECT t.id, t.mode, GROUP_CONCAT(a.answer, char(10)) AS answers FROM tasks t "
                "JOIN answers a ON a.task_id = t.id WHERE t.project_id = ? AND t.n_answers >= 2 "
                "GROUP BY t.id ORDER BY t.id DESC LIMIT 5000",
                (project_id,),
            ).fetchall()
        return {
            "queue": {
                "open": status.get("open", 0),
                "leased": leased,
                "done": status.get("done", 0),
                "cancelled": status.get("cancelled", 0),
            },
            "throughput": throughput,
            "labellers": labellers,
            "agreement": agreement(
                [(r["mode"], [json.loads(a) for a in r["answers"].split("\n")]) for r in multi]
            ),
        }
