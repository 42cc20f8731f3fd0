"""The monitor records every event once, however often the broker delivers it."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy import event as sqlalchemy_event

from common.clock import utcnow
from common.messages import HeartbeatKind, JobHeartbeat, RunFinished, RunStarted, RunStatus, WireMessage
from common.settings import Settings
from common.signing import Keyring, Role
from common.store import Store
from common.topology import Topology, event_routing_key
from monitor.recorder import record_batch
from tests.conftest import Start
from tests.fleet import eventually
from tests.integration.helpers import apply_toml, runs_of, state_of


async def _send(amqp: AbstractRobustConnection, settings: Settings, *events: WireMessage) -> None:
    channel = await amqp.channel()
    exchange = await channel.get_exchange(Topology(settings.namespace).events_exchange)
    keyring = Keyring.parse(settings.keys)
    for event in events:
        body, routing_key = event.to_bytes(), event_routing_key(event)
        headers = keyring.sign(Role.EVENT, settings.namespace, routing_key, body)
        await exchange.publish(aio_pika.Message(body, headers=headers), routing_key)


def _run_events(
    run_id: str, job: str, at: datetime, lasting: timedelta, status: RunStatus, exit_code: int | None = None
) -> tuple[RunStarted, RunFinished]:
    """A worker's start and end of run ``run_id`` of ``job``, started at ``at``."""
    common = {
        "run_id": run_id,
        "trigger_id": f"{job}@2026-01-01T00:00:00Z",
        "job": job,
        "pool": "default",
        "worker": "w",
        "scheduled_at": at,
        "started_at": at,
    }
    finished = RunFinished(
        **common,
        finished_at=at + lasting,
        duration_seconds=lasting.total_seconds(),
        status=status,
        exit_code=exit_code,
    )
    return RunStarted(**common), finished


async def test_a_redelivered_run_event_does_not_create_a_second_row(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection
) -> None:
    await fleet("monitor")
    now = utcnow()
    started, finished = _run_events("run-1", "dup", now, timedelta(seconds=2), RunStatus.FAILED, exit_code=1)
    # Out of order and repeated, as redeliveries may come.
    await _send(amqp, settings, finished, started, finished, started, finished)
    await _send(amqp, settings, JobHeartbeat(id="marker", job="dup-done", at=now))
    await eventually(lambda: runs_of(store, "dup-done"))

    runs = await runs_of(store, "dup")
    assert len(runs) == 1
    assert runs[0].status == "failed" and runs[0].exit_code == 1 and runs[0].duration_seconds == 2.0
    state = await state_of(store, "dup")
    assert state is not None and state.consecutive_failures == 1


async def test_heartbeats_make_runs_of_a_heartbeat_only_job(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection
) -> None:
    await apply_toml(
        store,
        """
        [jobs.backup]
        schedule = "0 3 * * *"
        timezone = "Europe/Berlin"
        """,
    )
    await fleet("monitor", "scheduler")
    now = utcnow()
    start = JobHeartbeat(id="b-1", job="backup", kind=HeartbeatKind.START, at=now - timedelta(seconds=30))
    done = JobHeartbeat(id="b-2", job="backup", kind=HeartbeatKind.SUCCESS, at=now, message="42 files")
    await _send(amqp, settings, start, start, done, done)

    async def finished() -> list[object]:
        runs = await runs_of(store, "backup")
        return runs if runs and runs[-1].status == "succeeded" else []

    runs = await eventually(finished)
    assert len(runs) == 1
    assert runs[0].source == "heartbeat" and runs[0].duration_seconds == 30.0
    assert runs[0].output_tail == "42 files"
    state = await state_of(store, "backup")
    assert state is not None and state.last_status == "succeeded"
    assert state.next_expected_at is not None and state.next_expected_at > now
    local = state.next_expected_at.astimezone(ZoneInfo("Europe/Berlin"))
    assert (local.hour, local.minute) == (3, 0)

    fail = JobHeartbeat(
        id="b-3", job="backup", kind=HeartbeatKind.FAIL, exit_code=2, at=now + timedelta(seconds=1)
    )
    await _send(amqp, settings, fail)
    failed = await eventually(lambda: runs_of(store, "backup", status="failed"))
    assert failed[0].exit_code == 2


async def test_a_run_in_progress_makes_its_job_running_until_it_ends(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection
) -> None:
    await fleet("monitor")
    now = utcnow()
    fields = {
        "trigger_id": "long@x",
        "job": "long",
        "pool": "default",
        "worker": "w",
        "scheduled_at": now,
    }
    older = RunStarted(run_id="older", started_at=now - timedelta(minutes=5), **fields)
    current = RunStarted(run_id="current", started_at=now, **fields)
    await _send(amqp, settings, current, older)  # out of order: the older start must not win

    async def running() -> object:
        state = await state_of(store, "long")
        return state if state is not None and state.last_run_id == "current" else None

    state = await eventually(running)
    assert state.last_status == "running"
    late_end = RunFinished(
        run_id="older",
        started_at=older.started_at,
        finished_at=now + timedelta(seconds=1),
        duration_seconds=301,
        status=RunStatus.SUCCEEDED,
        **fields,
    )
    await _send(amqp, settings, late_end)
    await eventually(lambda: runs_of(store, "long", status="succeeded"))
    state = await state_of(store, "long")
    assert state is not None and (state.last_run_id, state.last_status) == ("current", "running")


async def test_two_monitors_recording_the_same_run_at_once_take_turns(store: Store) -> None:
    """Two monitors consume one queue: a run's start may be in one's transaction and its end in
    the other's, at the same moment. The second must read what the first writes, not what was
    there before it: reading first, it inserted the run and the job's state a second time (a
    unique violation, its whole batch written again one event at a time) or wrote over the
    first's changes."""
    now = utcnow()
    started, finished = _run_events("both-1", "both", now, timedelta(seconds=1), RunStatus.SUCCEEDED)
    second_began = asyncio.Event()

    async def second_monitor() -> None:
        async with store.session() as session, session.begin():
            connection = await session.connection()
            sqlalchemy_event.listen(
                connection.sync_connection, "before_cursor_execute", lambda *_: second_began.set()
            )
            await record_batch(session, [finished], utcnow())

    async with store.session() as session, session.begin():
        await record_batch(session, [started], now)
        second = asyncio.create_task(second_monitor())
        await asyncio.wait_for(second_began.wait(), 30)
        await asyncio.sleep(0.2)  # the second goes as far as it can before the first commits
    await asyncio.wait_for(second, 60)

    [run] = await runs_of(store, "both")
    assert (run.status, run.finished_at) == (RunStatus.SUCCEEDED.value, now + timedelta(seconds=1))
    state = await state_of(store, "both")
    assert state is not None and (state.last_run_id, state.last_status) == ("both-1", "succeeded")
