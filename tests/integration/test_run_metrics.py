"""The run metrics rollup (``common.run_metrics``), fed by the recorder: each finished run is
counted once per hour and day, a redelivered event is not counted again, duplicates are not
counted, two batches add up, and a year of a job's days is read by the primary key alone."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text

from common.messages import RunFinished, RunStatus
from common.run_metrics import MAX_BUCKETS, add_finished, read_metrics
from common.settings import normalise_database_url
from common.store import RunMetricRow, RunRow, Store
from monitor.recorder import record_batch
from tests.conftest import POSTGRES_URL, STORES

T0 = datetime(2026, 3, 1, 10, 15, tzinfo=UTC)


@pytest.fixture(params=STORES)
async def blank(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A connected store with nothing in it, at no schema version."""
    if request.param == "sqlite":
        store = await Store.connect(f"sqlite+aiosqlite:///{tmp_path / 'old.db'}")
        yield store
        await store.close()
        return
    schema = f"m_{uuid.uuid4().hex[:10]}"
    store = await Store.connect(normalise_database_url(POSTGRES_URL), schema)
    yield store
    async with store.engine.begin() as connection:
        await connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    await store.close()


def finished(
    run_id: str, started: datetime, seconds: float, status: RunStatus = RunStatus.SUCCEEDED
) -> RunFinished:
    return RunFinished(
        run_id=run_id,
        trigger_id=f"t-{run_id}",
        job="nightly",
        pool="default",
        worker="w1",
        scheduled_at=started,
        started_at=started,
        finished_at=started + timedelta(seconds=seconds),
        duration_seconds=seconds,
        status=status,
    )


async def test_finished_runs_are_rolled_up_once_per_hour_and_day(store: Store) -> None:
    first = [
        finished("a", T0, 2.0),
        finished("b", T0 + timedelta(minutes=10), 6.0, RunStatus.FAILED),
        finished("c", T0 + timedelta(hours=1), 1.0),
        finished("d", T0 + timedelta(hours=1), 0.0, RunStatus.DUPLICATE),
    ]
    async with store.session() as session, session.begin():
        await record_batch(session, first, T0)
    async with store.session() as session, session.begin():  # redelivered, and one new run
        await record_batch(
            session, [first[0], finished("e", T0 + timedelta(days=1), 10.0, RunStatus.TIMED_OUT)], T0
        )

    end = T0 + timedelta(days=3)
    hours = await read_metrics(store, "nightly", "hour", T0 - timedelta(hours=1), end)
    assert [
        (b.start.hour, b.runs, b.failures, b.average_duration_seconds, b.max_duration_seconds) for b in hours
    ] == [
        (10, 2, 1, 4.0, 6.0),
        (11, 1, 0, 1.0, 1.0),
        (10, 1, 1, 10.0, 10.0),
    ]
    days = await read_metrics(store, "nightly", "day", T0 - timedelta(days=1), end)
    assert [(b.start, b.runs, b.failures, b.max_duration_seconds) for b in days] == [
        (datetime(2026, 3, 1, tzinfo=UTC), 3, 1, 6.0),
        (datetime(2026, 3, 2, tzinfo=UTC), 1, 1, 10.0),
    ]
    assert await read_metrics(store, "other", "day", T0 - timedelta(days=1), end) == []


async def test_a_year_of_history_is_one_bounded_range_of_the_primary_key(store: Store) -> None:
    start = datetime(2025, 1, 1, tzinfo=UTC)
    runs = [
        RunRow(
            run_id=f"r{day}",
            job="nightly",
            source="worker",
            status="succeeded" if day % 7 else "failed",
            started_at=start + timedelta(days=day, hours=3),
            duration_seconds=float(day % 60),
        )
        for day in range(365)
    ]
    async with store.session() as session, session.begin():
        await add_finished(session, runs)  # 730 rows: more than one statement's worth of upserts
    async with store.session() as session:
        stored = len((await session.execute(select(RunMetricRow.bucket))).all())
    assert stored == 2 * 365
    days = await read_metrics(store, "nightly", "day", start, start + timedelta(days=366))
    assert len(days) == 365 and sum(b.runs for b in days) == 365 and sum(b.failures for b in days) == 53
    assert max(b.max_duration_seconds or 0 for b in days) == 59.0
    assert (
        len(await read_metrics(store, "nightly", "hour", start, start + timedelta(days=400))) <= MAX_BUCKETS
    )
    if store.dialect == "sqlite":
        async with store.engine.connect() as connection:
            plan = await connection.exec_driver_sql(
                "EXPLAIN QUERY PLAN SELECT * FROM run_metrics WHERE job = 'nightly' AND resolution = 'day' "
                "AND bucket >= '2025-01-01' AND bucket < '2026-01-01' ORDER BY bucket"
            )
            details = " ".join(str(row[-1]) for row in plan)
        assert "USING INDEX sqlite_autoindex_run_metrics_1" in details and "TEMP B-TREE" not in details, (
            details
        )


async def test_the_migration_fills_the_rollup_from_the_runs_already_recorded(blank: Store) -> None:
    await blank.upgrade("0007")
    naive = T0.replace(tzinfo=None)
    rows = [
        ("a", "succeeded", naive, 2.0),
        ("b", "failed", naive + timedelta(minutes=30), 4.0),
        ("c", "succeeded", naive + timedelta(hours=1), None),
        ("d", "duplicate", naive, 0.0),
        ("e", "running", naive, None),
    ]
    async with blank.engine.begin() as connection:
        for run_id, status, started, duration in rows:
            await connection.execute(
                text(
                    "INSERT INTO runs (run_id, job, source, redelivered, status, started_at, finished_at, "
                    "duration_seconds) VALUES (:run_id, 'nightly', 'worker', false, :status, :started, "
                    ":finished, :duration)"
                ),
                {
                    "run_id": run_id,
                    "status": status,
                    "started": started,
                    "finished": None if status == "running" else started + timedelta(seconds=5),
                    "duration": duration,
                },
            )
    await blank.upgrade()
    end = T0 + timedelta(days=1)
    hours = await read_metrics(blank, "nightly", "hour", T0 - timedelta(hours=1), end)
    assert [
        (b.start, b.runs, b.failures, b.average_duration_seconds, b.max_duration_seconds) for b in hours
    ] == [
        (datetime(2026, 3, 1, 10, tzinfo=UTC), 2, 1, 3.0, 4.0),
        (datetime(2026, 3, 1, 11, tzinfo=UTC), 1, 0, None, None),
    ]
    [day] = await read_metrics(blank, "nightly", "day", T0 - timedelta(days=1), end)
    assert (day.start, day.runs, day.failures, day.max_duration_seconds) == (
        datetime(2026, 3, 1, tzinfo=UTC),
        3,
        1,
        4.0,
    )
    # And the monitor adds to what the migration counted.
    async with blank.session() as session, session.begin():
        await record_batch(session, [finished("f", T0, 8.0)], T0)
    [day] = await read_metrics(blank, "nightly", "day", T0 - timedelta(days=1), end)
    assert (day.runs, day.max_duration_seconds) == (4, 8.0)
