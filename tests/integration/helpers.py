"""Small helpers for integration tests: applying jobs and reading runs."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from common.catalog import apply_jobs
from common.clock import utcnow
from common.jobs import JobSpec, parse_jobs
from common.store import JobStateRow, RunRow, Store


async def apply_toml(store: Store, text: str) -> list[JobSpec]:
    """Apply the jobs of a TOML document to ``store``."""
    specs = parse_jobs(text)
    await apply_jobs(store, specs, utcnow())
    return specs


async def runs_of(store: Store, job: str, **where: Any) -> list[RunRow]:
    """The recorded runs of ``job`` (filtered by column values), oldest first."""
    query = select(RunRow).where(RunRow.job == job).order_by(RunRow.started_at)
    for column, value in where.items():
        query = query.where(getattr(RunRow, column) == value)
    async with store.session() as session:
        return list((await session.execute(query)).scalars())


async def state_of(store: Store, job: str) -> JobStateRow | None:
    """The monitor's current state of ``job``, read afresh."""
    async with store.session() as session:
        return await session.get(JobStateRow, job)
