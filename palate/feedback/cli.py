"""``palate feedback serve|create-token|revoke-token|export|import``.

:func:`add_parser` registers the sub-commands on the top-level ``palate`` parser; each handler
takes the parsed namespace and returns an exit code. User mistakes raise
:class:`palate.errors.FeedbackError`, which ``palate`` prints on one line with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from palate.errors import FeedbackError
from palate.feedback.serve_options import add_serve_arguments
from palate.feedback.store import Store
from palate.feedback.tasks import EXPORT_FORMATS


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``feedback`` and its sub-commands to ``subparsers``; return the ``feedback`` parser."""
    fb = subparsers.add_parser("feedback", help="the human-feedback service: serve, tokens, export/import")
    sub = fb.add_subparsers(dest="feedback_command", required=True)

    p = sub.add_parser("serve", help="run the labelling pages and the API (uvicorn)")
    add_serve_arguments(p)
    p.set_defaults(func=serve)

    p = sub.add_parser(
        "create-token", help="create a labeller or admin token (printed once; only its hash is kept)"
    )
    p.add_argument("--db", required=True, help="SQLite database of the service")
    p.add_argument("--name", required=True, help="account name shown in exports and on the admin page")
    p.add_argument("--role", choices=["labeller", "admin"], default="labeller")
    p.add_argument(
        "--project",
        action="append",
        default=[],
        help="project the account may see (repeatable; created if missing)",
    )
    p.add_argument(
        "--all-projects", action="store_true", help="admin of every project (training runs use this)"
    )
    p.set_defaults(func=create_token)

    p = sub.add_parser("revoke-token", help="revoke a token (a running server stops accepting it within 5 s)")
    p.add_argument("--db", required=True)
    p.add_argument("--token", required=True, help="the token to revoke")
    p.set_defaults(func=revoke_token)

    p = sub.add_parser("export", help="write a project's answers as JSONL in a trainer format")
    p.add_argument("--db", required=True)
    p.add_argument("--project", required=True)
    p.add_argument("--out", required=True, help="output .jsonl file (written atomically)")
    p.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default=None,
        help="which format to write when a project holds several; hf: prompt/chosen/rejected pairs of every "
        "text task (rankings expanded to pairs), as TRL and `palate lm rm --train-data` read them",
    )
    p.set_defaults(func=export)

    p = sub.add_parser("import", help="load a labelled JSONL file (an export) into a project")
    p.add_argument("--db", required=True)
    p.add_argument("--project", required=True, help="target project (created if missing)")
    p.add_argument("file", help="JSONL in one of the export formats")
    p.set_defaults(func=import_)
    return fb


def serve(args: argparse.Namespace) -> int:
    """Run the service until interrupted (FastAPI and uvicorn are imported only here)."""
    from palate.feedback.server import serve as run_server

    return run_server(args)


def create_token(args: argparse.Namespace) -> int:
    """Print a new token for ``--name``; the only time it is shown."""
    store = Store(args.db)
    try:
        token = store.create_token(args.name, args.role, args.project, all_projects=args.all_projects)
    finally:
        store.close()
    scope = "all projects" if args.all_projects else ", ".join(args.project)
    print(f"# {args.role} {args.name!r} ({scope}); store it now, it is not kept", file=sys.stderr)
    print(token)
    return 0


def revoke_token(args: argparse.Namespace) -> int:
    """Revoke one token; an unknown or already revoked token is a user mistake."""
    store = Store(args.db)
    try:
        if not store.revoke_token(args.token):
            raise FeedbackError("--token is unknown or already revoked; nothing changed")
    finally:
        store.close()
    print("revoked", file=sys.stderr)
    return 0


def export(args: argparse.Namespace) -> int:
    """Write ``--project``'s answers to ``--out`` (temp file + rename, so readers never see half a file)."""
    if not Path(args.db).exists():
        raise FeedbackError(f"--db {args.db}: no such database")
    store = Store(args.db)
    try:
        pid = store.project_id(args.project)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
        n = 0
        try:
            with os.fdopen(fd, "w") as fh:
                for row in store.export_rows(pid, args.format):
                    fh.write(json.dumps(row) + "\n")
                    n += 1
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        store.close()
    print(f"wrote {n} lines to {out}", file=sys.stderr)
    return 0


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line_number, object)`` for each non-blank line; a bad line names file and line."""
    path = Path(path)
    if not path.exists():
        raise FeedbackError(f"{path}: no such file")
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise FeedbackError(
                    f"{path}:{lineno}: not valid JSON ({err.msg}); fix or remove the line"
                ) from err


def import_(args: argparse.Namespace) -> int:
    """Load a JSONL file of labelled comparisons into ``--project`` (one transaction)."""
    rows = list(read_jsonl(args.file))
    store = Store(args.db)
    try:
        pid = store.ensure_project(args.project)
        try:
            counts = store.import_rows(pid, rows)
        except FeedbackError as err:
            raise FeedbackError(f"{args.file}: {err}") from err
    finally:
        store.close()
    print(
        f"imported {counts['tasks']} comparisons ({counts['answers']} answers); "
        f"skipped {counts['skipped']} already present",
        file=sys.stderr,
    )
    return 0
