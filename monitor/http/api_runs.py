"""``/api/runs``: runs and their logs, newest first, filtered by job, status, time range (of the
start) and text (in the output tail or the error), a page at a time.

A page ends with ``next_cursor`` when more may follow: pass it back as ``cursor`` (with the same
filters) for the next page. The cursor is the last run's (start, run id): pages neither repeat
nor skip a run while new ones arrive. Each run's ``request_id`` is its run id: the id the
worker's logs and the endpoint's own logs (an HTTP action sends it) carry.

The reads follow the query rules (docs/development.md): newest first by ``ix_runs_started``, of
one job by ``ix_runs_job_started``, one run by the primary key.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, JsonValue
from sqlalchemy import and_, or_, select

from common.api_keys import ApiKey
from common.messages import RunStatus
from common.store import RunRow
from monitor.http.api_common import NOT_FOUND, READ_ERRORS, JobFilter, invalid, utc_instant
from monitor.http.auth import ApiError, reader
from monitor.http.context import HttpContext, context_of

router = APIRouter(prefix="/runs", tags=["runs"])

# Text searched for in the output and error: no NUL, which no database stores.
_TEXT_PATTERN = r"^[^\x00]*$"
_RUN_ID_PATTERN = r"^[^\x00]{1,255}$"


class RunOut(BaseModel):
    """One run: how it went, its output's tail, and the ids that link it to logs and triggers."""

    run_id: str
    request_id: str
    job: str
    trigger_id: str | None
    source: str
    status: str
    pool: str | None
    worker: str | None
    redelivered: bool
    scheduled_at: datetime | None
    started_at: datetime
    finished_at: datetime | None
    duration_seconds: float | None
    exit_code: int | None
    http_status: int | None
    output_tail: str | None
    error: str | None
    # What a python action returned (JSON); the id an http action's endpoint gave the request.
    result: JsonValue | None
    endpoint_request_id: str | None
    # 1, or more for a retry of the same trigger.
    attempt: int


class RunPage(BaseModel):
    """A page of runs, newest first; ``next_cursor`` fetches the next one (null: no more)."""

    runs: list[RunOut]
    next_cursor: str | None


def run_out(row: RunRow) -> RunOut:
    """A stored run as the API shows it."""
    return RunOut(
        run_id=row.run_id,
        request_id=row.run_id,
        job=row.job,
        trigger_id=row.trigger_id,
        source=row.source,
        status=row.status,
        pool=row.pool,
        worker=row.worker,
        redelivered=bool(row.redelivered),
        scheduled_at=row.scheduled_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        duration_seconds=row.duration_seconds,
        exit_code=row.exit_code,
        http_status=row.http_status,
        output_tail=row.output_tail,
        error=row.error,
        result=None if row.result is None else orjson.loads(row.result),
        endpoint_request_id=row.endpoint_request_id,
        attempt=row.attempt or 1,
    )


def _cursor(row: RunRow) -> str:
    text = f"{row.started_at.isoformat()}|{row.run_id}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _position(cursor: str) -> tuple[datetime, str]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        instant, run_id = text.split("|", 1)
        started = utc_instant(datetime.fromisoformat(instant), "cursor")
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise invalid("query", "cursor", "not a cursor of this API (pass next_cursor back)") from exc
    if started is None or "\x00" in run_id:
        raise invalid("query", "cursor", "not a cursor of this API (pass next_cursor back)")
    return started, run_id


@router.get("", response_model=RunPage, responses=READ_ERRORS)
async def list_runs(
    context: Annotated[HttpContext, Depends(context_of)],
    key: Annotated[ApiKey, Depends(reader)],
    job: JobFilter = None,
    status: Annotated[RunStatus | None, Query(description="Only runs in this status")] = None,
    since: Annotated[datetime | None, Query(alias="from", description="Started at or after")] = None,
    until: Annotated[datetime | None, Query(alias="to", description="Started before")] = None,
    text: Annotated[
        str | None,
        Query(max_length=200, pattern=_TEXT_PATTERN, description="In the output tail or error (any case)"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="Runs per page")] = 50,
    cursor: Annotated[str | None, Query(max_length=600, description="next_cursor of the page before")] = None,
) -> RunPage:
    """Runs newest first, filtered, one page at a time."""
    query = select(RunRow)
    if job is not None:
        query = query.where(RunRow.job == job)
    if status is not None:
        query = query.where(RunRow.status == status.value)
    start, end = utc_instant(since, "from"), utc_instant(until, "to")
    if start is not None:
        query = query.where(RunRow.started_at >= start)
    if end is not None:
        query = query.where(RunRow.started_at < end)
    if text:
        query = query.where(
            or_(
                RunRow.output_tail.icontains(text, autoescape=True),
                RunRow.error.icontains(text, autoescape=True),
            )
        )
    if cursor is not None:
        at, run_id = _position(cursor)
        query = query.where(
            RunRow.started_at <= at,
            or_(RunRow.started_at < at, and_(RunRow.started_at == at, RunRow.run_id < run_id)),
        )
    query = query.order_by(RunRow.started_at.desc(), RunRow.run_id.desc()).limit(limit + 1)
    async with context.store.session() as session:
        found = list((await session.execute(query)).scalars())
    more = len(found) > limit
    page = found[:limit]
    return RunPage(runs=[run_out(row) for row in page], next_cursor=_cursor(page[-1]) if more else None)


@router.get("/{run_id}", response_model=RunOut, responses={**READ_ERRORS, **NOT_FOUND})
async def show_run(
    run_id: Annotated[str, Path(pattern=_RUN_ID_PATTERN, description="The run's id (its request id)")],
    context: Annotated[HttpContext, Depends(context_of)],
    key: Annotated[ApiKey, Depends(reader)],
) -> RunOut:
    """One run by its id."""
    async with context.store.session() as session:
        row = await session.get(RunRow, run_id)
    if row is None:
        raise ApiError(404, "not_found")
    return run_out(row)
