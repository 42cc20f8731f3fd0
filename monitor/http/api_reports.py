"""Reports under ``/api/``: a job's run metrics per hour or day, alert attempts, flips and the
fleet's health. Each reads through the function its CLI command uses (``cronfleet alerts``,
``flips``, ``status``), so the API and the CLI never disagree; the metrics come from the rollup
the monitor keeps as runs finish (``common.run_metrics``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from common.api_keys import ApiKey
from common.cli.admin import read_status
from common.cli.alerts import read_attempts
from common.cli.flips import read_flips
from common.run_metrics import MAX_BUCKETS, Resolution, bucket_of, bucket_span, read_metrics
from monitor.http.api_common import READ_ERRORS, JobFilter, JobNameParam, Limit, invalid, utc_instant
from monitor.http.auth import reader
from monitor.http.context import HttpContext, context_of

router = APIRouter(tags=["reports"])

Context = Annotated[HttpContext, Depends(context_of)]
Reader = Annotated[ApiKey, Depends(reader)]

_RESOLUTIONS: dict[str, Resolution] = {"hours": "hour", "days": "day"}
# The range read when ``from`` is not given: this many buckets back from ``to``.
_DEFAULT_BUCKETS = {"hour": 48, "day": 31}


class MetricBucket(BaseModel):
    """One hour or day (UTC, by the runs' start): finished runs, failures (runs that did not
    succeed), their average and maximum duration."""

    start: datetime
    runs: int
    failures: int
    average_duration_seconds: float | None
    max_duration_seconds: float | None


class JobMetrics(BaseModel):
    """A job's buckets in [``from``, ``to``), oldest first; hours or days without runs are absent."""

    job: str
    resolution: Literal["hours", "days"]
    since: datetime
    until: datetime
    buckets: list[MetricBucket]


class AlertAttemptOut(BaseModel):
    """One try at delivering an alert to one channel, as ``cronfleet alerts`` lists it."""

    at: datetime
    job: str
    channel: str
    kind: str
    attempt: int
    delivered: bool
    final: bool
    error: str | None
    retry_at: datetime | None
    flip_id: int | None
    alert_id: str


class AlertList(BaseModel):
    """Alert attempts, newest first."""

    attempts: list[AlertAttemptOut]


class FlipOut(BaseModel):
    """A change of a job's (or a fleet component's) health state, as ``cronfleet flips`` lists it."""

    at: datetime
    job: str
    from_state: str
    to_state: str
    reason: str
    recovered_from: str | None


class FlipList(BaseModel):
    """Flips, newest first."""

    flips: list[FlipOut]


class ComponentHealth(BaseModel):
    """A fleet component (``@scheduler``, ``@pool:NAME``, ``@worker:NAME``, ``@dead-letters``)."""

    component: str
    kind: str
    name: str
    state: str
    since: datetime
    seen_at: datetime | None
    detail: str


class JobHealth(BaseModel):
    """A job's health as ``cronfleet status`` shows it."""

    job: str
    health: str
    since: datetime | None = None
    due_at: datetime | None = None
    last_finished_at: datetime | None = None
    duplicates_24h: int | None = None
    reason: str


class FleetHealth(BaseModel):
    """The fleet, then every job: ``cronfleet status --json``. ``ok`` is false when a component
    is down or a job is down, failing, stuck or stored with a refused spec."""

    ok: bool
    fleet: list[ComponentHealth]
    jobs: list[JobHealth]


@router.get("/jobs/{name}/metrics", response_model=JobMetrics, responses=READ_ERRORS, tags=["jobs"])
async def job_metrics(
    name: JobNameParam,
    context: Context,
    key: Reader,
    resolution: Annotated[
        Literal["hours", "days"], Query(description="Buckets of an hour or a day")
    ] = "hours",
    since: Annotated[
        datetime | None, Query(alias="from", description="First bucket (default: 48 h or 31 d back)")
    ] = None,
    until: Annotated[datetime | None, Query(alias="to", description="End, excluded (default: now)")] = None,
) -> JobMetrics:
    """A job's run count, failures, average and maximum duration per hour or day (at most a
    leap year of buckets per request)."""
    size = _RESOLUTIONS[resolution]
    span = bucket_span(size)
    try:
        end = utc_instant(until, "to") or bucket_of(context.clock(), size) + span
        start = utc_instant(since, "from") or end - span * _DEFAULT_BUCKETS[size]
    except OverflowError as exc:
        raise invalid("query", "from", "out of range") from exc
    if start >= end:
        raise invalid("query", "from", "must be before 'to'")
    found = await read_metrics(context.store, name, size, start, end)
    buckets = [MetricBucket(**vars(bucket)) for bucket in found[:MAX_BUCKETS]]
    return JobMetrics(job=name, resolution=resolution, since=start, until=end, buckets=buckets)


@router.get("/alerts", response_model=AlertList, responses=READ_ERRORS)
async def list_alerts(context: Context, key: Reader, job: JobFilter = None, limit: Limit = 100) -> AlertList:
    """Alert attempts, newest first (of one job)."""
    rows = await read_attempts(context.store, job, limit)
    return AlertList(attempts=[AlertAttemptOut.model_validate(row) for row in rows])


@router.get("/flips", response_model=FlipList, responses=READ_ERRORS)
async def list_flips(context: Context, key: Reader, job: JobFilter = None, limit: Limit = 100) -> FlipList:
    """Health flips, newest first (of one job)."""
    rows = await read_flips(context.store, job, limit)
    return FlipList(flips=[FlipOut.model_validate(row) for row in rows])


@router.get("/health", response_model=FleetHealth, responses=READ_ERRORS)
async def fleet_health(context: Context, key: Reader) -> FleetHealth:
    """The fleet's components and every job's health, as ``cronfleet status`` shows them."""
    fleet, jobs = await read_status(context.store, context.clock())
    components = [ComponentHealth.model_validate(row) for row in fleet]
    health = [JobHealth.model_validate(row) for row in jobs]
    down = any(c.state == "down" for c in components)
    bad = any(j.health in ("down", "failing", "stuck", "invalid") for j in health)
    return FleetHealth(ok=not (down or bad), fleet=components, jobs=health)
