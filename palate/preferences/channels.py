"""Where labels come from: the channels between the training loop and a labeller.

:class:`SyncChannel` serves a labeller that answers on the spot (the synthetic oracle).
:class:`AsyncChannel` serves a slow one: human labellers answer asynchronously, through the
feedback service. A background thread submits queries from a bounded queue and records answers
as they come. When the queue is full the loop drops new clips (they were never shown, nothing is
lost); an answer, whenever it arrives, is written to labels.jsonl before anything else happens to
it, so labels are never dropped.

Both offer the same calls to the trainer: ``start()``, ``offer(queries)``, ``answers()``,
``outstanding()`` and ``close(wait_s)``; each answer is recorded in the run's
:class:`~palate.preferences.storage.LabelStore` as it arrives. ``start`` is separate from
construction because a resumed run must first tell the labeller and the store which of its
earlier queries are still open (:meth:`~palate.preferences.checkpoint.TrainerCheckpoint._restore`)
before anything collects answers.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

log = logging.getLogger(__name__)


class SyncChannel:
    """Labels on the spot (synthetic oracle): submit, then collect at once."""

    def __init__(self, labeller: Any, store: Any) -> None:
        self.labeller, self.store = labeller, store
        self.dropped = 0

    def start(self) -> None:
        """Nothing runs in the background: answers are collected when asked for."""

    def offer(self, queries: list[Any]) -> int:
        self.store.save_queries(queries)
        self.labeller.submit(queries)
        return len(queries)

    def answers(self) -> list[Any]:
        return [self.store.record(a) for a in self.labeller.collect()]

    def outstanding(self) -> int:
        return self.store.pending

    def close(self, wait_s: float = 0.0) -> list[Any]:
        self.labeller.close()
        return []


class AsyncChannel:
    """A background thread between the loop and a slow (human) labeller.

    ``offer`` puts queries in a bounded queue and drops those that do not fit; the thread
    submits queued queries and polls for answers, recording each one in the store at once.
    """

    def __init__(self, labeller: Any, store: Any, max_pending: int, poll_s: float = 1.0, start: bool = True) -> None:
        self.labeller, self.store = labeller, store
        self.max_pending = max_pending
        self.poll_s = poll_s
        self.dropped = 0
        self._queue: queue.Queue[Any] = queue.Queue()
        self._results: list[Any] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="palate-labeller", daemon=True)
        self._started = False
        if start:
            self.start()

    def start(self) -> None:
        """Start the background thread (once); until then offered queries wait in the queue."""
        if not self._started:
            self._started = True
            self._thread.start()

    def offer(self, queries: list[Any]) -> int:
        self._raise()
        room = max(0, self.max_pending - self.store.pending)
        keep, drop = queries[:room], queries[room:]
        if drop:
            self.dropped += len(drop)
            log.info("labeller busy (%d pending): dropped %d clip pairs", self.store.pending, len(drop))
        if keep:
            # Segments on disk before the labeller sees the query: any answer can be recorded.
            self.store.save_queries(keep)
            self._queue.put(keep)
        return len(keep)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    batch = self._queue.get(timeout=0.05)
                    self.labeller.submit(batch)
                except queue.Empty:
                    pass
                got = self.labeller.collect(timeout=0.0)
                recorded = [self.store.record(a) for a in got]
                if recorded:
                    with self._lock:
                        self._results.extend(recorded)
                elif self._queue.empty():
                    self._stop.wait(self.poll_s)
        except BaseException as err:  # surfaced in the training thread
            self._error = err

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def answers(self) -> list[Any]:
        self._raise()
        with self._lock:
            out, self._results = self._results, []
        return out

    def outstanding(self) -> int:
        return self.store.pending

    def close(self, wait_s: float = 0.0) -> list[Any]:
        deadline = time.monotonic() + wait_s
        while self.store.pending and time.monotonic() < deadline and self._error is None:
            time.sleep(min(self.poll_s, 0.2))
        self._stop.set()
        if self._started:
            self._thread.join(timeout=30)
        self.labeller.close()
        out = self.answers()
        return out
