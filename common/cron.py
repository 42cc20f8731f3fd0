"""Cron maths: (schedule, time zone, after) -> the next fire instant in UTC. Pure; no clock.

Schedules have 5 fields (minute first) or 6 (seconds first), or a macro such as ``@hourly``.
Daylight-saving nights follow cronie: a fixed-time job whose wall time is repeated when clocks go
back fires once, at the first occurrence; a wall time skipped when clocks go forward fires right
after the gap. The next fire is always strictly later than ``after``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
# A valid expression yields a new candidate each step; the bound only stops a pathological
# expression (say, 30 February) from looping, it never limits a real schedule.
_MAX_STEPS = 64


@dataclass(frozen=True)
class Schedule:
    """A parsed cron expression."""

    text: str
    has_seconds: bool
    fixed_hour: bool


@lru_cache(maxsize=8192)
def parse_schedule(text: str) -> Schedule:
    """Parse and validate ``text``. Raises ValueError with a plain reason when it is not cron."""
    expression = " ".join(text.split())
    if not expression:
        raise ValueError("the schedule is empty")
    if expression.startswith("@"):
        if expression.lower() not in MACROS:
            raise ValueError(f"unknown macro {expression!r}; use one of {', '.join(MACROS)}")
        return Schedule(expression.lower(), has_seconds=False, fixed_hour=expression != "@hourly")
    fields = expression.split(" ")
    if len(fields) not in (5, 6):
        raise ValueError(
            f"a schedule has 5 fields (minute hour day month weekday) or 6 (seconds first), not {len(fields)}"
        )
    has_seconds = len(fields) == 6
    if not croniter.is_valid(expression, second_at_beginning=has_seconds):
        raise ValueError(f"{expression!r} is not a valid cron expression")
    hour = fields[2] if has_seconds else fields[1]
    # As cronie: an hour field starting with '*' (every hour, or a step) follows real time on
    # DST nights; any other (a number, a list, a range) names wall-clock hours, fired once each.
    fixed_hour = not hour.startswith("*")
    schedule = Schedule(expression, has_seconds=has_seconds, fixed_hour=fixed_hour)
    _first_fire(schedule)
    return schedule


def _first_fire(schedule: Schedule) -> None:
    """Raise ValueError when ``schedule`` names no instant at all (say, 30 February)."""
    try:
        croniter(schedule.text, _EPOCH, second_at_beginning=schedule.has_seconds).get_next(datetime)
    except (CroniterError, ValueError) as exc:
        raise ValueError(f"{schedule.text!r} never fires (no date matches it)") from exc


_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def parse_timezone(name: str) -> ZoneInfo:
    """The IANA time zone called ``name``. Raises ValueError when there is none."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r} (use an IANA name like 'Europe/Paris')") from exc


# Many jobs share a schedule and fire at the same instants: their next fires are computed once.
@lru_cache(maxsize=16384)
def next_fire(schedule: str, zone: tzinfo, after: datetime) -> datetime:
    """The first fire instant of ``schedule`` in ``zone`` strictly after ``after``, in UTC.

    ``after`` must be timezone-aware. Raises ValueError for an invalid schedule or one that
    never fires.
    """
    if after.tzinfo is None:
        raise ValueError("next_fire needs an aware datetime")
    parsed = parse_schedule(schedule)
    steps = croniter(parsed.text, after.astimezone(zone), second_at_beginning=parsed.has_seconds)
    for _ in range(_MAX_STEPS):
        candidate: datetime = steps.get_next(datetime)
        instant = candidate.astimezone(UTC)
        if instant <= after:
            continue
        if parsed.fixed_hour and _is_second_occurrence(candidate, zone):
            continue
        return instant
    raise ValueError(f"{schedule!r} has no fire time after {after.isoformat()}")


def _is_second_occurrence(moment: datetime, zone: tzinfo) -> bool:
    """Whether ``moment`` is the later of two instants sharing its wall time (clocks went back)."""
    wall = moment.replace(tzinfo=None)
    first = wall.replace(tzinfo=zone, fold=0).utcoffset()
    second = wall.replace(tzinfo=zone, fold=1).utcoffset()
    return first != second and moment.utcoffset() == second and first != moment.utcoffset()
