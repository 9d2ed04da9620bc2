"""The HTTP service: labeller and admin pages, and the API training runs call.

Endpoints are ``async`` and call the :class:`~palate.feedback.store.Store` inline: each call is
one short SQLite transaction (well under a millisecond, plus the fsync of a commit), and running
them on the event loop serialises them for free, which is SQLite's one-writer model, instead of
paying a thread hand-off per request. Every ``/api`` endpoint authenticates with
``Authorization: Bearer <token>`` or the ``palate_token`` cookie that ``/api/login`` sets for the
pages (``SameSite=Strict``, ``HttpOnly``, so other sites can neither read nor ride it).

Run: ``python -m palate.feedback.server --db feedback.sqlite --port 8000`` (or ``palate feedback serve``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, ValidationError
from starlette.formparsers import MultiPartException, MultiPartParser

from palate.errors import FeedbackError
from palate.feedback import media
from palate.feedback.auth import Principal
from palate.feedback.errors import BadInput, Forbidden, NotFound, Unauthorized
from palate.feedback.limits import DEFAULT_MAX_JSON, DEFAULT_MAX_UPLOAD, BodyLimit, TooLarge
from palate.feedback.serve_options import add_serve_arguments
from palate.feedback.store import Store

STATIC = Path(__file__).parent / "static"
COOKIE = "palate_token"


class LoginBody(BaseModel):
    token: str = Field(max_length=200)


class ProjectBody(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    description: str = Field(default="", max_length=10_000)


class TasksBody(BaseModel):
    #: Validated task by task in :func:`palate.feedback.tasks.normalize_task_spec`.
    tasks: list[Any] = Field(min_length=1, max_length=10_000)


class IdsBody(BaseModel):
    ids: list[int] = Field(max_length=100_000)


class ExternalIdsBody(BaseModel):
    external_ids: list[str] = Field(max_length=100_000)


class NextBody(BaseModel):
    project: str | None = None


class AnswerBody(BaseModel):
    answer: dict[str, Any]
    duration_ms: int | None = None
    #: Lease and return the next task in the same round trip (what the labeller page does).
    next: bool = False
    project: str | None = None


_M = TypeVar("_M", bound=BaseModel)


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI request body of a route that parses its body itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


def _task_id(raw: str) -> int:
    if not raw.isdigit() or len(raw) > 18:
        raise RequestValidationError(
            [
                {
                    "type": "int_parsing",
                    "loc": ("path", "task_id"),
                    "msg": f"task_id must be an integer, got {raw!r}",
                }
            ]
        )
    return int(raw)


def default_data_dir(db_path: str | Path) -> Path:
    """``feedback.sqlite`` keeps its media in ``feedback-data/`` beside it unless told otherwise."""
    db_path = Path(db_path)
    return db_path.parent / f"{db_path.stem}-data"


def create_app(
    db_path: str | Path,
    *,
    data_dir: str | Path | None = None,
    lease_seconds: float = 120.0,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    max_json_bytes: int = DEFAULT_MAX_JSON,
    synchronous: str = "NORMAL",
    clock: Callable[[], float] | None = None,
) -> FastAPI:
    """Build the app around one :class:`Store`; the store is ``app.state.store``.

    ``max_upload_bytes`` caps a media upload, ``max_json_bytes`` every other request body
    (refused with 413 before a byte of it is parsed, see :class:`BodyLimit`).
    """
    if max_json_bytes < 1024 or max_upload_bytes < 1024:
        raise FeedbackError(
            f"body limits of {max_json_bytes} (JSON) and {max_upload_bytes} (media) bytes are too small "
            "for any request; give at least 1 KiB (--max-json-mb, --max-upload-mb)"
        )
    kwargs: dict[str, Any] = {"synchronous": synchronous, "lease_seconds": lease_seconds}
    if clock is not None:
        kwargs["clock"] = clock
    store = Store(db_path, **kwargs)
    data = Path(data_dir) if data_dir is not None else default_data_dir(db_path)
    media.media_dir(data).mkdir(parents=True, exist_ok=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        store.close()

    app = FastAPI(
        title="palate feedback",
        version="1",
        docs_url="/api/docs",
        openapi_url="/api/openapi.json",
        lifespan=lifespan,
    )
    app.state.store = store
    app.state.data_dir = data
    app.state.max_upload_bytes = max_upload_bytes
    app.state.max_json_bytes = max_json_bytes
    # Outermost, so no route, dependency or validation sees an oversized body.
    app.add_middleware(BodyLimit, limit=max_json_bytes, exempt=("/api/media",))

    @app.exception_handler(FeedbackError)
    async def _feedback_error(request: Request, exc: FeedbackError) -> JSONResponse:
        status = getattr(exc, "status", 400)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse({"detail": "request body is not valid JSON"}, status_code=400)
        parts = [
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}" for e in errors[:5]
        ]
        return JSONResponse(
            {"detail": "; ".join(parts), "errors": json.loads(json.dumps(errors, default=str))},
            status_code=422,
        )

    def principal(request: Request) -> Principal:
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else request.cookies.get(COOKIE)
        return store.authenticate(token)

    def admin(request: Request) -> Principal:
        who = principal(request)
        if not who.is_admin:
            raise Forbidden(f"{who.name!r} is a labeller; this endpoint needs an admin token")
        return who

    # ------------------------------------------------------------------ labeller API
    # Registered first (routes match in order) and kept lean: these two carry nearly all the
    # traffic, so they authenticate before reading the body, parse it with one pydantic call and
    # return a JSONResponse, skipping FastAPI's dependency solving and response-model pass
    # (about a third of the CPU per answer otherwise). The schemas still appear in /api/docs.

    async def parse(request: Request, model: type[_M], default: bytes = b"") -> _M:
        raw = await request.body()
        try:
            return model.model_validate_json(raw or default)
        except ValidationError as err:
            raise RequestValidationError(err.errors(include_url=False)) from err

    def _project_arg(who: Principal, name: str | None) -> int | None:
        return None if name is None else store.resolve_project(who, name)

    @app.post("/api/next", openapi_extra=_body_schema(NextBody), response_model=None)
    async def next_task(request: Request) -> Response:
        """Lease the next task (or renew the one held) and report progress."""
        who = principal(request)
        body = await parse(request, NextBody, b"{}")
        pid = _project_arg(who, body.project)
        return JSONResponse({"task": store.lease_next(who, pid), "progress": store.progress(who, pid)})

    @app.post(
        "/api/tasks/{task_id}/answer",
        status_code=201,
        openapi_extra=_body_schema(AnswerBody),
        response_model=None,
    )
    async def answer(request: Request) -> Response:
        """Store an answer durably (the 201 comes after COMMIT); optionally lease the next task."""
        who = principal(request)
        task_id = _task_id(request.path_params["task_id"])
        body = await parse(request, AnswerBody)
        pid = _project_arg(who, body.project)
        answer_id = store.submit_answer(who, task_id, body.answer, body.duration_ms)
        out: dict[str, Any] = {"answer_id": answer_id}
        if body.next:
            out["task"] = store.lease_next(who, pid)
            out["progress"] = store.progress(who, pid)
        return JSONResponse(out, status_code=201)

    @app.post("/api/tasks/{task_id}/release")
    async def release(request: Request, task_id: int) -> dict[str, Any]:
        """Give a leased task back (skip)."""
        return {"released": store.release(principal(request), task_id)}

    # ------------------------------------------------------------------ pages

    def page(name: str) -> FileResponse:
        return FileResponse(STATIC / name, headers={"Cache-Control": "no-store"})

    @app.get("/", include_in_schema=False)
    async def label_page(request: Request) -> Response:
        try:
            principal(request)
        except Unauthorized:
            return RedirectResponse("/login", status_code=303)
        return page("label.html")

    @app.get("/admin", include_in_schema=False)
    async def admin_page(request: Request) -> Response:
        try:
            who = principal(request)
        except Unauthorized:
            return RedirectResponse("/login?next=/admin", status_code=303)
        if not who.is_admin:
            return JSONResponse({"detail": "the admin page needs an admin token"}, status_code=403)
        return page("admin.html")

    @app.get("/login", include_in_schema=False)
    async def login_page() -> Response:
        return page("login.html")

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "schema_version": store.schema_version()}

    # ------------------------------------------------------------------ session

    @app.post("/api/login")
    async def login(body: LoginBody) -> Response:
        """Check a token and keep it in an HttpOnly cookie for the pages."""
        who = store.authenticate(body.token)
        resp = JSONResponse(_me(who))
        resp.set_cookie(COOKIE, body.token, httponly=True, samesite="strict", max_age=30 * 86400)
        return resp

    @app.post("/api/logout")
    async def logout() -> Response:
        resp = JSONResponse({"ok": True})
        resp.delete_cookie(COOKIE)
        return resp

    def _me(who: Principal) -> dict[str, Any]:
        return {"name": who.name, "role": who.role, "projects": store.projects_for(who)}

    @app.get("/api/me")
    async def me(request: Request) -> dict[str, Any]:
        return _me(principal(request))

    @app.get("/api/projects")
    async def projects(request: Request) -> list[dict[str, Any]]:
        return store.projects_for(principal(request))

    @app.post("/api/projects", status_code=201)
    async def create_project(request: Request, body: ProjectBody) -> dict[str, Any]:
        who = admin(request)
        if not who.all_projects:
            raise Forbidden(
                f"{who.name!r} is an admin of some projects only; creating projects needs --all-projects"
            )
        store.ensure_project(body.name, body.description)
        return {"name": body.name}

    # ------------------------------------------------------------------ training-run API

    @app.post("/api/media", status_code=201)
    async def upload_media(request: Request) -> dict[str, Any]:
        """Upload one clip (mp4, webm or gif), as multipart field ``file`` or as the raw body.

        The body is read in chunks and refused with 413 as soon as it passes the limit, so an
        oversized upload costs neither memory nor disk.
        """
        admin(request)
        limit: int = app.state.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit + 64 * 1024:
            raise TooLarge(limit)

        async def capped() -> AsyncGenerator[bytes, None]:
            seen = 0
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit + 64 * 1024:
                    raise TooLarge(limit)
                yield chunk

        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            try:
                form = await MultiPartParser(
                    request.headers, capped(), max_files=1, max_fields=5, max_part_size=64 * 1024
                ).parse()
            except MultiPartException as err:
                raise BadInput(f"multipart upload is malformed: {err}") from err
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise BadInput("multipart upload needs the clip in a file field named 'file'")
            data = await upload.read()
            await upload.close()
        else:
            data = b"".join([chunk async for chunk in capped()])
        if len(data) > limit:
            raise TooLarge(limit)
        if not data:
            raise BadInput("upload is empty; send the clip bytes")
        sha, ext = media.store_media(app.state.data_dir, data)
        store.add_media(sha, ext, len(data))
        return {"sha256": sha, "ext": ext, "size": len(data)}

    @app.get("/api/media/{name}")
    async def get_media(request: Request, name: str) -> Response:
        who = principal(request)
        try:
            path = media.media_path(app.state.data_dir, name)
        except FeedbackError as err:
            raise NotFound(str(err)) from err
        sha = name.split(".")[0]
        if store.media_ext(sha) != name.split(".")[1] or not path.exists():
            raise NotFound(f"media {name} does not exist")
        if not store.may_view_media(who, sha):
            raise Forbidden(f"media {name} belongs to no task of {who.name!r}'s projects")
        return FileResponse(
            path,
            media_type=media.MEDIA_TYPES[path.suffix[1:]],
            headers={"Cache-Control": "private, max-age=86400, immutable"},
        )

    @app.post("/api/projects/{project}/tasks", status_code=201)
    async def create_tasks(request: Request, project: str, body: TasksBody) -> dict[str, Any]:
        """Create tasks (all or nothing); returns their ids in the order given."""
        who = admin(request)
        pid = store.resolve_project(who, project)
        return {"ids": store.create_tasks(pid, body.tasks)}

    @app.post("/api/projects/{project}/tasks/cancel")
    async def cancel_tasks(request: Request, project: str, body: IdsBody) -> dict[str, Any]:
        who = admin(request)
        return {"cancelled": store.cancel_tasks(store.resolve_project(who, project), body.ids)}

    @app.post("/api/projects/{project}/tasks/status")
    async def task_status(request: Request, project: str, body: IdsBody) -> dict[str, Any]:
        who = admin(request)
        found = store.task_status(store.resolve_project(who, project), body.ids)
        return {"tasks": {str(k): v for k, v in found.items()}}

    @app.post("/api/projects/{project}/tasks/find")
    async def find_tasks(request: Request, project: str, body: ExternalIdsBody) -> dict[str, Any]:
        """The tasks with these external ids (a restarted run finding the tasks it created)."""
        who = admin(request)
        return {"tasks": store.find_tasks(store.resolve_project(who, project), body.external_ids)}

    @app.get("/api/projects/{project}/answers")
    async def answers(request: Request, project: str, since: int = 0, limit: int = 500) -> dict[str, Any]:
        """Answers with id > ``since``; pass the returned ``cursor`` next time."""
        who = admin(request)
        rows, cursor, more = store.answers_since(store.resolve_project(who, project), since, limit)
        return {"answers": rows, "cursor": cursor, "has_more": more}

    @app.get("/api/projects/{project}/stats")
    async def stats(request: Request, project: str) -> dict[str, Any]:
        who = admin(request)
        return store.stats(store.resolve_project(who, project))

    @app.get("/api/projects/{project}/export")
    async def export(request: Request, project: str, format: str | None = None) -> Response:
        """All answers as JSONL in a trainer format (see docs/feedback.md)."""
        who = admin(request)
        pid = store.resolve_project(who, project)
        lines = [json.dumps(row) + "\n" for row in store.export_rows(pid, format)]
        name = f"{project}-{format or 'answers'}.jsonl"
        return StreamingResponse(
            iter(lines),
            media_type="application/x-ndjson",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def serve(args: argparse.Namespace) -> int:
    """Run the service with uvicorn until interrupted."""
    import uvicorn

    if not 0 < args.port < 65536:
        raise FeedbackError(f"--port {args.port}: use 1..65535")
    app = create_app(
        args.db,
        data_dir=args.data_dir,
        lease_seconds=args.lease_seconds,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_json_bytes=int(args.max_json_mb * 2**20),
        synchronous=args.synchronous,
    )
    # Access logging costs about a third of the throughput and duplicates the answers table;
    # the Server header only advertises versions.
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level, access_log=False, server_header=False
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m palate.feedback.server", description=__doc__.splitlines()[0]
    )
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return serve(args)
    except FeedbackError as err:
        print(f"error: {err}")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
