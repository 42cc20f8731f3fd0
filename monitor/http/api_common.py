"""What the API's route modules share: error bodies (documented in the OpenAPI document), the
422 answer, bounded JSON bodies, instants from query strings, and names in paths."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import Path, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel

from common.messages import JOB_NAME_PATTERN

# A request body larger than this is refused (a job's spec is a few kilobytes).
MAX_BODY_BYTES = 1024 * 1024


class ErrorBody(BaseModel):
    """Every error but 422: ``{"error": CODE}``."""

    error: str


class InvalidBody(BaseModel):
    """A 422: the field at fault (dotted; null for the whole request) and why, in one line."""

    error: str
    field: str | None
    detail: str


READ_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No valid API key"},
    422: {"model": InvalidBody, "description": "A bad parameter or body"},
}
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    **READ_ERRORS,
    403: {"model": ErrorBody, "description": "The key is read-only"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "No such thing"}}

JobNameParam = Annotated[
    str,
    Path(
        pattern=JOB_NAME_PATTERN,
        description="The job's name",
        openapi_examples={"backup": {"value": "backup"}},
    ),
]
JobFilter = Annotated[str | None, Query(pattern=JOB_NAME_PATTERN, description="Only this job's")]
Limit = Annotated[int, Query(ge=1, le=1000, description="At most this many")]


def invalid(where: str, field: str | None, detail: str) -> RequestValidationError:
    """The 422 ``{"error": "invalid", "field": field, "detail": detail}`` (``where``: ``body``,
    ``query`` or ``path``), to raise."""
    loc: tuple[str, ...] = (where, *(field.split(".") if field else ()))
    return RequestValidationError([{"loc": loc, "msg": detail, "type": "invalid"}])


async def json_body(request: Request) -> Any:
    """The request's JSON body, at most ``MAX_BODY_BYTES``; 422 otherwise."""
    size = 0
    parts: list[bytes] = []
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise invalid("body", None, f"the body is larger than {MAX_BODY_BYTES // 1024} KiB")
        parts.append(part)
    try:
        return orjson.loads(b"".join(parts))
    except orjson.JSONDecodeError as exc:
        raise invalid("body", None, f"not JSON: {exc}") from exc


def utc_instant(value: datetime | None, field: str) -> datetime | None:
    """``value`` as aware UTC (a naive one is taken as UTC); 422 when it has no UTC equivalent."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:
        raise invalid("query", field, "out of range") from exc
