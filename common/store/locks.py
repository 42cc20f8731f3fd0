"""Which database a session talks to, and SQLite's one write lock taken at a chosen moment."""

from __future__ import annotations

from typing import cast

from sqlalchemy import Table, update
from sqlalchemy.ext.asyncio import AsyncSession

from common.store.models import JobStateRow

_STATES = cast(Table, JobStateRow.__table__)


def dialect_of(session: AsyncSession) -> str:
    """The name of the database ``session`` is bound to: ``sqlite`` or ``postgresql``."""
    return session.get_bind().dialect.name


async def take_sqlite_write_lock(session: AsyncSession) -> None:
    """Take SQLite's write lock now, held until the transaction ends: what the transaction reads
    from here on, no other writer changes before it commits. (An UPDATE that matches nothing
    takes the lock as any write does.)"""
    await session.execute(update(_STATES).where(_STATES.c.job == "").values(job=_STATES.c.job))
