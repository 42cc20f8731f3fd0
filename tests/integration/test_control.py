"""Job changes reach a running scheduler at once: ``jobs.changed`` on the control exchange.

Each scheduler here polls the store only every 60 s, so what it does within seconds of a change
it learned from the control message, not from its poll."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy import func, select

from common.clock import utcnow
from common.messages import JOBS_CHANGED_ROUTING_KEY, JobsChanged
from common.settings import Settings
from common.store import FireRow, Store
from common.topology import Topology
from tests.fleet import Fleet, eventually, run_cronfleet
from tests.integration.test_poison import DeadLetters

SLOW_POLL = 60.0


def _jobs_file(directory: Path, *, enabled: bool) -> Path:
    path = directory / "jobs.toml"
    path.write_text(
        f"""
[jobs.told]
schedule = "* * * * * *"
enabled = {"true" if enabled else "false"}
action = {{ type = "shell", argv = ["true"] }}
"""
    )
    return path


async def _fires_since(store: Store, since: object) -> int:
    async with store.session() as session:
        query = select(func.count()).select_from(FireRow).where(FireRow.job == "told")
        return int(await session.scalar(query.where(FireRow.scheduled_at > since)) or 0)


async def test_an_apply_reaches_a_running_scheduler_before_its_next_poll(
    settings: Settings, store: Store, tmp_path: Path
) -> None:
    slow = settings.model_copy(update={"jobs_reload_seconds": SLOW_POLL})
    fleet = Fleet(slow)
    try:
        await fleet.start("scheduler")
        applied = await run_cronfleet(slow, "apply", str(_jobs_file(tmp_path, enabled=True)))
        assert applied.returncode == 0, applied.stderr
        assert "not told" not in applied.stderr
        # A new every-second job fires long before the scheduler's next poll (60 s away).
        await eventually(lambda: _fires_since(store, utcnow() - timedelta(minutes=1)), timeout=15)

        # Paused (enabled = false) the same way: it stops firing, again well before a poll.
        paused = await run_cronfleet(slow, "apply", str(_jobs_file(tmp_path, enabled=False)))
        assert paused.returncode == 0, paused.stderr
        after = utcnow() + timedelta(seconds=3)

        async def stopped() -> bool:
            # No fire due more than 3 s after the pause, seen once 6 s have passed.
            return utcnow() > after + timedelta(seconds=3) and await _fires_since(store, after) == 0

        await eventually(stopped, timeout=20, every=0.5)
    finally:
        await fleet.stop()


async def test_a_forged_jobs_changed_is_dead_lettered_and_the_scheduler_goes_on(
    settings: Settings, store: Store, amqp: AbstractRobustConnection
) -> None:
    fleet = Fleet(settings.model_copy(update={"jobs_reload_seconds": SLOW_POLL}))
    try:
        await fleet.start("scheduler")
        channel = await amqp.channel()
        exchange = await channel.get_exchange(Topology(settings.namespace).control_exchange)
        body = JobsChanged(by="mallory", at=utcnow()).to_bytes()
        forged = {"cronfleet-key-id": "trigger-1", "cronfleet-signature": "0" * 64}
        await exchange.publish(aio_pika.Message(body, headers=forged), routing_key=JOBS_CHANGED_ROUTING_KEY)
        dead = await DeadLetters.open(amqp, settings)
        await dead.wait_for(1)
        assert set(dead.reasons()) <= {"bad_signature", "unknown_key"}
        assert dead.messages[0].body == body
        for task in fleet.tasks:
            assert not task.done()
    finally:
        await fleet.stop()
