"""The jobs table: read the jobs, and apply a jobs file to it as one transaction with a diff."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from pydantic import ValidationError
from sqlalchemy import delete, select

from common.errors import AlreadyExists, CronfleetError, NotFound
from common.jobs import JobSpec, spec_from_json
from common.store import JobRow, Store
from common.store.chunks import IN_LIST_CHUNK, chunks

log = logging.getLogger("cronfleet.catalog")


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
    ``dry_run``, reports the diff and writes nothing.
    """
    diff = JobsDiff()
    wanted = {spec.name: spec for spec in specs}
    async with store.session() as session, session.begin():
        existing = {row.name: row for row in (await session.execute(select(JobRow))).scalars()}
        for name, spec in sorted(wanted.items()):
            row = existing.get(name)
            if row is None:
                diff.added.append(name)
                row = JobRow(name=name, created_at=now)
                if not dry_run:
                    session.add(row)
            elif row.fingerprint != spec.fingerprint():
                diff.changed.append(name)
            else:
                diff.unchanged.append(name)
                continue
            if not dry_run:
                _fill(row, spec, now)
        if prune:
            diff.removed.extend(sorted(set(existing) - set(wanted)))
            if not dry_run:
                for some in chunks(diff.removed, IN_LIST_CHUNK):
                    await session.execute(delete(JobRow).where(JobRow.name.in_(some)))
    return diff


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
        if row is None:
            row = JobRow(name=spec.name, created_at=now)
            session.add(row)
            outcome = "added"
        elif row.fingerprint != spec.fingerprint():
            outcome = "changed"
        else:
            return "unchanged"
        _fill(row, spec, now)
    return outcome


async def remove_job(store: Store, name: str) -> bool:
    """Remove the job called ``name`` as ``apply`` removes a job no longer in the file; whether
    it was there."""
    async with store.session() as session, session.begin():
        removed = await session.execute(delete(JobRow).where(JobRow.name == name).returning(JobRow.name))
        return removed.first() is not None


def _fill(row: JobRow, spec: JobSpec, now: datetime) -> None:
    row.spec = spec.canonical_json().decode()
    row.fingerprint = spec.fingerprint()
    row.pool = spec.pool
    row.enabled = spec.enabled
    row.updated_at = now
