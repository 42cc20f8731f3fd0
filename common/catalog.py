"""The jobs table: read the jobs, apply a jobs file to it as one transaction with a diff, and
read what changed since a version (the scheduler's reload)."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from pydantic import ValidationError
from sqlalchemy import Table, bindparam, delete, func, insert, select, true, update
from sqlalchemy.ext.asyncio import AsyncSession

from common.errors import AlreadyExists, CronfleetError, NotFound
from common.jobs import JobSpec, fingerprint_of, spec_from_json
from common.store import JobRemovalRow, JobRow, JobsVersionRow, Store, dialect_insert
from common.store.chunks import IN_LIST_CHUNK, chunks, rows_per_insert

log = logging.getLogger("cronfleet.catalog")

_JOBS = cast(Table, JobRow.__table__)


@dataclass(frozen=True)
class JobsDiff:
    """What ``apply`` did: job names added, changed, removed and left as they were."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StoredJobs:
    """The jobs read from the store, and those whose stored spec this cronfleet refuses (a job
    applied by an older, laxer cronfleet), by name with the reason."""

    specs: list[JobSpec]
    unreadable: dict[str, str]


async def read_jobs(store: Store, names: Collection[str] | None = None) -> StoredJobs:
    """Every job in the store (or those of ``names``), enabled or not, by name.

    A stored spec that no longer validates never raises: it is reported in ``unreadable``.
    """
    query = select(JobRow.name, JobRow.spec)
    rows: list[tuple[str, str]] = []
    async with store.session() as session:
        if names is None:
            rows.extend((name, spec) for name, spec in await session.execute(query))
        else:
            for some in chunks(sorted(names), IN_LIST_CHUNK):
                rows.extend(
                    (name, spec) for name, spec in await session.execute(query.where(JobRow.name.in_(some)))
                )
    specs: list[JobSpec] = []
    unreadable: dict[str, str] = {}
    for name, spec in sorted(rows):
        try:
            specs.append(spec_from_json(spec))
        except ValueError as exc:
            unreadable[name] = _first_line(exc)
    return StoredJobs(specs, unreadable)


async def load_jobs(store: Store, names: Collection[str] | None = None) -> list[JobSpec]:
    """The readable jobs of ``read_jobs``; each unreadable one is logged as an error (callers
    that show jobs to people list those too, see ``read_jobs``)."""
    stored = await read_jobs(store, names)
    for name, reason in stored.unreadable.items():
        log.error(
            "job %s is stored with a spec this cronfleet refuses (%s): it is not run or judged "
            "until its jobs file is fixed and applied again",
            name,
            reason,
        )
    return stored.specs


def _first_line(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in error["loc"]) or "spec"
        return f"field {where}: {error['msg']}"[:300]
    return (str(exc).splitlines() or ["unreadable"])[0][:300]


async def load_fingerprints(store: Store) -> dict[str, str]:
    """Each job's name and fingerprint: enough to tell which jobs changed since last read."""
    async with store.session() as session:
        return {
            name: fp for name, fp in (await session.execute(select(JobRow.name, JobRow.fingerprint))).all()
        }


async def find_job(store: Store, name: str) -> JobSpec | None:
    """The job called ``name``, or None."""
    stored = await read_jobs(store, [name])
    if name in stored.unreadable:
        raise CronfleetError(
            f"job {name!r} is stored with a spec this cronfleet refuses ({stored.unreadable[name]}): "
            "fix its jobs file and apply it again"
        )
    return stored.specs[0] if stored.specs else None


async def apply_jobs(
    store: Store, specs: Sequence[JobSpec], now: datetime, *, prune: bool = True, dry_run: bool = False
) -> JobsDiff:
    """Make the store hold exactly ``specs`` (with ``prune``, jobs not in ``specs`` are removed).

    Idempotent: applying the same specs twice changes nothing the second time. With
    ``dry_run``, reports the diff and writes nothing. Every added or changed job gets its next
    fire instant and the write's version (``JobsVersionRow``); every removed one a tombstone with
    it. Each statement carries a bounded number of rows, however many jobs there are.
    """
    diff = JobsDiff()
    wanted = {spec.name: spec for spec in specs}
    async with store.session() as session, session.begin():
        # Taken first: its row lock makes concurrent applies take turns, so the diff below is
        # computed against what the previous one wrote.
        version = None if dry_run else await next_jobs_version(session)
        query = select(JobRow.name, JobRow.fingerprint, JobRow.next_fire_at)
        existing = {name: (fp, next_at) for name, fp, next_at in await session.execute(query)}
        added: list[dict[str, Any]] = []
        changed: list[dict[str, Any]] = []
        for name, spec in sorted(wanted.items()):
            canonical = spec.canonical_json()
            fingerprint = fingerprint_of(canonical)
            old = existing.get(name)
            if old is not None and old[0] == fingerprint:
                diff.unchanged.append(name)
                continue
            (diff.added if old is None else diff.changed).append(name)
            if version is not None:
                values = _values(spec, canonical, now, version, None if old is None else old[1])
                if old is None:
                    added.append({**values, "name": name, "created_at": now})
                else:
                    changed.append({**values, "name": name})
        if prune:
            diff.removed.extend(sorted(set(existing) - set(wanted)))
        if version is None:
            return diff
        # Executemany of one cached statement: the driver's batches stay under the parameter limit.
        for some in chunks(added, rows_per_insert(len(added[0]) if added else 1)):
            await session.execute(insert(_JOBS), list(some))
        for some in chunks(changed, IN_LIST_CHUNK):
            await session.execute(update(JobRow), list(some))
        await _remove(session, store.dialect, diff.removed, version)
    return diff


async def next_jobs_version(session: AsyncSession) -> int:
    """Take the next jobs version for the writes of ``session``'s transaction (and hold the
    counter's row lock until it ends, so that versions become visible in order)."""
    bump = (
        update(JobsVersionRow)
        .where(JobsVersionRow.id == 1)
        .values(version=JobsVersionRow.version + 1)
        .returning(JobsVersionRow.version)
        .execution_options(synchronize_session=False)
    )
    version = (await session.execute(bump)).scalar_one_or_none()
    if version is None:  # a store whose counter row was lost: start it again above every job
        highest = await session.scalar(select(func.max(JobRow.version))) or 0
        version = highest + 1
        session.add(JobsVersionRow(id=1, version=version))
        await session.flush()
    return int(version)


async def _remove(session: AsyncSession, dialect: str, names: Sequence[str], version: int) -> None:
    """Delete the jobs called ``names`` and leave a tombstone for each, at ``version``."""
    for some in chunks(names, IN_LIST_CHUNK):
        await session.execute(delete(JobRow).where(JobRow.name.in_(some)))
    tombstones = [{"name": name, "version": version} for name in names]
    for rows in chunks(tombstones, rows_per_insert(2)):
        statement = dialect_insert(dialect, JobRemovalRow).values(list(rows))
        await session.execute(
            statement.on_conflict_do_update(
                index_elements=["name"], set_={"version": statement.excluded.version}
            )
        )


def _values(
    spec: JobSpec, canonical: bytes, now: datetime, version: int, pending: datetime | None
) -> dict[str, Any]:
    """The columns of a job's row as ``spec`` (whose ``canonical_json`` is ``canonical``) makes
    them, written at ``version``."""
    planned = spec.enabled and spec.action is not None
    return {
        "spec": canonical.decode(),
        "fingerprint": fingerprint_of(canonical),
        "pool": spec.pool,
        "enabled": spec.enabled,
        "updated_at": now,
        "planned": planned,
        "next_fire_at": first_fire(spec, now, pending) if planned else None,
        "version": version,
    }


def first_fire(spec: JobSpec, now: datetime, pending: datetime | None = None) -> datetime | None:
    """The fire a job (new, or changed at ``now``) is planned for: its first after ``now``; or,
    when its previous ``pending`` fire is due but not yet expired, the first from that one on, so
    that an edit made as a job falls due does not drop the fire. None (logged) if there is none."""
    after = now
    if pending is not None and now - timedelta(seconds=spec.expires_after_seconds) < pending <= now:
        after = pending - _JUST_BEFORE
    try:
        return spec.next_fire(after)
    except ValueError as exc:
        log.error("job %s: no next fire after %s (%s)", spec.name, after.isoformat(), exc)
        return None


_JUST_BEFORE = timedelta(microseconds=1)


async def save_job(store: Store, spec: JobSpec, now: datetime, *, exists: bool | None = None) -> str:
    """Store one job as ``apply`` would (its row by primary key, nothing else read): ``added``,
    ``changed`` or ``unchanged``. With ``exists`` True the job must be stored already (else
    NotFound), with False it must not be (else AlreadyExists)."""
    async with store.session() as session, session.begin():
        row = await session.get(JobRow, spec.name)
        if exists is True and row is None:
            raise NotFound(f"no job called {spec.name!r}")
        if exists is False and row is not None:
            raise AlreadyExists(f"a job called {spec.name!r} exists already")
        fingerprint = spec.fingerprint()
        if row is not None and row.fingerprint == fingerprint:
            return "unchanged"
        version = await next_jobs_version(session)
        pending = None if row is None else row.next_fire_at
        if row is None:
            row = JobRow(name=spec.name, created_at=now)
            session.add(row)
            outcome = "added"
        else:
            outcome = "changed"
        for column, value in _values(spec, spec.canonical_json(), now, version, pending).items():
            setattr(row, column, value)
    return outcome


async def remove_job(store: Store, name: str) -> bool:
    """Remove the job called ``name`` as ``apply`` removes a job no longer in the file; whether
    it was there."""
    async with store.session() as session, session.begin():
        if await session.get(JobRow, name) is None:
            return False
        await _remove(session, store.dialect, [name], await next_jobs_version(session))
        return True


@dataclass(frozen=True)
class JobChanges:
    """What changed in the jobs since a version: ``planned`` jobs as (name, next fire instant or
    None when not computed yet, version), and the names of jobs removed or no longer planned.
    ``version``: the version these changes bring the reader to."""

    version: int
    planned: list[tuple[str, datetime | None, int]]
    unplanned: list[str]


async def read_job_changes(store: Store, since: int | None) -> JobChanges:
    """The jobs changed (or removed) after version ``since`` (every planned job when None), up to
    the current version: never a spec, never the whole table unless ``since`` is None."""
    async with store.session() as session, session.begin():
        current = await session.scalar(select(JobsVersionRow.version).where(JobsVersionRow.id == 1))
        # A job stamped above the counter read here was written after it: the next read has it.
        upto = JobRow.version <= (current or 0) if current is not None else true()
        query = select(JobRow.name, JobRow.planned, JobRow.next_fire_at, JobRow.version).where(upto)
        planned: list[tuple[str, datetime | None, int]] = []
        unplanned: list[str] = []
        if since is None:
            query = query.where(JobRow.planned.is_(True))
        else:
            query = query.where(JobRow.version > since)
            removals = select(JobRemovalRow.name).where(
                JobRemovalRow.version > since, JobRemovalRow.version <= (current or 0)
            )
            unplanned.extend((await session.execute(removals)).scalars())
        for name, is_planned, next_at, version in await session.execute(query):
            if is_planned:
                planned.append((name, next_at, version))
            else:
                unplanned.append(name)
    return JobChanges(int(current or 0), planned, unplanned)


async def planned_pools(store: Store) -> set[str]:
    """The pools of the jobs a scheduler plans."""
    async with store.session() as session:
        query = select(JobRow.pool).where(JobRow.planned.is_(True)).distinct()
        return set((await session.execute(query)).scalars())


async def record_next_fires(store: Store, fired: Sequence[tuple[str, int, datetime]]) -> None:
    """Store each fired job's next fire instant, as (name, version the fire was planned at, next
    instant); a job changed since (another version) keeps the instant its change wrote."""
    table = _JOBS
    statement = (
        update(table)
        .where(table.c.name == bindparam("b_name"), table.c.version == bindparam("b_version"))
        .values(next_fire_at=bindparam("b_next"))
    )
    rows = [{"b_name": name, "b_version": version, "b_next": when} for name, version, when in fired]
    async with store.session() as session, session.begin():
        for some in chunks(rows, IN_LIST_CHUNK):
            await session.execute(statement, list(some))
