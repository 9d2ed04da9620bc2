"""The flags of the feedback server, shared by ``palate feedback serve`` and ``python -m palate.feedback.server``.

A module of its own so that the CLI can build its parser without importing FastAPI, and the server
can parse its flags without importing the CLI.
"""

from __future__ import annotations

import argparse


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``palate feedback serve`` and ``python -m palate.feedback.server``."""
    parser.add_argument("--db", required=True, help="SQLite database file (created and migrated if needed)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface; 0.0.0.0 exposes the service to the network"
    )
    parser.add_argument(
        "--data-dir", default=None, help="where uploaded media live (default: <db stem>-data/ beside the db)"
    )
    parser.add_argument(
        "--lease-seconds", type=float, default=120.0, help="how long a shown task stays reserved"
    )
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted media upload")
    parser.add_argument(
        "--max-json-mb",
        type=float,
        default=8.0,
        help="largest JSON request body (a batch of tasks, an answer); larger ones get 413 unread",
    )
    parser.add_argument(
        "--synchronous",
        choices=["normal", "full"],
        default="normal",
        help="SQLite fsync policy: normal survives a killed server; full also a power cut, slower",
    )
    parser.add_argument("--log-level", default="warning", help="uvicorn log level")
