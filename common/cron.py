"""Cron maths: (schedule, time zone, after) -> the next fire instant in UTC. Pure; no clock.

Schedules have 5 fields (minute first) or 6 (seconds first), or a macro such as ``@hourly``.
Daylight-saving nights follow cronie: a fixed-time job whose wall time is repeated when clocks go
back fires once, at the first occurrence; a wall time skipped when clocks go forward fires right
after the gap. The next fire is always strictly later than ``after``.

Only what every process evaluates identically is accepted, since each scheduler computes the fires
itself and they must agree to the instant:

- numbers, month and weekday names (``JAN``, ``MON``), ``*``, lists ``,``, ranges ``-``, steps ``/``;
- ``?`` in the day-of-month or weekday field (the same as ``*``);
- ``L`` (the last day of the month; ``L5``, the last Friday), ``#`` (``1#2``, the second Monday)
  and ``W`` (``15W``, the weekday nearest the 15th): pure calendar arithmetic, the same in every
  process.

Refused: croniter's ``R`` (random: each process would draw its own value, so two schedulers fire at
different instants), Jenkins' ``H`` (hashed: croniter needs a seed the scheduler does not give it;
write the value yourself), its seventh year field, and anything but printable ASCII.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

from common.bounds import MAX_SCHEDULE_LENGTH, MAX_TIMEZONE_LENGTH

MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
# A valid expression yields a new candidate each step; the bound only stops a pathological
# expression (say, 30 February) from looping, it never limits a real schedule.
_MAX_STEPS = 64
_CHARACTERS = re.compile(r"[A-Za-z0-9*,\-/?#@() \t\r\n]+")
# croniter's random and hashed forms: R, R(0-5), R/10, H(0-29)/10 (a whole list item).
_RANDOM_OR_HASHED = re.compile(r"(?:^|,)([rh])(?:\(\d+-\d+\))?(?:/\d+)?(?=,|$)", re.IGNORECASE)
# What an IANA name may hold: letters, digits, '_', '-', '+', in '/'-separated parts.
_ZONE_NAME = re.compile(r"[A-Za-z0-9_+\-]+(?:/[A-Za-z0-9_+\-]+)*")


@dataclass(frozen=True)
class Schedule:
    """A parsed cron expression."""

    text: str
    has_seconds: bool
    fixed_hour: bool


@lru_cache(maxsize=8192)
def parse_schedule(text: str) -> Schedule:
    """Parse and validate ``text``. Raises ValueError with a plain reason when it is not cron,
    or when it is a form processes could evaluate differently (see the module's docstring)."""
    if len(text) > MAX_SCHEDULE_LENGTH:
        raise ValueError(f"the schedule is too long ({len(text)} characters, at most {MAX_SCHEDULE_LENGTH})")
    if text and not _CHARACTERS.fullmatch(text):
        odd = next(c for c in text if not _CHARACTERS.fullmatch(c))
        raise ValueError(
            f"the schedule holds the character {odd!r}; cron uses ASCII digits, names and * , - / ? L W #"
        )
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
    for field in fields:
        found = _RANDOM_OR_HASHED.search(field)
        if found and found.group(1).lower() == "r":
            raise ValueError(
                f"{field!r} is croniter's random form: each scheduler would draw its own value and "
                "fire at a different instant; write the value itself"
            )
        if found:
            raise ValueError(
                f"{field!r} is a hashed ('H') form, which cronfleet does not support; write the value itself"
            )
    try:
        valid = croniter.is_valid(expression, second_at_beginning=has_seconds)
    # is_valid only catches croniter's own errors; any other is still a text it cannot read.
    except (TypeError, IndexError, KeyError, ValueError):
        valid = False
    if not valid:
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
    """The IANA time zone called ``name``. Raises ValueError when there is none (or when the name
    could not be one: too long, odd characters, a path)."""
    if len(name) > MAX_TIMEZONE_LENGTH:
        raise ValueError(
            f"the time zone name is too long ({len(name)} characters, at most {MAX_TIMEZONE_LENGTH})"
        )
    unknown = ValueError(f"unknown time zone {name!r} (use an IANA name like 'Europe/Paris')")
    if not _ZONE_NAME.fullmatch(name):
        raise unknown
    try:
        return ZoneInfo(name)
    # A directory ("America") or an unreadable file is an OSError; a file that is not a zone, a
    # ValueError.
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise unknown from exc


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
