"""The fleet rides out a broker restart: no fire is lost, none runs twice unflagged, consumers come
back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from common.clock import utcnow
from common.settings import Settings
from common.store import FireRow, RunRow, Store
from tests.chaos.conftest import PrivateBroker
from tests.conftest import TEST_KEYS
from tests.fleet import Fleet, eventually
from tests.integration.helpers import apply_toml, runs_of

OUTAGE_SECONDS = 4.0


@pytest.fixture
async def chaos_settings(private_broker: PrivateBroker, tmp_path: Path) -> Settings:
    return Settings(
        amqp_url=private_broker.url,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'cronfleet.db'}",
        keys=TEST_KEYS,
        namespace=f"chaos-{uuid.uuid4().hex[:8]}",
        heartbeat_seconds=0.5,
        jobs_reload_seconds=0.3,
        allow_commands="*",
    )


@pytest.fixture
async def chaos_store(chaos_settings: Settings) -> AsyncIterator[Store]:
    store = await Store.open(chaos_settings.database_url, upgrade=True)
    yield store
    await store.close()


async def test_a_broker_restart_loses_no_fire_and_repeats_none(
    private_broker: PrivateBroker, chaos_settings: Settings, chaos_store: Store
) -> None:
    await apply_toml(
        chaos_store,
        """
        [jobs.through-outage]
        schedule = "* * * * * *"
        action = { type = "shell", argv = ["true"] }
        """,
    )
    fleet = Fleet(chaos_settings)
    try:
        await fleet.start("monitor", "worker", "scheduler")

        async def two_runs() -> bool:
            return len(await runs_of(chaos_store, "through-outage", status="succeeded")) >= 2

        await eventually(two_runs)

        await asyncio.to_thread(private_broker.stop_app)
        outage_began = utcnow()
        await asyncio.sleep(OUTAGE_SECONDS)  # the outage itself: fires fall due while it lasts
        await asyncio.to_thread(private_broker.start_app)
        back = utcnow()

        async def runs_after_restart() -> bool:
            runs = await runs_of(chaos_store, "through-outage", status="succeeded")
            return sum(1 for r in runs if r.scheduled_at is not None and r.scheduled_at > back) >= 3

        await _eventually_or_report(runs_after_restart, chaos_store, back)

        # Every fire claimed so far, including those that fell due during the outage, ends
        # in exactly one recorded run. A fire whose publish the outage cut before its confirm is
        # published again, and its second delivery is recorded as a ``duplicate`` of the run:
        # a repeat said, not a second run.
        settled_before = utcnow()

        async def every_fire_has_one_run() -> bool:
            async with chaos_store.session() as session:
                fires = set(
                    (
                        await session.execute(
                            select(FireRow.trigger_id).where(FireRow.scheduled_at < settled_before)
                        )
                    ).scalars()
                )
                ended = (
                    await session.execute(
                        select(RunRow.trigger_id, RunRow.status).where(RunRow.status != "running")
                    )
                ).all()
            ran = [trigger for trigger, status in ended if status != "duplicate"]
            flagged = {trigger for trigger, status in ended if status == "duplicate"}
            return fires <= set(ran) and len(ran) == len(set(ran)) and flagged <= set(ran)

        await _eventually_or_report(every_fire_has_one_run, chaos_store, back)
        async with chaos_store.session() as session:
            during = (
                (
                    await session.execute(
                        select(FireRow.trigger_id).where(
                            FireRow.scheduled_at > outage_began, FireRow.scheduled_at < back
                        )
                    )
                )
                .scalars()
                .all()
            )
        assert len(during) >= OUTAGE_SECONDS - 1, "fires that fell due during the outage were claimed"
        ran = [r.trigger_id for r in await runs_of(chaos_store, "through-outage") if r.status != "duplicate"]
        assert len(ran) == len(set(ran)), "a trigger was run twice, the second not flagged as a duplicate"
    finally:
        await fleet.stop()


async def _eventually_or_report(check: Callable[[], Awaitable[bool]], store: Store, back: datetime) -> None:
    """``eventually(check)`` within 60 s; its failure says what the store holds: each fire's
    instant and publication, and each run's status, from a few seconds before the broker was back."""
    try:
        await eventually(check, timeout=60)
    except AssertionError as failure:
        since = back - timedelta(seconds=OUTAGE_SECONDS + 3)
        lines = [f"broker back at {back.isoformat()}"]
        async with store.session() as session:
            for title, table, columns in (
                ("fires", FireRow, ("trigger_id", "scheduled_at", "claimed_by", "published_at")),
                ("runs", RunRow, ("trigger_id", "status", "worker", "started_at")),
            ):
                recent = table.scheduled_at > since
                if table is RunRow:
                    recent = recent | (RunRow.status == "duplicate")
                query = select(*(getattr(table, c) for c in columns)).where(recent)
                rows = (await session.execute(query.order_by(table.scheduled_at))).all()
                lines += [f"{title} ({', '.join(columns)}):", *(f"  {row}" for row in rows)]
        raise AssertionError(f"{failure}\n" + "\n".join(lines)) from None
