"""The jobs table: read the jobs, and apply a jobs file to it as one transaction with a diff."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import delete, select

from common.jobs import JobSpec, spec_from_json
from common.store import JobRow, Store
from common.store.chunks import IN_LIST_CHUNK, chunks


@dataclass(frozen=True)
class JobsDiff:
    """What ``apply`` did: job names added, changed, removed and left as they were."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


async def load_jobs(store: Store, names: Collection[str] | None = None) -> list[JobSpec]:
    """Every job in the store (or those of ``names``), enabled or not, by name."""
    if names is None:
        async with store.session() as session:
            rows = (await session.execute(select(JobRow.spec).order_by(JobRow.name))).scalars()
            return [spec_from_json(spec) for spec in rows]
    specs: list[JobSpec] = []
    async with store.session() as session:
        for some in chunks(sorted(names), IN_LIST_CHUNK):
            rows = (await session.execute(select(JobRow.spec).where(JobRow.name.in_(some)))).scalars()
            specs.extend(spec_from_json(spec) for spec in rows)
    return sorted(specs, key=lambda spec: spec.name)


async def load_fingerprints(store: Store) -> dict[str, str]:
    """Each job's name and fingerprint: enough to tell which jobs changed since last read."""
    async with store.session() as session:
        return {
            name: fp for name, fp in (await session.execute(select(JobRow.name, JobRow.fingerprint))).all()
        }


async def find_job(store: Store, name: str) -> JobSpec | None:
    """The job called ``name``, or None."""
    async with store.session() as session:
        spec = await session.scalar(select(JobRow.spec).where(JobRow.name == name))
    return None if spec is None else spec_from_json(spec)


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


def _fill(row: JobRow, spec: JobSpec, now: datetime) -> None:
    row.spec = spec.canonical_json().decode()
    row.fingerprint = spec.fingerprint()
    row.pool = spec.pool
    row.enabled = spec.enabled
    row.updated_at = now
