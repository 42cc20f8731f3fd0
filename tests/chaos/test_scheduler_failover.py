"""Schedulers killed with SIGKILL, again and again, lose no fire and repeat none unflagged.

Measured before: a scheduler killed while its claims were unpublished left them for 30 s (its
restarted self had a new name), and the takeover published fires the broker had already
confirmed: 22 of 2,120 fires ran twice, unflagged. Now a dead claimer's fires are taken over
within about 4 s (``common.fires.STALE_CLAIM_SECONDS``), a restarted scheduler adopts its dead
predecessors' fires at once, and a trigger published twice runs once (the worker records the
repeat as ``duplicate``).
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import time
from datetime import UTC, datetime

from sqlalchemy import select

from common.services import local_prefix
from common.settings import Settings
from common.store import FireRow, Store
from tests.conftest import Counts, Start
from tests.fleet import declare_pool, eventually, scheduler_process, stop_processes
from tests.integration.helpers import FireTally, apply_toml, due_fires, every_second_jobs, trigger_runs
from worker.actions import RunContext
from worker.functions import job_function

JOBS = 20
KILLS = 6
# A fire counts as late when its run started more than this after it was due: the goal,
# reported in the counts line, not asserted. On this 2-core machine, with the rest of the suite
# beside it, 80 to 160 of about 300 fires were later than that in 2 of 4 suite runs on
# 2026-11-28 (and in 3 copies of this test run side by side); alone or two side by side, none,
# the latest 3.2 to 3.3 s.
LATE_SECONDS = 5.0
# What is asserted: no run starts this late. A dead claimer's fires waited 30 s before the
# takeover (``common.fires.STALE_CLAIM_SECONDS`` is now 3 s): that comes back as a failure here.
BROKEN_TAKEOVER_SECONDS = 20.0


@job_function
def tick(run: RunContext) -> None:
    """The jobs' action: nothing (the test measures the schedulers, not the actions)."""


def _claimer(store_rows: list[tuple[str, datetime]], processes: dict[str, subprocess.Popen[bytes]]) -> str:
    """The running scheduler that claimed a fire most recently (the one whose death hurts most)."""
    for claimed_by, _at in sorted(store_rows, key=lambda row: row[1], reverse=True):
        if claimed_by in processes:
            return claimed_by
    return random.choice(list(processes))


async def _recent_claims(store: Store) -> list[tuple[str, datetime]]:
    async with store.session() as session:
        rows = await session.execute(
            select(FireRow.claimed_by, FireRow.claimed_at).order_by(FireRow.claimed_at.desc()).limit(50)
        )
        return [(str(by), at) for by, at in rows]


def _name_of(process: subprocess.Popen[bytes]) -> str:
    """The scheduler's default name, as it claims fires (``common.services``)."""
    return f"{local_prefix('scheduler')}{process.pid}"


async def test_three_schedulers_killed_at_random_lose_and_repeat_nothing_unflagged(
    settings: Settings, store: Store, fleet: Start, counts: Counts
) -> None:
    jobs = every_second_jobs("every-second", JOBS, "tests.chaos.test_scheduler_failover:tick", 60)
    await apply_toml(store, jobs)
    await declare_pool(settings, "default")
    await fleet("monitor", "worker", concurrency=32)
    processes = {_name_of(p): p for p in (scheduler_process(settings) for _ in range(3))}
    killed: list[str] = []
    try:
        # The window opens once the schedulers fire: fires due while none had started yet are
        # not theirs to lose (they are a fleet's start, and its misfire policy's).
        await eventually(lambda: _published(store), timeout=60)
        began = datetime.now(UTC)
        for _ in range(KILLS):
            await asyncio.sleep(random.uniform(1.5, 3.0))
            victim = _claimer(await _recent_claims(store), processes)
            processes.pop(victim).send_signal(signal.SIGKILL)
            killed.append(victim)
            fresh = scheduler_process(settings)
            processes[_name_of(fresh)] = fresh
        ended = datetime.now(UTC)
        # Every fire due in the window has had time to be taken over, published and run.
        deadline = time.monotonic() + 30
        due = due_fires("every-second", JOBS, began, ended)
        while True:
            runs = await trigger_runs(store, [fire_id for fire_id, _at in due])
            executed = {t for t, status, _started in runs if status != "duplicate"}
            if all(fire_id in executed for fire_id, _at in due) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    finally:
        await stop_processes(processes.values())

    tally = FireTally.of(due, runs)
    lag = {
        fire_id: (tally.started[fire_id] - at).total_seconds()
        for fire_id, at in due
        if fire_id in tally.started
    }
    late = [fire_id for fire_id, seconds in lag.items() if seconds > LATE_SECONDS]
    broken = [fire_id for fire_id, seconds in lag.items() if seconds > BROKEN_TAKEOVER_SECONDS]
    counts(
        f"scheduler failover: {len(killed)} SIGKILLs of the latest claimer, {len(due)} fires due "
        f"({JOBS} jobs every second); missing {len(tally.missing)}, late (> {LATE_SECONDS:g} s) "
        f"{len(late)}, latest {max(lag.values(), default=0):.1f} s; run twice unflagged "
        f"{len(tally.unflagged)}; repeats flagged as duplicate {sum(tally.flagged.values())}"
    )
    assert len(killed) == KILLS
    assert tally.missing == [], f"fires never run: {tally.missing[:5]}"
    assert tally.unflagged == [], f"fires run twice without a duplicate flag: {tally.unflagged[:5]}"
    assert broken == [], f"runs started more than {BROKEN_TAKEOVER_SECONDS:g} s late: {broken[:5]}"


async def _published(store: Store) -> bool:
    async with store.session() as session:
        return (
            await session.scalar(select(FireRow.trigger_id).where(FireRow.published_at.is_not(None)).limit(1))
        ) is not None
