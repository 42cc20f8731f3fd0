"""Daylight-saving nights: ``next_fire`` against a plain reference that walks the minutes as cronie does.

The reference below knows nothing of ``common.cron``: it parses the fields into sets of
numbers, then walks real time minute by minute, reads the wall clock of the zone at each minute and
decides what cronie would run then (``find_jobs`` in cronie's ``src/cron.c``):

- a *wild* job (minute or hour field starting with ``*``) runs at every minute whose wall time
  matches: never in a skipped hour, twice in a repeated one;
- any other job runs the wall times between the last wall time already handled and now, once:
  after a jump forward it runs once if any skipped wall time (or now) matched; after a jump back
  it runs nothing until the wall clock passes the furthest wall time already handled.

A 6-field schedule (seconds first) is judged by the same rule, at the seconds it names within each
minute; its seconds field never makes it wild.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.cron import next_fire

ZONES = [
    "America/New_York",
    "Europe/London",
    "Europe/Berlin",
    "Australia/Lord_Howe",
    "Australia/Sydney",
    "Asia/Kolkata",
    "UTC",
]
MINUTE = timedelta(minutes=1)


# -- the reference ---------------------------------------------------------------------------------


def field_values(text: str, low: int, high: int) -> set[int]:
    """The numbers one cron field selects (numbers, '*', ranges, steps, lists)."""
    values: set[int] = set()
    for item in text.split(","):
        head, _, step = item.partition("/")
        if head == "*":
            first, last = low, high
        elif "-" in head:
            first, last = (int(part) for part in head.split("-"))
        else:
            first = int(head)
            last = high if step else first
        values.update(range(first, last + 1, int(step or 1)))
    return values


class Reference:
    """A cron expression (5 fields, or 6 with seconds first), matched against wall-clock times the
    plain way."""

    def __init__(self, expression: str) -> None:
        fields = expression.split()
        self.seconds = sorted(field_values(fields[0], 0, 59)) if len(fields) == 6 else [0]
        minute, hour, dom, month, dow = fields[-5:]
        self.minutes = field_values(minute, 0, 59)
        self.hours = field_values(hour, 0, 23)
        self.doms = field_values(dom, 1, 31)
        self.months = field_values(month, 1, 12)
        self.dows = {d % 7 for d in field_values(dow, 0, 6)}
        self.either_star = dom.startswith("*") or dow.startswith("*")
        # The seconds field never makes a job wild: the minute and hour fields decide.
        self.wild = minute.startswith("*") or hour.startswith("*")

    def matches(self, wall: datetime) -> bool:
        """Whether the wall-clock minute ``wall`` matches (minute, hour, day, month)."""
        if wall.minute not in self.minutes or wall.hour not in self.hours or wall.month not in self.months:
            return False
        by_dom = wall.day in self.doms
        by_dow = wall.isoweekday() % 7 in self.dows
        return (by_dom and by_dow) if self.either_star else (by_dom or by_dow)

    def fires(self, zone: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
        """Every instant in (start, end) at which cronie would run the job, in UTC."""
        # Walk from well before ``start`` so that the furthest wall time handled is known there.
        at = start.replace(second=0, microsecond=0) - timedelta(minutes=75)
        handled = at.astimezone(zone).replace(tzinfo=None)
        found: list[datetime] = []
        while at < end:
            at += MINUTE
            wall = at.astimezone(zone).replace(tzinfo=None)
            this_minute = [at + timedelta(seconds=s) for s in self.seconds]
            if self.wild:
                moments = this_minute if self.matches(wall) else []
            else:
                # The wall minutes jumped over (clocks went forward) run once, now; the minute
                # now runs if the wall clock has not been here before (clocks went back).
                skipped, moment = False, handled + MINUTE
                while moment < wall:
                    skipped = skipped or self.matches(moment)
                    moment += MINUTE
                moments = [at] if skipped else []
                if wall > handled and self.matches(wall):
                    moments = sorted({*moments, *this_minute})
            handled = max(handled, wall)
            found.extend(m for m in moments if start < m < end)
        return found


def chained(expression: str, zone: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    found, at = [], start
    while (at := next_fire(expression, zone, at)) < end:
        found.append(at)
    return found


def transitions(zone: str, years: range) -> list[datetime]:
    """The instants at which ``zone``'s UTC offset changes, found by stepping minutes near each
    hourly change (plainly, without ``common.cron``)."""
    tz = ZoneInfo(zone)
    found = []
    at = datetime(years.start, 1, 1, tzinfo=UTC)
    stop = datetime(years.stop, 1, 1, tzinfo=UTC)
    offset = at.astimezone(tz).utcoffset()
    while at < stop:
        following = at + timedelta(hours=1)
        if following.astimezone(tz).utcoffset() != offset:
            moment = at
            while moment.astimezone(tz).utcoffset() == offset:
                moment += MINUTE
            found.append(moment)
            offset = moment.astimezone(tz).utcoffset()
        at = following
    return found


YEARS = range(2025, 2029)
NIGHTS = {zone: transitions(zone, YEARS) for zone in ZONES}


def test_the_zones_have_their_daylight_saving_nights() -> None:
    assert len(NIGHTS["America/New_York"]) == 2 * len(YEARS)
    assert len(NIGHTS["Australia/Lord_Howe"]) == 2 * len(YEARS)
    assert NIGHTS["Asia/Kolkata"] == NIGHTS["UTC"] == []


# -- random expressions, near every transition -----------------------------------------------------


def minute_field(pick: random.Random) -> str:
    kind = pick.choice(["*", "step", "value", "list", "range", "range-step", "value-step"])
    a, b = sorted((pick.randint(0, 59), pick.randint(0, 59)))
    step = pick.randint(1, 40)
    return {
        "*": "*",
        "step": f"*/{step}",
        "value": str(a),
        "list": ",".join(str(m) for m in sorted({a, b, pick.randint(0, 59)})),
        "range": f"{a}-{b}",
        "range-step": f"{a}-{b}/{step}",
        "value-step": f"{a}/{step}",
    }[kind]


def hour_field(pick: random.Random) -> str:
    # Hours around the changes (0-4 local) come often, so that fixed-time jobs meet the gaps and
    # the repeated hours.
    def hour() -> int:
        return pick.randint(0, 4) if pick.random() < 0.7 else pick.randint(0, 23)

    kind = pick.choice(["*", "step", "value", "value", "list", "range"])
    a, b = sorted((hour(), hour()))
    return {
        "*": "*",
        "step": f"*/{pick.randint(1, 12)}",
        "value": str(a),
        "list": ",".join(str(h) for h in sorted({a, b, hour()})),
        "range": f"{a}-{b}",
    }[kind]


def random_case(seed: int) -> tuple[str, str, datetime]:
    """An expression (one in four with a seconds field), a zone and a start instant, nine in ten
    within hours of a change of offset."""
    pick = random.Random(seed)
    seconds = [pick.choice(["0", "30", "0,45", "*/20", "15-17"])] if pick.random() < 0.25 else []
    expression = " ".join(
        [
            *seconds,
            minute_field(pick),
            hour_field(pick),
            pick.choice(["*", "*", "*", "1-15", "*/2", "8,9,10"]),
            pick.choice(["*", "*", "*", "3,4,10,11", "1-6"]),
            pick.choice(["*", "*", "*", "0", "1-5", "*/2", "6,0"]),
        ]
    )
    zone = pick.choice(ZONES)
    nights = NIGHTS[zone]
    if nights and pick.random() < 0.9:
        anchor = pick.choice(nights)
    else:
        anchor = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=pick.randrange(4 * 365 * 86_400))
    shift = timedelta(minutes=pick.randint(-100, 40), seconds=pick.choice([0, 0, 1, 30, 59]))
    return expression, zone, anchor + shift


# Hypothesis draws one seed per example and the case is built from it: drawing each field through
# hypothesis cost more than the check itself (10,000 examples must stay well under 30 s).
@settings(max_examples=10_000, derandomize=True, deadline=None, database=None)
@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_next_fire_agrees_with_cronie_minute_by_minute(seed: int) -> None:
    """10,000 expressions x zones x start instants, nine in ten within hours of a change of
    offset: every fire in the next two hours, from ``next_fire`` chained, is the reference's."""
    expression, zone_name, after = random_case(seed)
    zone = ZoneInfo(zone_name)
    end = after + timedelta(hours=2)
    expected = Reference(expression).fires(zone, after, end)
    assert chained(expression, zone, after, end) == expected, (expression, zone_name, after)


def test_the_random_cases_cover_every_night_and_both_kinds_of_job() -> None:
    cases = [random_case(seed) for seed in range(3000)]
    assert {zone for _, zone, _ in cases} == set(ZONES)
    near = {(zone, min(NIGHTS[zone], key=lambda n: abs(n - at))) for _, zone, at in cases if NIGHTS[zone]}
    assert len(near) == sum(len(n) for n in NIGHTS.values())
    assert {Reference(e).wild for e, _, _ in cases} == {True, False}
    assert {len(e.split()) for e, _, _ in cases} == {5, 6}


# -- the known nights, spelled out -------------------------------------------------------------------


def local_fires(expression: str, zone: str, start: str, hours: float) -> list[str]:
    """Fires in the ``hours`` of real time after local ``start``, as local 'HH:MM:SS+hh:mm'."""
    tz = ZoneInfo(zone)
    begin = datetime.fromisoformat(start).replace(tzinfo=tz).astimezone(UTC)
    found = chained(expression, tz, begin, begin + timedelta(hours=hours))
    return [f.astimezone(tz).isoformat()[11:] for f in found]


@pytest.mark.parametrize(
    ("expression", "zone", "start", "hours", "expected"),
    [
        # New York, 8 March 2026: 02:00 EST becomes 03:00 EDT.
        # Wild: the hour field matches 00, 02, 04: the skipped 02:xx never fires, 03:00 never
        # matched (it did with croniter).
        (
            "*/10 */2 * * *",
            "America/New_York",
            "2026-03-08T01:55",
            3,
            [
                "04:00:00-04:00",
                "04:10:00-04:00",
                "04:20:00-04:00",
                "04:30:00-04:00",
                "04:40:00-04:00",
                "04:50:00-04:00",
            ],
        ),
        # Fixed: 02:30 does not exist; it fires once, at the first instant after the gap.
        ("30 2 * * *", "America/New_York", "2026-03-08T00:00", 24, ["03:00:00-04:00"]),
        # Fixed with several wall times in the gap: still once.
        ("0,15,30,45 2 * * *", "America/New_York", "2026-03-08T00:00", 24, ["03:00:00-04:00"]),
        # Fixed, matching 02:30 and 03:00: the end of the gap is both; one fire.
        ("0,30 2,3 * * *", "America/New_York", "2026-03-08T01:00", 3, ["03:00:00-04:00", "03:30:00-04:00"]),
        # Wild by its minute field: follows elapsed time, nothing in the skipped hour.
        ("*/20 2 * * *", "America/New_York", "2026-03-08T00:00", 24, []),
        # New York, 1 November 2026: 02:00 EDT becomes 01:00 EST; 01:xx comes twice.
        ("30 1 * * *", "America/New_York", "2026-11-01T00:00", 24, ["01:30:00-04:00"]),
        ("30 1 * * *", "America/New_York", "2026-11-01T01:40", 2, []),
        (
            "*/30 1 * * *",
            "America/New_York",
            "2026-11-01T00:50",
            3,
            [
                "01:00:00-04:00",
                "01:30:00-04:00",
                "01:00:00-05:00",
                "01:30:00-05:00",
            ],
        ),
        (
            "30 * * * *",
            "America/New_York",
            "2026-11-01T00:00",
            4,
            [
                "00:30:00-04:00",
                "01:30:00-04:00",
                "01:30:00-05:00",
                "02:30:00-05:00",
            ],
        ),
        # Europe/Berlin: 02:00 -> 03:00 on 29 March, 03:00 -> 02:00 on 25 October 2026.
        ("30 2 * * *", "Europe/Berlin", "2026-03-29T00:00", 24, ["03:00:00+02:00"]),
        ("30 2 * * *", "Europe/Berlin", "2026-10-25T00:00", 24, ["02:30:00+02:00"]),
        (
            "0 */2 * * *",
            "Europe/Berlin",
            "2026-10-25T01:30",
            4,
            [
                "02:00:00+02:00",
                "02:00:00+01:00",
                "04:00:00+01:00",
            ],
        ),
        # Lord Howe shifts by half an hour: 02:00 +10:30 becomes 02:30 +11:00 on 4 October 2026,
        # and 02:00 +11:00 becomes 01:30 +10:30 on 5 April 2026.
        ("0,15 2 * * *", "Australia/Lord_Howe", "2026-10-04T00:00", 24, ["02:30:00+11:00"]),
        (
            "*/15 * * * *",
            "Australia/Lord_Howe",
            "2026-10-04T01:40",
            1,
            [
                "01:45:00+10:30",
                "02:30:00+11:00",
                "02:45:00+11:00",
                "03:00:00+11:00",
            ],
        ),
        ("45 1 * * *", "Australia/Lord_Howe", "2026-04-05T00:00", 24, ["01:45:00+11:00"]),
        (
            "*/15 * * * *",
            "Australia/Lord_Howe",
            "2026-04-05T01:20",
            1.25,
            [
                "01:30:00+11:00",
                "01:45:00+11:00",
                "01:30:00+10:30",
                "01:45:00+10:30",
                "02:00:00+10:30",
            ],
        ),
        # London, 29 March 2026: 01:00 GMT becomes 02:00 BST.
        ("30 1 * * *", "Europe/London", "2026-03-29T00:00", 24, ["02:00:00+01:00"]),
        # Sydney, 5 April 2026: 03:00 AEDT becomes 02:00 AEST.
        ("0 2 * * *", "Australia/Sydney", "2026-04-05T00:00", 24, ["02:00:00+11:00"]),
        # Seconds never make a job wild: minute 30 hour 2 names a wall time, fired after the gap.
        ("*/20 30 2 * * *", "Europe/Berlin", "2026-03-29T00:00", 24, ["03:00:00+02:00"]),
        (
            "*/20 30 2 * * *",
            "Europe/Berlin",
            "2026-10-25T02:00",
            3,
            [
                "02:30:00+02:00",
                "02:30:20+02:00",
                "02:30:40+02:00",
            ],
        ),
        # A wild 6-field schedule follows elapsed time, as a 5-field one.
        (
            "0 0 * * * *",
            "Europe/Berlin",
            "2026-10-25T01:30",
            3,
            [
                "02:00:00+02:00",
                "02:00:00+01:00",
                "03:00:00+01:00",
            ],
        ),
        ("0 0 * * * *", "Europe/Berlin", "2026-03-29T01:30", 2, ["03:00:00+02:00", "04:00:00+02:00"]),
    ],
)
def test_known_daylight_saving_nights(
    expression: str, zone: str, start: str, hours: float, expected: list[str]
) -> None:
    assert local_fires(expression, zone, start, hours) == expected


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        # Half-hour shifts that cronsim 2.8 got wrong (03:36 and 04:46), found by bench_cron.py.
        ("*/12 3 8 * 0,6", datetime(2026, 4, 4, 10, 52, 9, tzinfo=UTC), "2026-04-05T03:00:00+10:30"),
        ("*/23 4-23 * * 0", datetime(2026, 9, 28, 17, 20, 3, tzinfo=UTC), "2026-10-04T04:00:00+11:00"),
    ],
)
def test_lord_howe_after_its_half_hour_shifts(expression: str, after: datetime, expected: str) -> None:
    zone = ZoneInfo("Australia/Lord_Howe")
    assert next_fire(expression, zone, after).astimezone(zone).isoformat() == expected


def test_a_fixed_job_after_the_gap_fire_goes_on_as_usual() -> None:
    # Asked again from the end-of-gap fire itself, the next fire is the next day's 02:30.
    ny = ZoneInfo("America/New_York")
    gap_fire = next_fire("30 2 * * *", ny, datetime(2026, 3, 8, 5, 0, tzinfo=UTC))
    assert gap_fire == datetime(2026, 3, 8, 7, 0, tzinfo=UTC)
    assert next_fire("30 2 * * *", ny, gap_fire) == datetime(2026, 3, 9, 6, 30, tzinfo=UTC)


def test_an_hourly_job_keeps_real_hours_through_both_nights() -> None:
    ny = ZoneInfo("America/New_York")
    for day in ("2026-03-08", "2026-11-01"):
        start = datetime.fromisoformat(day).replace(tzinfo=ny).astimezone(UTC)
        found = chained("@hourly", ny, start, start + timedelta(hours=24))
        assert all(b - a == timedelta(hours=1) for a, b in pairwise(found))
