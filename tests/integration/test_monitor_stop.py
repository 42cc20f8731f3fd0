"""A monitor that is stopped (its task cancelled) ends, whatever it was doing.

aio-pika 10 / aiormq 7 sometimes swallow a cancellation: a task cancelled while it closes a
channel sees ``channel.close()`` return normally, as if nothing had been asked of it (measured
here: 37 of 300 cancellations at random moments of a channel's open, declare and close). The
monitor's drain check opens and closes a channel every 0.2 s until its timers start, so a
monitor stopped in that window used to carry on with its timers forever, and ``serve``'s task
group never ended: the hang of a whole test run after a test that started a monitor. Every loop
the monitor runs now checks, each turn, whether it was asked to stop
(``common.cancel.stop_if_cancelled``). And a store transaction the monitor lets finish after it
was stopped (``monitor.health_store.whole``) gets a bounded time, not forever.

The 30 s bounds below only detect a stop that never ends; nothing here measures time.
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select, text

from common.clock import utcnow
from common.settings import Settings
from common.store import JobHealthRow, Store
from monitor.deadlines import Deadlines, tick
from monitor.health_store import whole
from tests.conftest import POSTGRES_URL
from tests.fleet import eventually
from tests.integration.helpers import apply_toml

STOP_BOUND = 30.0

A_JOB = """
[jobs.every]
schedule = "* * * * * *"
grace_seconds = 1
action = { type = "shell", argv = ["true"] }
"""


async def _stopped(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it to end; fail if it does not end, or ends otherwise than
    cancelled."""
    task.cancel()
    try:
        await asyncio.wait_for(asyncio.shield(task), STOP_BOUND)
    except TimeoutError:
        task.cancel()  # do not leave it running for the next test
        raise AssertionError(f"the task did not end within {STOP_BOUND}s of being cancelled") from None
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
        return
    raise AssertionError("the cancelled task returned instead of ending cancelled")


async def test_deadlines_stop_even_when_a_library_swallowed_the_cancellation(store: Store) -> None:
    await apply_toml(store, A_JOB)
    deadlines = Deadlines(store, reload_seconds=0.3)
    entered = asyncio.Event()

    async def started_swallowing_the_cancellation() -> None:
        # What aio-pika's channel.close() does now and then: return normally when cancelled.
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            return

    task = asyncio.create_task(deadlines.run_forever(started_swallowing_the_cancellation))
    await asyncio.wait_for(entered.wait(), STOP_BOUND)
    await _stopped(task)
    assert deadlines.ticks == 0  # it stopped before the timers started


@pytest.mark.skipif(not POSTGRES_URL, reason="a transaction waiting on a row lock needs PostgreSQL")
@pytest.mark.parametrize("settings", ["postgresql"], indirect=True)
async def test_a_stopped_monitor_does_not_wait_forever_for_a_transaction_stuck_on_a_lock(
    settings: Settings, store: Store
) -> None:
    await apply_toml(store, A_JOB)
    await tick(store, ["every"], utcnow())  # the job's health record exists
    async with store.session() as holder, holder.begin():
        # Another monitor holds the job's record, and does not let go while this one stops.
        locked = select(JobHealthRow).where(JobHealthRow.job == "every").with_for_update()
        await holder.execute(locked)
        ticking = asyncio.create_task(whole(tick(store, ["every"], utcnow())))
        await eventually(lambda: _waiting_on_a_lock(store))
        await _stopped(ticking)


async def _waiting_on_a_lock(store: Store) -> bool:
    async with store.session() as session:
        waiting = await session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query ILIKE '%job_health%'"
            )
        )
    return bool(waiting)
