"""Trigger claims: each trigger id is executed once by the whole fleet while it is valid.

Before a worker runs a trigger it claims the trigger id in the store. The first claim wins; the
claim carries a lease its worker renews while the job runs, and, once the run is over, the
run's ``run.finished`` event. Whoever else receives the same trigger (a replay, a duplicate
publish, a redelivery after a lost channel) learns from the claim what to do:

- ``RUN``: nobody had it: run the job.
- ``TAKEN_OVER``: its worker died mid-run (the lease ran out unfinished): run it again, as a
  redelivery.
- ``HELD``: another run of it is in progress: wait, then ask again.
- ``DUPLICATE``: it was run already: do not run it; report the repeat (and the finished event
  again, in case its first report was lost).
- ``CONFLICT``: the id was claimed with another body: a forgery or a bug, refused.

A finished attempt that calls for a retry records, once the broker confirmed it, that the retry
was published (``retry_published``); a repeat of the attempt publishes it only when it was not
and the worker that ended the attempt stopped renewing the claim (``take_retry``), so one failed
attempt is followed by one retry message however often it is delivered.

A retry is claimed under its own key (``common.retries.claim_key``: ``<trigger id>#<attempt>``),
so that it runs as a new attempt while a repeat of the same attempt is still a duplicate; it runs
only if the previous attempt's claim ended in a failure that may be retried (``ended``).

The runs of a job whose overlap policy is ``skip`` or ``queue`` (``exclusive``) also take the
job's lease (``take_lease``), a row of the same table keyed ``exclusive:<job>``: while one run
holds it no other run of the job starts, on any worker; a lease its worker stopped renewing for
its ttl is free again.

Leases are compared with each worker's own clock: clocks across hosts must agree to well within
the lease (``CRONFLEET_CLAIM_LEASE_SECONDS``, 30 s by default).
"""

from __future__ import annotations

import enum
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any, cast

import orjson
from sqlalchemy import Table, delete, select, update

from common.batching import Batcher
from common.bounds import LATEST_INSTANT
from common.errors import StoreUnavailable
from common.messages import RunStatus
from common.store import STORE_OUTAGES, Store, TriggerClaimRow, bulk, dialect_insert
from common.store.chunks import IN_LIST_CHUNK, chunks


class ClaimOutcome(enum.Enum):
    """What a worker may do with a trigger it received (see the module's docstring)."""

    RUN = "run"
    TAKEN_OVER = "taken_over"
    HELD = "held"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class Claim:
    """The answer to a claim: the outcome, and the run that holds (or held) the trigger."""

    outcome: ClaimOutcome
    run_id: str
    worker: str
    finished_event: str | None = None
    # When the holder took it (given with TAKEN_OVER: when the lost run began, near enough).
    claimed_at: datetime | None = None


_CLAIMS = cast(Table, TriggerClaimRow.__table__)
# A finished claim is written to the row its run holds: by trigger id and run id. Its lease is
# renewed as it is: it is now the finishing worker's time to publish the retry the end may call
# for (``take_retry``).
_FINISH_KEY = ("trigger_id", "run_id")


def _write_now(
    claims: list[dict[str, object]], finishes: list[dict[str, object]], connection: sqlite3.Connection
) -> set[Any]:
    """``TriggerClaims._write_many``'s statements on a SQLite connection of one's own: the trigger
    ids of the new claims that went in."""
    inserted = bulk.insert_new_rows_now(connection, _CLAIMS, "trigger_id", "run_id", claims)
    bulk.update_rows_now(connection, _CLAIMS, _FINISH_KEY, finishes)
    return inserted


class RetryTurn(enum.Enum):
    """Who publishes the retry a finished attempt calls for, asked by a repeat of that attempt."""

    PUBLISH = "publish"  # the caller: nobody published it and nobody alive is publishing it
    PUBLISHED = "published"  # done already (or the claim is gone): nothing to publish
    BUSY = "busy"  # the worker that ended the attempt may be publishing it now: ask again


@dataclass(frozen=True)
class TriggerClaims:
    """The claims of one worker: ``worker`` names it, ``lease`` is how long a claim it does not
    renew stays its own."""

    store: Store
    worker: str
    lease: timedelta
    # New claims and finished ones, written together: one transaction for the runs that start
    # and end while the previous one is being written.
    _writes: Batcher[tuple[bool, dict[str, object]], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_writes", Batcher(self._write_many))

    async def claim(
        self, trigger_id: str, body_sha256: str, run_id: str, expires_at: datetime, now: datetime
    ) -> Claim:
        """Claim ``trigger_id`` for ``run_id`` unless another run has it; never both.

        Raises StoreUnavailable when the store cannot answer (the trigger is then neither run nor
        dropped: the caller hands it back to the broker).
        """
        row = {
            "trigger_id": trigger_id,
            "body_sha256": body_sha256,
            "run_id": run_id,
            "worker": self.worker,
            "claimed_at": now,
            "lease_until": now + self.lease,
            "trigger_expires_at": expires_at,
        }
        # The common case, nobody had it: inserted together with the claims made meanwhile.
        if await self._writes.submit((True, row)):
            return Claim(ClaimOutcome.RUN, run_id, self.worker)
        try:
            async with self.store.session() as session, session.begin():
                inserted = await session.execute(
                    dialect_insert(self.store.dialect, TriggerClaimRow)
                    .values(row)
                    .on_conflict_do_nothing(index_elements=["trigger_id"])
                )
                if _rowcount(inserted) == 1:
                    return Claim(ClaimOutcome.RUN, run_id, self.worker)
                held = await session.get(TriggerClaimRow, trigger_id, populate_existing=True)
                if held is None:  # deleted by retention between the two statements
                    return Claim(ClaimOutcome.HELD, "", "")
                holder = Claim(ClaimOutcome.HELD, held.run_id, held.worker, held.finished_event)
                if held.body_sha256 != body_sha256:
                    return Claim(ClaimOutcome.CONFLICT, held.run_id, held.worker)
                if held.finished_at is not None:
                    return Claim(ClaimOutcome.DUPLICATE, held.run_id, held.worker, held.finished_event)
                if held.lease_until > now:
                    return holder
                # The holder stopped renewing: take over, unless someone else just did. (What the
                # lost run was is read first: the UPDATE refreshes ``held`` in the session.)
                lost = Claim(ClaimOutcome.TAKEN_OVER, held.run_id, held.worker, claimed_at=held.claimed_at)
                taken = await session.execute(
                    update(TriggerClaimRow)
                    .where(
                        TriggerClaimRow.trigger_id == trigger_id,
                        TriggerClaimRow.run_id == held.run_id,
                        TriggerClaimRow.finished_at.is_(None),
                    )
                    .values(run_id=run_id, worker=self.worker, claimed_at=now, lease_until=now + self.lease)
                )
                if _rowcount(taken) == 1:
                    return lost
                return holder
        except STORE_OUTAGES as exc:
            raise _unavailable(self.store, "claim", trigger_id, exc) from exc

    async def renew(self, trigger_ids: Iterable[str], now: datetime) -> None:
        """Extend the lease of this worker's unfinished claims among ``trigger_ids``.

        Rows are locked in trigger id order, as ``_write_many`` locks them, so that the two
        rarely deadlock; when PostgreSQL rolls one back all the same, it is a StoreUnavailable."""
        try:
            async with self.store.session() as session, session.begin():
                for chunk in chunks(sorted(set(trigger_ids)), IN_LIST_CHUNK):
                    await session.execute(
                        update(TriggerClaimRow)
                        .where(
                            TriggerClaimRow.trigger_id.in_(chunk),
                            TriggerClaimRow.worker == self.worker,
                            TriggerClaimRow.finished_at.is_(None),
                        )
                        .values(lease_until=now + self.lease)
                    )
        except STORE_OUTAGES as exc:
            raise _unavailable(self.store, "renew the claims of", f"{self.worker}'s runs", exc) from exc

    async def finish(self, trigger_id: str, run_id: str, finished_event: str, now: datetime) -> None:
        """Mark ``run_id``'s claim on ``trigger_id`` finished, keeping its ``run.finished`` body.

        The runs that end while one such write is under way are written together in the next
        (``common.batching``): one transaction for many, not one each. Raises StoreUnavailable."""
        await self._writes.submit(
            (
                False,
                {
                    "trigger_id": trigger_id,
                    "run_id": run_id,
                    "finished_at": now,
                    "finished_event": finished_event,
                    "lease_until": now + self.lease,
                },
            )
        )

    async def retry_published(self, trigger_id: str, now: datetime) -> None:
        """Record that the retry the finished claim on ``trigger_id`` called for was confirmed
        published, so that no repeat of the attempt publishes it again. Raises StoreUnavailable."""
        try:
            async with self.store.session() as session, session.begin():
                await session.execute(
                    update(TriggerClaimRow)
                    .where(TriggerClaimRow.trigger_id == trigger_id)
                    .values(retry_published_at=now)
                )
        except STORE_OUTAGES as exc:
            raise _unavailable(self.store, "record the retry of", trigger_id, exc) from exc

    async def take_retry(self, trigger_id: str, now: datetime) -> RetryTurn:
        """Whether the caller (handling a repeat of a finished attempt) is the one to publish the
        retry its end called for: only when it is not published and the lease the end renewed
        has run out (the worker that ended it died before it published); then the lease is the
        caller's, so that of many repeats one publishes. Raises StoreUnavailable."""
        try:
            async with self.store.session() as session, session.begin():
                taken = await session.execute(
                    update(TriggerClaimRow)
                    .where(
                        TriggerClaimRow.trigger_id == trigger_id,
                        TriggerClaimRow.finished_at.is_not(None),
                        TriggerClaimRow.retry_published_at.is_(None),
                        TriggerClaimRow.lease_until <= now,
                    )
                    .values(lease_until=now + self.lease)
                )
                if _rowcount(taken) == 1:
                    return RetryTurn.PUBLISH
                row = await session.get(TriggerClaimRow, trigger_id, populate_existing=True)
                if row is None or row.retry_published_at is not None:
                    return RetryTurn.PUBLISHED
                return RetryTurn.BUSY
        except STORE_OUTAGES as exc:
            raise _unavailable(self.store, "read the retry of", trigger_id, exc) from exc

    async def _write_many(self, writes: list[tuple[bool, dict[str, object]]]) -> list[bool]:
        """Write new claims (``(True, row)``) and finished ones (``(False, row)``) in one
        transaction; for each, whether it went in (a new claim: of two rows for one trigger id,
        the first; a finished one: always True)."""
        # In trigger id order, the order ``renew`` locks them in: two writers of the same rows
        # that take them in the same order wait for each other instead of deadlocking.
        claims = sorted((row for is_claim, row in writes if is_claim), key=lambda row: str(row["trigger_id"]))
        finishes = sorted(
            (row for is_claim, row in writes if not is_claim), key=lambda row: str(row["trigger_id"])
        )
        # In the driver's terms (``common.store.bulk``): a worker writes two rows a run. On a
        # SQLite file, the transaction is one call on the writer's thread
        # (``common.store.sqlite_writer``), not a hand-over to aiosqlite's a statement.
        writer = self.store.sqlite_writer()
        try:
            if writer is not None:
                inserted = await writer.transaction(partial(_write_now, claims, finishes))
            else:
                async with self.store.session() as session, session.begin():
                    inserted = await bulk.insert_new_rows(session, _CLAIMS, "trigger_id", "run_id", claims)
                    await bulk.update_rows(session, _CLAIMS, _FINISH_KEY, finishes)
        except STORE_OUTAGES as exc:
            first = claims[0]["trigger_id"] if claims else finishes[0]["trigger_id"]
            what = f"{len(claims)} claim(s) and {len(finishes)} end(s) of runs, {first} first"
            raise _unavailable(self.store, "write", what, exc) from exc
        won = []
        for is_claim, row in writes:
            if not is_claim:
                won.append(True)
                continue
            key = str(row["trigger_id"])
            won.append(key in inserted)
            inserted.discard(key)
        return won

    async def release(self, trigger_id: str, run_id: str) -> None:
        """Give up ``run_id``'s claim on ``trigger_id`` before its job started, so that the next
        delivery of the trigger runs it at once."""
        try:
            async with self.store.session() as session, session.begin():
                await session.execute(
                    delete(TriggerClaimRow).where(
                        TriggerClaimRow.trigger_id == trigger_id,
                        TriggerClaimRow.run_id == run_id,
                        TriggerClaimRow.finished_at.is_(None),
                    )
                )
        except STORE_OUTAGES as exc:
            raise _unavailable(self.store, "release the claim on", trigger_id, exc) from exc

    async def ended(self, key: str) -> tuple[RunStatus, datetime] | None:
        """How and when the run that held ``key`` ended (from its kept ``run.finished``); None when
        nobody claimed it, or its run has not ended."""
        try:
            async with self.store.session() as session:
                row = await session.get(TriggerClaimRow, key)
                if row is None or row.finished_at is None or row.finished_event is None:
                    return None
                status = RunStatus(orjson.loads(row.finished_event)["status"])
                return status, row.finished_at
        except STORE_OUTAGES as exc:
            raise _unavailable(self.store, "read the claim on", key, exc) from exc

    async def exists(self, key: str) -> bool:
        """Whether anyone claimed ``key`` (a retry already taken needs no second publish)."""
        try:
            async with self.store.session() as session:
                return await session.get(TriggerClaimRow, key) is not None
        except STORE_OUTAGES as exc:
            raise _unavailable(self.store, "read the claim on", key, exc) from exc

    async def take_lease(self, key: str, run_id: str, ttl: timedelta, now: datetime) -> Claim:
        """Take the lease ``key`` for ``run_id`` for ``ttl`` unless another run holds it: RUN when
        taken (TAKEN_OVER from a run whose worker stopped renewing it), else HELD naming the
        holder. Raises StoreUnavailable."""
        row = {
            "trigger_id": key,
            "body_sha256": "",
            "run_id": run_id,
            "worker": self.worker,
            "claimed_at": now,
            "lease_until": now + ttl,
            # Never purged by retention: the row is deleted when its run gives the lease back.
            "trigger_expires_at": LATEST_INSTANT,
        }
        try:
            async with self.store.session() as session, session.begin():
                inserted = await session.execute(
                    dialect_insert(self.store.dialect, TriggerClaimRow)
                    .values(row)
                    .on_conflict_do_nothing(index_elements=["trigger_id"])
                )
                if _rowcount(inserted) == 1:
                    return Claim(ClaimOutcome.RUN, run_id, self.worker)
                held = await session.get(TriggerClaimRow, key, populate_existing=True)
                if held is None:  # given back between the two statements
                    return Claim(ClaimOutcome.HELD, "", "")
                holder = Claim(ClaimOutcome.HELD, held.run_id, held.worker)
                if held.lease_until > now:
                    return holder
                taken = await session.execute(
                    update(TriggerClaimRow)
                    .where(TriggerClaimRow.trigger_id == key, TriggerClaimRow.run_id == held.run_id)
                    .values(run_id=run_id, worker=self.worker, claimed_at=now, lease_until=now + ttl)
                )
                if _rowcount(taken) == 1:
                    return Claim(ClaimOutcome.TAKEN_OVER, holder.run_id, holder.worker)
                return holder
        except STORE_OUTAGES as exc:
            raise _unavailable(self.store, "take the lease", key, exc) from exc

    async def renew_lease(self, key: str, run_id: str, ttl: timedelta, now: datetime) -> None:
        """Extend ``run_id``'s lease ``key`` by ``ttl`` from ``now`` (nothing if it lost it)."""
        try:
            async with self.store.session() as session, session.begin():
                await session.execute(
                    update(TriggerClaimRow)
                    .where(TriggerClaimRow.trigger_id == key, TriggerClaimRow.run_id == run_id)
                    .values(lease_until=now + ttl)
                )
        except STORE_OUTAGES as exc:
            raise _unavailable(self.store, "renew the lease", key, exc) from exc

    async def give_back(self, key: str, run_id: str) -> None:
        """End ``run_id``'s lease ``key`` (nothing if another run holds it now)."""
        try:
            async with self.store.session() as session, session.begin():
                await session.execute(
                    delete(TriggerClaimRow).where(
                        TriggerClaimRow.trigger_id == key, TriggerClaimRow.run_id == run_id
                    )
                )
        except STORE_OUTAGES as exc:
            raise _unavailable(self.store, "give back the lease", key, exc) from exc

    async def keep_trigger(self, key: str, run_id: str, body: bytes, envelope: str) -> None:
        """Keep, in ``run_id``'s claim on ``key``, the trigger's signed ``body`` and its
        ``envelope`` (signature headers and routing key, JSON): what ends the run should its worker
        die after the trigger was acked. Raises StoreUnavailable."""
        try:
            async with self.store.session() as session, session.begin():
                await session.execute(
                    update(TriggerClaimRow)
                    .where(TriggerClaimRow.trigger_id == key, TriggerClaimRow.run_id == run_id)
                    .values(trigger_body=body.decode("utf-8"), trigger_envelope=envelope)
                )
        except STORE_OUTAGES as exc:
            raise _unavailable(self.store, "keep the trigger of", key, exc) from exc

    async def lapsed(self, now: datetime, limit: int = 100) -> list[Lapsed]:
        """Unfinished claims that keep their trigger (acked when their run started) and whose
        worker stopped renewing them: runs lost with their worker, that nobody will redeliver."""
        try:
            async with self.store.session() as session:
                rows = await session.execute(
                    select(TriggerClaimRow)
                    .where(
                        TriggerClaimRow.finished_at.is_(None),
                        TriggerClaimRow.trigger_body.is_not(None),
                        TriggerClaimRow.lease_until < now,
                    )
                    .limit(limit)
                )
                return [
                    Lapsed(
                        row.trigger_id,
                        Claim(ClaimOutcome.TAKEN_OVER, row.run_id, row.worker, claimed_at=row.claimed_at),
                        (row.trigger_body or "").encode("utf-8"),
                        row.trigger_envelope or "{}",
                    )
                    for row in rows.scalars()
                ]
        except STORE_OUTAGES as exc:
            raise _unavailable(self.store, "look for lapsed claims of", "long runs", exc) from exc

    async def take_over(self, key: str, held_run_id: str, run_id: str, now: datetime) -> bool:
        """Take ``key``'s claim from ``held_run_id`` (whose worker stopped renewing it) for
        ``run_id``; False when another worker did first or it ended meanwhile."""
        try:
            async with self.store.session() as session, session.begin():
                taken = await session.execute(
                    update(TriggerClaimRow)
                    .where(
                        TriggerClaimRow.trigger_id == key,
                        TriggerClaimRow.run_id == held_run_id,
                        TriggerClaimRow.finished_at.is_(None),
                        TriggerClaimRow.lease_until < now,
                    )
                    .values(run_id=run_id, worker=self.worker, claimed_at=now, lease_until=now + self.lease)
                )
                return _rowcount(taken) == 1
        except STORE_OUTAGES as exc:
            raise _unavailable(self.store, "take over the claim on", key, exc) from exc


@dataclass(frozen=True)
class Lapsed:
    """A lapsed claim of a run whose trigger was acked: its key, who held it, the trigger kept."""

    key: str
    holder: Claim
    body: bytes
    envelope: str


def _rowcount(result: object) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


def _unavailable(store: Store, what: str, which: str, exc: BaseException) -> StoreUnavailable:
    reason = getattr(exc, "orig", None) or exc
    return StoreUnavailable(f"cannot {what} {which} in the store at {store.where}: {reason}")
