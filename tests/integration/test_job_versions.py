"""Jobs carry their next fire and a version: a reader learns what changed since the version it saw
(changes, removals, disabling) and nothing else, and a scheduler starts without parsing a spec."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy import select

from common.catalog import apply_jobs, read_job_changes, remove_job, save_job
from common.clock import utcnow
from common.jobs import JobSpec, parse_jobs
from common.publisher import Publisher
from common.settings import Settings
from common.store import JobRow, Store
from common.topology import Topology
from scheduler.service import Scheduler

JOBS = """
[jobs.minutely]
schedule = "* * * * *"
action = { type = "shell", argv = ["true"] }

[jobs.daily]
schedule = "30 2 * * *"
timezone = "Europe/Berlin"
action = { type = "shell", argv = ["true"] }

[jobs.pinged]
schedule = "* * * * *"

[jobs.paused]
schedule = "* * * * *"
enabled = false
action = { type = "shell", argv = ["true"] }
"""


def _by_name(specs: list[JobSpec]) -> dict[str, JobSpec]:
    return {spec.name: spec for spec in specs}


async def test_apply_stores_next_fires_and_changes_are_read_since_a_version(store: Store) -> None:
    specs = _by_name(parse_jobs(JOBS))
    now = utcnow()
    await apply_jobs(store, list(specs.values()), now)
    first = await read_job_changes(store, None)
    planned = {name: when for name, when, _version in first.planned}
    assert set(planned) == {"minutely", "daily"}  # heartbeat-only and disabled jobs are not planned
    assert all(when is not None and now < when <= now + timedelta(days=1) for when in planned.values())

    # Nothing changed: nothing to read.
    await apply_jobs(store, list(specs.values()), utcnow())
    assert (await read_job_changes(store, first.version)).planned == []

    edited = {
        **specs,
        "daily": specs["daily"].model_copy(update={"schedule": "45 3 * * *"}),
        "minutely": specs["minutely"].model_copy(update={"enabled": False}),
    }
    del edited["pinged"]
    await apply_jobs(store, list(edited.values()), utcnow())
    changes = await read_job_changes(store, first.version)
    assert [name for name, _when, _version in changes.planned] == ["daily"]
    assert sorted(changes.unplanned) == ["minutely", "pinged"]
    assert changes.version > first.version

    # One job saved or removed on its own (the HTTP API) is read the same way.
    await save_job(store, specs["minutely"], utcnow())
    await remove_job(store, "daily")
    later = await read_job_changes(store, changes.version)
    assert [name for name, _when, _version in later.planned] == ["minutely"]
    assert later.unplanned == ["daily"]
    assert (await read_job_changes(store, later.version)).planned == []


@pytest.fixture
async def publisher(settings: Settings, amqp: AbstractRobustConnection) -> AsyncIterator[Publisher]:
    opened = await Publisher.open(amqp, Topology(settings.namespace), settings.keyring())
    yield opened


async def test_a_scheduler_starts_without_parsing_and_reloads_only_what_changed(
    settings: Settings, store: Store, publisher: Publisher
) -> None:
    specs = _by_name(parse_jobs(JOBS))
    await apply_jobs(store, list(specs.values()), utcnow())
    scheduler = Scheduler(settings, store, publisher, "scheduler-versions")
    await scheduler.reload()
    assert len(scheduler.planner) == 2
    assert scheduler.planner.specs_held == 0  # nothing falls due yet: no spec was read

    async with store.session() as session:
        stored = await session.scalar(select(JobRow.next_fire_at).where(JobRow.name == "minutely"))
    assert scheduler.planner.next_wakeup() == stored

    # A change is picked up by the next reload; a fire of a job is written back as its next.
    await apply_jobs(store, [specs["minutely"]], utcnow())
    await scheduler.reload()
    assert len(scheduler.planner) == 1
    assert stored is not None
    won = await scheduler.fire_due(stored + timedelta(milliseconds=1))
    assert won == 1
    async with store.session() as session:
        after = await session.scalar(select(JobRow.next_fire_at).where(JobRow.name == "minutely"))
    assert after == stored + timedelta(minutes=1)
