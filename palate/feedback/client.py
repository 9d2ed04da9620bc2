"""Python client of the feedback service, used by the preference loop and the LM pipeline.

A training run holds an admin token: it uploads clips, creates pair or rank tasks, then reads
answers incrementally with a cursor (each answer seen once, in commit order) or blocks in
:meth:`FeedbackClient.wait_for_answers`. Every HTTP error becomes a :class:`FeedbackError` that
carries the server's message, so a run stops with "task 12 was cancelled..." rather than a bare 409.

Example::

    with FeedbackClient("http://127.0.0.1:8000", token) as fb:
        fb.ensure_project("hopper-prefs")
        left = fb.upload_media("runs/x/clips/0001.mp4")
        right = fb.upload_media("runs/x/clips/0002.mp4")
        [tid] = fb.create_pair_tasks("hopper-prefs", [{"left": {"media": left, "id": "seg-1"},
                                                       "right": {"media": right, "id": "seg-2"}}])
        labels = fb.wait_for_answers("hopper-prefs", [tid], timeout=600)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx

from palate.errors import ConfigError, FeedbackError, PalateError


class FeedbackClient:
    """Thin typed wrapper over the HTTP API; one keep-alive connection pool per instance."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        http: httpx.Client | None = None,
    ) -> None:
        """``http`` replaces the connection pool (tests pass FastAPI's in-process TestClient)."""
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self._http = http if http is not None else httpx.Client(base_url=self.base_url, timeout=timeout)
        self._http.headers["Authorization"] = f"Bearer {token}"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FeedbackClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _request(self, method: str, path: str, *, idempotent: bool = False, **kwargs: Any) -> Any:
        """Send one request; connection errors are retried only where repeating is harmless."""
        attempts = self.retries + 1 if idempotent else 1
        for attempt in range(attempts):
            try:
                resp = self._http.request(method, path, **kwargs)
                break
            except httpx.TransportError as err:
                if attempt + 1 >= attempts:
                    raise FeedbackError(
                        f"feedback service at {self.base_url} unreachable ({err}); is `palate feedback serve` running?"
                    ) from err
                time.sleep(0.2 * 2**attempt)
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("detail", resp.text)
            except ValueError:
                detail = resp.text
            err = FeedbackError(f"{method} {path} -> {resp.status_code}: {detail}")
            err.status = resp.status_code  # type: ignore[attr-defined]
            raise err
        ctype = resp.headers.get("content-type", "")
        return resp.json() if ctype.startswith("application/json") else resp.text

    # ------------------------------------------------------------------ training-run side

    def ensure_project(self, name: str, description: str = "") -> None:
        """Create the project if it does not exist (needs an all-projects admin token)."""
        self._request(
            "POST", "/api/projects", json={"name": name, "description": description}, idempotent=True
        )

    def upload_media(self, clip: str | Path | bytes) -> str:
        """Upload an mp4/webm/gif (path or bytes); returns its sha256, used as ``{"media": sha}``.

        Uploads are content-addressed, so retrying is harmless.
        """
        data = Path(clip).read_bytes() if isinstance(clip, str | Path) else clip
        out = self._request(
            "POST",
            "/api/media",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
            idempotent=True,
        )
        return out["sha256"]

    def create_tasks(self, project: str, tasks: list[dict[str, Any]]) -> list[int]:
        """Create tasks of any kind (see ``normalize_task_spec``); all or nothing. Returns task ids.

        Give each task an ``external_id`` to make a retried call safe: the server refuses a
        duplicate id with a 409 instead of queueing the comparison twice.
        """
        idem = all("external_id" in t for t in tasks)
        return self._request(
            "POST", f"/api/projects/{project}/tasks", json={"tasks": tasks}, idempotent=idem
        )["ids"]

    def create_pair_tasks(self, project: str, pairs: list[dict[str, Any]], **common: Any) -> list[int]:
        """Pairs ``{"left": item, "right": item, "prompt"?: str, ...}``; ``common`` (priority,
        redundancy, ...) applies to each one that does not set it.

        An item may be a :class:`~pathlib.Path` to a rendered clip: it is uploaded first and
        replaced by ``{"media": sha256, "id": <file name>}``; a ``str`` is a text.
        """
        specs = []
        for p in pairs:
            spec = {**common, **p, "kind": "pair"}
            for side in ("left", "right"):
                if isinstance(spec.get(side), Path):
                    spec[side] = {"media": self.upload_media(spec[side]), "id": spec[side].name}
            specs.append(spec)
        return self.create_tasks(project, specs)

    def create_rank_task(
        self,
        project: str,
        prompt: str,
        completions: list[str | dict[str, str]],
        *,
        best_of: bool = False,
        **extra: Any,
    ) -> int:
        """One ranking (InstructGPT) or, with ``best_of=True``, best-of-K (Ziegler et al.) task."""
        spec = {
            "kind": "rank",
            "prompt": prompt,
            "completions": completions,
            "mode": "best" if best_of else "rank",
            **extra,
        }
        return self.create_tasks(project, [spec])[0]

    def cancel(self, project: str, task_ids: list[int]) -> int:
        """Cancel tasks nobody needs any more; answered ones stay. Returns how many were cancelled."""
        return self._request(
            "POST", f"/api/projects/{project}/tasks/cancel", json={"ids": task_ids}, idempotent=True
        )["cancelled"]

    def task_status(self, project: str, task_ids: list[int]) -> dict[int, dict[str, Any]]:
        """``{task_id: {"status", "n_answers", "redundancy"}}`` for known ids."""
        out = self._request(
            "POST", f"/api/projects/{project}/tasks/status", json={"ids": task_ids}, idempotent=True
        )
        return {int(k): v for k, v in out["tasks"].items()}

    def find_tasks(self, project: str, external_ids: list[str], batch: int = 1000) -> dict[str, dict[str, Any]]:
        """``{external_id: {"id", "status", "n_answers", "redundancy"}}`` for the ids the project holds.

        Asked ``batch`` ids per request, to stay well inside the server's body limit.
        """
        out: dict[str, dict[str, Any]] = {}
        for i in range(0, len(external_ids), batch):
            part = external_ids[i : i + batch]
            got = self._request(
                "POST", f"/api/projects/{project}/tasks/find", json={"external_ids": part}, idempotent=True
            )
            out.update(got["tasks"])
        return out

    def answers_since(
        self, project: str, cursor: int = 0, limit: int = 500
    ) -> tuple[list[dict[str, Any]], int]:
        """All answers after ``cursor`` (following pages); returns ``(answers, new_cursor)``."""
        got: list[dict[str, Any]] = []
        while True:
            out = self._request(
                "GET",
                f"/api/projects/{project}/answers",
                params={"since": cursor, "limit": limit},
                idempotent=True,
            )
            got.extend(out["answers"])
            cursor = out["cursor"]
            if not out["has_more"]:
                return got, cursor

    def wait_for_answers(
        self,
        project: str,
        task_ids: list[int],
        *,
        timeout: float = 3600.0,
        poll_interval: float = 2.0,
        cursor: int = 0,
    ) -> dict[int, list[dict[str, Any]]]:
        """Block until every task is done or cancelled (or ``timeout`` passes); return answers by task.

        Tasks still open at the timeout are returned with the answers they have so far (maybe
        none); the caller decides whether to cancel them. ``cursor`` skips answers already read.
        """
        wanted = set(task_ids)
        by_task: dict[int, list[dict[str, Any]]] = {t: [] for t in task_ids}
        deadline = time.monotonic() + timeout
        while True:
            status = self.task_status(project, sorted(wanted))
            missing = wanted - set(status)
            if missing:
                raise FeedbackError(f"tasks {sorted(missing)[:10]} are not in project {project!r}")
            answers, cursor = self.answers_since(project, cursor)
            for a in answers:
                if a["task_id"] in by_task:
                    by_task[a["task_id"]].append(a)
            if all(s["status"] != "open" for s in status.values()) or time.monotonic() >= deadline:
                # Answers committed between the status read and the fetch above are included;
                # one more fetch catches any committed just before a task closed.
                answers, cursor = self.answers_since(project, cursor)
                for a in answers:
                    if a["task_id"] in by_task:
                        by_task[a["task_id"]].append(a)
                return by_task
            time.sleep(min(poll_interval, max(0.0, deadline - time.monotonic())))

    def stats(self, project: str) -> dict[str, Any]:
        """Queue, throughput and agreement, as on the admin page."""
        return self._request("GET", f"/api/projects/{project}/stats", idempotent=True)

    def export(self, project: str, fmt: str | None = None) -> list[dict[str, Any]]:
        """Answers in a trainer format (``pairs``, ``text_pairs``, ``rankings``, ``best_of_k``, ``hf``)."""
        params = {"format": fmt} if fmt else {}
        text = self._request("GET", f"/api/projects/{project}/export", params=params, idempotent=True)
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    # ------------------------------------------------------------------ labeller side (scripts, tests, load runs)

    def next_task(self, project: str | None = None) -> tuple[dict[str, Any] | None, dict[str, int]]:
        """Lease the next task; returns ``(task or None, progress)``."""
        out = self._request("POST", "/api/next", json={"project": project})
        return out["task"], out["progress"]

    def answer(
        self,
        task_id: int,
        answer: dict[str, Any],
        *,
        duration_ms: int | None = None,
        next: bool = False,
        project: str | None = None,
    ) -> dict[str, Any]:
        """Submit one answer; with ``next=True`` the reply also carries the next leased task."""
        return self._request(
            "POST",
            f"/api/tasks/{task_id}/answer",
            json={"answer": answer, "duration_ms": duration_ms, "next": next, "project": project},
        )


def client_from_env(url: str, token_env: str, who: str = "the human labeller",
                    error: type[PalateError] = ConfigError) -> FeedbackClient:
    """A client with the admin token from ``$token_env``, or ``error`` saying how to make one.

    One place for what every training-side user of the service (control preferences, LM labelling,
    LM evaluation by people) needs before it may create tasks.
    """
    token = os.environ.get(token_env)
    if not token:
        raise error(
            f"{who} needs the feedback service's admin token in ${token_env}; create one with "
            "`palate feedback create-token --db DB --name trainer --role admin --all-projects` and export it"
        )
    return FeedbackClient(url, token)
