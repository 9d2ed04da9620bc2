"""Request size limits of the feedback service: JSON bodies and media uploads.

Both are refused with 413 before the body is parsed or stored, so an oversized request costs
neither memory nor disk (``--max-json-mb``, ``--max-upload-mb`` of ``palate feedback serve``).
"""

from __future__ import annotations

import json
from typing import Any

from palate.errors import FeedbackError

DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024
#: Largest JSON request body: a batch of tasks (up to 9 texts of 200,000 characters each fit
#: in one task); an answer is a few hundred bytes.
DEFAULT_MAX_JSON = 8 * 1024 * 1024


class BodyLimit:
    """ASGI middleware: refuse a request body over ``limit`` bytes with 413 before the app reads it.

    A ``Content-Length`` over the limit is refused at once, without reading the body. A body
    without one (``Transfer-Encoding: chunked``) is read here chunk by chunk and refused as soon
    as it passes the limit, so it costs at most ``limit`` bytes of memory; a body within the limit
    is handed to the app unchanged. Paths in ``exempt`` (media uploads) stream their bodies and
    enforce their own limit. Pure ASGI rather than ``BaseHTTPMiddleware``: it sits on the answer
    path, which is benchmarked.
    """

    def __init__(self, app: Any, limit: int, exempt: tuple[str, ...] = ()) -> None:
        self.app, self.limit, self.exempt = app, int(limit), exempt

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD") or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        declared = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                declared = value
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replay = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        sent = False

        async def replayed() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return replay
            return await receive()

        await self.app(scope, replayed, send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps({"detail": _too_large_json(self.limit)}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _too_large_json(limit: int) -> str:
    return (
        f"request body is larger than the limit of {_size(limit)} for JSON; send fewer tasks per "
        "request, or start the server with a larger --max-json-mb"
    )


class TooLarge(FeedbackError):
    """413 for a media upload over ``--max-upload-mb``."""

    status = 413

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"upload is larger than the limit of {_size(limit)}; shorten or downscale the clip, "
            "or start the server with a larger --max-upload-mb"
        )
