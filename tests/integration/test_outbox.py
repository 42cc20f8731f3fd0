"""The fires outbox: a fire is claimed once, and a pending one is published once, by one taker."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy import select

from common import fires
from common.clock import utcnow
from common.jobs import parse_jobs
from common.publisher import Publisher
from common.services import dead_local_instances, local_prefix
from common.settings import Settings
from common.store import FireRow, Store
from common.topology import Topology

JOB = parse_jobs('[jobs.j]\nschedule = "* * * * * *"\naction = { type = "shell", argv = ["true"] }\n')[0]


@pytest.fixture
async def publisher(settings: Settings, amqp: AbstractRobustConnection) -> AsyncIterator[Publisher]:
    topology = Topology(settings.namespace)
    opened = await Publisher.open(amqp, topology, settings.keyring())
    await topology.declare_pool(opened.channel, "default")
    yield opened


async def _queued(amqp: AbstractRobustConnection, settings: Settings) -> int:
    channel = await amqp.channel()
    queue = await channel.declare_queue(Topology(settings.namespace).pool_queue("default"), passive=True)
    count = queue.declaration_result.message_count or 0
    await channel.close()
    return count


async def test_concurrent_claims_of_one_fire_have_one_winner(store: Store) -> None:
    now = utcnow()
    trigger = JOB.trigger_at(now, now)
    results = await asyncio.gather(*(fires.claim(store, [trigger], f"scheduler-{i}", now) for i in range(5)))
    assert sorted(len(won) for won in results) == [0, 0, 0, 0, 1]


async def test_pending_fires_are_taken_once_and_only_when_their_claimer_is_gone(
    settings: Settings, store: Store, publisher: Publisher, amqp: AbstractRobustConnection
) -> None:
    now = utcnow()
    claimed = await fires.claim(store, [JOB.trigger_at(now, now)], "scheduler-a", now)
    assert len(claimed) == 1  # claimed by A, which has not published it (yet)

    # B leaves a fresh claim of A's alone: A may be publishing it right now.
    assert await fires.publish_pending(store, publisher, "scheduler-b", now) == 0
    # A's own sweep publishes it.
    assert await fires.publish_pending(store, publisher, "scheduler-a", now) == 1
    assert await fires.publish_pending(store, publisher, "scheduler-a", now) == 0

    later = now + timedelta(seconds=1)
    await fires.claim(store, [JOB.trigger_at(later, later)], "scheduler-a", later)
    # A died with that fire unpublished: once the claim is stale, B and C race for it; one wins.
    stale = later + timedelta(seconds=fires.STALE_CLAIM_SECONDS + 1)
    taken = await asyncio.gather(
        fires.publish_pending(store, publisher, "scheduler-b", stale),
        fires.publish_pending(store, publisher, "scheduler-c", stale),
    )
    assert sorted(taken) == [0, 1]
    assert await _queued(amqp, settings) == 2
    async with store.session() as session:
        unpublished = (await session.execute(select(FireRow).where(FireRow.published_at.is_(None)))).all()
    assert unpublished == []


async def test_an_expired_pending_fire_is_not_published(
    settings: Settings, store: Store, publisher: Publisher, amqp: AbstractRobustConnection
) -> None:
    then = utcnow() - timedelta(hours=1)
    await fires.claim(store, [JOB.trigger_at(then, then)], "scheduler-a", then)
    assert await fires.publish_pending(store, publisher, "scheduler-a", utcnow()) == 0
    assert await _queued(amqp, settings) == 0


async def test_a_restarted_scheduler_adopts_its_dead_predecessors_fires_at_once(
    settings: Settings, store: Store, publisher: Publisher, amqp: AbstractRobustConnection
) -> None:
    # A scheduler of this host was killed between claiming a fire and publishing it: its
    # successor (a new pid, so a new name) sends it at once, not once the claim is stale.
    gone = await asyncio.create_subprocess_exec("true")
    await gone.wait()
    dead = f"{local_prefix('scheduler')}{gone.pid}"
    alive = f"{local_prefix('scheduler')}{os.getpid()}"
    other_host = "scheduler@another-host:1"
    now = utcnow()
    later = now + timedelta(seconds=1)
    await fires.claim(store, [JOB.trigger_at(now, now)], dead, now)
    await fires.claim(store, [JOB.trigger_at(later, later)], other_host, now)

    claimers = await fires.pending_claimers(store, local_prefix("scheduler"), now)
    assert claimers == [dead]
    assert dead_local_instances("scheduler", [*claimers, alive, other_host, "scheduler@x"]) == [dead]
    assert await fires.adopt_claims(store, "scheduler-new", [dead], now) == 1
    # Its own now: published on its first sweep; the other host's fresh claim is left alone.
    assert await fires.publish_pending(store, publisher, "scheduler-new", now) == 1
    assert await _queued(amqp, settings) == 1
