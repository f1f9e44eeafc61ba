"""The FastAPI app factory and `ipdfer serve`.

    app = create_app(Settings())        # REDIS_URL unset: in-process model + batching loop
    ipdfer serve --host 0.0.0.0 --port 8000

Errors are JSON `{"detail": "..."}` (422 adds `errors`), turned from service
exceptions into HTTP answers here, at the edge. Every response carries
`X-Request-ID` (the client's, if it sent a sane one). `GET /` serves the try-it
page from `service/static/`.
"""
from __future__ import annotations

import argparse
import hmac
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import router
from service.backend import Backend, make_backend
from service.errors import (
    VIDEO_ERROR_STATUS, JobError, NoWorkers, QueueFull, ResultTimeout, Unavailable, client_detail, http_status,
)
from service.metrics import ApiMetrics
from service.settings import Settings, add_options
from service.videos import VideoJobs

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
_SANE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

DESCRIPTION = """Facial expression recognition with identity and pose disentangled (IPD-FER).

`POST /predict` an image (multipart field `file`, or the raw body) to get, per face:
box, landmarks, detection score, expression probabilities over 7 classes, head pose
(yaw, pitch, roll in degrees), a `face_id` and, with `?neutral=true`, the synthesized
neutral face. `GET /neutralize?face_id=...` returns that neutral face as PNG
(`&kind=residue`: where the face differs from it). Errors are JSON `{"detail": "..."}`;
503 answers carry `Retry-After`."""


_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class ObservabilityMiddleware:
    """Request id, per-route request counts and latency (route templates, not raw
    paths, so metrics cardinality stays bounded)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _SANE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # Labels only from a bounded set: the route template, "static" for the web
            # page's mount, else "unmatched"; never the raw path or an invented method.
            route = scope.get("route")
            path = getattr(route, "path", None) or ("static" if route is not None else "unmatched")
            method = scope.get("method", "")
            method = method if method in _HTTP_METHODS else "other"
            self.metrics.requests.labels(path, method, str(status)).inc()
            self.metrics.latency.labels(path, method).observe(time.perf_counter() - t0)


OPERATIONS_PATHS = frozenset({"/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


class OperationsKeyMiddleware:
    """IPDFER_PROTECT_OPERATIONS: the API key guards the operations paths as well."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in OPERATIONS_PATHS:
            given = dict(scope.get("headers") or []).get(b"x-api-key", b"")
            if not hmac.compare_digest(given, self.key):
                response = _error(401, "missing or wrong X-API-Key header", {"WWW-Authenticate": "APIKey"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _error(status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    retry = {"Retry-After": str(app.state.settings.retry_after_s)}

    @app.exception_handler(JobError)
    async def job_error(request: Request, exc: JobError) -> JSONResponse:
        if exc.kind == "dead_letter":
            app.state.metrics.dead_lettered.inc()
        status = http_status(exc)
        return _error(status, client_detail(exc), errors=[]) if status == 422 else _error(status, client_detail(exc))

    from model.video.decode import VideoError

    @app.exception_handler(VideoError)
    async def video_error(request: Request, exc: VideoError) -> JSONResponse:
        return _error(VIDEO_ERROR_STATUS[exc.kind], exc.detail)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return _error(http_status(exc), client_detail(exc), retry)

    @app.exception_handler(NoWorkers)
    async def no_workers(request: Request, exc: NoWorkers) -> JSONResponse:
        return _error(http_status(exc), client_detail(exc), retry)

    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, exc: Unavailable) -> JSONResponse:
        return _error(http_status(exc), client_detail(exc), retry)

    @app.exception_handler(ResultTimeout)
    async def timeout(request: Request, exc: ResultTimeout) -> JSONResponse:
        return _error(http_status(exc), client_detail(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = exc.headers
        if exc.status_code == 405:  # Allow lists every route of the path, not just the first one found
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(app, request.url.path))}
        return _error(exc.status_code, str(exc.detail), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
                           for e in errors) or "invalid request"
        return _error(422, detail, errors=errors)

    @app.exception_handler(ClientDisconnect)
    async def disconnected(request: Request, exc: ClientDisconnect) -> Response:
        # Not a server error: one log line, and 499 ("client closed request", as nginx
        # counts it) in the metrics; nobody reads the answer.
        log.info("client disconnected before sending its whole request: %s %s", request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}")


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Methods for which some route of the app fully matches `path`."""
    from starlette.routing import Match
    allowed = []
    for method in sorted(_HTTP_METHODS):
        scope = {"type": "http", "path": path, "method": method, "root_path": "", "headers": []}
        if any(route.matches(scope)[0] == Match.FULL for route in app.router.routes):
            allowed.append(method)
    return allowed


def add_web_page(app: FastAPI) -> None:
    """The try-it page's files as explicit GET routes (not a catch-all mount at "/",
    which answered every unknown path and method itself: GET /predict was a 404)."""
    from fastapi.responses import FileResponse
    files = {"/": "index.html", "/app.js": "app.js", "/live.js": "live.js", "/style.css": "style.css"}
    def serve(path: Path):  # no parameters: nothing of the request chooses the file
        def page() -> FileResponse:
            return FileResponse(path)
        return page

    for url, name in files.items():
        if (STATIC_DIR / name).is_file():
            app.add_api_route(url, serve(STATIC_DIR / name), methods=["GET", "HEAD"], include_in_schema=False,
                              name=f"static:{name}")


def create_app(settings: Settings | None = None, *, backend: Backend | None = None) -> FastAPI:
    """The app. `backend` overrides the one chosen from settings (tests)."""
    settings = settings or Settings()
    backend = backend or make_backend(settings)
    metrics = ApiMetrics()

    videos = VideoJobs(settings, backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await backend.start()
        log.info("serving in %s mode", backend.mode)
        try:
            yield
        finally:
            await videos.stop()
            await backend.stop()

    app = FastAPI(title="IPD-FER", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings, app.state.backend, app.state.metrics = settings, backend, metrics
    app.state.videos = videos
    install_error_handlers(app)
    if settings.protect_operations and settings.api_key:
        app.add_middleware(OperationsKeyMiddleware, key=settings.api_key.get_secret_value())
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)
    app.include_router(router)
    add_web_page(app)  # a small page to try it in a browser, at GET /
    return app


# --- ipdfer serve -------------------------------------------------------------------


SERVE_OPTIONS = ("host", "port", "workers_inprocess", "redis_url", "max_batch_size", "max_wait_ms", "log_level")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, SERVE_OPTIONS)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    settings = Settings.from_args(args, SERVE_OPTIONS)
    settings.configure_logging()
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level.lower(), timeout_graceful_shutdown=10,
                timeout_keep_alive=5, limit_concurrency=settings.max_connections,
                http=header_deadline_protocol(settings.header_timeout_s),
                # a live frame may be as large as an upload; a client may queue few frames
                ws_max_size=settings.max_body_bytes + 1024, ws_max_queue=4)
    return 0


def header_deadline_protocol(timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline for a request's line and headers.

    uvicorn times out idle keep-alive connections, but not one that sends its
    headers a byte at a time, or never finishes them: enough of those hold every
    slot of limit_concurrency. The deadline starts when the connection opens and
    again after each response; a request whose headers are not complete by then
    gets a bare 408 and the connection is closed. (The body has its own deadline,
    body_timeout_s, in the app.)"""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineH11Protocol(H11Protocol):
        _deadline = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            self._arm()  # before: the next (pipelined) request may start inside super()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(timeout_s, self._expire)

        def _expire(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return  # closed, or its headers are in: the request is under way
            if self.conn.trailing_data[0]:  # part of a request line / headers came
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n"
                                     b"connection: close\r\n\r\n")
            log.info("closing a connection whose request headers did not arrive within %g s", timeout_s)
            self.transport.close()

    return HeaderDeadlineH11Protocol
