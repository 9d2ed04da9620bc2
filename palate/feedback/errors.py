"""Errors of the feedback service, each with the HTTP status the server answers it with.

All are :class:`palate.errors.FeedbackError`: a user mistake, printed on one line by ``palate``.
"""

from __future__ import annotations

from palate.errors import FeedbackError


class BadInput(FeedbackError):
    """The request or file is malformed (400)."""

    status = 400


class Unauthorized(FeedbackError):
    """No token, or a token that is unknown or revoked (401)."""

    status = 401


class Forbidden(FeedbackError):
    """A valid token acting outside its role or projects (403)."""

    status = 403


class NotFound(FeedbackError):
    """An unknown task, project or media file (404)."""

    status = 404


class Conflict(FeedbackError):
    """The request contradicts the stored state: double answer, cancelled task, lost lease (409)."""

    status = 409
