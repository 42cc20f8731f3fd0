"""``/metrics`` in the Prometheus text format, read from the store at each scrape.

No global counter is kept: a ``StoreCollector`` runs a few bounded queries (each by an index: a
time range of the runs, fires by their primary key, the job and fleet health tables, whose size
is the number of jobs and components) and turns them into metric families. So any monitor of a
fleet answers the same, and a restarted one loses nothing. Run counts and histograms cover a
sliding ``WINDOW`` (they are gauges: read them as they are, do not ``rate()`` them); the only
counters are this monitor's own events recorded and refused since it started.

It takes an API key, read-only is enough: ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``
(what Prometheus' ``authorization`` scrape setting sends). See docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, Float, and_, case, cast, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncSession

from common.api_keys import ApiKey, verify_api_key
from common.store import (
    HEALTH_STATES,
    AlertAttemptRow,
    FireRow,
    FleetHealthRow,
    FlipRow,
    JobHealthRow,
    MissedFireRow,
    RunRow,
)
from common.store.locks import dialect_of
from monitor.http.auth import API_KEY_HEADER, ApiError
from monitor.http.context import HttpContext, context_of
from monitor.http.dashboard import errors

router = APIRouter(tags=["metrics"])

# The sliding window of the run, duration, lag and alert figures.
WINDOW = timedelta(hours=1)
DURATION_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_WINDOW_TEXT = "the last hour"


async def scraper(
    context: Annotated[HttpContext, Depends(context_of)],
    x_api_key: Annotated[str | None, Header(alias=API_KEY_HEADER)] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> ApiKey:
    """A live API key (read-only is enough) from ``X-API-Key`` or ``Authorization: Bearer``;
    401 ``{"error": "unauthorized"}`` otherwise."""
    presented = x_api_key
    if presented is None and authorization is not None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer":
            presented = token.strip()
    key = await verify_api_key(context.store, presented, context.clock())
    if key is None:
        raise ApiError(401, "unauthorized")
    return key


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format 0.0.4"},
        **errors(401),
    },
)
async def metrics(
    _key: Annotated[ApiKey, Depends(scraper)], context: Annotated[HttpContext, Depends(context_of)]
) -> Response:
    """The fleet's metrics in the Prometheus text format (see docs/metrics.md)."""
    collector = StoreCollector(context)
    await collector.gather()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@dataclass(eq=False)
class StoreCollector(Collector):
    """The metric families of one scrape: ``gather()`` reads the store, ``collect()`` yields."""

    context: HttpContext
    families: list[Metric] = field(default_factory=list)

    def collect(self) -> Iterable[Metric]:
        """What the last ``gather()`` read."""
        return list(self.families)

    async def gather(self) -> None:
        """Read the store now (one session, bounded queries) into ``families``."""
        now = self.context.clock()
        since = now - WINDOW
        async with self.context.store.session() as session:
            families = [
                *await _runs(session, since),
                *await _durations(session, since),
                *await _fire_lag(session, since),
                *await missed_fires(session, since),
                *await _job_health(session),
                *await _alerts(session, since),
                *await _fleet(session),
            ]
        families.extend(_events(self.context))
        self.families = families


def _seconds(session: AsyncSession, later: Any, earlier: Any) -> ColumnElement[Any]:
    """``later - earlier`` in seconds, in the store's SQL."""
    if dialect_of(session) == "postgresql":
        return func.extract("epoch", later - earlier)
    return (func.julianday(later) - func.julianday(earlier)) * 86400.0


def _buckets(value: Any, bounds: Sequence[float]) -> list[ColumnElement[Any]]:
    """Per bound, how many values are at most it (cumulative, as Prometheus buckets are)."""
    return [func.sum(case((value <= bound, 1), else_=0)) for bound in bounds]


def _bucket_pairs(bounds: Sequence[float], counts: Sequence[Any], total: int) -> list[tuple[str, float]]:
    pairs = [(_le(bound), float(count or 0)) for bound, count in zip(bounds, counts, strict=True)]
    pairs.append(("+Inf", float(total)))
    return pairs


def _le(bound: float) -> str:
    return repr(float(bound))


async def _runs(session: AsyncSession, since: datetime) -> Iterator[Metric]:
    family = GaugeMetricFamily(
        "cronfleet_runs_last_hour",
        f"Runs started in {_WINDOW_TEXT}, by job and status (running: not finished yet).",
        labels=["job", "status"],
    )
    counted = await session.execute(
        select(RunRow.job, RunRow.status, func.count())
        .where(RunRow.started_at >= since)
        .group_by(RunRow.job, RunRow.status)
    )
    for job, status, count in sorted(counted.all()):
        family.add_metric([job, status], count)
    return iter([family])


async def _durations(session: AsyncSession, since: datetime) -> Iterator[Metric]:
    family = GaugeHistogramMetricFamily(
        "cronfleet_run_duration_seconds_last_hour",
        f"Durations of the runs that finished in {_WINDOW_TEXT}, by job.",
        labels=["job"],
    )
    duration = RunRow.duration_seconds
    finished = and_(RunRow.finished_at >= since, duration.is_not(None))
    found = await session.execute(
        select(RunRow.job, func.count(), func.sum(duration), *_buckets(duration, DURATION_BUCKETS))
        .where(finished)
        .group_by(RunRow.job)
    )
    for job, count, total, *counts in sorted(found.all(), key=lambda row: row[0]):
        family.add_metric([job], _bucket_pairs(DURATION_BUCKETS, counts, count), float(total or 0.0))
    return iter([family])


async def _fire_lag(session: AsyncSession, since: datetime) -> Iterator[Metric]:
    """Scheduled fires (not manual ones) of the runs started in the window: how long after it was
    meant to go out (its instant plus its jitter offset, ``fires.due_at``) each fire was confirmed
    published by the scheduler that claimed it."""
    due = func.coalesce(FireRow.due_at, FireRow.scheduled_at)
    lag = cast(_seconds(session, FireRow.published_at, due), Float)
    found = await session.execute(
        select(func.count(), func.sum(lag), func.max(lag), *_buckets(lag, LAG_BUCKETS))
        .select_from(RunRow)
        .join(FireRow, FireRow.trigger_id == RunRow.trigger_id)
        .where(
            RunRow.started_at >= since,
            RunRow.source == "worker",
            FireRow.manual.is_(False),
            FireRow.published_at.is_not(None),
        )
    )
    count, total, longest, *counts = found.one()
    histogram = GaugeHistogramMetricFamily(
        "cronfleet_fire_lag_seconds_last_hour",
        f"Scheduled fires whose runs started in {_WINDOW_TEXT}: seconds from the instant each was "
        "meant to go out (scheduled instant plus jitter offset) to the broker's publish confirm.",
    )
    histogram.add_metric([], _bucket_pairs(LAG_BUCKETS, counts, count or 0), float(total or 0.0))
    worst = GaugeMetricFamily(
        "cronfleet_fire_lag_seconds_max_last_hour", f"The longest fire lag in {_WINDOW_TEXT}."
    )
    worst.add_metric([], float(longest or 0.0))
    return iter([histogram, worst])


async def missed_fires(session: AsyncSession, since: datetime) -> Iterator[Metric]:
    """The fires no scheduler sent on time, by job, as the misfire policies settled them in the
    window (table ``missed_fires``, by its ``recorded_at`` index): skipped, and caught up late."""
    found = await session.execute(
        select(MissedFireRow.job, func.sum(MissedFireRow.skipped), func.sum(MissedFireRow.caught_up))
        .where(MissedFireRow.recorded_at >= since)
        .group_by(MissedFireRow.job)
    )
    family = GaugeMetricFamily(
        "cronfleet_missed_fires_last_hour",
        f"Fires no scheduler sent on time (it was down), settled by the job's misfire policy in "
        f"{_WINDOW_TEXT}: skipped, or caught_up (sent late).",
        labels=["job", "outcome"],
    )
    for job, skipped, caught_up in found.all():
        family.add_metric([job, "skipped"], float(skipped or 0))
        family.add_metric([job, "caught_up"], float(caught_up or 0))
    return iter([family])


async def _job_health(session: AsyncSession) -> Iterator[Metric]:
    states = GaugeMetricFamily(
        "cronfleet_job_state",
        "1 for the job's health state as the monitor keeps it, 0 for the others.",
        labels=["job", "state"],
    )
    failures = GaugeMetricFamily(
        "cronfleet_job_consecutive_failures", "Failed runs in a row, by job.", labels=["job"]
    )
    finished = GaugeMetricFamily(
        "cronfleet_job_last_finished_timestamp_seconds",
        "When the job's last run finished (Unix time), by job; absent before its first.",
        labels=["job"],
    )
    rows = await session.execute(
        select(
            JobHealthRow.job,
            JobHealthRow.state,
            JobHealthRow.consecutive_failures,
            JobHealthRow.last_finished_at,
        ).order_by(JobHealthRow.job)
    )
    for job, state, in_a_row, last_finished in rows.all():
        for candidate in HEALTH_STATES:
            states.add_metric([job, candidate], 1.0 if candidate == state else 0.0)
        failures.add_metric([job], in_a_row)
        if last_finished is not None:
            finished.add_metric([job], last_finished.timestamp())
    return iter([states, failures, finished])


async def _alerts(session: AsyncSession, since: datetime) -> Iterator[Metric]:
    attempts = GaugeMetricFamily(
        "cronfleet_alert_attempts_last_hour",
        f"Alert delivery attempts in {_WINDOW_TEXT}, by channel and result (sent or failed).",
        labels=["channel", "result"],
    )
    found = await session.execute(
        select(AlertAttemptRow.channel, AlertAttemptRow.delivered, func.count())
        .where(AlertAttemptRow.at >= since)
        .group_by(AlertAttemptRow.channel, AlertAttemptRow.delivered)
    )
    for channel, delivered, count in sorted(found.all()):
        attempts.add_metric([channel, "sent" if delivered else "failed"], count)
    pending = GaugeMetricFamily(
        "cronfleet_alerts_pending", "Alerts not yet delivered to every channel of their route."
    )
    # The literal, not a parameter: only then may SQLite read the partial index of pending alerts.
    waiting = select(func.count()).where(FlipRow.alert == literal_column("'pending'"))
    pending.add_metric([], await session.scalar(waiting) or 0)
    return iter([attempts, pending])


async def _fleet(session: AsyncSession) -> Iterator[Metric]:
    up = GaugeMetricFamily(
        "cronfleet_fleet_component_up",
        "1 when the fleet component is up, 0 when down or new (as the monitor last decided it).",
        labels=["component", "kind"],
    )
    seen = GaugeMetricFamily(
        "cronfleet_fleet_component_seen_timestamp_seconds",
        "The component's latest heartbeat (schedulers, workers) or good look (pools, the "
        "dead-letter queue), Unix time.",
        labels=["component", "kind"],
    )
    waiting = GaugeMetricFamily(
        "cronfleet_queue_messages",
        "Messages ready in a pool's queue or the dead-letter queue at the monitor's last look.",
        labels=["queue"],
    )
    running = GaugeMetricFamily(
        "cronfleet_worker_running_jobs", "Jobs a worker ran at its latest heartbeat.", labels=["worker"]
    )
    scheduler = GaugeMetricFamily(
        "cronfleet_scheduler_heartbeat_timestamp_seconds",
        "The newest scheduler heartbeat any monitor recorded (Unix time); absent before the first.",
    )
    rows = (await session.execute(select(FleetHealthRow).order_by(FleetHealthRow.component))).scalars()
    for row in rows:
        labels = [row.component, row.kind]
        up.add_metric(labels, 1.0 if row.state == "up" else 0.0)
        if row.seen_at is not None:
            seen.add_metric(labels, row.seen_at.timestamp())
        if row.kind == "pool" and row.count is not None:
            waiting.add_metric([f"pool:{row.name}"], row.count)
        elif row.kind == "dead-letters" and row.count is not None:
            waiting.add_metric(["dead-letters"], row.count)
        elif row.kind == "worker" and row.count is not None:
            running.add_metric([row.name], row.count)
        elif row.kind == "scheduler" and row.seen_at is not None:
            scheduler.add_metric([], row.seen_at.timestamp())
    return iter([up, seen, waiting, running, scheduler])


def _events(context: HttpContext) -> list[Metric]:
    counts = context.events()
    recorded = CounterMetricFamily(
        "cronfleet_monitor_events_recorded",
        "Events this monitor recorded (that changed the store) since it started.",
    )
    recorded.add_metric([], counts.recorded)
    refused = CounterMetricFamily(
        "cronfleet_monitor_events_refused",
        "Events this monitor refused (dead-lettered with a reason) since it started.",
    )
    refused.add_metric([], counts.refused)
    return [recorded, refused]
