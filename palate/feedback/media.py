"""Media uploads: recognise the container by its magic bytes and store it content-addressed.

Labellers watch clips the training run rendered, so the server must never serve a file whose
name or path came from a request. Each upload is sniffed (the extension a client claims is
ignored), hashed, and written atomically to ``<data_dir>/media/<sha256>.<ext>``; the only thing a
request can later name is that hex digest.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from palate.errors import FeedbackError

#: Extension -> MIME type of every container we accept.
MEDIA_TYPES: dict[str, str] = {"mp4": "video/mp4", "webm": "video/webm", "gif": "image/gif"}

#: A stored media name: 64 lower-case hex digits and a known extension, nothing else.
MEDIA_NAME_RE = re.compile(r"^([0-9a-f]{64})\.(mp4|webm|gif)$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def sniff_media(data: bytes) -> str:
    """Return the extension (``mp4``, ``webm``, ``gif``) that ``data``'s magic bytes announce.

    Checked: an ISO-BMFF ``ftyp`` box at offset 4 (mp4), the EBML header ``1A 45 DF A3`` with a
    ``webm`` DocType in the first bytes (so a Matroska file is not served as WebM), and
    ``GIF87a``/``GIF89a``. Anything else raises :class:`FeedbackError`.
    """
    if len(data) >= 12 and data[4:8] == b"ftyp":
        return "mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3" and b"webm" in data[:64]:
        return "webm"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    raise FeedbackError(
        "upload is not a supported media file: its first bytes match neither mp4 ('ftyp' box), "
        "webm (EBML header with DocType webm) nor GIF87a/GIF89a; render clips as mp4, webm or gif"
    )


def media_dir(data_dir: Path) -> Path:
    """The one directory media is written to and served from."""
    return Path(data_dir) / "media"


def store_media(data_dir: Path, data: bytes) -> tuple[str, str]:
    """Validate ``data`` and write it to ``<data_dir>/media/<sha256>.<ext>``; return ``(sha256, ext)``.

    The write goes to a temporary file in the same directory, is fsynced, then renamed over the
    final name, so a crash never leaves a half-written clip under a valid name. Identical
    uploads map to the same file, which makes retries harmless.
    """
    ext = sniff_media(data)
    digest = hashlib.sha256(data).hexdigest()
    folder = media_dir(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{digest}.{ext}"
    if final.exists() and final.stat().st_size == len(data):
        return digest, ext
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".upload-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return digest, ext


def media_path(data_dir: Path, name: str) -> Path:
    """Resolve a stored media name (``<sha256>.<ext>``) to its file, refusing anything else."""
    if not MEDIA_NAME_RE.match(name):
        raise FeedbackError(f"media name {name!r} is not '<64 hex digits>.<mp4|webm|gif>'")
    return media_dir(data_dir) / name
