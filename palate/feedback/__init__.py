"""The human-feedback service: people compare clips or rank completions; training runs read the answers.

Layout: :mod:`~palate.feedback.store` (the SQLite store: tasks, leases, answers), with
:mod:`~palate.feedback.schema` (tables, migrations), :mod:`~palate.feedback.auth` (tokens,
principals, accounts), :mod:`~palate.feedback.tasks` (task and answer validation, formats),
:mod:`~palate.feedback.exports` (export, import), :mod:`~palate.feedback.stats` (admin counts,
agreement) and :mod:`~palate.feedback.errors`;
:mod:`~palate.feedback.media` (upload validation and content-addressed files),
:mod:`~palate.feedback.server` (FastAPI app and pages), :mod:`~palate.feedback.client` (what the
preference loop and the LM pipeline call), :mod:`~palate.feedback.cli` (``palate feedback ...``) with
:mod:`~palate.feedback.serve_options` (the server's flags).
Nothing here imports torch or another palate layer. The names below load on first use, so that
``palate --help`` does not pay for httpx or FastAPI.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FeedbackClient", "Store"]


def __getattr__(name: str) -> Any:
    if name == "FeedbackClient":
        from palate.feedback.client import FeedbackClient

        return FeedbackClient
    if name == "Store":
        from palate.feedback.store import Store

        return Store
    raise AttributeError(f"module 'palate.feedback' has no attribute {name!r}")
