"""The ``missed_fires`` table: the backlogs the misfire policy settled, recorded so that fires a
downtime cost are never silently gone; and the one log line that says so."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from common.store import MissedFireRow, Store, dialect_insert
from common.store.chunks import chunks, rows_per_insert
from scheduler.misfire import Misfire

log = logging.getLogger("cronfleet.scheduler")

# At most this many jobs are named in the log line (the counts are always whole).
_LOGGED_JOBS = 10


async def record_misfires(store: Store, misfires: Sequence[Misfire], recorded_by: str, now: datetime) -> int:
    """Store one ``missed_fires`` row per settled backlog; a backlog another scheduler recorded
    already (same job, same first missed fire) is left as it was. Returns how many rows were new."""
    rows = [
        {
            "job": m.job,
            "first_missed": m.first_missed,
            "last_missed": m.last_missed,
            "policy": m.policy,
            "skipped": m.skipped,
            "counted_all": m.counted_all,
            "caught_up": len(m.fire),
            "recorded_by": recorded_by,
            "recorded_at": now,
        }
        for m in misfires
    ]
    if not rows:
        return 0
    table = MissedFireRow.__table__
    statement = dialect_insert(store.dialect, table).on_conflict_do_nothing().returning(MissedFireRow.job)
    written = 0
    async with store.session() as session, session.begin():
        for some in chunks(rows, rows_per_insert(len(rows[0]))):
            written += len((await session.execute(statement, list(some))).all())
    return written


def log_misfires(misfires: Sequence[Misfire]) -> None:
    """One warning line for all the backlogs settled at once: jobs, fires skipped, fires sent late."""
    if not misfires:
        return
    skipped = sum(m.skipped for m in misfires)
    sent = sum(len(m.fire) for m in misfires)
    lower = "" if all(m.counted_all for m in misfires) else "at least "
    named = ", ".join(
        f"{m.job} ({m.policy}: {m.skipped}{'' if m.counted_all else '+'} skipped, {len(m.fire)} sent)"
        for m in misfires[:_LOGGED_JOBS]
    )
    more = f", and {len(misfires) - _LOGGED_JOBS} more" if len(misfires) > _LOGGED_JOBS else ""
    log.warning(
        "%d job(s) missed fires while no scheduler sent them: %s%d fire(s) skipped, %d sent late "
        "by their misfire policy (recorded in missed_fires): %s%s",
        len(misfires),
        lower,
        skipped,
        sent,
        named,
        more,
    )
