"""The fires table as an outbox: claim a fire once, publish it, mark it published.

Any number of schedulers (or ``cronfleet trigger``) may try to claim the same (job, scheduled
time); the unique key lets exactly one win. A claimed fire not yet confirmed by the broker stays
pending and is published again until it expires.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import select, update

from common.bus import Publisher
from common.errors import BrokerUnavailable
from common.messages import Trigger
from common.store import FireRow, Store, dialect_insert

log = logging.getLogger("cronfleet.fires")


class PendingFire(NamedTuple):
    """A claimed fire as the outbox keeps it: the exact trigger body to publish."""

    trigger_id: str
    pool: str
    body: str


async def claim(
    store: Store, triggers: Sequence[Trigger], claimed_by: str, now: datetime
) -> list[PendingFire]:
    """Record each trigger's fire unless one exists for its (job, scheduled time).

    Returns the fires this call claimed, in order; the others were claimed before.
    """
    if not triggers:
        return []
    fires = [PendingFire(t.id, t.pool, t.to_bytes().decode()) for t in triggers]
    rows = [
        {
            "trigger_id": t.id,
            "job": t.job,
            "scheduled_at": t.scheduled_at,
            "expires_at": t.expires_at,
            "claimed_by": claimed_by,
            "claimed_at": now,
            "pool": t.pool,
            "manual": t.manual,
            "body": fire.body,
        }
        for t, fire in zip(triggers, fires, strict=True)
    ]
    statement = (
        dialect_insert(store.dialect, FireRow)
        .values(rows)
        .on_conflict_do_nothing()
        .returning(FireRow.trigger_id)
    )
    async with store.session() as session, session.begin():
        claimed = set((await session.execute(statement)).scalars())
    return [fire for fire in fires if fire.trigger_id in claimed]


async def publish(store: Store, publisher: Publisher, fires: Sequence[PendingFire], now: datetime) -> int:
    """Publish claimed fires with pipelined confirms.

    Marks the confirmed ones published and returns how many were. A fire the broker did not
    confirm stays pending for ``publish_pending``.
    """
    results = await asyncio.gather(
        *(publisher.trigger_body(f.body.encode(), f.pool, f.trigger_id) for f in fires),
        return_exceptions=True,
    )
    done = [fire.trigger_id for fire, result in zip(fires, results, strict=True) if result is None]
    for fire, result in zip(fires, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, BrokerUnavailable):
                raise result
            log.warning("trigger %s not published yet: %s", fire.trigger_id, result)
    if done:
        async with store.session() as session, session.begin():
            await session.execute(
                update(FireRow).where(FireRow.trigger_id.in_(done)).values(published_at=now)
            )
    return len(done)


async def publish_claimed(
    store: Store, publisher: Publisher, triggers: Sequence[Trigger], claimed_by: str, now: datetime
) -> list[PendingFire]:
    """Claim ``triggers`` and publish those this call won. Returns the ones it won."""
    won = await claim(store, triggers, claimed_by, now)
    await publish(store, publisher, won, now)
    return won


async def publish_pending(store: Store, publisher: Publisher, now: datetime, limit: int = 500) -> int:
    """Publish fires claimed but never confirmed (a broker outage, a crash) that have not expired.

    Returns how many were published now.
    """
    async with store.session() as session:
        rows = (
            await session.execute(
                select(FireRow.trigger_id, FireRow.pool, FireRow.body)
                .where(FireRow.published_at.is_(None), FireRow.expires_at > now)
                .order_by(FireRow.claimed_at)
                .limit(limit)
            )
        ).all()
    if not rows:
        return 0
    return await publish(store, publisher, [PendingFire(*row) for row in rows], now)
