"""Forgetting old history in small batches: runs, heartbeats, fires, trigger claims, alert
attempts and routine flips past their age.

Each batch is its own short transaction (``PURGE_BATCH`` rows), so a purge never holds a long
lock and never builds a statement that grows with the data. What is kept: jobs, each job's
state and health, every flip someone was told about (an alarm, or the recovery from one), each
job's latest flip, leases, every run still running, and every fire not yet published that has
not expired.

A routine flip (``up`` to ``running`` and back, ``late``: two or three for every run of every
job) says no more than the run it came with, and goes with it: kept for good, they grew with
every run the fleet ever made, faster than the runs the purge keeps bounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, exists, select
from sqlalchemy.orm import InstrumentedAttribute, aliased

from common.store.chunks import PURGE_BATCH
from common.store.database import Store
from common.store.models import (
    AlertAttemptRow,
    Base,
    FireRow,
    FlipRow,
    HeartbeatRow,
    RunRow,
    TriggerClaimRow,
)


@dataclass(frozen=True)
class Purged:
    """How many rows of each table a purge removed."""

    runs: int = 0
    heartbeats: int = 0
    fires: int = 0
    claims: int = 0
    attempts: int = 0
    flips: int = 0

    @property
    def total(self) -> int:
        """Rows removed in all."""
        return self.runs + self.heartbeats + self.fires + self.claims + self.attempts + self.flips

    def __str__(self) -> str:
        return (
            f"{self.runs} run(s), {self.heartbeats} heartbeat(s), {self.fires} fire(s), "
            f"{self.claims} trigger claim(s), {self.attempts} alert attempt(s) and "
            f"{self.flips} routine flip(s)"
        )


async def purge(store: Store, older_than: timedelta, now: datetime, *, batch: int = PURGE_BATCH) -> Purged:
    """Delete finished runs, heartbeats, fires, trigger claims, alert attempts and routine flips
    older than ``older_than`` before ``now``.

    A run counts from when it finished (a run still running is never purged), a heartbeat from
    its instant, a fire and a trigger claim from the trigger's expiry (an expired trigger is
    never published nor run again), an alert attempt from when it was made, a flip from its
    instant. A flip someone was told about (its ``alert`` set: an alarm, or the recovery from
    one) and each job's latest flip are kept, whatever their age; so is health.
    """
    cutoff = now - older_than
    return Purged(
        runs=await _purge(store, RunRow, RunRow.run_id, RunRow.finished_at < cutoff, batch),
        heartbeats=await _purge(store, HeartbeatRow, HeartbeatRow.id, HeartbeatRow.at < cutoff, batch),
        fires=await _purge(store, FireRow, FireRow.trigger_id, FireRow.expires_at < cutoff, batch),
        claims=await _purge(
            store,
            TriggerClaimRow,
            TriggerClaimRow.trigger_id,
            TriggerClaimRow.trigger_expires_at < cutoff,
            batch,
        ),
        attempts=await _purge(store, AlertAttemptRow, AlertAttemptRow.id, AlertAttemptRow.at < cutoff, batch),
        flips=await _purge(store, FlipRow, FlipRow.id, _routine_flip_before(cutoff), batch),
    )


def _routine_flip_before(cutoff: datetime) -> ColumnElement[bool]:
    """A flip before ``cutoff`` that nobody was told about and that is not its job's latest (a
    later flip of the job exists): read through ``ix_flips_at``, the later one through
    ``ix_flips_job_at``."""
    later = aliased(FlipRow)
    return and_(
        FlipRow.at < cutoff,
        FlipRow.alert.is_(None),
        exists().where(later.job == FlipRow.job, later.at > FlipRow.at),
    )


async def _purge(
    store: Store, table: type[Base], key: InstrumentedAttribute[Any], old: ColumnElement[bool], batch: int
) -> int:
    """Delete the rows matching ``old``, ``batch`` keys per transaction, until none is left."""
    removed = 0
    while True:
        oldest = select(key).where(old).limit(batch).scalar_subquery()
        async with store.session() as session, session.begin():
            result = await session.execute(delete(table).where(key.in_(oldest)))
        count = int(getattr(result, "rowcount", 0) or 0)
        removed += count
        if count < batch:
            return removed
