"""The monitor keeps each job's health with the machine of monitor/health.py: it stores the state,
the next deadline and every flip, ticks deadlines as timers, learns job changes, survives
restarts and shares the work with other monitors without storing a flip twice."""

from __future__ import annotations

import itertools
import re
from datetime import datetime, timedelta
from typing import Any

import orjson
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy import delete, select

from common.clock import utcnow
from common.jobs import JobSpec
from common.messages import HeartbeatKind, JobHeartbeat, RunFinished, RunStarted, RunStatus, WireMessage
from common.publisher import Publisher
from common.settings import Settings
from common.store import FlipRow, JobHealthRow, JobStateRow, Store
from common.topology import Topology
from monitor.health import Flip, State
from monitor.health_store import JobFlip, store_flips
from monitor.recorder import feeds_health, record_batch
from tests.conftest import Start
from tests.fleet import Fleet, eventually, run_cronfleet
from tests.integration.helpers import apply_toml, runs_of

EVERY_SECOND = """
[jobs.every]
schedule = "* * * * * *"
grace_seconds = 1
action = { type = "shell", argv = ["true"] }
"""


# Every column of a job's health record.
COLUMNS = [column.name for column in JobHealthRow.__table__.columns]


async def health_of(store: Store, job: str) -> JobHealthRow | None:
    """``job``'s stored health, read afresh."""
    async with store.session() as session:
        return await session.get(JobHealthRow, job)


async def state_is(store: Store, job: str, state: str) -> JobHealthRow | None:
    """``job``'s stored health if it is in ``state``, else None (for ``eventually``)."""
    health = await health_of(store, job)
    return health if health is not None and health.state == state else None


async def flips_of(store: Store, job: str) -> list[FlipRow]:
    """``job``'s stored flips, oldest first."""
    async with store.session() as session:
        query = select(FlipRow).where(FlipRow.job == job).order_by(FlipRow.at, FlipRow.id)
        return list((await session.execute(query)).scalars())


def moves(flips: list[FlipRow]) -> list[tuple[str, str]]:
    return [(flip.from_state, flip.to_state) for flip in flips]


def facts(flips: list[FlipRow]) -> list[tuple[object, ...]]:
    return [(flip.id, flip.at, flip.from_state, flip.to_state, flip.reason) for flip in flips]


def no_flip_twice(flips: list[FlipRow]) -> None:
    seen = [(flip.job, flip.at, flip.from_state, flip.to_state) for flip in flips]
    assert len(seen) == len(set(seen)), f"a flip was stored twice: {seen}"
    for earlier, later in itertools.pairwise(flips):
        assert later.from_state == earlier.to_state, f"flips do not chain: {moves(flips)}"


async def send(amqp: AbstractRobustConnection, settings: Settings, *events: WireMessage) -> None:
    """Publish signed events to the monitor's queue (declared first, so they wait there)."""
    topology = Topology(settings.namespace)
    channel = await amqp.channel()
    await topology.declare_monitor(channel)
    publisher = await Publisher.open(amqp, topology, settings.keyring())
    for event in events:
        await publisher.event(event)


async def seed_overdue(store: Store, spec: JobSpec, due: datetime) -> None:
    """Store ``spec``'s health as a monitor that then stopped would have left it: ``up``, its next
    run due at ``due`` (in the past), its timer never fired."""
    ran = due - timedelta(seconds=30)
    async with store.session() as session, session.begin():
        await session.execute(delete(JobHealthRow).where(JobHealthRow.job == spec.name))
        session.add(
            JobHealthRow(
                job=spec.name,
                state="up",
                since=ran,
                due_at=due,
                deadline_at=due,
                consecutive_failures=0,
                last_run_at=ran,
                last_finished_at=ran,
                fingerprint=spec.fingerprint(),
                updated_at=ran,
            )
        )


async def test_a_run_that_does_not_come_turns_its_job_down_and_a_run_brings_it_back_up(
    settings: Settings, store: Store, fleet: Start
) -> None:
    await apply_toml(store, EVERY_SECOND)
    await fleet("monitor")  # no scheduler, no worker: no run comes

    down = await eventually(lambda: state_is(store, "every", "down"))
    flips = await flips_of(store, "every")
    assert moves(flips) == [("new", "late"), ("late", "down")]
    assert re.fullmatch(r"no run since it was due at \S+Z \(1s grace\)", flips[-1].reason)
    assert down.since == flips[-1].at and down.deadline_at is None and down.open_alarm == "down"
    status = await run_cronfleet(settings, "status", "--json")
    assert status.returncode == 1  # a job down makes `status` fail
    [row] = orjson.loads(status.stdout)["jobs"]
    assert row["health"] == "down" and row["reason"] == flips[-1].reason

    await fleet("worker", "scheduler")

    async def recovered() -> list[FlipRow]:
        return [f for f in await flips_of(store, "every") if f.to_state == "up" and f.recovered_from]

    [recovery] = await eventually(recovered)
    assert recovery.recovered_from == "down" and recovery.from_state == "running"
    assert recovery.reason.endswith("; recovered from down")
    no_flip_twice(await flips_of(store, "every"))


async def test_a_heartbeat_only_job_follows_the_same_machine(
    settings: Settings, store: Store, fleet: Start
) -> None:
    await apply_toml(store, '[jobs.outside]\nschedule = "@daily"\n')
    before = await run_cronfleet(settings, "status", "--json")
    assert before.returncode == 0
    assert orjson.loads(before.stdout)["jobs"][0]["health"] == "new"  # no monitor has seen it yet
    await fleet("monitor")
    await eventually(lambda: state_is(store, "outside", "new"))

    assert (await run_cronfleet(settings, "ping", "outside", "--start")).returncode == 0
    assert (await run_cronfleet(settings, "ping", "outside")).returncode == 0
    up = await eventually(lambda: state_is(store, "outside", "up"))
    assert moves(await flips_of(store, "outside")) == [("new", "running"), ("running", "up")]
    last = (await flips_of(store, "outside"))[-1]
    assert re.fullmatch(r"heartbeat \w+ reported success after \d+(ms|s)", last.reason), last.reason
    assert up.run_id is None and up.consecutive_failures == 0 and up.due_at is not None

    assert (await run_cronfleet(settings, "ping", "outside", "--fail")).returncode == 0
    await eventually(lambda: state_is(store, "outside", "failing"))
    last = (await flips_of(store, "outside"))[-1]
    assert re.fullmatch(r"last run failed: heartbeat \w+ reported failure", last.reason), last.reason
    status = await run_cronfleet(settings, "status", "--json")
    assert status.returncode == 1
    assert orjson.loads(status.stdout)["jobs"][0]["health"] == "failing"

    # A heartbeat for a job the store does not know is recorded as a run, with no health.
    assert (await run_cronfleet(settings, "ping", "stranger")).returncode == 0
    await eventually(lambda: runs_of(store, "stranger"))
    assert await health_of(store, "stranger") is None


async def test_a_restarted_monitor_records_queued_events_first_and_emits_missed_flips_once(
    settings: Settings, store: Store, amqp: AbstractRobustConnection
) -> None:
    text = "".join(
        f'[jobs.{name}]\nschedule = "@daily"\ngrace_seconds = 10\n' for name in ("quiet", "started", "probe")
    )
    specs = {spec.name: spec for spec in await apply_toml(store, text)}
    now = utcnow()
    due = now - timedelta(seconds=30)
    # While no monitor ran, both jobs fell due; "started" did start, 5 s after it was due, and
    # its start waits in the queue. Their grace periods (10 s) ended 20 s ago.
    await seed_overdue(store, specs["quiet"], due)
    await seed_overdue(store, specs["started"], due)
    start = JobHeartbeat(id="s-1", job="started", kind=HeartbeatKind.START, at=due + timedelta(seconds=5))
    await send(amqp, settings, start)

    monitor = Fleet(settings)
    try:
        await monitor.start("monitor")
        await eventually(lambda: state_is(store, "quiet", "down"))
        await eventually(lambda: state_is(store, "started", "running"))
    finally:
        await monitor.stop()
    quiet, started = await flips_of(store, "quiet"), await flips_of(store, "started")
    assert moves(quiet) == [("up", "late"), ("late", "down")]
    assert [f.at for f in quiet] == [due, due + timedelta(seconds=10)]  # each at its own instant
    assert moves(started) == [("up", "late"), ("late", "running")]  # never down: its start came

    # Restarted: the flips already stored are not emitted again. ("probe", overdue, shows that
    # the restarted monitor did tick what was overdue.)
    await seed_overdue(store, specs["probe"], utcnow() - timedelta(seconds=30))
    again = Fleet(settings)
    try:
        await again.start("monitor")
        await eventually(lambda: state_is(store, "probe", "down"))
    finally:
        await again.stop()
    assert facts(await flips_of(store, "quiet")) == facts(quiet)
    assert facts(await flips_of(store, "started")) == facts(started)
    assert moves(await flips_of(store, "probe")) == [("up", "late"), ("late", "down")]


async def test_two_monitors_never_store_the_same_flip_twice(
    settings: Settings, store: Store, amqp: AbstractRobustConnection
) -> None:
    text = EVERY_SECOND + '[jobs.overdue]\nschedule = "@daily"\ngrace_seconds = 10\n'
    specs = {spec.name: spec for spec in await apply_toml(store, text)}
    await seed_overdue(store, specs["overdue"], utcnow() - timedelta(seconds=30))
    monitors = Fleet(settings)
    try:
        # Both rebuild the same timers and tick "overdue" at once; both tick "every" as it falls
        # due each second and then down.
        await monitors.start("monitor", "monitor")
        await eventually(lambda: state_is(store, "overdue", "down"))
        await eventually(lambda: state_is(store, "every", "down"))
        await send(amqp, settings, JobHeartbeat(id="ok-1", job="every", at=utcnow()))

        async def recovered() -> bool:
            return any(f.recovered_from == "down" for f in await flips_of(store, "every"))

        await eventually(recovered)
    finally:
        await monitors.stop()
    assert moves(await flips_of(store, "overdue")) == [("up", "late"), ("late", "down")]
    every = await flips_of(store, "every")
    assert moves(every)[:3] == [("new", "late"), ("late", "down"), ("down", "up")]
    no_flip_twice(every)


async def test_the_monitor_learns_that_a_job_was_paused_resumed_changed_or_removed(
    settings: Settings, store: Store, fleet: Start
) -> None:
    await apply_toml(store, '[jobs.outside]\nschedule = "@daily"\n')
    await fleet("monitor")
    await eventually(lambda: state_is(store, "outside", "new"))

    await apply_toml(store, '[jobs.outside]\nschedule = "@daily"\nenabled = false\n')
    paused = await eventually(lambda: state_is(store, "outside", "paused"))
    assert paused.due_at is None and paused.deadline_at is None
    assert (await flips_of(store, "outside"))[-1].reason == "paused: the job was disabled"
    status = await run_cronfleet(settings, "status", "--json")
    assert status.returncode == 0 and orjson.loads(status.stdout)["jobs"][0]["health"] == "paused"

    await apply_toml(store, '[jobs.outside]\nschedule = "@daily"\n')
    await eventually(lambda: state_is(store, "outside", "new"))
    assert (await flips_of(store, "outside"))[-1].reason == "resumed: the job was enabled"

    # A new schedule applies from now on: due every second with 1 s of grace, and no run comes.
    await apply_toml(store, '[jobs.outside]\nschedule = "* * * * * *"\ngrace_seconds = 1\n')
    await eventually(lambda: state_is(store, "outside", "down"))

    await apply_toml(store, '[jobs.other]\nschedule = "@daily"\n')  # "outside" is removed

    async def forgotten() -> bool:
        return await health_of(store, "outside") is None

    await eventually(forgotten)
    await eventually(lambda: state_is(store, "other", "new"))
    assert moves(await flips_of(store, "outside"))[-1] == ("late", "down")  # history stays


async def test_flips_lists_the_stored_flips_newest_first(
    settings: Settings, store: Store, fleet: Start
) -> None:
    await apply_toml(store, EVERY_SECOND + '[jobs.outside]\nschedule = "@daily"\n')
    await fleet("monitor")
    await eventually(lambda: state_is(store, "every", "down"))
    assert (await run_cronfleet(settings, "ping", "outside", "--fail")).returncode == 0
    await eventually(lambda: state_is(store, "outside", "failing"))

    listed = await run_cronfleet(settings, "flips", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = orjson.loads(listed.stdout)
    assert [(r["job"], r["from_state"], r["to_state"]) for r in rows[:1]] == [("outside", "new", "failing")]
    assert [r["at"] for r in rows] == sorted((r["at"] for r in rows), reverse=True)
    one = orjson.loads((await run_cronfleet(settings, "flips", "every", "--limit", "1", "--json")).stdout)
    assert [(r["job"], r["from_state"], r["to_state"]) for r in one] == [("every", "late", "down")]
    table = await run_cronfleet(settings, "flips", "every")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split() == [
        "AT",
        "JOB",
        "FROM_STATE",
        "TO_STATE",
        "REASON",
    ]
    assert (await run_cronfleet(settings, "flips", "nobody")).stdout.strip() == "(none)"


def test_a_duplicate_run_is_no_input_of_the_health_machine() -> None:
    common: dict[str, Any] = {"job": "j", "pool": "default", "worker": "w", "trigger_id": "j@1"}
    at = utcnow()
    times: dict[str, Any] = {"scheduled_at": at, "started_at": at, "finished_at": at, "duration_seconds": 0}
    duplicate = RunFinished(**common, **times, run_id="r-2", status=RunStatus.DUPLICATE)
    assert not feeds_health(duplicate)
    for status in RunStatus:
        if status not in (RunStatus.RUNNING, RunStatus.DUPLICATE):
            assert feeds_health(RunFinished(**common, **times, run_id="r-1", status=status)), status
    assert feeds_health(RunStarted(**common, run_id="r-1", scheduled_at=at, started_at=at))
    assert feeds_health(JobHeartbeat(id="h", job="j", at=at))


async def test_a_duplicate_run_is_recorded_and_leaves_the_jobs_health_alone(store: Store) -> None:
    await apply_toml(store, '[jobs.nightly]\nschedule = "@daily"\n')
    now = utcnow()
    run: dict[str, Any] = {
        "job": "nightly",
        "pool": "default",
        "worker": "w",
        "scheduled_at": now,
        "started_at": now,
    }
    ran = RunFinished(
        **run,
        run_id="r-1",
        trigger_id="nightly@1",
        finished_at=now,
        duration_seconds=0.0,
        status=RunStatus.SUCCEEDED,
    )
    repeated = RunFinished(
        **run,
        run_id="r-2",
        trigger_id="nightly@1",
        finished_at=now + timedelta(seconds=1),
        duration_seconds=0.0,
        status=RunStatus.DUPLICATE,
    )
    async with store.session() as session, session.begin():
        await record_batch(session, [RunStarted(**run, run_id="r-1", trigger_id="nightly@1"), ran], now)
    before = await health_of(store, "nightly")
    assert before is not None and before.state == "up"
    flips_before = facts(await flips_of(store, "nightly"))

    async with store.session() as session, session.begin():
        outcome = await record_batch(session, [repeated], now + timedelta(seconds=1))

    assert outcome.recorded == 1 and outcome.health.flips == []
    [recorded] = await runs_of(store, "nightly", run_id="r-2")
    assert recorded.status == "duplicate"
    after = await health_of(store, "nightly")
    assert after is not None
    assert {c: getattr(after, c) for c in COLUMNS} == {c: getattr(before, c) for c in COLUMNS}
    assert facts(await flips_of(store, "nightly")) == flips_before


async def test_a_herd_of_flips_stored_at_once_gets_each_its_own_row_and_id(store: Store) -> None:
    # More flips than one INSERT carries, with two of the same content, stored in one go: each
    # id must name the row of its own flip (the alert of flip N is about flip N's job).
    now = utcnow().replace(microsecond=123456)
    flips = [
        JobFlip(
            f"job-{i % 700:04d}",
            Flip(
                at=now + timedelta(seconds=i // 700),
                from_state=State.LATE if i % 3 else State.UP,
                to_state=State.DOWN,
                reason=f"no run ({i})",
            ),
        )
        for i in range(1500)
    ]
    flips.append(flips[7])
    flips.append(JobFlip("job-0001", Flip(now, State.DOWN, State.UP, "ran", recovered_from=State.DOWN)))
    async with store.session() as session, session.begin():
        saved = await store_flips(session, flips, now)
    assert [item.job for item in saved] == [item.job for item in flips]
    assert len({item.id for item in saved}) == len(flips)
    async with store.session() as session:
        rows = {row.id: row for row in (await session.execute(select(FlipRow))).scalars()}
    for item in saved:
        assert item.id is not None
        row = rows[item.id]
        assert (row.job, row.at, row.from_state, row.to_state, row.reason, row.recovered_from) == (
            item.job,
            item.flip.at,
            item.flip.from_state.value,
            item.flip.to_state.value,
            item.flip.reason,
            None if item.flip.recovered_from is None else item.flip.recovered_from.value,
        )
        assert row.alert == ("pending" if item.alert else None)


async def test_a_job_whose_runs_overlap_still_gets_its_next_expected_time(store: Store) -> None:
    # Each run's end is recorded after the next run began (a job longer than its period, or
    # events recorded out of order): every run's end is history, and the job must still be
    # expected at its next fire, moving on with each end, never back.
    await apply_toml(store, EVERY_SECOND)
    start = utcnow().replace(microsecond=0)
    runs: dict[str, Any] = {"job": "every", "pool": "default", "worker": "w"}

    def started(n: int) -> RunStarted:
        at = start + timedelta(seconds=n)
        return RunStarted(**runs, run_id=f"r-{n}", trigger_id=f"every@{n}", scheduled_at=at, started_at=at)

    def finished(n: int) -> RunFinished:
        at = start + timedelta(seconds=n)
        return RunFinished(
            **runs,
            run_id=f"r-{n}",
            trigger_id=f"every@{n}",
            scheduled_at=at,
            started_at=at,
            finished_at=at + timedelta(seconds=1.5),
            duration_seconds=1.5,
            status=RunStatus.SUCCEEDED,
        )

    expected = []
    for n in range(3):
        batch = [started(n + 1), finished(n)] if n else [started(0), started(1), finished(0)]
        async with store.session() as session, session.begin():
            await record_batch(session, batch, start + timedelta(seconds=n + 2))
        async with store.session() as session:
            state = await session.get(JobStateRow, "every")
        assert state is not None and state.last_run_id == f"r-{n + 1}"
        expected.append(state.next_expected_at)
    # The first fire after each end (n + 1.5 s): n + 2 s.
    assert expected == [start + timedelta(seconds=n + 2) for n in range(3)], expected
