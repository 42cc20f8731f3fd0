"""The monitor watches the fleet (monitor/fleet_watch.py): no scheduler, a pool without a worker,
a worker killed mid-run (its run becomes ``lost``), dead letters piling up; each change of state
is a flip in ``flips`` and shows in ``cronfleet status``."""

from __future__ import annotations

import asyncio
import signal
from datetime import datetime, timedelta
from pathlib import Path

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy import select, text

from common.clock import utcnow
from common.messages import RunFinished, RunStarted, RunStatus, WorkerHeartbeat
from common.settings import Settings
from common.store import FleetHealthRow, FlipRow, JobHealthRow, Store
from common.topology import Topology
from monitor.fleet_watch import FleetWatch, fleet_policy
from monitor.recorder import record_batch
from tests.conftest import Start
from tests.fleet import eventually, run_cronfleet, worker_process
from tests.integration.helpers import apply_toml, flips_of, runs_of

ACTION_JOB = """
[jobs.nightly]
schedule = "0 3 * * *"
action = { type = "shell", argv = ["true"] }
"""


async def component(store: Store, key: str) -> FleetHealthRow | None:
    """The stored record of fleet component ``key``, read afresh."""
    async with store.session() as session:
        return await session.get(FleetHealthRow, key)


async def component_is(store: Store, key: str, state: str) -> FleetHealthRow | None:
    """``key``'s record if it is in ``state``, else None (for ``eventually``)."""
    found = await component(store, key)
    return found if found is not None and found.state == state else None


async def test_no_scheduler_is_down_and_starting_one_brings_it_up(
    settings: Settings, store: Store, fleet: Start
) -> None:
    await apply_toml(store, ACTION_JOB)
    await fleet("monitor")
    await eventually(lambda: component_is(store, "@scheduler", "down"))
    status = await run_cronfleet(settings, "status", "--json")
    assert status.returncode == 1  # a fleet component down makes `status` fail
    [scheduler] = [row for row in orjson.loads(status.stdout)["fleet"] if row["kind"] == "scheduler"]
    assert scheduler["state"] == "down" and "no scheduler heartbeat" in scheduler["detail"]
    text = (await run_cronfleet(settings, "status")).stdout
    assert text.index("@scheduler") < text.index("nightly")  # the fleet comes above the jobs

    await fleet("scheduler")
    await eventually(lambda: component_is(store, "@scheduler", "up"))
    assert await flips_of(store, "@scheduler") == [("new", "down"), ("down", "up")]
    async with store.session() as session:
        recovery = await session.scalar(
            select(FlipRow).where(FlipRow.job == "@scheduler", FlipRow.to_state == "up")
        )
    assert recovery is not None and recovery.recovered_from == "down"
    listed = orjson.loads((await run_cronfleet(settings, "flips", "@scheduler", "--json")).stdout)
    assert [row["to_state"] for row in listed] == ["up", "down"]


async def test_a_heartbeat_only_fleet_needs_no_scheduler(
    settings: Settings, store: Store, fleet: Start
) -> None:
    await apply_toml(store, '[jobs.outside]\nschedule = "@daily"\n')
    await fleet("monitor")
    await eventually(lambda: component_is(store, "@dead-letters", "up"))
    record = await eventually(lambda: component(store, "@scheduler"))
    assert record.state == "new" and record.detail == "no enabled job has an action"
    assert (await run_cronfleet(settings, "status")).returncode == 0


async def test_a_trigger_waiting_in_a_pool_with_no_worker_makes_the_pool_down_until_a_worker_comes(
    settings: Settings, store: Store, fleet: Start
) -> None:
    await apply_toml(store, ACTION_JOB)
    await fleet("monitor", "scheduler")
    await eventually(lambda: component_is(store, "@pool:default", "up"))
    assert (await run_cronfleet(settings, "trigger", "nightly")).returncode == 0

    down = await eventually(lambda: component_is(store, "@pool:default", "down"))
    assert down.count == 1 and down.detail == "1 waiting, 0 consumer(s)"
    assert (await run_cronfleet(settings, "status")).returncode == 1

    await fleet("worker")
    await eventually(lambda: component_is(store, "@pool:default", "up"))
    assert await flips_of(store, "@pool:default") == [("new", "up"), ("up", "down"), ("down", "up")]
    await eventually(lambda: runs_of(store, "nightly", status="succeeded"))


async def test_a_worker_killed_mid_run_goes_down_and_its_run_becomes_lost(
    settings: Settings, store: Store, fleet: Start, tmp_path: Path
) -> None:
    await apply_toml(
        store,
        """
        [jobs.slow]
        schedule = "0 0 1 1 *"
        timeout_seconds = 60
        action = { type = "shell", argv = ["sleep", "30"] }
        """,
    )
    await fleet("monitor")
    worker = worker_process(settings)
    try:
        assert (await run_cronfleet(settings, "trigger", "slow")).returncode == 0
        [run] = await eventually(lambda: runs_of(store, "slow", status="running"), timeout=30)
        assert run.worker is not None
        await eventually(lambda: component_is(store, f"@worker:{run.worker}", "up"))
        worker.send_signal(signal.SIGKILL)
        await asyncio.to_thread(worker.wait, 30)
    finally:
        if worker.poll() is None:
            worker.kill()

    [lost] = await eventually(lambda: runs_of(store, "slow", status="lost"), timeout=30)
    assert lost.run_id == run.run_id and lost.finished_at is not None
    assert lost.error is not None and "stopped sending heartbeats" in lost.error
    key = f"@worker:{run.worker}"
    assert await flips_of(store, key) == [("new", "up"), ("up", "down")]
    async with store.session() as session:
        [flip] = (
            await session.execute(select(FlipRow).where(FlipRow.job == key, FlipRow.to_state == "down"))
        ).scalars()
        health = await session.get(JobHealthRow, "slow")
    assert "1 run(s) of it marked lost" in flip.reason
    # The lost run is fed to the job's health: no longer running.
    assert health is not None and health.run_id is None
    status = orjson.loads((await run_cronfleet(settings, "status", "--json")).stdout)
    assert {row["component"]: row["state"] for row in status["fleet"]}[key] == "down"


async def test_a_dead_lettered_message_raises_the_dead_letters_alarm(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection
) -> None:
    await fleet("monitor")
    await eventually(lambda: component_is(store, "@dead-letters", "up"))
    channel = await amqp.channel()
    exchange = await channel.get_exchange(Topology(settings.namespace).events_exchange)
    # Not signed: the monitor refuses it to the dead-letter queue.
    await exchange.publish(
        aio_pika.Message(b'{"v": 1, "type": "job.heartbeat"}'), routing_key="job.heartbeat.x"
    )

    down = await eventually(lambda: component_is(store, "@dead-letters", "down"))
    assert down.count == 1
    assert await flips_of(store, "@dead-letters") == [("new", "up"), ("up", "down")]
    assert (await run_cronfleet(settings, "status")).returncode == 1


async def _start_held_run(store: Store) -> RunStarted:
    """Job ``held`` with run ``r1`` recorded running on worker ``w1`` since now."""
    await apply_toml(
        store, '[jobs.held]\nschedule = "@daily"\naction = { type = "shell", argv = ["true"] }\n'
    )
    t0 = utcnow()
    started = RunStarted(
        run_id="r1",
        trigger_id="held@x",
        job="held",
        pool="default",
        worker="w1",
        scheduled_at=t0,
        started_at=t0,
    )
    async with store.session() as session, session.begin():
        await record_batch(session, [started], t0)
    return started


async def _watching_w1_up(
    settings: Settings, store: Store, amqp: AbstractRobustConnection, t0: datetime
) -> FleetWatch:
    """A fleet watch that has seen the broker since before ``t0`` and worker ``w1`` up at ``t0``."""
    watch = _watch(settings, store, amqp)
    watch.clock = lambda: t0
    await watch.look(t0 - timedelta(seconds=10))
    watch.note(WorkerHeartbeat(worker="w1", pool="default", at=t0, concurrency=1, running=1))
    await watch.look(t0)
    return watch


def _watch(settings: Settings, store: Store, amqp: AbstractRobustConnection) -> FleetWatch:
    return FleetWatch(
        store, amqp, Topology(settings.namespace), fleet_policy(settings), settings.heartbeat_seconds
    )


async def test_two_monitors_flip_a_worker_once_and_a_late_finish_recorded_over_lost_heals_the_job(
    settings: Settings, store: Store, amqp: AbstractRobustConnection
) -> None:
    policy = fleet_policy(settings)
    started = await _start_held_run(store)
    t0 = started.started_at
    beat = WorkerHeartbeat(worker="w1", pool="default", at=t0, concurrency=1, running=1)
    watches = [_watch(settings, store, amqp) for _ in range(2)]
    for watch in watches:
        watch.clock = lambda: t0
        await watch.look(t0 - timedelta(seconds=10))  # each monitor sees the broker from then on
        watch.note(beat)
        await watch.look(t0)
    after = t0 + policy.heartbeat_timeout + timedelta(seconds=1)
    for watch in watches:
        await watch.look(after)  # the first marks w1 down and its run lost; the second, nothing
    later = after + timedelta(seconds=1)
    await asyncio.gather(*(watch.look(later) for watch in watches))

    assert await flips_of(store, "@worker:w1") == [("new", "up"), ("up", "down")]
    [lost] = await runs_of(store, "held")
    assert lost.status == "lost" and lost.finished_at == after
    async with store.session() as session:
        health = await session.get(JobHealthRow, "held")
    assert health is not None and health.state == "failing" and health.run_id is None

    # The worker did finish after all (its event was late): that is what the run did.
    finished = RunFinished(
        **started.model_dump(exclude={"type"}),
        finished_at=t0 + timedelta(seconds=2),
        duration_seconds=2.0,
        status=RunStatus.SUCCEEDED,
    )
    for _ in range(2):  # and a redelivery of it changes nothing more
        async with store.session() as session, session.begin():
            await record_batch(session, [finished], later)
    [run] = await runs_of(store, "held")
    assert run.status == "succeeded" and run.finished_at == t0 + timedelta(seconds=2)
    async with store.session() as session:
        health = await session.get(JobHealthRow, "held")
    # The loss was the job's only failure, and its run did succeed: the job is up again, told as
    # a recovery (it was left failing, until its next run, after an alert that was not true).
    assert health is not None and health.state == "up" and health.lost_run_id is None
    assert await flips_of(store, "held") == [("new", "running"), ("running", "failing"), ("failing", "up")]


async def test_a_run_that_ends_while_its_silent_worker_s_runs_are_marked_lost_keeps_its_real_end(
    settings: Settings, store: Store, amqp: AbstractRobustConnection
) -> None:
    """The fleet watch read a silent worker's ``running`` runs, then wrote ``lost`` over each by
    its id: a ``run.finished`` the recorder committed in between was overwritten, and the fire
    ended ``lost`` though it had succeeded, with nothing left to deliver it again (its trigger
    was acked). Measured in tests/chaos/test_fleet_across_hosts.py under load: 8 fires of a cut
    worker, whose ends the monitor was still recording as it judged the worker silent."""
    if store.dialect != "postgresql":
        pytest.skip("SQLite has one writer at a time: the watch reads the run after the end is kept")
    started = await _start_held_run(store)
    t0 = started.started_at
    watch = await _watching_w1_up(settings, store, amqp, t0)
    finished = RunFinished(
        **started.model_dump(exclude={"type"}),
        finished_at=t0 + timedelta(seconds=1),
        duration_seconds=1.0,
        status=RunStatus.SUCCEEDED,
    )
    after = t0 + fleet_policy(settings).heartbeat_timeout + timedelta(seconds=1)
    async with store.session() as recording, recording.begin():
        # The run's end is written, not yet committed, when the watch judges its worker silent.
        await record_batch(recording, [finished], after)
        judging = asyncio.create_task(watch.look(after))
        await eventually(lambda: _waiting_for_a_lock(store), timeout=30, every=0.05)
    await judging

    [run] = await runs_of(store, "held")
    assert (run.status, run.finished_at) == ("succeeded", t0 + timedelta(seconds=1))
    assert await flips_of(store, "@worker:w1") == [("new", "up"), ("up", "down")]


async def _waiting_for_a_lock(store: Store) -> bool:
    async with store.engine.connect() as connection:
        return bool(await connection.scalar(text("SELECT count(*) FROM pg_locks WHERE NOT granted")))


async def test_a_run_recorded_after_its_worker_was_judged_gone_does_not_stay_running(
    settings: Settings, store: Store, amqp: AbstractRobustConnection
) -> None:
    """A ``run.started`` recorded once its worker was already down, or forgotten (a late event):
    nothing judged that worker again, and the run stayed ``running`` for good. It is marked lost
    at the next look, like the runs the worker held when it went down."""
    policy = fleet_policy(settings)
    started = await _start_held_run(store)
    t0 = started.started_at
    watch = await _watching_w1_up(settings, store, amqp, t0)
    after = t0 + policy.heartbeat_timeout + timedelta(seconds=1)
    await watch.look(after)  # w1 down, r1 lost
    assert await flips_of(store, "@worker:w1") == [("new", "up"), ("up", "down")]

    async def start(run_id: str, worker: str) -> None:
        late = started.model_copy(update={"run_id": run_id, "trigger_id": f"held@{run_id}", "worker": worker})
        async with store.session() as session, session.begin():
            await record_batch(session, [late], after)

    await start("r2", "w1")  # w1 is down
    await start("r3", "w9")  # never heard of, and its run began long ago
    await watch.look(after + timedelta(seconds=1))
    statuses = {run.run_id: run.status for run in await runs_of(store, "held")}
    assert statuses == {"r1": "lost", "r2": "lost", "r3": "lost"}
    # No new flip for w1 (already down), none for a worker never heard of: each run's job is told.
    assert await flips_of(store, "@worker:w1") == [("new", "up"), ("up", "down")]
    assert await flips_of(store, "@worker:w9") == []
