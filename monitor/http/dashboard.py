"""The dashboard: a page at ``/`` (static assets, no CDN) and the JSON it polls under
``/dashboard/``, which takes an API key like the API (``X-API-Key``).

The page shows the fleet (as ``cronfleet status`` does: ``common.cli.fleet_status``), then
every job with its health, its schedule in words, its last and next run and the durations of its
last runs; a job's recent runs with their output on click; and, for a read-write key, "run now",
which claims and publishes a manual fire exactly as ``cronfleet trigger`` does. What reaches the
page never holds a secret: of a job's action only its type is sent.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel
from sqlalchemy import select

from common import fires
from common.api_keys import ApiKey
from common.catalog import find_job, read_jobs
from common.cli.admin import last_flip_reason
from common.cli.fleet_status import read_fleet
from common.connection import CONNECT_ERRORS, open_channel
from common.cron import next_fire
from common.cron_words import describe_schedule
from common.errors import BrokerUnavailable, ConfigError, CronfleetError
from common.jobs import JobSpec
from common.messages import RunStatus
from common.signing import Role
from common.store import JobHealthRow, JobRow, JobStateRow, RunRow
from common.topology import Topology
from monitor.http.api_common import ErrorBody
from monitor.http.api_reports import ComponentHealth
from monitor.http.api_runs import RunOut, run_out
from monitor.http.auth import ApiError, reader, writer
from monitor.http.context import HttpContext, context_of

router = APIRouter(tags=["dashboard"])

# How many jobs the overview lists (by name), and how many runs a job's sparkline draws.
MAX_JOBS = 500
SPARK_RUNS = 20
MAX_RUNS = 100

# The page and its assets, shipped as package data (pyproject: monitor.http/static).
_ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# Everything the page loads comes from the monitor itself; nothing inline runs.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of these error statuses, each ``{"error": CODE}``."""
    return {status: {"model": ErrorBody, "description": _ERROR_TEXT[status]} for status in statuses}


_ERROR_TEXT = {
    401: "no live API key (`unauthorized`)",
    403: "a read-only key (`read_only`)",
    404: "no such job (`not_found`)",
    409: "the job cannot run now (`no_action`, `invalid_job`)",
    503: "no trigger key, or the broker refused (`cannot_sign_triggers`, `broker_unavailable`)",
}


def _asset(name: str) -> bytes:
    return resources.files("monitor.http").joinpath("static", name).read_bytes()


@router.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    """The dashboard's page (it asks for an API key, then polls ``/dashboard/overview``)."""
    return HTMLResponse(_asset("index.html"), headers=_PAGE_HEADERS)


@router.get("/dashboard/assets/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    """One of the page's own assets; 404 for any other name."""
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise ApiError(404, "not_found")
    return Response(_asset(name), media_type=media_type, headers=_PAGE_HEADERS)


class DashboardKey(BaseModel):
    """The key the page holds: its name, and whether it may run jobs."""

    name: str
    read_only: bool


@router.get("/dashboard/key", response_model=DashboardKey, responses=errors(401))
async def key(api_key: Annotated[ApiKey, Depends(reader)]) -> DashboardKey:
    """Which key the page holds (401 for none that is live)."""
    return DashboardKey(name=api_key.name, read_only=api_key.read_only)


class SparkRun(BaseModel):
    """One finished run in a job's duration history."""

    status: str
    started_at: datetime
    duration_seconds: float | None


class JobView(BaseModel):
    """A job as the dashboard shows it: no secret (of its action, only the type)."""

    name: str
    schedule: str
    schedule_words: str
    timezone: str
    action: str
    pool: str
    enabled: bool
    description: str
    state: str
    since: datetime | None
    # Why it is in that state: the reason of its last flip (None before the first).
    reason: str | None = None
    last_status: str | None
    last_started_at: datetime | None
    last_finished_at: datetime | None
    next_run_at: datetime | None
    consecutive_failures: int
    history: list[SparkRun]
    error: str | None = None


class Overview(BaseModel):
    """Everything the page draws, as of ``now``."""

    now: datetime
    fleet: list[ComponentHealth]
    jobs: list[JobView]
    truncated: bool


@router.get("/dashboard/overview", response_model=Overview, responses=errors(401))
async def overview(
    _key: Annotated[ApiKey, Depends(reader)], context: Annotated[HttpContext, Depends(context_of)]
) -> Overview:
    """The fleet and every job (the first ``MAX_JOBS`` by name) with its health and history.
    Every read is bounded by ``MAX_JOBS`` (an IN list of at most 500 names, by primary keys)."""
    now = context.clock()
    async with context.store.session() as session:
        # The first MAX_JOBS names by the primary key: a page never reads (or parses) more jobs.
        first = select(JobRow.name).order_by(JobRow.name).limit(MAX_JOBS + 1)
        names = list((await session.execute(first)).scalars())
    truncated = len(names) > MAX_JOBS
    names = names[:MAX_JOBS]
    stored = await read_jobs(context.store, names)
    specs = stored.specs
    async with context.store.session() as session:
        fleet = [ComponentHealth.model_validate(row) for row in await read_fleet(session)]
        # Each health record with the reason of its job's last flip (ix_flips_job_at), as `status`.
        last_reason = last_flip_reason()
        of_health = select(JobHealthRow, last_reason).where(JobHealthRow.job.in_(names))
        health = {row.job: (row, reason) for row, reason in await session.execute(of_health)}
        of_state = select(JobStateRow).where(JobStateRow.job.in_(names))
        states = {row.job: row for row in (await session.execute(of_state)).scalars()}
        history: dict[str, list[SparkRun]] = {}
        for spec in specs:
            # Each through ix_runs_job_started: SPARK_RUNS rows, whatever the table holds.
            recent = await session.execute(
                select(RunRow.status, RunRow.started_at, RunRow.duration_seconds)
                .where(RunRow.job == spec.name, RunRow.status.notin_(_UNFINISHED))
                .order_by(RunRow.started_at.desc())
                .limit(SPARK_RUNS)
            )
            history[spec.name] = [
                SparkRun(status=status, started_at=started, duration_seconds=duration)
                for status, started, duration in reversed(recent.all())
            ]
    jobs: list[JobView] = []
    for spec in specs:
        row, reason = health.get(spec.name, (None, None))
        last = states.get(spec.name)
        state = row.state if row is not None else ("new" if spec.enabled else "paused")
        jobs.append(
            JobView(
                name=spec.name,
                schedule=spec.schedule_text(),
                schedule_words=_schedule_words(spec),
                timezone=spec.timezone,
                action=spec.action.type if spec.action is not None else "heartbeat",
                pool=spec.pool,
                enabled=spec.enabled,
                description=spec.description,
                state=state,
                since=None if row is None else row.since,
                reason=reason,
                last_status=None if last is None else last.last_status,
                last_started_at=None if last is None else last.last_started_at,
                last_finished_at=None if last is None else last.last_finished_at,
                next_run_at=_next_run(spec, now) if spec.enabled else None,
                consecutive_failures=0 if row is None else row.consecutive_failures,
                history=history.get(spec.name, []),
            )
        )
    jobs.extend(_unreadable(name, why) for name, why in stored.unreadable.items())
    jobs.sort(key=lambda job: job.name)
    return Overview(now=now, fleet=fleet, jobs=jobs, truncated=truncated)


# Not drawn in the duration history: a run still going, and a repeat that did not run.
_UNFINISHED = (RunStatus.RUNNING.value, RunStatus.DUPLICATE.value)


def _schedule_words(spec: JobSpec) -> str:
    if spec.schedule is None:
        return spec.schedule_text()
    words: str = describe_schedule(spec.schedule)
    return words


def _next_run(spec: JobSpec, now: datetime) -> datetime | None:
    # Not through next_fire's cache: keyed by a new instant at every poll, it would never hit
    # and would push out the scheduler's entries (``cronfleet run`` shares the process).
    try:
        found: datetime = (
            spec.next_fire(now)
            if spec.schedule is None
            else next_fire.__wrapped__(spec.schedule, spec.zone(), now)
        )
    except ValueError:
        return None
    return found


def _unreadable(name: str, why: str) -> JobView:
    return JobView(
        name=name,
        schedule="",
        schedule_words="",
        timezone="",
        action="invalid",
        pool="",
        enabled=False,
        description="",
        state="invalid",
        since=None,
        last_status=None,
        last_started_at=None,
        last_finished_at=None,
        next_run_at=None,
        consecutive_failures=0,
        history=[],
        error=f"stored spec refused ({why}): fix the jobs file and apply it again",
    )


@router.get("/dashboard/jobs/{name}/runs", response_model=list[RunOut], responses=errors(401))
async def job_runs(
    name: str,
    _key: Annotated[ApiKey, Depends(reader)],
    context: Annotated[HttpContext, Depends(context_of)],
    limit: Annotated[int, Query(ge=1, le=MAX_RUNS)] = 20,
) -> list[RunOut]:
    """The job's newest runs, newest first (none for an unknown job)."""
    async with context.store.session() as session:
        found = await session.execute(
            select(RunRow).where(RunRow.job == name).order_by(RunRow.started_at.desc()).limit(limit)
        )
        return [run_out(run) for run in found.scalars()]


class Triggered(BaseModel):
    """The manual fire claimed and published."""

    trigger_id: str


@router.post(
    "/dashboard/jobs/{name}/trigger",
    response_model=Triggered,
    status_code=202,
    responses=errors(401, 403, 404, 409, 503),
)
async def trigger(
    name: str,
    _key: Annotated[ApiKey, Depends(writer)],
    context: Annotated[HttpContext, Depends(context_of)],
) -> Triggered:
    """Run the job now, as ``cronfleet trigger`` does: a manual fire claimed in the store and
    published to its pool. 404 for an unknown job, 409 for one without an action, 503 when no
    key here may sign a trigger or the broker does not take it (a claimed fire is then published
    by a scheduler's outbox sweep, while it has not expired)."""
    try:
        spec = await find_job(context.store, name)
    except CronfleetError as exc:
        raise ApiError(409, "invalid_job") from exc
    if spec is None:
        raise ApiError(404, "not_found")
    if spec.action is None:
        raise ApiError(409, "no_action")
    try:
        context.keyring.require([Role.TRIGGER], who="the dashboard")
    except ConfigError as exc:
        raise ApiError(503, "cannot_sign_triggers") from exc
    try:
        await _declare_pool(context, spec.pool)
        now = context.clock()
        message = spec.trigger_at(now, now, manual=True)
        await fires.publish_claimed(context.store, context.publisher, [message], "http", now)
    except (BrokerUnavailable, *CONNECT_ERRORS) as exc:
        raise ApiError(503, "broker_unavailable") from exc
    return Triggered(trigger_id=message.id)


async def _declare_pool(context: HttpContext, pool: str) -> None:
    """Make sure ``pool``'s queue exists (as ``cronfleet trigger`` does), on a channel of its own
    so that a refused declare cannot close the monitor's publishing channel."""
    topology = Topology(context.settings.namespace)
    if context.connection is None:
        await topology.declare_pool(context.publisher.channel, pool)
        return
    channel = await open_channel(context.connection)
    try:
        await topology.declare_pool(channel, pool)
    finally:
        with contextlib.suppress(*CONNECT_ERRORS):
            await channel.close()
