"""The misfire policy: what a scheduler does with a job's fires that no scheduler sent while
they could still go out (all were stopped, or could not reach the store or the broker). Pure;
time is an argument.

A fire is *missed* when it was due to go out at or before ``missed_before``: at least
``START_TOLERANCE`` before this scheduler started (downtime: nobody was there to send it), or
at least its job's ``expires_after_seconds`` ago (a trigger a worker would refuse). Any later
fire is merely late and goes out as usual. The missed part of a job's backlog is settled at once,
by its ``misfire`` policy: ``skip`` fires none of it, ``once`` its latest instant, ``all`` its
latest instants within ``catchup`` (at most ``MAX_CATCHUP_FIRES``). The rest is counted as
skipped, never enumerated beyond ``MAX_COUNTED``: the work is bounded however long the downtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from common.intervals import EPOCH, parse_interval
from common.jobs import JobSpec

# A fire due less than this before the scheduler started is late, not missed: a restart that
# takes a few seconds loses nothing (a scheduler's own start-up, imports to first plan, takes
# seconds on a loaded host).
START_TOLERANCE = timedelta(seconds=5)
# At most this many fires of one job are caught up by ``misfire = "all"`` after one downtime.
MAX_CATCHUP_FIRES = 1000
# Skipped fires of a cron job are counted up to this many (an interval job's exactly).
MAX_COUNTED = 10_000
_JUST_BEFORE = timedelta(microseconds=1)


@dataclass(frozen=True)
class Misfire:
    """How the missed part of job ``job``'s backlog (its fires from ``first_missed`` to
    ``last_missed``) was settled at ``now`` under ``policy``: ``fire`` (nominal instants, oldest
    first) go out now, ``skipped`` do not (a lower bound when not ``counted_all``); ``next_at`` is
    the job's first fire after the missed ones (None: it has none), due now or later."""

    job: str
    policy: str
    now: datetime
    first_missed: datetime
    last_missed: datetime
    fire: tuple[datetime, ...]
    skipped: int
    counted_all: bool
    next_at: datetime | None


def missed_before(spec: JobSpec, started_at: datetime | None, now: datetime) -> datetime:
    """The instant at or before which a fire of ``spec`` meant to go out is missed, for a
    scheduler that started planning at ``started_at`` (None: long ago) and looks at ``now``."""
    cutoff = now - timedelta(seconds=spec.expires_after_seconds)
    if started_at is not None:
        cutoff = max(cutoff, started_at - START_TOLERANCE)
    return cutoff


def settle_backlog(spec: JobSpec, first_missed: datetime, until: datetime, now: datetime) -> Misfire:
    """Settle ``spec``'s fires from ``first_missed`` (one of its instants) to ``until`` (both
    included; at most ``now``) by its misfire policy (see the module's docstring). Bounded work:
    a few thousand fire computations at most, whatever the length of the downtime."""
    end = min(until, now)
    latest = latest_fires(spec, first_missed, end, 1)
    last = latest[-1] if latest else first_missed
    catchup = spec.catchup_seconds()
    not_before = first_missed if catchup is None else max(first_missed, now - timedelta(seconds=catchup))
    fire: list[datetime] = []
    if spec.misfire == "once" and last >= not_before:
        fire = [last]
    elif spec.misfire == "all" and not_before <= end:
        fire = latest_fires(spec, not_before, end, MAX_CATCHUP_FIRES)
    count, exact = count_fires(spec, first_missed, end)
    try:
        next_at: datetime | None = spec.next_fire(end)
    except ValueError:
        next_at = None
    return Misfire(
        job=spec.name,
        policy=spec.misfire,
        now=now,
        first_missed=first_missed,
        last_missed=last,
        fire=tuple(fire),
        skipped=max(0, count - len(fire)),
        counted_all=exact,
        next_at=next_at,
    )


def latest_fires(spec: JobSpec, not_before: datetime, now: datetime, limit: int) -> list[datetime]:
    """The latest of ``spec``'s instants in ``[not_before, now]``, oldest first: all of them when
    there are at most ``limit``, else at most ``limit`` of the most recent. Looks back from ``now``
    in windows doubling from one second, each walked at most ``4 * limit`` fires."""
    kept: list[datetime] = []
    span = timedelta(seconds=1)
    while True:
        start = max(not_before, now - span)
        found, complete = _walk(spec, start, now, 4 * limit)
        if not complete:
            return kept
        if len(found) > limit:
            return found[-limit:]
        kept = found
        if start == not_before:
            return kept
        span *= 2


def count_fires(spec: JobSpec, first: datetime, now: datetime) -> tuple[int, bool]:
    """How many of ``spec``'s instants lie in ``[first, now]``, and whether that is exact: an
    interval job's are counted exactly, a cron job's up to ``MAX_COUNTED``."""
    if spec.every is not None:
        step = parse_interval(spec.every) * 1_000_000
        low = -((EPOCH - first) // _JUST_BEFORE // step)  # ceil
        high = (now - EPOCH) // _JUST_BEFORE // step
        return max(0, high - low + 1), True
    found, complete = _walk(spec, first, now, MAX_COUNTED)
    return len(found), complete


def _walk(spec: JobSpec, start: datetime, end: datetime, cap: int) -> tuple[list[datetime], bool]:
    """``spec``'s instants in ``[start, end]``, at most ``cap``; and whether that is all of them."""
    found: list[datetime] = []
    at = start - _JUST_BEFORE
    while True:
        try:
            at = spec.next_fire(at)
        except ValueError:
            return found, True
        if at > end:
            return found, True
        if len(found) == cap:
            return found, False
        found.append(at)
