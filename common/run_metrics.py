"""Finished runs rolled up per job and per hour and day (UTC, by the run's start), so that a
year of a job's history is read in one index range of at most 8,784 hourly or 366 daily rows.

The monitor adds each batch's finished runs in the batch's own transaction (``add_finished``):
a redelivered event is not recorded again, so it is not counted again; an upsert adds to a
bucket, so two monitors recording at once both count. A run counts as a failure when it did not
succeed; ``duplicate`` runs (repeats that were not executed) and ``skipped`` ones (a fire that
found another run of its job in flight: neither a success nor a failure) are left out, and so
are runs the monitor marked ``lost`` until they report their real end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, Literal, Protocol, cast

from sqlalchemy import Table, case, select
from sqlalchemy.ext.asyncio import AsyncSession

from common.messages import RunStatus
from common.store import RunMetricRow, Store, dialect_insert
from common.store.chunks import IN_LIST_CHUNK, chunks


class FinishedRun(Protocol):
    """What the rollup reads of a finished run (a stored run, or the monitor's row of one)."""

    job: str
    status: str
    started_at: datetime
    duration_seconds: float | None


Resolution = Literal["hour", "day"]
RESOLUTIONS: tuple[Resolution, ...] = ("hour", "day")
# How many buckets one read may return: a leap year of hours.
MAX_BUCKETS = 366 * 24


def bucket_of(instant: datetime, resolution: Resolution) -> datetime:
    """The start (aware UTC) of the hour or day ``instant`` falls in."""
    utc = instant.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return utc if resolution == "hour" else utc.replace(hour=0)


def bucket_span(resolution: Resolution) -> timedelta:
    """How long one bucket of ``resolution`` lasts."""
    return timedelta(hours=1) if resolution == "hour" else timedelta(days=1)


@dataclass
class _Sums:
    runs: int = 0
    failures: int = 0
    duration_count: int = 0
    duration_sum: float = 0.0
    duration_max: float | None = None

    def add(self, run: FinishedRun) -> None:
        self.runs += 1
        self.failures += run.status != RunStatus.SUCCEEDED.value
        if run.duration_seconds is not None:
            self.duration_count += 1
            self.duration_sum += run.duration_seconds
            if self.duration_max is None or run.duration_seconds > self.duration_max:
                self.duration_max = run.duration_seconds


# Runs the rollup leaves out (see the module's docstring).
_NOT_COUNTED = frozenset(
    {RunStatus.DUPLICATE.value, RunStatus.SKIPPED.value, RunStatus.RUNNING.value, RunStatus.LOST.value}
)


async def add_finished(session: AsyncSession, runs: Iterable[FinishedRun]) -> None:
    """Add ``runs`` (just recorded as finished, each once) to their jobs' hourly and daily
    buckets, inside the caller's transaction: a few upserts, each of a bounded number of rows,
    in key order (two monitors never wait on each other in a cycle)."""
    sums: dict[tuple[str, str, datetime], _Sums] = {}
    for run in runs:
        if run.status in _NOT_COUNTED:
            continue
        for resolution in RESOLUTIONS:
            key = (run.job, resolution, bucket_of(run.started_at, resolution))
            sums.setdefault(key, _Sums()).add(run)
    if not sums:
        return
    rows = [
        {
            "job": job,
            "resolution": resolution,
            "bucket": bucket,
            "runs": s.runs,
            "failures": s.failures,
            "duration_count": s.duration_count,
            "duration_sum": s.duration_sum,
            "duration_max": s.duration_max,
        }
        for (job, resolution, bucket), s in sorted(sums.items())
    ]
    bind = session.bind
    statement = _upsert("sqlite" if bind is None else bind.dialect.name)
    for some in chunks(rows, IN_LIST_CHUNK):
        # An executemany of one statement, compiled once per dialect (a multi-row VALUES would
        # be compiled anew for every number of rows).
        await session.execute(statement, list(some))


@cache
def _upsert(dialect: str) -> Any:
    """The upsert that adds one row of sums to its bucket, in ``dialect``."""
    table = cast(Table, RunMetricRow.__table__)
    insert = dialect_insert(dialect, table)
    new = insert.excluded
    return insert.on_conflict_do_update(
        index_elements=["job", "resolution", "bucket"],
        set_={
            "runs": table.c.runs + new.runs,
            "failures": table.c.failures + new.failures,
            "duration_count": table.c.duration_count + new.duration_count,
            "duration_sum": table.c.duration_sum + new.duration_sum,
            "duration_max": case(
                (new.duration_max.is_(None), table.c.duration_max),
                (table.c.duration_max.is_(None), new.duration_max),
                (new.duration_max > table.c.duration_max, new.duration_max),
                else_=table.c.duration_max,
            ),
        },
    )


@dataclass(frozen=True)
class Bucket:
    """One hour or day of a job's finished runs."""

    start: datetime
    runs: int
    failures: int
    average_duration_seconds: float | None
    max_duration_seconds: float | None


async def read_metrics(
    store: Store, job: str, resolution: Resolution, since: datetime, until: datetime
) -> list[Bucket]:
    """The buckets of ``job`` at ``resolution`` that start in [``since``, ``until``), oldest
    first, at most ``MAX_BUCKETS``; buckets without runs are absent. One range of the primary
    key."""
    query = (
        select(RunMetricRow)
        .where(
            RunMetricRow.job == job,
            RunMetricRow.resolution == resolution,
            RunMetricRow.bucket >= since,
            RunMetricRow.bucket < until,
        )
        .order_by(RunMetricRow.bucket)
        .limit(MAX_BUCKETS)
    )
    async with store.session() as session:
        found = (await session.execute(query)).scalars().all()
    return [
        Bucket(
            start=row.bucket,
            runs=row.runs,
            failures=row.failures,
            average_duration_seconds=row.duration_sum / row.duration_count if row.duration_count else None,
            max_duration_seconds=row.duration_max,
        )
        for row in found
    ]
