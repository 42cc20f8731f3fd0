"""Interval schedules, jitter and the misfire policy against the real broker and both stores.

Time is driven through the scheduler's clock (``Scheduler(clock=...)``) and ``fire_due(now)``:
a scheduler "stopped for an hour" is one whose successor starts an hour of clock later, with
the store as the first one left it."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy import select

from common import fires
from common.catalog import apply_jobs
from common.clock import utcnow
from common.jitter import jitter_offset
from common.jobs import parse_jobs
from common.publisher import Publisher
from common.settings import Settings
from common.store import FireRow, JobRow, MissedFireRow, Store
from common.topology import Topology
from monitor.http.metrics import missed_fires
from scheduler.service import Scheduler
from tests.conftest import Start
from tests.fleet import eventually
from tests.integration.helpers import apply_toml, runs_of

ACTION = 'action = { type = "shell", argv = ["true"] }'


class Clock:
    """A scheduler's clock that says what the test sets."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


@pytest.fixture
async def publisher(settings: Settings, amqp: AbstractRobustConnection) -> AsyncIterator[Publisher]:
    topology = Topology(settings.namespace)
    opened = await Publisher.open(amqp, topology, settings.keyring())
    await topology.declare_pool(opened.channel, "default")
    yield opened


def _aligned(every: int, before: datetime) -> datetime:
    """The last multiple of ``every`` seconds since the epoch at or before ``before``."""
    seconds = int(before.timestamp()) // every * every
    return datetime.fromtimestamp(seconds, UTC)


async def _fires(store: Store, job: str) -> list[FireRow]:
    async with store.session() as session:
        query = select(FireRow).where(FireRow.job == job).order_by(FireRow.scheduled_at)
        return list((await session.execute(query)).scalars())


async def _queued(amqp: AbstractRobustConnection, settings: Settings) -> list[dict[str, object]]:
    """The trigger bodies waiting in the default pool's queue, taken off it."""
    channel = await amqp.channel()
    queue = await channel.declare_queue(Topology(settings.namespace).pool_queue("default"), passive=True)
    bodies = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        bodies.append(json.loads(message.body))
    await channel.close()
    return bodies


async def _next_fire_at(store: Store, job: str) -> datetime | None:
    async with store.session() as session:
        return await session.scalar(select(JobRow.next_fire_at).where(JobRow.name == job))


@pytest.mark.both_stores
async def test_an_every_job_with_jitter_runs_at_its_instants_plus_their_offsets(
    store: Store, fleet: Start
) -> None:
    await apply_toml(
        store,
        f"""
        [jobs.spread]
        every = "2s"
        jitter = "1s"
        {ACTION}
        """,
    )
    await fleet("monitor", "worker", "scheduler")

    async def three_succeeded() -> list[object]:
        runs = await runs_of(store, "spread", status="succeeded")
        return runs if len(runs) >= 3 else []

    runs = await eventually(three_succeeded)
    for run in runs:
        assert run.scheduled_at is not None
        # The nominal instant, a multiple of 2 s since the epoch, names the trigger...
        assert run.scheduled_at.timestamp() % 2 == 0
        assert run.trigger_id == f"spread@{run.scheduled_at.strftime('%Y-%m-%dT%H:%M:%SZ')}"
        # ...and the run starts no earlier than the instant plus its stable offset.
        assert run.started_at >= run.scheduled_at + jitter_offset("spread", run.scheduled_at, 1)
    trigger_ids = [r.trigger_id for r in await runs_of(store, "spread")]
    assert len(trigger_ids) == len(set(trigger_ids))


async def test_two_schedulers_and_a_restarted_one_agree_on_an_interval_jobs_instants(
    settings: Settings, store: Store, publisher: Publisher, amqp: AbstractRobustConnection
) -> None:
    specs = parse_jobs(f'[jobs.tick]\nevery = "45s"\n{ACTION}\n')
    start = _aligned(45, utcnow()) - timedelta(seconds=44)  # just after an instant
    await apply_jobs(store, specs, start)
    first = start + timedelta(seconds=44)
    assert await _next_fire_at(store, "tick") == first
    one = Scheduler(settings, store, publisher, "scheduler-one", Clock(start))
    two = Scheduler(settings, store, publisher, "scheduler-two", Clock(start + timedelta(seconds=3)))
    for scheduler in (one, two):
        await scheduler.reload()
        assert scheduler.next_fire_at() == first
    won = 0
    for index, instant in enumerate([first, first + timedelta(seconds=45), first + timedelta(seconds=90)]):
        for offset, scheduler in ((0.001, one), (0.2, two)):
            now = instant + timedelta(seconds=offset)
            assert isinstance(scheduler.clock, Clock)
            scheduler.clock.at = now
            won += await scheduler.fire_due(now)
        assert won == index + 1  # the claim lets one of the two win each instant
    fires = await _fires(store, "tick")
    assert [f.trigger_id for f in fires] == [
        f"tick@{(first + timedelta(seconds=45 * i)).strftime('%Y-%m-%dT%H:%M:%SZ')}" for i in range(3)
    ]
    # A scheduler started afterwards plans the stored next instant, the same one.
    later = Scheduler(settings, store, publisher, "scheduler-three", Clock(first + timedelta(seconds=91)))
    await later.reload()
    assert later.next_fire_at() == first + timedelta(seconds=135)
    assert len(await _queued(amqp, settings)) == 3


async def test_a_jittered_fire_goes_out_at_its_offset_with_its_nominal_trigger_id(
    settings: Settings, store: Store, publisher: Publisher, amqp: AbstractRobustConnection
) -> None:
    specs = parse_jobs(f'[jobs.spread]\nevery = "1m"\njitter = "50s"\n{ACTION}\n')
    start = _aligned(60, utcnow())
    await apply_jobs(store, specs, start)
    nominal = start + timedelta(minutes=1)
    out = specs[0].publish_at(nominal)
    assert nominal < out < nominal + timedelta(seconds=50)
    clock = Clock(start)
    scheduler = Scheduler(settings, store, publisher, "scheduler-jitter", clock)
    await scheduler.reload()
    # Planned from the store by its nominal instant; its spec read then, it waits for its offset.
    for now in (nominal, out - timedelta(milliseconds=1)):
        clock.at = now
        assert await scheduler.fire_due(now) == 0
        assert scheduler.next_fire_at() == out
    clock.at = out
    assert await scheduler.fire_due(out) == 1
    [fire] = await _fires(store, "spread")
    assert fire.trigger_id == f"spread@{nominal.strftime('%Y-%m-%dT%H:%M:%SZ')}"
    assert fire.scheduled_at == nominal and fire.claimed_at == out and fire.due_at == out
    [body] = await _queued(amqp, settings)
    assert body["id"] == fire.trigger_id
    assert body["scheduled_at"] == nominal.strftime("%Y-%m-%dT%H:%M:%SZ")
    expires = datetime.fromisoformat(str(body["expires_at"]).replace("Z", "+00:00"))
    assert expires == out + timedelta(seconds=specs[0].expires_after_seconds)
    # The next one goes out at its own offset.
    following = nominal + timedelta(minutes=1)
    assert scheduler.next_fire_at() == specs[0].publish_at(following)
    assert await _next_fire_at(store, "spread") == following


# (policy, fields, fires sent after an hour down, of the 360 instants missed)
POLICIES = [
    ("skip", 'misfire = "skip"', 0),
    ("once", "", 1),  # the default
    ("all", 'misfire = "all"\ncatchup = "5m"', 30),
]


@pytest.mark.parametrize(("policy", "fields", "sent"), POLICIES, ids=[p[0] for p in POLICIES])
async def test_after_an_hour_down_the_missed_fires_follow_the_misfire_policy_and_are_recorded(
    settings: Settings,
    store: Store,
    publisher: Publisher,
    amqp: AbstractRobustConnection,
    caplog: pytest.LogCaptureFixture,
    policy: str,
    fields: str,
    sent: int,
) -> None:
    specs = parse_jobs(f'[jobs.ten]\nevery = "10s"\n{fields}\n{ACTION}\n')
    stopped = _aligned(10, utcnow()) - timedelta(hours=1)
    await apply_jobs(store, specs, stopped - timedelta(seconds=1))
    first = Scheduler(settings, store, publisher, "scheduler-before", Clock(stopped))
    await first.reload()
    assert await first.fire_due(stopped + timedelta(milliseconds=5)) == 1
    assert await _next_fire_at(store, "ten") == stopped + timedelta(seconds=10)

    # An hour (and 7 s) later, another scheduler starts on the store as the first one left it.
    back = stopped + timedelta(hours=1, seconds=7)
    second = Scheduler(settings, store, publisher, "scheduler-after", Clock(back))
    await second.reload()
    with caplog.at_level(logging.WARNING, logger="cronfleet.scheduler"):
        assert await second.fire_due(back) == sent
        assert await second.fire_due(back + timedelta(milliseconds=1)) == 0

    fires = await _fires(store, "ten")
    caught_up = [f.scheduled_at for f in fires[1:]]
    assert all(f.due_at == back for f in fires[1:])  # the fire lag counts from when they went out
    last = stopped + timedelta(hours=1)
    assert caught_up == [last - timedelta(seconds=10 * i) for i in reversed(range(sent))]
    async with store.session() as session:
        [missed] = (await session.execute(select(MissedFireRow))).scalars().all()
    assert (missed.job, missed.policy, missed.recorded_by) == ("ten", policy, "scheduler-after")
    assert missed.first_missed == stopped + timedelta(seconds=10) and missed.last_missed == last
    assert (missed.skipped, missed.caught_up, missed.counted_all) == (360 - sent, sent, True)
    async with store.session() as session:
        [family] = list(await missed_fires(session, back - timedelta(hours=1)))
    assert sorted((s.labels["outcome"], s.value) for s in family.samples) == [
        ("caught_up", sent),
        ("skipped", 360 - sent),
    ]
    # One line says it, with the counts; not a line per fire.
    lines = [r.getMessage() for r in caplog.records if "missed fires" in r.getMessage()]
    assert len(lines) == 1 and f"{360 - sent} fire(s) skipped, {sent} sent late" in lines[0]
    # Caught-up triggers expire counting from when they went out, not from their instant.
    bodies = await _queued(amqp, settings)
    assert len(bodies) == 1 + sent
    for body in bodies[1:]:
        expires = datetime.fromisoformat(str(body["expires_at"]).replace("Z", "+00:00"))
        assert expires == back + timedelta(seconds=specs[0].expires_after_seconds)
    # The job goes on from now, and a scheduler starting next does not settle the backlog again.
    assert second.next_fire_at() == last + timedelta(seconds=10)
    assert await _next_fire_at(store, "ten") == last + timedelta(seconds=10)


async def test_schedulers_starting_together_after_downtime_send_and_record_the_backlog_once(
    settings: Settings, store: Store, publisher: Publisher
) -> None:
    specs = parse_jobs(f'[jobs.ten]\nevery = "10s"\nmisfire = "all"\ncatchup = "1m"\n{ACTION}\n')
    stopped = _aligned(10, utcnow()) - timedelta(hours=2)
    await apply_jobs(store, specs, stopped)
    back = stopped + timedelta(hours=2, seconds=1)  # 7200 s: late (less than 5 s before the start)
    won = 0
    for index in range(3):
        scheduler = Scheduler(settings, store, publisher, f"scheduler-{index}", Clock(back))
        await scheduler.reload()
        won += await scheduler.fire_due(back + timedelta(milliseconds=index))
    assert won == 6  # the instants of the last minute (7150 s to 7200 s), each claimed once
    async with store.session() as session:
        rows = (await session.execute(select(MissedFireRow))).scalars().all()
    assert len(rows) == 1 and rows[0].skipped == 720 - 6


async def test_a_restart_of_a_few_seconds_sends_every_fire_late_and_records_nothing_missed(
    settings: Settings, store: Store, publisher: Publisher
) -> None:
    specs = parse_jobs(f'[jobs.second]\nevery = "1s"\nmisfire = "skip"\n{ACTION}\n')
    stopped = _aligned(1, utcnow()) - timedelta(minutes=1)
    await apply_jobs(store, specs, stopped - timedelta(milliseconds=500))
    first = Scheduler(settings, store, publisher, "scheduler-before", Clock(stopped))
    await first.reload()
    assert await first.fire_due(stopped + timedelta(milliseconds=5)) == 1
    back = stopped + timedelta(seconds=4, milliseconds=500)  # restarted 4.5 s later
    second = Scheduler(settings, store, publisher, "scheduler-after", Clock(back))
    await second.reload()
    # The first had prepared 1 s and 2 s ahead (claimed as of their instants) when it stopped:
    # the second sends 3 s and 4 s at once (late, not missed, even under skip) and takes the
    # first's over once they are stale, as any claim of a dead scheduler.
    assert await second.fire_due(back) == 2
    stale = back + timedelta(seconds=fires.STALE_CLAIM_SECONDS)
    assert await fires.publish_pending(store, publisher, second.name, stale, skip=second._ready_ids) == 2
    published = [f.scheduled_at - stopped for f in await _fires(store, "second") if f.published_at]
    assert published == [timedelta(seconds=s) for s in range(5)]
    async with store.session() as session:
        assert (await session.execute(select(MissedFireRow))).first() is None
