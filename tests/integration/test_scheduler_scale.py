"""More jobs than a statement may carry bind parameters (PostgreSQL: 32,767): they are applied,
the scheduler starts on them, and a burst of 10,000 fires due in the same second is claimed and
published, every one, on both stores.

The scheduler runs on a clock stopped at the apply's instant: the burst falls due once, however
long applying 33,000 jobs takes on a slow machine (on the wall clock, every second the apply took
was a further 10,000 fires due by the time the scheduler looked)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy import func, select

from common.catalog import apply_jobs
from common.clock import utcnow
from common.jobs import JobSpec
from common.publisher import Publisher
from common.settings import Settings
from common.store import FireRow, Store
from common.topology import Topology
from scheduler.service import Scheduler

JOBS = 33_000  # more than PostgreSQL's 32,767 bind parameters, one per job, would allow
BURST = 10_000  # of which fire every five seconds, all at the same instant
TICKING = 100  # and these every second, so that some fires are prepared ahead of their instant
ACTION = {"type": "shell", "argv": ["true"]}


def _specs(jobs: int, burst: int, ticking: int) -> list[JobSpec]:
    def jobs_of(prefix: str, schedule: str, count: int) -> list[JobSpec]:
        return [
            JobSpec.model_validate({"name": f"{prefix}-{i:05d}", "schedule": schedule, "action": ACTION})
            for i in range(count)
        ]

    return [
        *jobs_of("burst", "*/5 * * * * *", burst),
        *jobs_of("tick", "* * * * * *", ticking),
        *jobs_of("yearly", "0 0 1 1 *", jobs - burst - ticking),
    ]


@pytest.fixture
async def publisher(settings: Settings, amqp: AbstractRobustConnection) -> AsyncIterator[Publisher]:
    topology = Topology(settings.namespace)
    opened = await Publisher.open(amqp, topology, settings.keyring())
    await topology.declare_pool(opened.channel, "default")
    yield opened


async def test_more_jobs_than_a_statement_has_parameters_start_and_fire(
    settings: Settings, store: Store, publisher: Publisher, amqp: AbstractRobustConnection
) -> None:
    specs = _specs(JOBS, BURST, TICKING)
    now = utcnow().replace(microsecond=0)
    diff = await apply_jobs(store, specs, now)
    assert len(diff.added) == JOBS

    # Re-applying with one job changed touches that job alone.
    changed = [*specs[:-1], specs[-1].model_copy(update={"description": "changed"})]
    again = await apply_jobs(store, changed, now)
    assert again.changed == [specs[-1].name] and len(again.unchanged) == JOBS - 1

    scheduler = Scheduler(settings, store, publisher, "scheduler-scale", clock=lambda: now)
    await scheduler.reload()
    assert len(scheduler.planner) == JOBS

    # Every burst job falls due at the first instant after the apply whose second divides by 5.
    due = datetime.fromtimestamp(5 * (math.floor(now.timestamp()) // 5 + 1), UTC)
    won = await scheduler.fire_due(due + timedelta(milliseconds=500))
    assert won >= BURST

    async with store.session() as session:
        burst_fires = await session.scalar(
            select(func.count()).select_from(FireRow).where(FireRow.scheduled_at == due)
        )
        unpublished = await session.scalar(
            select(func.count())
            .select_from(FireRow)
            .where(FireRow.published_at.is_(None), FireRow.scheduled_at <= due)
        )
        # Fires due within a second after were prepared ahead: claimed as of their own instant
        # (no scheduler takes them for pending before then), not published yet.
        ahead = (
            await session.execute(
                select(FireRow.scheduled_at, FireRow.claimed_at).where(FireRow.published_at.is_(None))
            )
        ).all()
        # Each fire is marked with its own confirm's instant, not one instant for the burst.
        instants = await session.scalar(select(func.count(func.distinct(FireRow.published_at))))
    assert burst_fires == BURST + TICKING
    assert unpublished == 0
    assert ahead and all(scheduled > due and claimed == scheduled for scheduled, claimed in ahead)
    assert instants is not None and instants > 1

    channel = await amqp.channel()
    queue = await channel.declare_queue(Topology(settings.namespace).pool_queue("default"), passive=True)
    assert (queue.declaration_result.message_count or 0) == won
    await channel.close()
