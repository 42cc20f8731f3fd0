"""Fires prepared ahead: a scheduler claims each fire ``FIRE_AHEAD`` before its instant and only
publishes it at the instant. The claim counts from that instant (no scheduler takes it for
pending before then); a job paused, changed or removed before its instant has its prepared fire
withdrawn, never sent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy import select

from common import fires
from common.catalog import apply_jobs
from common.clock import utcnow
from common.jobs import JobSpec, parse_jobs
from common.publisher import Publisher
from common.settings import Settings
from common.store import FireRow, Store
from common.topology import Topology
from scheduler.service import FIRE_AHEAD, Scheduler

EVERY_SECOND = """
[jobs.tick]
schedule = "* * * * * *"
action = { type = "shell", argv = ["true"] }
"""


@pytest.fixture
async def publisher(settings: Settings, amqp: AbstractRobustConnection) -> AsyncIterator[Publisher]:
    opened = await Publisher.open(amqp, Topology(settings.namespace), settings.keyring())
    await Topology(settings.namespace).declare_pool(opened.channel, "default")
    yield opened


async def _fires(store: Store) -> list[FireRow]:
    async with store.session() as session:
        return list((await session.execute(select(FireRow).order_by(FireRow.scheduled_at))).scalars())


async def _prepared(settings: Settings, store: Store, publisher: Publisher) -> tuple[Scheduler, datetime]:
    """A scheduler that has prepared the next fire of ``tick``: it and that fire's instant."""
    await apply_jobs(store, parse_jobs(EVERY_SECOND), utcnow())
    scheduler = Scheduler(settings, store, publisher, "scheduler-ahead")
    await scheduler.reload()
    now = utcnow()
    assert await scheduler.prepare(now + FIRE_AHEAD, now) >= 1
    await scheduler.publish_ready(now)  # what was due already (the reload came late in a second)
    ahead = [row for row in await _fires(store) if row.published_at is None]
    assert ahead and all(row.claimed_at == row.scheduled_at > now for row in ahead)
    return scheduler, ahead[0].scheduled_at


async def test_a_prepared_fire_is_published_at_its_instant_and_pending_for_nobody_before(
    settings: Settings, store: Store, publisher: Publisher
) -> None:
    scheduler, instant = await _prepared(settings, store, publisher)
    just_before = instant - timedelta(milliseconds=1)

    # Before its instant it is nobody's pending fire: not another scheduler's to take...
    assert await fires.publish_pending(store, publisher, "another", just_before, stale_after=0) == 0
    # ...nor this one's own sweep's, nor is it published early.
    assert await fires.publish_pending(store, publisher, scheduler.name, just_before) == 0
    assert await scheduler.publish_ready(just_before) == 0

    assert await scheduler.publish_ready(instant) == 1
    published = next(row for row in await _fires(store) if row.scheduled_at == instant)
    assert published.published_at is not None


async def test_the_own_sweep_leaves_a_due_prepared_fire_to_its_scheduler(
    settings: Settings, store: Store, publisher: Publisher
) -> None:
    scheduler, instant = await _prepared(settings, store, publisher)
    # Due now, but held in memory for publish_ready: the sweep of the same scheduler skips it
    # (publishing it there too would send it twice).
    swept = await fires.publish_pending(store, publisher, scheduler.name, instant, skip=scheduler._ready_ids)
    assert swept == 0
    assert await scheduler.publish_ready(instant) == 1


async def test_a_dead_schedulers_prepared_fire_is_taken_over_once_it_is_stale(
    settings: Settings, store: Store, publisher: Publisher
) -> None:
    _scheduler, instant = await _prepared(settings, store, publisher)  # then it "dies"
    stale = timedelta(seconds=fires.STALE_CLAIM_SECONDS)
    assert await fires.publish_pending(store, publisher, "survivor", instant + stale / 2) == 0
    assert await fires.publish_pending(store, publisher, "survivor", instant + stale) >= 1
    taken = next(row for row in await _fires(store) if row.scheduled_at == instant)
    assert taken.claimed_by == "survivor" and taken.published_at is not None


@pytest.mark.parametrize("change", ["paused", "edited", "removed"])
async def test_a_prepared_fire_of_a_job_changed_before_its_instant_is_withdrawn(
    settings: Settings, store: Store, publisher: Publisher, change: str
) -> None:
    scheduler, instant = await _prepared(settings, store, publisher)
    tick = parse_jobs(EVERY_SECOND)[0]
    specs: list[JobSpec] = {
        "paused": [tick.model_copy(update={"enabled": False})],
        "edited": [tick.model_copy(update={"timeout_seconds": 7.0})],
        "removed": [],
    }[change]
    await apply_jobs(store, specs, utcnow())
    await scheduler.reload()

    rows = {row.scheduled_at: row for row in await _fires(store)}
    if change == "edited":
        # Withdrawn, then prepared again as the job now is when it next falls due.
        assert instant not in rows or rows[instant].published_at is not None
        now = utcnow()
        assert await scheduler.prepare(now + FIRE_AHEAD, now) >= 1
        waiting = [row for row in await _fires(store) if row.published_at is None]
        assert waiting and all('"timeout_seconds":7.0' in row.body for row in waiting)
    else:
        assert instant not in rows, "the fire of a job gone before its instant was kept"
        assert await scheduler.publish_ready(instant + timedelta(seconds=5)) == 0
