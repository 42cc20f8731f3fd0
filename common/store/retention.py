"""Forgetting old history in small batches: runs, heartbeats, fires, trigger claims and alert
attempts past their age.

Each batch is its own short transaction (``PURGE_BATCH`` rows), so a purge never holds a long
lock and never builds a statement that grows with the data. What is kept: jobs, each job's
state, its health and its flips, leases, every run still running, and every fire not yet
published that has not expired.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, delete, select
from sqlalchemy.orm import InstrumentedAttribute

from common.store.chunks import PURGE_BATCH
from common.store.database import Store
from common.store.models import AlertAttemptRow, Base, FireRow, HeartbeatRow, RunRow, TriggerClaimRow


@dataclass(frozen=True)
class Purged:
    """How many rows of each table a purge removed."""

    runs: int = 0
    heartbeats: int = 0
    fires: int = 0
    claims: int = 0
    attempts: int = 0

    @property
    def total(self) -> int:
        """Rows removed in all."""
        return self.runs + self.heartbeats + self.fires + self.claims + self.attempts

    def __str__(self) -> str:
        return (
            f"{self.runs} run(s), {self.heartbeats} heartbeat(s), {self.fires} fire(s), "
            f"{self.claims} trigger claim(s) and {self.attempts} alert attempt(s)"
        )


async def purge(store: Store, older_than: timedelta, now: datetime, *, batch: int = PURGE_BATCH) -> Purged:
    """Delete finished runs, heartbeats, fires, trigger claims and alert attempts older than
    ``older_than`` before ``now``.

    A run counts from when it finished (a run still running is never purged), a heartbeat from
    its instant, a fire and a trigger claim from the trigger's expiry (an expired trigger is
    never published nor run again), an alert attempt from when it was made. Flips and health
    are kept.
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
