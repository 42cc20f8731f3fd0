"""Cron maths: (schedule, time zone, after) -> the next fire instant in UTC. Pure; no clock.

Schedules have 5 fields (minute first) or 6 (seconds first), or a macro such as ``@hourly``.
The next fire is always strictly later than ``after``. ``docs/scheduling.md`` states the rules
for operators, with examples; in short:

- The fields match the *wall-clock* time of the job's zone. The day of the month and the day of
  the week combine as in cron (Vixie cron, cronie): when either field starts with ``*`` (or is
  ``?``) a day must match both, otherwise it matches when either does.
- Daylight-saving nights follow cronie exactly (``find_jobs`` in cronie's ``src/cron.c``): a job is
  *wild* when its minute or its hour field starts with ``*``. A wild job follows elapsed time: it
  fires at every real instant whose wall time matches, so never in a skipped hour and twice in a
  repeated one. Any other job names wall-clock times: one that falls in a skipped gap fires once,
  at the first instant after the gap, and one that is repeated fires once, at its first occurrence.
  A job never fires at an instant its fields do not match, except that one fire at the end of a
  gap. A 6-field schedule is wild or not by its minute and hour fields: the seconds field never
  makes it wild.

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

How it is computed: a schedule is compiled once into bit masks (seconds, minutes, hours, months,
and the matching days of each month), and the next fire is found by jumping from set bit to set
bit in wall-clock time, one stretch of constant UTC offset at a time. The common forms are parsed
here; a form this parser does not know (``L``, ``W``, ``#``, wrapping ranges...) is validated and
expanded by croniter, as before, so what was accepted stays accepted, with the same meaning but
for cron's day-field rule above (croniter made a union unless a field was exactly ``*``) and a
one-value range ``a-a`` (croniter 7 read it as every value).
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, CroniterError, croniter

from common.bounds import MAX_SCHEDULE_LENGTH, MAX_TIMEZONE_LENGTH

MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_MACRO_FIELDS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_CHARACTERS = re.compile(r"[A-Za-z0-9*,\-/?#@() \t\r\n]+")
# croniter's random and hashed forms: R, R(0-5), R/10, H(0-29)/10 (a whole list item).
_RANDOM_OR_HASHED = re.compile(r"(?:^|,)([rh])(?:\(\d+-\d+\))?(?:/\d+)?(?=,|$)", re.IGNORECASE)
# What an IANA name may hold: letters, digits, '_', '-', '+', in '/'-separated parts.
_ZONE_NAME = re.compile(r"[A-Za-z0-9_+\-]+(?:/[A-Za-z0-9_+\-]+)*")

# A schedule that has fired once since 2000 fires again within this many years (a 29 February on
# a given weekday recurs within 40 years; 2100 is no leap year): searching further only spins.
_HORIZON_YEARS = 400
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_DAY = 86_400

# Per field: its index in a 6-field expression, its lowest and highest value, its names.
_MONTH_NAMES = {
    n: i + 1
    for i, n in enumerate(
        ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
    )
}
_DAY_NAMES = {n: i for i, n in enumerate(["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"])}
_SECOND, _MINUTE, _HOUR, _DOM, _MONTH, _DOW = range(6)
_LIMITS = {_SECOND: (0, 59), _MINUTE: (0, 59), _HOUR: (0, 23), _DOM: (1, 31), _MONTH: (1, 12), _DOW: (0, 7)}
_NAMES = {_MONTH: _MONTH_NAMES, _DOW: _DAY_NAMES}
_PLAIN_ITEM = re.compile(r"(\*|\?|[0-9A-Z]+(?:-[0-9A-Z]+)?)(?:/([0-9]+))?")


@dataclass(frozen=True, slots=True)
class Days:
    """Which days of a month a schedule's day-of-month and weekday fields select.

    ``dom`` has bit d set for day d (1..31), ``dow`` bit w for weekday w (0 = Sunday);
    ``both`` says a day must match both fields (cron's rule: either field starts with ``*``).
    ``calendar`` is set instead when a field uses ``L``, ``W`` or ``#`` (or a form only croniter
    reads): then the days come from croniter, which defined those forms for cronfleet."""

    dom: int
    dow: int
    both: bool
    calendar: str | None = None


@dataclass(frozen=True, slots=True)
class Schedule:
    """A parsed, compiled cron expression.

    ``text`` is the normalised expression (what the jobs file stores); ``wild`` says whether it
    follows elapsed time on daylight-saving nights (its minute or hour field starts with ``*``).
    The masks have bit n set when value n matches (months 1..12)."""

    text: str
    has_seconds: bool
    wild: bool
    seconds: int
    minutes: int
    hours: int
    months: int
    days: Days


def _bits(values: range | list[int] | set[int]) -> int:
    mask = 0
    for value in values:
        mask |= 1 << value
    return mask


def _value(text: str, field: int) -> int | None:
    """A number or a name in ``field``, or None when it is neither or out of range."""
    low, high = _LIMITS[field]
    if text.isdigit():
        number = int(text) if len(text) <= 3 else high + 1
    else:
        number = _NAMES.get(field, {}).get(text, high + 1)
    return number if low <= number <= high else None


@lru_cache(maxsize=4096)
def _plain_field(text: str, field: int) -> int | None:
    """The mask of a field in the common grammar (numbers, names, ``*``, ``?``, ``a-b``, steps,
    lists), or None when it holds anything else (croniter then decides what it means)."""
    low, high = _LIMITS[field]
    top = 6 if field == _DOW else high
    mask = 0
    for item in text.upper().split(","):
        found = _PLAIN_ITEM.fullmatch(item)
        if found is None:
            return None
        head, step_text = found.group(1), found.group(2)
        step = 1
        if step_text is not None:
            step = int(step_text) if len(step_text) <= 3 else 0
            if step < 1:
                return None
        if head in ("*", "?"):
            if head == "?" and (field not in (_DOM, _DOW) or text != "?"):
                return None
            start, end = low, top
        elif "-" in head:
            first, last = (_value(part, field) for part in head.split("-"))
            if first is None or last is None or first > last:
                return None
            if field == _DOW and last == 7 and step_text is not None:
                return None
            start, end = first, last
        else:
            single = _value(head, field)
            if single is None:
                return None
            start, end = single, (top if step_text is not None else single)
            if field == _DOW and single == 7 and step_text is not None:
                return None
        mask |= _bits(range(start, end + 1, step))
    if field == _DOW and mask >> 7 & 1:
        mask = (mask | 1) & 0x7F  # 7 is Sunday too
    return mask


def _croniter_mask(values: list[int | str] | list[int], field: int) -> int:
    low, high = _LIMITS[field]
    if "*" in values:
        return _bits(range(low, high + 1))
    return _bits({int(v) for v in values})


# Parsing costs about 10 us; the cache spares it for the schedules in use, not for every job of a
# large fleet (a scheduler keeps what it needs itself).
@lru_cache(maxsize=16384)
def parse_schedule(text: str) -> Schedule:
    """Parse, validate and compile ``text``. Raises ValueError with a plain reason when it is not
    cron, when it never fires, or when it is a form processes could evaluate differently (see the
    module's docstring)."""
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
        schedule = _compile(expression.lower(), ["0", *_MACRO_FIELDS[expression.lower()].split(" ")])
        _first_fire(schedule)
        return schedule
    fields = expression.split(" ")
    if len(fields) not in (5, 6):
        raise ValueError(
            f"a schedule has 5 fields (minute hour day month weekday) or 6 (seconds first), not {len(fields)}"
        )
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
    six = fields if len(fields) == 6 else ["0", *fields]
    schedule = _compile(expression, six)
    _first_fire(schedule)
    return schedule


def _compile(expression: str, six: list[str]) -> Schedule:
    """Compile the six fields (seconds first) of ``expression``; croniter reads what we do not."""
    masks = [_plain_field(text, field) for field, text in enumerate(six)]
    has_seconds = len(expression.split(" ")) == 6
    # As cronie (MIN_STAR, HR_STAR): a minute or hour field starting with '*' follows real time.
    wild = six[_MINUTE].startswith("*") or six[_HOUR].startswith("*")
    both = six[_DOM][0] in "*?" or six[_DOW][0] in "*?"
    dom, dow = masks[_DOM], masks[_DOW]
    if dom is not None and dow is not None:
        days = Days(dom=dom, dow=dow, both=both)
    else:
        days = Days(dom=0, dow=0, both=both, calendar=f"0 0 {six[_DOM]} * {six[_DOW]}")
    plain = list(masks)
    if any(mask is None for mask in masks):
        expanded = _croniter_expand(expression, has_seconds)
        # croniter's expansion: 5 fields, then the seconds field last when there are 6.
        order = [expanded[5] if has_seconds else [0], *expanded[:5]]
        for field in (_SECOND, _MINUTE, _HOUR, _MONTH):
            if plain[field] is None:
                plain[field] = _croniter_mask(order[field], field)
    seconds_mask, minutes, hours, _, months, _ = plain
    assert seconds_mask is not None and minutes is not None and hours is not None and months is not None
    return Schedule(expression, has_seconds, wild, seconds_mask, minutes, hours, months, days)


def _croniter_expand(expression: str, has_seconds: bool) -> list[list[int | str]]:
    """croniter's reading of ``expression`` (its fields expanded), or ValueError when it has none."""
    try:
        valid = croniter.is_valid(expression, second_at_beginning=has_seconds)
    # is_valid only catches croniter's own errors; any other is still a text it cannot read.
    except (TypeError, IndexError, KeyError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"{expression!r} is not a valid cron expression")
    expanded, _ = croniter.expand(expression, second_at_beginning=has_seconds)
    return [list(values) for values in expanded]


def _first_fire(schedule: Schedule) -> None:
    """Raise ValueError when ``schedule`` names no instant at all (say, 30 February)."""
    epoch = _instant(datetime(2000, 1, 1, tzinfo=UTC))
    if _next_wall(schedule, epoch, epoch + _HORIZON_YEARS * 366 * _DAY) is None:
        raise ValueError(f"{schedule.text!r} never fires (no date matches it)")


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
    never fires. Daylight-saving nights follow cronie (see the module's docstring).
    """
    if after.tzinfo is None:
        raise ValueError("next_fire needs an aware datetime")
    parsed = parse_schedule(schedule)
    # Fires fall on whole seconds: the first candidate is the next whole second after ``after``.
    low = _instant(after) + 1
    limit = low + _HORIZON_YEARS * 366 * _DAY
    while low < limit:
        start, end, before, offset = _stretch(zone, low)
        # Clocks went forward at ``start``: a fixed-time job whose wall time fell in the gap fires
        # once, at the first instant after it (cronie runs the missed fixed-time jobs then).
        if (
            low == start
            and not parsed.wild
            and offset > before
            and _next_wall(parsed, start + before, start + offset) is not None
        ):
            return _utc(start)
        first_wall = low + offset
        if not parsed.wild and before > offset:
            # Clocks went back at ``start``: the walls before start + before came already.
            first_wall = max(first_wall, start + before)
        wall = _next_wall(parsed, first_wall, end + offset)
        if wall is not None:
            return _utc(wall - offset)
        low = end
    raise ValueError(f"{schedule!r} has no fire time after {after.isoformat()}")


def _instant(moment: datetime) -> int:
    """Whole seconds since the epoch, rounded down (``moment`` is aware)."""
    delta = moment - _EPOCH
    return delta.days * _DAY + delta.seconds


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _utc(instant: int) -> datetime:
    return datetime.fromtimestamp(instant, UTC)


def _next_wall(schedule: Schedule, first: int, end: int) -> int | None:
    """The first wall-clock time in [first, end) (seconds since 1970-01-01 00:00, as if UTC) that
    ``schedule``'s fields match, or None."""
    if first >= end:
        return None
    day_number, second_of_day = divmod(first, _DAY)
    today = date.fromordinal(_EPOCH_ORDINAL + day_number)
    year, month, day = today.year, today.month, today.day
    hour, rest = divmod(second_of_day, 3600)
    minute, second = divmod(rest, 60)
    last = date.fromordinal(_EPOCH_ORDINAL + (end - 1) // _DAY)
    last_month = (last.year, last.month)
    months, hours, minutes, seconds = schedule.months, schedule.hours, schedule.minutes, schedule.seconds
    while True:
        if (year, month) > last_month:
            return None
        if not months >> month & 1:
            found = _next_bit(months, month)
            if found is None:
                year, month = year + 1, _next_bit(months, 1) or 1
            else:
                month = found
            day, hour, minute, second = 1, 0, 0, 0
            continue
        found = _next_bit(_month_days(schedule.days, year, month), day)
        if found is None:
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
            day, hour, minute, second = 1, 0, 0, 0
            continue
        if found != day:
            day, hour, minute, second = found, 0, 0, 0
        found = _next_bit(hours, hour)
        if found is None:
            day, hour, minute, second = day + 1, 0, 0, 0
            continue
        if found != hour:
            hour, minute, second = found, 0, 0
        found = _next_bit(minutes, minute)
        if found is None:
            hour, minute, second = hour + 1, 0, 0
            continue
        if found != minute:
            minute, second = found, 0
        found = _next_bit(seconds, second)
        if found is None:
            minute, second = minute + 1, 0
            continue
        wall = (
            (date(year, month, day).toordinal() - _EPOCH_ORDINAL) * _DAY + hour * 3600 + minute * 60 + found
        )
        return wall if wall < end else None


def _next_bit(mask: int, start: int) -> int | None:
    """The lowest set bit of ``mask`` at or above ``start``."""
    rest = mask >> start
    if not rest:
        return None
    return start + (rest & -rest).bit_length() - 1


@lru_cache(maxsize=65536)
def _month_days(days: Days, year: int, month: int) -> int:
    """Bit d set when day d of ``month`` in ``year`` matches ``days``."""
    first = date(year, month, 1)
    length = ((date(year + 1, 1, 1) if month == 12 else date(year, month + 1, 1)) - first).days
    if days.calendar is not None:
        return _calendar_days(days.calendar, first, length)
    in_month = (1 << (length + 1)) - 2
    # isoweekday: Monday 1 .. Sunday 7; cron: Sunday 0 .. Saturday 6.
    weekday = first.isoweekday() % 7
    by_weekday = 0
    for day in range(1, length + 1):
        if days.dow >> ((weekday + day - 1) % 7) & 1:
            by_weekday |= 1 << day
    if days.both:
        return days.dom & by_weekday & in_month
    return (days.dom | by_weekday) & in_month


def _calendar_days(calendar: str, first: date, length: int) -> int:
    """The days of one month that croniter gives for ``calendar`` (``0 0 DOM * DOW``)."""
    mask = 0
    start = datetime(first.year, first.month, first.day) - timedelta(minutes=1)
    steps = croniter(calendar, start, implement_cron_bug=True)
    for _ in range(length):
        try:
            found: datetime = steps.get_next(datetime)
        except (CroniterBadDateError, CroniterError):
            break
        if (found.year, found.month) != (first.year, first.month):
            break
        mask |= 1 << found.day
    return mask


@lru_cache(maxsize=4096)
def _transitions(zone: tzinfo, year: int) -> tuple[tuple[int, int, int], ...]:
    """Every change of ``zone``'s UTC offset in ``year`` (UTC): (instant, offset before, offset
    after), offsets in seconds. Found by sampling every six hours and bisecting to the second
    (no zone changes its offset twice within six hours)."""
    if isinstance(zone, timezone):
        return ()
    begin = _instant(datetime(year, 1, 1, tzinfo=UTC))
    stop = _instant(datetime(year + 1, 1, 1, tzinfo=UTC))
    found = []
    step = 6 * 3600
    previous = _offset(zone, begin)
    at = begin
    while at < stop:
        following = min(at + step, stop)
        offset = _offset(zone, following)
        if offset != previous:
            low, high = at, following  # offset(low) == previous, offset(high) == offset
            while high - low > 1:
                middle = (low + high) // 2
                if _offset(zone, middle) == previous:
                    low = middle
                else:
                    high = middle
            found.append((high, previous, offset))
            previous = offset
        at = following
    return tuple(found)


def _offset(zone: tzinfo, instant: int) -> int:
    shift = datetime.fromtimestamp(instant, zone).utcoffset()
    return 0 if shift is None else shift.days * _DAY + shift.seconds


@lru_cache(maxsize=4096)
def _offsets(zone: tzinfo, year: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``zone``'s stretches of constant offset from the start of ``year - 1`` to the start of
    ``year + 2``: their start instants and their offsets. The first start is that boundary, not a
    change of offset; every other one is a change."""
    begin = _utc_year_start(year - 1)
    starts, offsets = [begin], [_offset(zone, begin)]
    for y in (year - 1, year, year + 1):
        for instant, _, offset in _transitions(zone, y):
            starts.append(instant)
            offsets.append(offset)
    return tuple(starts), tuple(offsets)


def _stretch(zone: tzinfo, instant: int) -> tuple[int, int, int, int]:
    """The stretch of constant offset holding ``instant``: (start, end, offset before start,
    offset). A start that is not a change of offset (a year boundary) has the same offset on both
    sides, and an end may be a year boundary that only bounds the search."""
    year = date.fromordinal(_EPOCH_ORDINAL + instant // _DAY).year
    starts, offsets = _offsets(zone, year)
    index = bisect_right(starts, instant) - 1
    end = starts[index + 1] if index + 1 < len(starts) else _utc_year_start(year + 2)
    before = offsets[index - 1] if index > 0 else offsets[index]
    return starts[index], end, before, offsets[index]


def _utc_year_start(year: int) -> int:
    return (date(year, 1, 1).toordinal() - _EPOCH_ORDINAL) * _DAY
