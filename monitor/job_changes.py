"""The monitor learns that jobs were applied, changed, paused or removed, the way the scheduler
does: a cheap poll of every job's fingerprint, and a closer look only at the jobs whose
fingerprint moved.

A new job gets its first health record; a changed one is told ``Paused``, ``Resumed`` or
``ScheduleChanged``; a removed one loses its record (its flips stay, as history). Each record
stores the fingerprint of the spec it follows, so a change is applied once however many monitors
see it, and a monitor that starts learns what changed while no monitor ran.
"""

from __future__ import annotations

from datetime import datetime

from common.catalog import load_fingerprints
from common.jobs import JobSpec
from common.store import Store
from monitor import health_store
from monitor.health import HealthInput, HealthRecord, Paused, Resumed, ScheduleChanged, State
from monitor.health_store import Advanced, HealthBatch


def change_input(record: HealthRecord, spec: JobSpec) -> HealthInput:
    """What tells the machine that the job following ``record`` is now ``spec``."""
    if not spec.enabled:
        return Paused()
    if record.state is State.PAUSED:
        return Resumed()
    return ScheduleChanged()


class JobWatch:
    """Which jobs were added, changed or removed since the last look."""

    def __init__(self) -> None:
        # Each job's fingerprint at the last look; None before the first.
        self.fingerprints: dict[str, str] | None = None

    async def look(self, store: Store, now: datetime) -> tuple[Advanced, set[str]]:
        """Bring the health records in line with the jobs as stored now, in one transaction.

        The first look compares the jobs with the fingerprints their records follow (so it also
        sees what changed while no monitor ran); later ones with the previous look. Returns what
        it did to health and the jobs removed.
        """
        current = await load_fingerprints(store)
        async with store.session() as session, session.begin():
            known = self.fingerprints
            if known is None:
                followed = await health_store.load_fingerprints(session)
                known = {job: fingerprint or "" for job, fingerprint in followed.items()}
            removed = set(known) - set(current)
            changed = {name for name, fingerprint in current.items() if known.get(name) != fingerprint}
            specs = await health_store.read_specs(session, changed) if changed else {}
            batch = HealthBatch(session, now)
            await batch.load(changed, specs)
            for job in sorted(changed):
                stored, spec = batch.records.get(job), specs.get(job)
                if stored is None or spec is None or spec.spec is None:
                    continue
                if stored.fingerprint != spec.fingerprint:
                    batch.advance(job, change_input(stored.record, spec.spec), follow=True)
            if removed:
                await health_store.forget(session, removed)
            advanced = await batch.save()
        self.fingerprints = current
        return advanced, removed
