"""The fires table as an outbox: claim a fire once, publish it, mark it published.

Any number of schedulers (or ``cronfleet trigger``) may try to claim the same (job, scheduled
time); the unique key lets exactly one win. A claimed fire not yet confirmed by the broker stays
pending and is published again until it expires.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import NamedTuple, cast

from sqlalchemy import Table, and_, delete, or_, select, update

from common.clock import utcnow
from common.collector import collector_paused
from common.errors import BrokerUnavailable
from common.framing import FramedMessage
from common.messages import Trigger
from common.publisher import Publisher
from common.store import FireRow, Store, dialect_insert
from common.store.chunks import IN_LIST_CHUNK, chunks, rows_per_insert

log = logging.getLogger("cronfleet.fires")

_FIRES = cast(Table, FireRow.__table__)
# Fires published (their confirms awaited) at a time: a burst streams out in bounded batches,
# each written in one go (``Publisher.trigger_bodies``).
PUBLISH_BATCH = 5000

# A fire claimed this long ago and still unpublished is taken over by another scheduler: its
# claimer is presumably dead (a live one publishes within milliseconds, renews the claims of a
# long burst batch by batch, and retries an unconfirmed fire itself). With schedulers looking
# every ``PENDING_EVERY_SECONDS``, a SIGKILLed claimer's fires go out within about 4 s. A live
# claimer stalled longer than this has its fires published twice: each repeat carries the same
# trigger id, and the worker records it as a ``duplicate`` run, not a second execution.
STALE_CLAIM_SECONDS = 3.0
# How often a scheduler publishes fires that are pending (its own unconfirmed ones, stale ones).
PENDING_EVERY_SECONDS = 0.5


class PendingFire(NamedTuple):
    """A claimed fire as the outbox keeps it: the exact trigger body to publish."""

    trigger_id: str
    pool: str
    body: str


async def claim(
    store: Store,
    triggers: Sequence[Trigger],
    claimed_by: str,
    now: datetime,
    due_at: Mapping[str, datetime] | None = None,
) -> list[PendingFire]:
    """Record each trigger's fire unless one exists for its (job, scheduled time), with when it
    was meant to go out (``due_at`` by trigger id; its ``scheduled_at`` when not given).

    A fire is claimed as of ``now``, or as of when it is meant to go out when that is later (a
    fire prepared ahead, see ``scheduler.service``): it counts as pending, for
    ``publish_pending``, only from then. Returns the fires this call claimed, in order; the
    others were claimed before.
    """
    if not triggers:
        return []
    fires = [PendingFire(t.id, t.pool, t.to_bytes().decode()) for t in triggers]
    due = {t.id: (due_at or {}).get(t.id, t.scheduled_at) for t in triggers}
    rows = [
        {
            "trigger_id": t.id,
            "job": t.job,
            "scheduled_at": t.scheduled_at,
            "expires_at": t.expires_at,
            "claimed_by": claimed_by,
            "claimed_at": max(now, due[t.id]),
            "pool": t.pool,
            "manual": t.manual,
            "body": fire.body,
            "due_at": due[t.id],
        }
        for t, fire in zip(triggers, fires, strict=True)
    ]
    claimed: set[str] = set()
    # One cached statement, executed over bounded chunks of rows: SQLAlchemy sends each chunk as
    # multi-row INSERTs of at most its insertmanyvalues page (under the parameter limit), and
    # compiles the statement once rather than a new VALUES list per chunk.
    statement = dialect_insert(store.dialect, _FIRES).on_conflict_do_nothing().returning(_FIRES.c.trigger_id)
    async with store.session() as session, session.begin():
        for some in chunks(rows, rows_per_insert(len(rows[0]))):
            claimed.update((await session.execute(statement, list(some))).scalars())
    return [fire for fire in fires if fire.trigger_id in claimed]


async def publish(
    store: Store,
    publisher: Publisher,
    fires: Sequence[PendingFire],
    claimed_by: str | None = None,
    *,
    framed: Mapping[str, FramedMessage] | None = None,
) -> int:
    """Publish claimed fires with pipelined confirms, ``PUBLISH_BATCH`` in flight at a time.

    Marks each confirmed fire published at the moment its own confirm came back, batch by batch
    (the first fires of a burst are marked while later ones are still going out), and returns
    how many were. A fire the broker did not confirm stays pending for ``publish_pending``.
    With ``claimed_by``, the claims of each later batch are renewed before it goes out, so that
    a long burst is not taken for a dead claimer's (``STALE_CLAIM_SECONDS``). Fires in
    ``framed`` (by trigger id) go out as framed ahead (``Publisher.frame_triggers``); the
    others are signed and framed now.
    """
    framed = framed or {}
    done = 0
    began = time.monotonic()
    for batch in chunks(fires, PUBLISH_BATCH):
        # Claims are stale after STALE_CLAIM_SECONDS: a burst that has gone on for a third of it
        # renews the claims of each batch before sending it.
        if claimed_by is not None and time.monotonic() - began > STALE_CLAIM_SECONDS / 3:
            await _renew_claims(store, [fire.trigger_id for fire in batch], claimed_by)
        now = datetime.now(UTC)
        unframed = [(f.body.encode(), f.pool, f.trigger_id, now) for f in batch if f.trigger_id not in framed]
        fresh = iter(publisher.frame_triggers(unframed))
        messages = [framed[f.trigger_id] if f.trigger_id in framed else next(fresh) for f in batch]
        # A full collection (100 ms and more in a scheduler of thousands of jobs) must not fall
        # between the fires' instant and their write or their confirms: it runs once they are
        # confirmed (or failed), before the store is told.
        with collector_paused():
            results = await publisher.send_triggers(messages)
        # Fires confirmed together (one broker ack confirms many) share their instant: one
        # UPDATE per instant marks them, rather than one parameter set per fire.
        by_instant: dict[datetime, list[str]] = {}
        for fire, result in zip(batch, results, strict=True):
            if isinstance(result, datetime):
                by_instant.setdefault(result, []).append(fire.trigger_id)
        if by_instant:
            # Marked before anything else can fail: a confirmed fire left unmarked would be sent again.
            async with store.session() as session, session.begin():
                for instant, ids in by_instant.items():
                    for some in chunks(ids, IN_LIST_CHUNK):
                        await session.execute(
                            update(_FIRES).where(_FIRES.c.trigger_id.in_(some)).values(published_at=instant)
                        )
            done += sum(len(ids) for ids in by_instant.values())
        for fire, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, BrokerUnavailable):
                    raise result
                log.warning("trigger %s not published yet: %s", fire.trigger_id, result)
    return done


async def _renew_claims(store: Store, trigger_ids: Sequence[str], claimed_by: str) -> None:
    """Stamp ``claimed_by``'s unpublished claims of these fires as made now."""
    now = utcnow()
    async with store.session() as session, session.begin():
        for some in chunks(list(trigger_ids), IN_LIST_CHUNK):
            await session.execute(
                update(FireRow)
                .where(
                    FireRow.trigger_id.in_(some),
                    FireRow.claimed_by == claimed_by,
                    FireRow.published_at.is_(None),
                )
                .values(claimed_at=now)
            )


async def adopt_claims(store: Store, claimed_by: str, dead: Sequence[str], now: datetime) -> int:
    """Make the unpublished, unexpired fires claimed by ``dead`` (claimers known to have died,
    such as this host's earlier scheduler processes) ``claimed_by``'s own, so that its next
    ``publish_pending`` sends them at once instead of after ``STALE_CLAIM_SECONDS``. Returns how
    many it adopted."""
    if not dead:
        return 0
    adopt = (
        update(FireRow)
        .where(FireRow.claimed_by.in_(list(dead)), FireRow.published_at.is_(None), FireRow.expires_at > now)
        .values(claimed_by=claimed_by)
    )
    async with store.session() as session, session.begin():
        result = await session.execute(adopt)
    return int(getattr(result, "rowcount", 0) or 0)


async def pending_claimers(store: Store, prefix: str, now: datetime) -> list[str]:
    """The claimers whose names start with ``prefix`` that hold unpublished, unexpired fires."""
    query = (
        select(FireRow.claimed_by)
        .where(
            FireRow.claimed_by.startswith(prefix), FireRow.published_at.is_(None), FireRow.expires_at > now
        )
        .distinct()
    )
    async with store.session() as session:
        return [str(name) for name in (await session.execute(query)).scalars()]


async def publish_claimed(
    store: Store,
    publisher: Publisher,
    triggers: Sequence[Trigger],
    claimed_by: str,
    now: datetime,
    due_at: Mapping[str, datetime] | None = None,
) -> list[PendingFire]:
    """Claim ``triggers`` (see ``claim`` for ``due_at``) and publish those this call won.
    Returns the ones it won."""
    won = await claim(store, triggers, claimed_by, now, due_at)
    await publish(store, publisher, won, claimed_by)
    return won


async def publish_pending(
    store: Store,
    publisher: Publisher,
    claimed_by: str,
    now: datetime,
    *,
    stale_after: float = STALE_CLAIM_SECONDS,
    limit: int = 500,
    skip: Collection[str] = (),
) -> int:
    """Publish fires claimed but never confirmed (a broker outage, a crash) that have not expired.

    Takes over, atomically, the unpublished fires ``claimed_by`` claimed itself, and those another
    claimer left unpublished for ``stale_after`` seconds (it is presumably dead): two callers never
    take the same fire. The caller must not call this while it is publishing fires it claimed
    (the scheduler holds a lock), or those would be published twice. Returns how many were
    published now. Fires in ``skip`` (the caller's own, prepared ahead and about to be published
    by it) are left alone.
    """
    # Checked again by the UPDATE itself, so that of two concurrent callers only one takes a fire.
    # A fire claimed ahead of its time (claimed_at in the future) is not pending before then.
    takeable = and_(
        FireRow.published_at.is_(None),
        FireRow.expires_at > now,
        FireRow.claimed_at <= now,
        or_(FireRow.claimed_by == claimed_by, FireRow.claimed_at <= now - timedelta(seconds=stale_after)),
    )
    candidates = select(FireRow.trigger_id).where(takeable).order_by(FireRow.claimed_at).limit(limit)
    take = (
        update(FireRow)
        .where(FireRow.trigger_id.in_(candidates.scalar_subquery()), takeable)
        .values(claimed_by=claimed_by, claimed_at=now)
        .returning(FireRow.trigger_id, FireRow.pool, FireRow.body)
    )
    async with store.session() as session, session.begin():
        rows = (await session.execute(take)).all()
    taken = [PendingFire(*row) for row in rows if row.trigger_id not in skip]
    if not taken:
        return 0
    return await publish(store, publisher, taken, claimed_by)


async def withdraw(store: Store, trigger_ids: Sequence[str], claimed_by: str) -> int:
    """Delete ``claimed_by``'s claims of these fires that are not published yet (fires prepared
    ahead for a job that changed, was paused or removed before their time), so that they are
    never sent and may be claimed again. Returns how many were withdrawn."""
    withdrawn = 0
    async with store.session() as session, session.begin():
        for some in chunks(list(trigger_ids), IN_LIST_CHUNK):
            result = await session.execute(
                delete(FireRow).where(
                    FireRow.trigger_id.in_(some),
                    FireRow.claimed_by == claimed_by,
                    FireRow.published_at.is_(None),
                )
            )
            withdrawn += int(getattr(result, "rowcount", 0) or 0)
    return withdrawn
