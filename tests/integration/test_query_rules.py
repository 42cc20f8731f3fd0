"""The query rules of docs/development.md, checked: no statement grows with the data, hot queries
use an index, and old history is purged in small batches."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import httpx
import pytest
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy import Engine, event, func, select, text

from common import fires
from common.api_keys import create_api_key
from common.catalog import apply_jobs, load_jobs
from common.clock import utcnow
from common.errors import StatementTooLarge, StoreUnavailable
from common.jobs import JobSpec
from common.messages import HeartbeatKind, JobHeartbeat, RunStatus
from common.publisher import Publisher
from common.settings import Settings
from common.store import AlertAttemptRow, FireRow, FlipRow, HeartbeatRow, JobRow, RunRow, Store, bulk
from common.store.chunks import IN_LIST_CHUNK, INSERT_PARAMETERS_CHUNK
from common.store.database import MAX_STATEMENT_PARAMETERS, statement_parameters
from common.store.models import JobHealthRow
from common.store.retention import purge
from common.topology import Topology
from common.trigger_claims import ClaimOutcome, TriggerClaims
from monitor.health_store import HealthBatch
from monitor.recorder import record_batch
from tests.conftest import Start
from tests.fleet import Fleet, cronfleet, eventually, run_cronfleet
from tests.integration.helpers import apply_toml, runs_of
from tests.integration.test_http_server import free_port

# More than PostgreSQL's 32,767 bind parameters once multiplied by any table's columns, and more
# than the store's own per-statement limit as a plain IN list.
MANY = MAX_STATEMENT_PARAMETERS + 1000


def _job(name: str) -> JobSpec:
    return JobSpec.model_validate(
        {"name": name, "schedule": "*/5 * * * *", "action": {"type": "shell", "argv": ["true"]}}
    )


@pytest.fixture
def largest_statement() -> Iterator[list[int]]:
    """The largest number of bind parameters any statement of this test carried, as [n]."""
    largest = [0]

    def measure(*args: Any) -> None:
        _conn, _cursor, _statement, parameters, _context, executemany = args
        largest[0] = max(largest[0], statement_parameters(parameters, executemany))

    event.listen(Engine, "before_cursor_execute", measure)
    yield largest
    event.remove(Engine, "before_cursor_execute", measure)


async def test_a_statement_that_would_outgrow_the_databases_is_refused_on_every_store(store: Store) -> None:
    names = [f"j{i}" for i in range(MANY)]
    with pytest.raises(StatementTooLarge, match="must be chunked"):
        async with store.session() as session:
            await session.execute(select(JobRow.name).where(JobRow.name.in_(names)))


async def test_more_fires_than_a_statement_can_carry_are_claimed_and_published(
    settings: Settings, store: Store, amqp: AbstractRobustConnection, largest_statement: list[int]
) -> None:
    topology = Topology(settings.namespace)
    publisher = await Publisher.open(amqp, topology, settings.keyring())
    await topology.declare_pool(publisher.channel, "default")
    job = _job("many")
    now = utcnow()
    # 5,000 fires: unchunked, the INSERT would carry 45,000 parameters and the UPDATE 5,000.
    count = 5000
    triggers = [job.trigger_at(now - timedelta(seconds=i), now) for i in range(count)]

    won = await fires.claim(store, triggers, "scheduler-1", now)
    assert len(won) == count
    assert await fires.claim(store, triggers[:10], "scheduler-2", now) == []  # claimed once
    assert await fires.publish(store, publisher, won) == count

    async with store.session() as session:
        published = await session.scalar(
            select(func.count()).select_from(FireRow).where(FireRow.published_at.is_not(None))
        )
    assert published == count
    assert 0 < largest_statement[0] <= max(IN_LIST_CHUNK, INSERT_PARAMETERS_CHUNK) < count


async def test_applying_and_removing_more_jobs_than_a_statement_can_carry(
    store: Store, largest_statement: list[int]
) -> None:
    specs = [_job(f"job-{i:05d}") for i in range(MANY)]
    diff = await apply_jobs(store, specs, utcnow())
    assert len(diff.added) == MANY
    assert len(await load_jobs(store, [s.name for s in specs])) == MANY

    diff = await apply_jobs(store, specs[:1], utcnow())
    assert len(diff.removed) == MANY - 1
    assert [s.name for s in await load_jobs(store)] == [specs[0].name]
    assert 0 < largest_statement[0] <= MAX_STATEMENT_PARAMETERS


async def _use_the_api(store: Store, port: int) -> None:
    """Call every route of the HTTP API once or more, filters and pages included."""
    _key, secret = await create_api_key(store, "rules", read_only=False, now=utcnow())
    headers = {"X-API-Key": secret}
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}/api", headers=headers, trust_env=False
    ) as client:
        page = (await client.get("/runs", params={"limit": 1})).json()
        filters: list[dict[str, Any]] = [
            {"cursor": page["next_cursor"], "limit": 1},
            {"job": "every", "limit": 2},
            {"job": "every", "status": "succeeded", "from": "2000-01-01", "to": "2999-01-01"},
            {"status": "failed"},
            {"text": "nothing like it"},
            {"job": "every", "text": "x"},
        ]
        for params in filters:
            assert (await client.get("/runs", params=params)).status_code == 200, params
        calls = [
            ("GET", f"/runs/{page['runs'][0]['run_id']}", None),
            ("GET", "/jobs", None),
            ("GET", "/jobs/every", None),
            ("GET", "/jobs/every/metrics", None),
            ("GET", "/jobs/every/metrics?resolution=days", None),
            ("GET", "/alerts", None),
            ("GET", "/alerts?job=every", None),
            ("GET", "/flips?job=every", None),
            ("GET", "/health", None),
            ("PATCH", "/jobs/outside", {"description": "pinged"}),
            ("POST", "/jobs/every/trigger", None),
            ("POST", "/jobs", {"name": "added", "schedule": "@daily"}),
            ("DELETE", "/jobs/added", None),
        ]
        for method, path, body in calls:
            answer = await client.request(method, path, json=body)
            assert answer.status_code < 300, (method, path, answer.text)


# Statements that read a whole table on purpose, and why. Anything else scanning a table fails.
FULL_SCANS_ALLOWED = {
    "jobs": "apply compares the file with every job, and the scheduler's reload reads every "
    "fingerprint (issue 16 replaces that with a version counter)",
    "job_state": "`status` shows every job",
    "job_health": "`status` shows every job's health, and a starting monitor compares every job's "
    "fingerprint with the one its health record follows (once, to learn what changed while it was down)",
    "fleet_health": "one row per scheduler kind, pool, worker and the dead letters: the monitor decides "
    "them all at each look, and `status` shows them all",
}
_FULL_SCAN = re.compile(r"^SCAN (\w+)$")


@pytest.mark.parametrize("settings", ["sqlite"], indirect=True)
async def test_every_query_of_the_running_fleet_uses_an_index(
    settings: Settings, store: Store, fleet: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured: dict[str, Any] = {}

    def capture(*args: Any) -> None:
        _conn, _cursor, statement, parameters, _context, executemany = args
        if not executemany and statement.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE")):
            captured.setdefault(statement, tuple(parameters))

    # The worker's claims go past SQLAlchemy, on a connection of the SQLite writer's own.
    on_connection = bulk._runs_on

    def runs_on(connection: sqlite3.Connection) -> bulk.Run:
        run = on_connection(connection)

        def captured_run(statement: str, parameters: Sequence[Any]) -> list[Any]:
            capture(None, None, statement, parameters, None, False)
            return run(statement, parameters)

        return captured_run

    monkeypatch.setattr(bulk, "_runs_on", runs_on)
    event.listen(Engine, "before_cursor_execute", capture)
    try:
        await apply_toml(
            store,
            '[jobs.every]\nschedule = "* * * * * *"\naction = { type = "shell", argv = ["true"] }\n'
            '[jobs.outside]\nschedule = "@daily"\n',
        )
        port = free_port()
        await fleet("monitor", http=("127.0.0.1", port))
        await fleet("worker", "scheduler")
        await eventually(lambda: runs_of(store, "every", status=RunStatus.SUCCEEDED.value))
        assert (await run_cronfleet(settings, "ping", "outside", "--start")).returncode == 0
        assert (await run_cronfleet(settings, "ping", "outside")).returncode == 0
        await eventually(lambda: runs_of(store, "outside", status=RunStatus.SUCCEEDED.value))
        for command in (
            ["runs"],
            ["runs", "every"],
            ["status"],
            ["flips"],
            ["flips", "every"],
            ["jobs"],
            ["db", "purge", "--older-than", "1d"],
        ):
            assert (await run_cronfleet(settings, *command)).returncode in (0, 1), command
        await _use_the_api(store, port)
    finally:
        event.remove(Engine, "before_cursor_execute", capture)

    scans: dict[str, list[str]] = {}
    async with store.engine.connect() as connection:
        for statement, parameters in captured.items():
            if "sqlite_master" in statement or "alembic_version" in statement:
                continue
            plan = await connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
            for row in plan:
                found = _FULL_SCAN.match(row[-1])
                # The rows a statement carries (``bulk.GIVEN``) are scanned, not a table.
                if found and found.group(1) not in (*FULL_SCANS_ALLOWED, bulk.GIVEN):
                    scans.setdefault(found.group(1), []).append(" ".join(statement.split())[:160])
    print(f"{len(captured)} distinct statements explained")
    assert len(captured) > 10, "the fleet ran too few statements to judge"
    assert any("trigger_claims" in statement and bulk.GIVEN in statement for statement in captured), (
        "the worker's claims were not seen"
    )
    assert scans == {}, f"full table scans on hot paths: {scans}"


async def test_purge_deletes_old_history_in_batches_and_keeps_what_is_live(store: Store) -> None:
    now = utcnow()
    old, recent = now - timedelta(days=40), now - timedelta(days=1)
    async with store.session() as session, session.begin():
        for i in range(25):
            session.add(_run(f"old-{i}", started=old, finished=old))
            session.add(HeartbeatRow(id=f"old-{i}", job="j", kind="success", at=old))
            session.add(_fire(f"j@old-{i}", expires=old))
            session.add(_attempt(f"flip-{i}", at=old))
        session.add(_attempt("flip-recent", at=recent))
        session.add(_flip(at=old))
        session.add(_run("still-running", started=old, finished=None))
        session.add(_run("recent", started=recent, finished=recent))
        session.add(HeartbeatRow(id="recent", job="j", kind="success", at=recent))
        session.add(_fire("j@pending", expires=now + timedelta(minutes=5)))

    purged = await purge(store, timedelta(days=30), now, batch=10)

    assert (purged.runs, purged.heartbeats, purged.fires, purged.attempts) == (25, 25, 25, 25)
    async with store.session() as session:
        attempts = set((await session.execute(select(AlertAttemptRow.alert_id))).scalars())
        flips = (await session.execute(select(func.count()).select_from(FlipRow))).scalar_one()
    assert attempts == {"flip-recent"} and flips == 1, "alert attempts age out; alarm flips are kept"
    async with store.session() as session:
        runs = set((await session.execute(select(RunRow.run_id))).scalars())
        beats = set((await session.execute(select(HeartbeatRow.id))).scalars())
        pending = set((await session.execute(select(FireRow.trigger_id))).scalars())
    assert runs == {"still-running", "recent"} and beats == {"recent"} and pending == {"j@pending"}
    assert (await purge(store, timedelta(days=30), now)).total == 0


async def test_purge_forgets_old_routine_flips_and_keeps_alarms_recoveries_and_each_jobs_latest(
    store: Store,
) -> None:
    now = utcnow()
    old, recent = now - timedelta(days=40), now - timedelta(days=1)

    def flip(
        job: str, at: Any, to: str, *, alert: str | None = None, recovered: str | None = None
    ) -> FlipRow:
        return FlipRow(
            job=job,
            at=at,
            from_state="up",
            to_state=to,
            reason=f"to {to}",
            created_at=at,
            alert=alert,
            recovered_from=recovered,
        )

    async with store.session() as session, session.begin():
        for i in range(12):  # every run of a busy job: up -> running -> up
            session.add(flip("busy", old + timedelta(minutes=i), "running" if i % 2 == 0 else "up"))
        session.add(flip("busy", old + timedelta(hours=1), "down", alert="done"))
        session.add(flip("busy", old + timedelta(hours=2), "up", alert="done", recovered="down"))
        session.add(flip("busy", recent, "running"))
        session.add(flip("quiet", old, "paused"))  # its latest: `status` shows its reason

    purged = await purge(store, timedelta(days=30), now, batch=5)

    async with store.session() as session:
        kept = (await session.execute(select(FlipRow.job, FlipRow.to_state).order_by(FlipRow.id))).all()
    assert purged.flips == 12
    assert [tuple(row) for row in kept] == [
        ("busy", "down"),
        ("busy", "up"),
        ("busy", "running"),
        ("quiet", "paused"),
    ]
    assert (await purge(store, timedelta(days=30), now)).total == 0


def test_db_purge_takes_an_age_and_says_what_it_removed(settings: Settings) -> None:
    result = cronfleet(settings, "db", "purge", "--older-than", "30d")
    assert result.returncode == 0, result.stderr
    assert (
        result.stdout.strip()
        == "purged 0 run(s), 0 heartbeat(s), 0 fire(s), 0 trigger claim(s), 0 alert attempt(s) and "
        "0 routine flip(s) older than 30d"
    )
    bad = cronfleet(settings, "db", "purge", "--older-than", "a while")
    assert bad.returncode == 1 and "like 30d, 12h or 90m" in bad.stderr and "Traceback" not in bad.stderr


def _attempt(alert_id: str, *, at: Any) -> AlertAttemptRow:
    return AlertAttemptRow(
        flip_id=None,
        alert_id=alert_id,
        kind="alarm",
        job="j",
        channel="log",
        attempt=1,
        at=at,
        delivered=True,
        error=None,
        final=True,
        retry_at=None,
    )


def _flip(*, at: Any) -> FlipRow:
    return FlipRow(job="j", at=at, from_state="up", to_state="down", reason="r", created_at=at, alert="done")


def _run(run_id: str, *, started: Any, finished: Any) -> RunRow:
    return RunRow(
        run_id=run_id,
        job="j",
        source="worker",
        status=RunStatus.RUNNING.value if finished is None else RunStatus.SUCCEEDED.value,
        started_at=started,
        finished_at=finished,
    )


def _fire(trigger_id: str, *, expires: Any) -> FireRow:
    return FireRow(
        trigger_id=trigger_id,
        job="j",
        scheduled_at=expires,
        expires_at=expires,
        claimed_by="s",
        claimed_at=expires,
        published_at=None,
        pool="default",
        manual=False,
        body="{}",
    )


async def test_the_unpublished_fires_index_holds_only_unpublished_fires(store: Store) -> None:
    described = {
        "sqlite": "SELECT sql FROM sqlite_master WHERE name = 'ix_fires_unpublished'",
        "postgresql": "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_fires_unpublished' "
        "AND schemaname = current_schema()",
    }[store.dialect]
    async with store.engine.connect() as connection:
        sql = await connection.scalar(text(described))
    assert sql is not None and re.search(r"WHERE \(?published_at IS NULL\)?", sql), sql


async def test_a_monitor_with_a_retention_purges_old_history_by_itself(
    settings: Settings, store: Store
) -> None:
    old = utcnow() - timedelta(days=3)
    async with store.session() as session, session.begin():
        session.add(_run("ancient", started=old, finished=old))
        session.add(HeartbeatRow(id="ancient", job="j", kind="success", at=old))
    keeping = settings.model_copy(update={"retention": "2d", "retention_check_seconds": 0.2})
    monitor = Fleet(keeping)
    try:
        await monitor.start("monitor")

        async def gone() -> bool:
            async with store.session() as session:
                left = await session.scalar(select(func.count()).select_from(RunRow))
                beats = await session.scalar(select(func.count()).select_from(HeartbeatRow))
            return left == 0 and beats == 0

        await eventually(gone)
    finally:
        await monitor.stop()


async def test_a_long_in_list_is_planned_for_its_values_not_once_for_all(store: Store) -> None:
    """PostgreSQL may switch a prepared statement to a generic plan after five runs, made without
    the values. In a monitor that first looked at a fleet just applied, the health records'
    ``job IN ($1, ..., $1000)`` lock got such a plan: a scan comparing each row with the 1,000
    values one by one (auto_explain: 0.5 s a chunk, 2.5 s to lock a herd's 5,000 records, 10 ms
    with the values). Every connection of the store plans each run with its own values, and
    locks what it asks for across chunks."""
    if store.dialect != "postgresql":
        pytest.skip("SQLite plans every statement anew")
    names = [f"herd-{n:05}" for n in range(2500)]
    now = utcnow()
    async with store.session() as session, session.begin():
        assert await session.scalar(text("SHOW plan_cache_mode")) == "force_custom_plan"
        await session.execute(
            JobHealthRow.__table__.insert(),  # type: ignore[attr-defined]
            [
                {"job": name, "state": "up", "since": now, "consecutive_failures": 0, "updated_at": now}
                for name in names
            ],
        )
        batch = HealthBatch(session, now)
        for _ in range(3):  # more than five runs of one chunk's statement
            assert len(await batch._lock(names)) == len(names)
        plans = (
            await session.execute(
                text(
                    "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                    "WHERE statement LIKE '%FROM job_health%FOR UPDATE%' "
                    "AND statement NOT LIKE '%pg_prepared_statements%'"
                )
            )
        ).all()
    assert plans and all(generic == 0 for generic, _custom in plans), plans


async def test_a_deadlock_is_an_outage_to_retry_and_never_stops_a_worker(store: Store) -> None:
    """PostgreSQL breaks a deadlock by rolling one transaction back (SQLSTATE 40P01). A worker
    under load met one between renewing its leases and ending runs, and the error, not counted
    as a store outage, stopped the worker ("unexpected error: DBAPIError: deadlock detected"):
    measured in the cluster chaos test, one of two workers gone. Such a rollback wrote nothing,
    and doing the work again succeeds: it is a StoreUnavailable, which every caller retries."""
    if store.dialect != "postgresql":
        pytest.skip("SQLite locks the whole database: its writers wait, they never deadlock")
    claims = TriggerClaims(store, "worker-deadlock", timedelta(seconds=30))
    now = utcnow()
    for trigger_id in ("a@1", "b@1"):
        claim = await claims.claim(trigger_id, "0" * 64, f"run-{trigger_id}", now + timedelta(hours=1), now)
        assert claim.outcome is ClaimOutcome.RUN
    async with store.engine.connect() as other:
        await other.begin()
        # The other transaction holds b, renew takes a and waits for b, then the other asks for a.
        await other.execute(
            text("UPDATE trigger_claims SET lease_until = lease_until WHERE trigger_id = 'b@1'")
        )
        renewing = asyncio.create_task(claims.renew(["a@1", "b@1"], utcnow()))
        await asyncio.sleep(0.3)
        crossing = asyncio.create_task(
            other.execute(
                text("UPDATE trigger_claims SET lease_until = lease_until WHERE trigger_id = 'a@1'")
            )
        )
        # PostgreSQL looks for deadlocks after deadlock_timeout (1 s): renew, waiting longest,
        # is the one it rolls back.
        with pytest.raises(StoreUnavailable, match="deadlock"):
            await renewing
        await crossing
        await other.rollback()
    await claims.renew(["a@1", "b@1"], utcnow())  # and done again, it goes through


async def test_a_heartbeat_reads_its_jobs_runs_still_going_not_their_whole_history(store: Store) -> None:
    """A success heartbeat may end its job's open heartbeat run: the monitor reads the runs of the
    job still going (``ix_runs_job_running``), not every run the job ever had, which an index on
    (job, started_at) went through, one row at a time, for each batch with a heartbeat."""
    now = utcnow()
    async with store.session() as session, session.begin():
        for n in range(50):
            at = now - timedelta(hours=n + 1)
            session.add(_run(f"history-{n}", started=at, finished=at))
            other = _run(f"elsewhere-{n}", started=at, finished=None)
            other.job = "other"
            session.add(other)
    statements: list[tuple[str, Any]] = []

    def capture(*args: Any) -> None:
        _conn, _cursor, statement, parameters, _context, _executemany = args
        if "FROM runs" in statement and "LIKE" in statement:
            statements.append((statement, parameters))

    beat = JobHeartbeat(id="beat-1", job="j", kind=HeartbeatKind.SUCCESS, at=now)
    event.listen(Engine, "before_cursor_execute", capture)
    try:
        async with store.session() as session, session.begin():
            await record_batch(session, [beat], now)
    finally:
        event.remove(Engine, "before_cursor_execute", capture)
    assert len(statements) == 1, statements
    statement, parameters = statements[0]
    async with store.engine.connect() as connection, connection.begin():
        if store.dialect == "postgresql":
            # A table this small is read whole whatever its indexes; which index is what counts.
            await connection.exec_driver_sql("ANALYZE runs")
            await connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
        plan = " ".join(
            str(row[-1]) for row in await connection.exec_driver_sql(f"EXPLAIN {statement}", parameters)
        )
    if store.dialect == "sqlite":
        async with store.engine.connect() as connection:
            rows = await connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
            plan = " ".join(str(row[-1]) for row in rows)
    assert "ix_runs_job_running" in plan, plan
