"""The health machine's records and flips in the store: read them locked, advance them, write
what changed, in the caller's transaction.

Several monitors may advance the same job at once (one records its events while another's timer
ticks it). Each reads a job's record locked for its transaction, so a flip is computed once and
stored once: on PostgreSQL the rows are read ``FOR UPDATE``, in job order (two monitors never wait
on each other in a cycle); on SQLite the transaction takes the database's write lock before it
reads, so two monitors' read-advance-write never interleave.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any, TypeVar, cast

from sqlalchemy import Table, delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from common.jobs import JobSpec, spec_from_json
from common.store import FlipRow, JobHealthRow, JobRow, bulk, dialect_insert
from common.store.chunks import IN_LIST_CHUNK, chunks
from common.store.locks import dialect_of, take_sqlite_write_lock
from monitor.channels.policy import needs_alert
from monitor.health import (
    Flip,
    HealthInput,
    HealthPolicy,
    HealthRecord,
    State,
    Tick,
    advance,
    initial_record,
)

log = logging.getLogger("cronfleet.monitor")

T = TypeVar("T")

_HEALTH = cast(Table, JobHealthRow.__table__)
_FLIPS = cast(Table, FlipRow.__table__)


@dataclass(frozen=True)
class StoredSpec:
    """A job as stored: its spec (None when this cronfleet refuses it) and its fingerprint."""

    spec: JobSpec | None
    fingerprint: str


@dataclass(frozen=True)
class StoredHealth:
    """A job's health record and the fingerprint of the spec it follows."""

    record: HealthRecord
    fingerprint: str | None


@dataclass(frozen=True)
class JobFlip:
    """A flip of one job; ``id``: its row once stored. ``alert``: people are told about it
    (``needs_alert``): it was stored with its alert pending, held by the monitor that stored it
    for ``ALERT_LEASE``."""

    job: str
    flip: Flip
    id: int | None = None

    @property
    def alert(self) -> bool:
        """Whether this flip is alerted (an alarm, or the recovery from one)."""
        return needs_alert(self.flip)


@dataclass(frozen=True)
class PreparedTick:
    """A Tick of one job computed ahead of its deadline ``at`` (``prepare_ticks``): the record as
    read and its row's ``updated_at`` (its version), the fingerprint of the spec it was computed
    under, and the record and flips a Tick at ``at`` makes of it."""

    at: datetime
    before: StoredHealth
    updated_at: datetime
    spec_fingerprint: str
    after: StoredHealth
    flips: tuple[Flip, ...]
    # The columns ``after`` changes (``changed_columns``), computed ahead too.
    changes: dict[str, Any]


@dataclass
class Advanced:
    """What a transaction did to health: the deadline of every job it read (None: only an input
    can change that job now), and the flips it stored, in order."""

    deadlines: dict[str, datetime | None] = field(default_factory=dict)
    flips: list[JobFlip] = field(default_factory=list)


async def read_specs(session: AsyncSession, names: Collection[str]) -> dict[str, StoredSpec]:
    """The stored jobs among ``names``; a spec this cronfleet refuses (applied by an older, laxer
    one: ``cronfleet status`` and ``doctor`` name it) is there with ``spec`` None."""
    found: dict[str, StoredSpec] = {}
    # Every tick of a herd reads each job's spec: its fingerprint (a hash of the spec, written
    # with it) says whether the spec parsed last time is still the stored one, so only the specs
    # not seen before travel and are parsed.
    unseen: list[str] = []
    fingerprints = select(JobRow.name, JobRow.fingerprint)
    for some in chunks(sorted(names), IN_LIST_CHUNK):
        for name, fingerprint in await session.execute(fingerprints.where(JobRow.name.in_(some))):
            known = _specs.get((name, fingerprint))
            if known is None:
                unseen.append(name)
            else:
                found[name] = known
    query = select(JobRow.name, JobRow.spec, JobRow.fingerprint)
    for some in chunks(unseen, IN_LIST_CHUNK):
        for name, spec, fingerprint in await session.execute(query.where(JobRow.name.in_(some))):
            found[name] = stored = StoredSpec(_readable(spec), fingerprint)
            if len(_specs) >= _PARSED_LIMIT:
                _specs.clear()
            _specs[(name, fingerprint)] = stored
    return found


def policy_of(spec: JobSpec) -> HealthPolicy:
    """The machine's policy for a job: its ``failure_threshold`` failed runs in a row make it
    ``failing``."""
    return HealthPolicy(failures_before_failing=spec.failure_threshold)


# Parsed specs by their stored JSON text: a job's spec is parsed once, not in every batch that
# touches the job. A changed spec is another text, hence parsed anew; the bound keeps a fleet
# that changes its jobs all the time from growing it without end.
_PARSED_LIMIT = 65536
_parsed: dict[str, JobSpec | None] = {}
# The same by (job, fingerprint): what ``read_specs`` found last time for that version of a job.
_specs: dict[tuple[str, str], StoredSpec] = {}


def _readable(spec: str) -> JobSpec | None:
    """``spec`` parsed (None when this cronfleet refuses it), from the cache when seen before."""
    try:
        return _parsed[spec]
    except KeyError:
        pass
    try:
        parsed: JobSpec | None = spec_from_json(spec)
    except ValueError:
        parsed = None
    if len(_parsed) >= _PARSED_LIMIT:
        _parsed.clear()
    _parsed[spec] = parsed
    return parsed


async def prepare_ticks(
    session: AsyncSession, jobs: Collection[str], at: datetime
) -> dict[str, PreparedTick]:
    """What a Tick at ``at`` will make of each of ``jobs`` as stored now, read without a lock
    and written nowhere: ``HealthBatch.adopt`` writes it at ``at`` if the record and the spec
    are still the ones it was computed from. A job without a record or a readable spec, or
    that the machine cannot advance, is left out (its tick takes the usual way)."""
    specs = await read_specs(session, jobs)
    prepared: dict[str, PreparedTick] = {}
    query = select(_HEALTH)
    for some in chunks(sorted(job for job in jobs if job in specs), IN_LIST_CHUNK):
        for row in await session.execute(query.where(_HEALTH.c.job.in_(some))):
            stored, spec = _stored(row), specs[row.job].spec
            if spec is None:
                continue
            result = _safely(
                row.job,
                "prepare its tick",
                partial(advance, stored.record, Tick(), spec, at, policy_of(spec)),
            )
            if result is not None:
                record, flips = result
                after = StoredHealth(record, stored.fingerprint)
                prepared[row.job] = PreparedTick(
                    at,
                    stored,
                    row.updated_at,
                    specs[row.job].fingerprint,
                    after,
                    tuple(flips),
                    changed_columns(row.job, stored, after),
                )
    return prepared


class HealthBatch:
    """One transaction's health work: ``load`` the records of some jobs (locked, and created for
    jobs that have none), ``advance`` them, ``save`` what changed and the flips."""

    def __init__(self, session: AsyncSession, now: datetime) -> None:
        self.session = session
        self.now = now
        self.specs: dict[str, StoredSpec] = {}
        self.records: dict[str, StoredHealth] = {}
        self._loaded: dict[str, StoredHealth] = {}
        # What adopted ticks change, computed with them: valid while their record is unchanged.
        self._changes: dict[str, tuple[StoredHealth, dict[str, Any]]] = {}
        self._flips: list[JobFlip] = []

    async def load(self, jobs: Collection[str], specs: Mapping[str, StoredSpec]) -> None:
        """Read and lock the health of ``jobs``. A job with a readable spec and no record yet gets
        ``initial_record(spec, now)``, stored at once (no flip). A job that is not in ``specs``
        (unknown to the store) or whose spec is unreadable has no record here."""
        wanted = sorted(job for job in jobs if job in specs)
        self.specs.update({job: specs[job] for job in wanted})
        found = await self._lock(wanted)
        missing = {}
        for job in wanted:
            spec = specs[job].spec
            if job not in found and spec is not None:
                record = _safely(job, "create its health record", partial(initial_record, spec, self.now))
                if record is not None:
                    missing[job] = StoredHealth(record, specs[job].fingerprint)
        if missing:
            # Another monitor may create the same rows at the same moment: whichever is first
            # stays, and both then advance the stored one.
            insert = dialect_insert(dialect_of(self.session), _HEALTH).on_conflict_do_nothing()
            await self.session.execute(insert, [_values(job, h, self.now) for job, h in missing.items()])
            found.update(await self._lock(sorted(missing)))
        self._loaded.update(found)
        self.records.update(found)

    async def adopt(
        self, jobs: Collection[str], prepared: Mapping[str, PreparedTick], specs: Mapping[str, StoredSpec]
    ) -> set[str]:
        """Lock the records of ``jobs`` and take the prepared Tick of each whose record (its row's
        ``updated_at``) and spec (its fingerprint) are still those it was computed from, and
        that leaves no deadline at or before ``now``: as if loaded and advanced by a Tick, to be
        written by ``save``. Returns the jobs taken; the others are for ``load`` and ``advance``.
        Every record of ``jobs`` is locked here, in job order, before ``load`` locks any."""
        versions = await self._lock_versions(sorted(jobs))
        taken: set[str] = set()
        for job in jobs:
            ready, spec = prepared.get(job), specs.get(job)
            if ready is None or spec is None or ready.spec_fingerprint != spec.fingerprint:
                continue
            if versions.get(job) != ready.updated_at or ready.at > self.now:
                continue
            deadline = ready.after.record.deadline_at
            if deadline is not None and deadline <= self.now:
                continue  # another deadline has passed since: the machine must see it
            self.specs[job] = spec
            self._loaded[job] = ready.before
            self.records[job] = ready.after
            self._changes[job] = (ready.after, ready.changes)
            self._flips.extend(JobFlip(job, flip) for flip in ready.flips)
            taken.add(job)
        return taken

    async def _lock_versions(self, jobs: list[str]) -> dict[str, datetime]:
        """Lock the records of ``jobs`` (as ``_lock``) and read their ``updated_at``."""
        rows = await self._locked_rows((_HEALTH.c.job, _HEALTH.c.updated_at), jobs)
        return {job: at for job, at in rows}

    async def _lock(self, jobs: list[str]) -> dict[str, StoredHealth]:
        rows = await self._locked_rows(tuple(_HEALTH.c), jobs)
        return {row.job: _stored(row) for row in rows}

    async def _locked_rows(self, columns: Sequence[Any], jobs: list[str]) -> list[Any]:
        """``columns`` of the records of ``jobs``, locked until the transaction ends: on
        PostgreSQL ``FOR UPDATE`` in job order, on SQLite under the database's write lock."""
        if not jobs:
            return []
        postgresql = dialect_of(self.session) == "postgresql"
        if not postgresql:
            await take_sqlite_write_lock(self.session)
        rows: list[Any] = []
        for some in chunks(jobs, IN_LIST_CHUNK):
            query = select(*columns).where(_HEALTH.c.job.in_(some)).order_by(_HEALTH.c.job)
            if postgresql:
                query = query.with_for_update()
            rows.extend(await self.session.execute(query))
        return rows

    def advance(self, job: str, event: HealthInput, *, follow: bool = False) -> list[Flip]:
        """Feed ``event`` to ``job``'s record under its current spec; with ``follow``, the record
        follows that spec from now on (its fingerprint). Returns the flips. A job without a record
        or a readable spec is left alone; a machine error is logged and leaves the record as it
        was (its runs are still recorded)."""
        stored, spec = self.records.get(job), self.specs[job].spec if job in self.specs else None
        if stored is None or spec is None:
            return []
        result = _safely(
            job,
            f"advance its health with {type(event).__name__}",
            lambda: advance(stored.record, event, spec, self.now, policy_of(spec)),
        )
        if result is None:
            return []
        record, flips = result
        fingerprint = self.specs[job].fingerprint if follow else stored.fingerprint
        self.records[job] = StoredHealth(record, fingerprint)
        self._flips.extend(JobFlip(job, flip) for flip in flips)
        return flips

    async def save(self) -> Advanced:
        """Write every record that changed and append the flips; returns every loaded job's
        deadline and the flips."""
        # Each changed record writes only the columns that changed (and its key and
        # ``updated_at``); records that changed the same columns (a herd of jobs turning
        # ``down`` at once) share one statement.
        by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        changes = self._changes
        for job, stored in sorted(self.records.items()):
            loaded = self._loaded.get(job)
            if stored is loaded or stored == loaded:
                continue
            if loaded is None:
                values = _values(job, stored, self.now)
            else:
                known = changes.get(job)
                if known is not None and known[0] is stored:
                    values = dict(known[1])
                else:
                    values = changed_columns(job, loaded, stored)
                values["updated_at"] = self.now
            by_columns.setdefault(tuple(values), []).append(values)
        for rows in by_columns.values():
            await bulk.update_rows(self.session, _HEALTH, "job", rows)
        saved = await store_flips(self.session, self._flips, self.now)
        advanced = Advanced({job: stored.record.deadline_at for job, stored in self.records.items()}, saved)
        self._loaded.update(self.records)
        self._changes.clear()
        self._flips = []
        return advanced


async def store_flips(session: AsyncSession, flips: Sequence[JobFlip], now: datetime) -> list[JobFlip]:
    """Insert ``flips`` (of jobs or of the fleet) in order, each alerted one with its alert pending
    and held by this monitor (``monitor.alerts``); the flips with their ids, increasing in order."""
    if not flips:
        return []
    ids = await bulk.insert_rows_with_ids(session, _FLIPS, [_flip_values(f, now) for f in flips])
    return [replace(item, id=flip_id) for item, flip_id in zip(flips, ids, strict=True)]


# How long the monitor that stores a flip holds its pending alert before it must renew its hold;
# past it, another monitor may claim the alert (``monitor.alerts``).
ALERT_LEASE = timedelta(seconds=60)


# How long a cancelled ``whole`` lets its transaction finish before cancelling it too.
WHOLE_GRACE_SECONDS = 5.0


async def whole(transaction: Coroutine[Any, Any, T], grace: float = WHOLE_GRACE_SECONDS) -> T:
    """Run ``transaction`` to its end even if the caller is cancelled meanwhile; the cancellation
    is raised once it has ended. A transaction cut off inside the SQLite driver can leave the
    database's write lock held by a connection nobody closes, stalling every other writer (a
    monitor stopped and started again in the same process, as in the tests).

    The wait is bounded: a transaction that has not ended ``grace`` seconds after the caller was
    cancelled (waiting on a row another monitor holds, on a store that stopped answering) is
    cancelled in turn, and the caller's cancellation is raised at most ``grace`` seconds later
    whether or not the driver has let go by then, so a stopping monitor always ends."""
    task = asyncio.ensure_future(transaction)
    task.add_done_callback(_retrieve)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task}, timeout=grace)
        if not task.done():
            log.warning("a store transaction had not ended %gs after the monitor stopped; cancelled", grace)
            task.cancel()
            await asyncio.wait({task}, timeout=grace)
        raise


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark the outcome of ``whole``'s transaction as seen, whoever awaits it or not."""
    if not task.cancelled():
        task.exception()


def log_flips(advanced: Advanced) -> None:
    """Log each flip of a committed transaction, alarms as warnings."""
    for item in advanced.flips:
        flip = item.flip
        level = logging.WARNING if flip.alarm else logging.INFO
        log.log(
            level,
            "job %s: %s -> %s at %s (%s)",
            item.job,
            flip.from_state,
            flip.to_state,
            flip.at.isoformat(),
            flip.reason,
        )


async def load_deadlines(session: AsyncSession, until: datetime | None = None) -> list[tuple[str, datetime]]:
    """Every (job, deadline) stored, or those at or before ``until``; read through the deadline
    index, nothing else."""
    column = _HEALTH.c.deadline_at
    query = select(_HEALTH.c.job, column).where(column.is_not(None))
    if until is not None:
        query = query.where(column <= until)
    return [(job, at) for job, at in await session.execute(query)]


async def load_fingerprints(session: AsyncSession) -> dict[str, str | None]:
    """The fingerprint each stored health record follows, by job."""
    rows = await session.execute(select(_HEALTH.c.job, _HEALTH.c.fingerprint))
    return {job: fingerprint for job, fingerprint in rows}


async def forget(session: AsyncSession, jobs: Collection[str]) -> None:
    """Delete the health records of ``jobs`` (removed jobs); their flips stay as history."""
    for some in chunks(sorted(jobs), IN_LIST_CHUNK):
        await session.execute(delete(_HEALTH).where(_HEALTH.c.job.in_(some)))


def _safely(job: str, what: str, compute: Callable[[], T]) -> T | None:
    """``compute()``, or None when it raises: a bug or an edge the machine cannot handle for one
    job must never stop the monitor nor lose the events of other jobs."""
    try:
        return compute()
    except Exception:
        log.exception("cannot %s for job %s; left as it was", what, job)
        return None


def _stored(row: Any) -> StoredHealth:
    return StoredHealth(_record(row), row.fingerprint)


def _record(row: Any) -> HealthRecord:
    return HealthRecord(
        state=State(row.state),
        since=row.since,
        due_at=row.due_at,
        deadline_at=row.deadline_at,
        run_id=row.run_id,
        run_started_at=row.run_started_at,
        consecutive_failures=row.consecutive_failures,
        open_alarm=None if row.open_alarm is None else State(row.open_alarm),
        last_run_at=row.last_run_at,
        last_finished_at=row.last_finished_at,
        lost_run_id=row.lost_run_id,
    )


def changed_columns(job: str, before: StoredHealth, after: StoredHealth) -> dict[str, Any]:
    """The columns of ``job``'s row that differ from ``before`` to ``after``, with its key (and
    without ``updated_at``, which the write sets)."""
    old, new = _values(job, before, before.record.since), _values(job, after, before.record.since)
    return {k: v for k, v in new.items() if k == "job" or (k != "updated_at" and v != old[k])}


def _values(job: str, stored: StoredHealth, now: datetime) -> dict[str, Any]:
    record = stored.record
    return {
        "job": job,
        "state": record.state.value,
        "since": record.since,
        "due_at": record.due_at,
        "deadline_at": record.deadline_at,
        "run_id": record.run_id,
        "run_started_at": record.run_started_at,
        "consecutive_failures": record.consecutive_failures,
        "open_alarm": None if record.open_alarm is None else record.open_alarm.value,
        "last_run_at": record.last_run_at,
        "last_finished_at": record.last_finished_at,
        "lost_run_id": record.lost_run_id,
        "fingerprint": stored.fingerprint,
        "updated_at": now,
    }


def _flip_values(item: JobFlip, now: datetime) -> dict[str, Any]:
    flip = item.flip
    alert = item.alert
    return {
        "alert": "pending" if alert else None,
        "alert_lease_until": now + ALERT_LEASE if alert else None,
        "job": item.job,
        "at": flip.at,
        "from_state": flip.from_state.value,
        "to_state": flip.to_state.value,
        "reason": flip.reason,
        "recovered_from": None if flip.recovered_from is None else flip.recovered_from.value,
        "created_at": now,
    }
