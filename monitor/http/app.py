"""The monitor's HTTP application and its server, started by ``cronfleet monitor --http``.

The HTTP layer only validates and translates: a ping becomes the same signed heartbeat event
on the bus that ``cronfleet ping`` sends, an API write goes through the same validation as
``apply``. Every route module contributes one ``router``; the OpenAPI document is served at
``/openapi.json``. No request ever gets a stack trace: an unexpected error is logged and
answered ``500 {"error": "internal_error"}``; a bad parameter or body ``422 {"error": "invalid",
"field": ..., "detail": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from monitor.http import api, dashboard, metrics, pings
from monitor.http.context import HttpContext

log = logging.getLogger("cronfleet.http")

# How long a stopping monitor gives open HTTP requests.
SHUTDOWN_GRACE_SECONDS = 5.0


def create_app(context: HttpContext) -> FastAPI:
    """The monitor's HTTP application over ``context``."""
    app = FastAPI(title="cronfleet monitor", openapi_url="/openapi.json", docs_url=None, redoc_url=None)
    app.state.context = context
    for module in (pings, api, metrics, dashboard):
        app.include_router(module.router)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # Every error is {"error": CODE}: an ApiError's code, else the status's own phrase.
        code = exc.detail if isinstance(exc.detail, str) else "error"
        return JSONResponse({"error": code}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # A bad parameter or body: {"error": "invalid", "field": "a.b", "detail": "why"}.
        return JSONResponse(invalid_body(exc), status_code=422)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        # A ping URL holds its key: never log it.
        path = "/ping/..." if request.url.path.startswith("/ping/") else request.url.path
        log.error("HTTP %s %s failed: %s: %s", request.method, path, type(exc).__name__, exc)
        return JSONResponse({"error": "internal_error"}, status_code=500)

    return app


def invalid_body(exc: RequestValidationError) -> dict[str, str | None]:
    """The 422 body of ``exc``: its first error's field (dotted, without ``body``/``query``/
    ``path``; None for the whole request) and reason, in one line."""
    errors = exc.errors()
    if not errors:
        return {"error": "invalid", "field": None, "detail": "invalid request"}
    first = errors[0]
    field = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
    detail = " ".join(str(first.get("msg", "invalid")).split())[:500]
    more = len(errors) - 1
    if more:
        detail += f" (and {more} more problem{'s' if more > 1 else ''})"
    return {"error": "invalid", "field": field, "detail": detail}


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to (``host``, ``port``) and listening (port 0: a free one), so that
    requests queue from now on even before the server takes them. Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the monitor's process owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_http(context: HttpContext, sock: socket.socket) -> None:
    """Serve the app on ``sock`` until cancelled; then let open requests finish (a few seconds
    at most) and close it."""
    config = uvicorn.Config(
        create_app(context), log_level="warning", lifespan="off", access_log=False, server_header=False
    )
    server = _Server(config)
    host, port = sock.getsockname()[:2]
    log.info("monitor HTTP on http://%s:%d/", host, port)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await asyncio.shield(task)
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, SHUTDOWN_GRACE_SECONDS)
        sock.close()
