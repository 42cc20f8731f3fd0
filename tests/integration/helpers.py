"""Small helpers for integration tests: applying jobs and reading runs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from common.catalog import apply_jobs
from common.clock import utcnow
from common.jobs import JobSpec, parse_jobs
from common.messages import trigger_id
from common.store import FlipRow, JobStateRow, RunRow, Store


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


async def flips_of(store: Store, key: str) -> list[tuple[str, str]]:
    """(from, to) of the stored flips of ``key`` (a job, or a fleet component), oldest first."""
    async with store.session() as session:
        query = select(FlipRow).where(FlipRow.job == key).order_by(FlipRow.at, FlipRow.id)
        return [(flip.from_state, flip.to_state) for flip in (await session.execute(query)).scalars()]


async def state_of(store: Store, job: str) -> JobStateRow | None:
    """The monitor's current state of ``job``, read afresh."""
    async with store.session() as session:
        return await session.get(JobStateRow, job)


async def trigger_runs(store: Store, trigger_ids: list[str]) -> list[tuple[str, str, datetime]]:
    """The runs of these triggers, duplicates included: (trigger id, status, started_at)."""
    runs: list[tuple[str, str, datetime]] = []
    async with store.session() as session:
        for first in range(0, len(trigger_ids), 500):
            some = trigger_ids[first : first + 500]
            rows = await session.execute(
                select(RunRow.trigger_id, RunRow.status, RunRow.started_at).where(RunRow.trigger_id.in_(some))
            )
            runs.extend((str(t), str(status), at) for t, status, at in rows)
    return runs


def every_second_jobs(prefix: str, count: int, function: str, expires_after_seconds: int) -> str:
    """A jobs file of ``count`` jobs ``<prefix>-00``... firing every second, each calling the
    python ``function`` (``module:name``)."""
    return "\n".join(
        f"""
        [jobs.{prefix}-{i:02d}]
        schedule = "* * * * * *"
        expires_after_seconds = {expires_after_seconds}
        action = {{ type = "python", function = "{function}" }}
        """
        for i in range(count)
    )


def due_fires(prefix: str, count: int, began: datetime, ended: datetime) -> list[tuple[str, datetime]]:
    """(trigger id, instant) of every fire of ``every_second_jobs(prefix, count, ...)`` due after
    ``began`` and until ``ended`` (whole seconds)."""
    return [
        (trigger_id(f"{prefix}-{i:02d}", at), at)
        for second in range(int(began.timestamp()) + 1, int(ended.timestamp()) + 1)
        for at in [datetime.fromtimestamp(second, UTC)]
        for i in range(count)
    ]


@dataclass
class FireTally:
    """What became of fires that fell due, from their runs (``trigger_runs``)."""

    # Trigger id -> its runs that executed it (not flagged), and its runs flagged ``duplicate``.
    ran: Counter[str] = field(default_factory=Counter)
    flagged: Counter[str] = field(default_factory=Counter)
    # The due fires with no executing run, and the fires executed more than once.
    missing: list[str] = field(default_factory=list)
    unflagged: list[str] = field(default_factory=list)
    # Trigger id -> when its first executing run started.
    started: dict[str, datetime] = field(default_factory=dict)

    @classmethod
    def of(cls, due: list[tuple[str, datetime]], runs: list[tuple[str, str, datetime]]) -> FireTally:
        """The tally of the ``due`` fires (trigger id, instant) given their ``runs``."""
        tally = cls()
        for fire_id, status, at in runs:
            if status == "duplicate":
                tally.flagged[fire_id] += 1
                continue
            tally.ran[fire_id] += 1
            if fire_id not in tally.started or at < tally.started[fire_id]:
                tally.started[fire_id] = at
        tally.missing = [fire_id for fire_id, _at in due if tally.ran[fire_id] == 0]
        tally.unflagged = [fire_id for fire_id, n in tally.ran.items() if n > 1]
        return tally
