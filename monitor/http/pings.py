"""Ping URLs, the Healthchecks scheme: a ``GET``, ``POST`` or ``HEAD`` of a ping URL becomes the
same signed ``job.heartbeat`` event on the bus that ``cronfleet ping`` sends.

- ``/ping/<key>``: success; ``/ping/<key>/start``, ``/ping/<key>/fail``; ``/ping/<key>/<code>``
  (``0`` success, ``1`` to ``255`` failed with that exit code). The key must ping exactly one job.
- ``/ping/<key>/<job>`` (and ``/start``, ``/fail``, ``/<code>`` after it): for a key that may ping
  several jobs (any key may name its job). For a key of one job, ``start``, ``fail`` and numbers
  after the key are the kind, never a job's name; for a key of several jobs, a name of one of
  them is the job.
- ``?rid=<id>``: the heartbeat's ``rid``, which makes a start and its finish one run.
- The request body is the heartbeat's message (the run's log): its last ``MESSAGE_CHARACTERS``
  characters are kept (invalid UTF-8 and NUL become U+FFFD); a longer body is cut, never refused,
  and the kept text then starts with a line saying so.

Answers (plain text): ``200 OK``; ``404`` for an unknown or revoked key, or a job the key may not
ping (the same answer: a caller learns nothing about which keys exist); ``400`` for a bad exit
code or rid; ``503`` when the store (to look the key up) or the broker (to take the heartbeat)
is unavailable (try again), or when this monitor's keys cannot sign it (logged as an error).
Nothing logged here holds the key.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import PlainTextResponse
from starlette.requests import ClientDisconnect

from common.bounds import MAX_TEXT_LENGTH
from common.errors import ConfigError, CronfleetError
from common.messages import RID_PATTERN, HeartbeatKind, JobHeartbeat
from common.ping_keys import PingKey, find_ping_key
from common.store import STORE_OUTAGES
from monitor.http.context import HttpContext, context_of

log = logging.getLogger("cronfleet.http.pings")

router = APIRouter(tags=["pings"])

# What the wire keeps of a heartbeat's message.
MESSAGE_CHARACTERS = MAX_TEXT_LENGTH
# The body's tail kept while reading: enough bytes for MESSAGE_CHARACTERS characters of UTF-8.
_KEPT_BYTES = 4 * MESSAGE_CHARACTERS
MAX_EXIT_CODE = 255

_RID = re.compile(RID_PATTERN)
_NUMBER = re.compile(r"^[+-]?[0-9]+$")
_KINDS = {"start": HeartbeatKind.START, "fail": HeartbeatKind.FAIL}
_METHODS = ["GET", "POST", "HEAD"]
_OTHER_METHODS = ["PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]


class _Refused(Exception):
    """A ping answered with ``status`` and ``text`` instead of being sent."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def _not_found() -> _Refused:
    return _Refused(404, "not found: no such ping key, or a job it may not ping\n")


def _answer(status: int, text: str) -> PlainTextResponse:
    return PlainTextResponse(text, status_code=status, headers={"Cache-Control": "no-store"})


Context = Annotated[HttpContext, Depends(context_of)]

_TEXT = {"text/plain": {"schema": {"type": "string"}}}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the heartbeat is on the bus: `OK`", "content": _TEXT},
    400: {"description": "an exit code out of 0 to 255, or a bad rid", "content": _TEXT},
    404: {"description": "unknown or revoked key, or a job it may not ping", "content": _TEXT},
    503: {"description": "not sent (the broker, or this monitor's keys): try again", "content": _TEXT},
}


# Read and checked by _ping itself (a bad one is a 400, not a 422): declared for the document.
Rid = Annotated[
    str | None,
    Query(description="links a start to its finish: the same value on both (1 to 64 of A-Z a-z 0-9 . _ ~ -)"),
]


async def ping(key: str, request: Request, context: Context, rid: Rid = None) -> PlainTextResponse:
    """The job of a key of one job succeeded."""
    return await _ping(context, request, key, [])


async def ping_word(
    key: str, word: str, request: Request, context: Context, rid: Rid = None
) -> PlainTextResponse:
    """``start``, ``fail`` or an exit code (the key's one job), or a job's success."""
    return await _ping(context, request, key, [word])


async def ping_job_word(
    key: str, job: str, word: str, request: Request, context: Context, rid: Rid = None
) -> PlainTextResponse:
    """``start``, ``fail`` or an exit code of a named job of the key."""
    return await _ping(context, request, key, [job, word])


# A POST's body, any bytes: the run's log.
_BODY = {
    "requestBody": {
        "required": False,
        "content": {"text/plain": {"schema": {"type": "string"}}},
        "description": "the run's log; its last 4096 characters are kept",
    }
}


async def _not_allowed() -> PlainTextResponse:
    return PlainTextResponse(
        "method not allowed: GET, POST or HEAD\n", status_code=405, headers={"Allow": ", ".join(_METHODS)}
    )


for _path, _handler, _summary in (
    ("/ping/{key}", ping, "ping: success"),
    ("/ping/{key}/{word}", ping_word, "ping: start, fail, an exit code, or a named job's success"),
    ("/ping/{key}/{job}/{word}", ping_job_word, "ping a named job: start, fail or an exit code"),
):
    for _method in _METHODS:
        router.add_api_route(
            _path,
            _handler,
            methods=[_method],
            summary=_summary,
            operation_id=f"{_handler.__name__}_{_method.lower()}",
            response_class=PlainTextResponse,
            responses=_RESPONSES,
            openapi_extra=_BODY if _method == "POST" else None,
        )
    # Any other method: 405 naming all three (one route per method would name only the first).
    for _route in (_path, f"{_path}/"):
        router.add_api_route(_route, _not_allowed, methods=_OTHER_METHODS, include_in_schema=False)
    for _method in _METHODS:
        # With a trailing slash too: a redirect would leave `curl -f` content and the job unpinged.
        router.add_api_route(
            _path + "/",
            _handler,
            methods=[_method],
            include_in_schema=False,
            response_class=PlainTextResponse,
        )


async def _ping(context: HttpContext, request: Request, token: str, words: list[str]) -> PlainTextResponse:
    try:
        return await _take(context, request, token, words)
    except Exception as exc:  # the app would log the path, and the path holds the key
        log.error("ping failed: %s: %s", type(exc).__name__, exc)
        return _answer(500, "internal error\n")


async def _take(context: HttpContext, request: Request, token: str, words: list[str]) -> PlainTextResponse:
    try:
        found = await find_ping_key(context.store, token)
        if found is None:
            raise _not_found()
        job, kind, exit_code = _target(found, words)
        rid = request.query_params.get("rid")
        if rid is not None and not _RID.fullmatch(rid):  # fullmatch: no trailing new line
            raise _Refused(400, f"bad rid: 1 to 64 of A-Z a-z 0-9 . _ ~ - ({RID_PATTERN})\n")
        message = await read_message(request)
    except _Refused as refused:
        return _answer(refused.status, refused.text)
    except ClientDisconnect:
        return _answer(400, "the request body did not arrive\n")
    except STORE_OUTAGES as exc:  # logged without the path: it holds the key
        log.warning("ping not taken: the store is unavailable: %s", type(exc).__name__)
        return _answer(503, "not taken: the store is unavailable, try again\n")
    beat = JobHeartbeat(
        id=uuid.uuid4().hex,
        job=job,
        kind=kind,
        exit_code=exit_code,
        at=context.clock(),
        message=message,
        rid=rid,
    )
    try:
        await context.publisher.event(beat)
    except ConfigError as exc:  # this monitor's keys cannot sign it: an operator must add one
        log.error("ping of job %s not sent: %s", job, exc)
        return _answer(503, "not sent: this monitor has no key that may sign this job's heartbeats\n")
    except CronfleetError as exc:  # the broker is away or refused it: the caller may retry
        log.warning("ping of job %s not sent: %s", job, exc)
        return _answer(503, "not sent: the message bus is unavailable, try again\n")
    return _answer(200, "OK")


def _target(key: PingKey, words: list[str]) -> tuple[str, HeartbeatKind, int | None]:
    """The job, kind and exit code ``words`` (the path after the key) say, for ``key``."""
    if len(words) == 2:
        job, word = words
        if job not in key.jobs:
            raise _not_found()
        kind, exit_code = _kind(word)
        if kind is None:
            raise _Refused(404, "not found: after the job comes start, fail or an exit code\n")
        return job, kind, exit_code
    if words:
        word = words[0]
        if len(key.jobs) > 1 and word in key.jobs:
            return word, HeartbeatKind.SUCCESS, None
        kind, exit_code = _kind(word)
        if kind is None:
            if word in key.jobs:
                return word, HeartbeatKind.SUCCESS, None
            raise _not_found()
    else:
        kind, exit_code = HeartbeatKind.SUCCESS, None
    if len(key.jobs) != 1:
        raise _Refused(404, "not found: this key pings several jobs: name one (/ping/<key>/<job>)\n")
    return key.jobs[0], kind, exit_code


def _kind(word: str) -> tuple[HeartbeatKind | None, int | None]:
    """What a path word after the key (or the job) says: ``start``, ``fail`` or an exit code
    (None: none of them). Raises _Refused (400) for a number that is not an exit code."""
    if word in _KINDS:
        return _KINDS[word], None
    if _NUMBER.fullmatch(word):
        code = int(word) if len(word) <= 10 else -1
        if not 0 <= code <= MAX_EXIT_CODE:
            raise _Refused(400, f"bad exit code {word[:20]!r}: 0 to {MAX_EXIT_CODE}\n")
        return (HeartbeatKind.SUCCESS if code == 0 else HeartbeatKind.FAIL), code
    return None, None


async def read_message(request: Request) -> str | None:
    """The request body as a heartbeat message: None when empty; else its text (UTF-8, with
    invalid bytes and NUL as U+FFFD), at most MESSAGE_CHARACTERS characters: a longer body is cut
    to its end, after a first line saying how long it was. The whole body is read, but never
    more than _KEPT_BYTES of it kept."""
    tail = bytearray()
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        tail += chunk
        if len(tail) > _KEPT_BYTES:
            del tail[: len(tail) - _KEPT_BYTES]
    if total == 0:
        return None
    cut_bytes = total - len(tail)
    if cut_bytes:
        # Start at a character: skip the continuation bytes of one cut in half.
        skip = 0
        while skip < len(tail) and skip < 3 and (tail[skip] & 0xC0) == 0x80:
            skip += 1
        del tail[:skip]
        cut_bytes += skip
    text = tail.decode("utf-8", "replace").replace("\x00", "\ufffd")
    if not cut_bytes and len(text) <= MESSAGE_CHARACTERS:
        return text
    marker = f"[cut: the body had {total} bytes; its end follows]\n"
    return marker + text[-(MESSAGE_CHARACTERS - len(marker)) :]
