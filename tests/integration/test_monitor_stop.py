"""A monitor that is stopped (its task cancelled) ends, whatever it was doing.

aio-pika 10 / aiormq 7 sometimes swallow a cancellation: a task cancelled while it closes a
channel sees ``channel.close()`` return normally, as if nothing had been asked of it (measured
here: 37 of 300 cancellations at random moments of a channel's open, declare and close). The
monitor's drain check opens and closes a channel every 0.2 s until its timers start, so a
monitor stopped in that window used to carry on with its timers forever, and ``serve``'s task
group never ended: the hang of a whole test run after a test that started a monitor. Every loop
the monitor runs now checks, each turn, whether it was asked to stop
(``common.cancel.stop_if_cancelled``).

The 30 s bounds below only detect a stop that never ends; nothing here measures time.
"""

from __future__ import annotations

import asyncio

from common.store import Store
from monitor.deadlines import Deadlines
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
