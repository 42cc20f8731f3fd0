"""Cron maths: strictly later, UTC out, cronie's rules on daylight-saving nights."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.cron import next_fire, parse_schedule, parse_timezone

ZONES = [
    "UTC",
    "America/New_York",
    "Europe/Berlin",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "America/Sao_Paulo",
]
SCHEDULES = [
    "* * * * *",
    "*/7 * * * *",
    "30 1 * * *",
    "30 2 * * *",
    "0 0 * * 0",
    "*/10 * * * * *",
    "@hourly",
    "@daily",
    "15 */3 * * 1-5",
]
instants = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2035, 1, 1), timezones=st.just(UTC)
)


def fires(schedule: str, zone: str, start: datetime, end: datetime) -> list[datetime]:
    tz = ZoneInfo(zone)
    found, at = [], start
    while (at := next_fire(schedule, tz, at)) < end:
        found.append(at)
    return found


@settings(max_examples=300)
@given(st.sampled_from(SCHEDULES), st.sampled_from(ZONES), instants)
def test_the_next_fire_is_strictly_later_and_in_utc(schedule: str, zone: str, after: datetime) -> None:
    first = next_fire(schedule, ZoneInfo(zone), after)
    second = next_fire(schedule, ZoneInfo(zone), first)
    assert after < first < second
    assert first.tzinfo is UTC or first.utcoffset() == timedelta(0)


@settings(max_examples=100)
@given(st.sampled_from(ZONES), instants)
def test_a_daily_job_fires_once_per_local_day(zone: str, after: datetime) -> None:
    days = [
        f.astimezone(ZoneInfo(zone)).date()
        for f in fires("30 1 * * *", zone, after, after + timedelta(days=10))
    ]
    assert len(days) == len(set(days))
    assert len(days) >= 9


@pytest.mark.parametrize(
    ("zone", "day", "schedule", "expected_local"),
    [
        # Clocks go back: a fixed-time job fires once, at the first occurrence.
        ("America/New_York", "2026-11-01", "30 1 * * *", ["01:30-04:00"]),
        ("Europe/Berlin", "2026-10-25", "30 2 * * *", ["02:30+02:00"]),
        ("Australia/Lord_Howe", "2026-04-05", "45 1 * * *", ["01:45+11:00"]),
        # Hour lists and ranges name wall-clock hours too.
        ("America/New_York", "2026-11-01", "30 1,13 * * *", ["01:30-04:00", "13:30-05:00"]),
        ("America/New_York", "2026-11-01", "30 1-2 * * *", ["01:30-04:00", "02:30-05:00"]),
        # Clocks go forward: a wall time in the gap fires right after it, not never.
        ("Europe/Berlin", "2026-03-29", "30 2 * * *", ["03:00+02:00"]),
        ("America/New_York", "2026-03-08", "30 2 * * *", ["03:00-04:00"]),
        # Interval jobs keep their interval in real time through a repeated hour.
        ("America/New_York", "2026-11-01", "0 * * * *", None),
    ],
)
def test_daylight_saving_nights_follow_cronie(
    zone: str, day: str, schedule: str, expected_local: list[str] | None
) -> None:
    tz = ZoneInfo(zone)
    start = datetime.fromisoformat(day).replace(tzinfo=tz)
    found = fires(schedule, zone, start, start + timedelta(days=1))
    local = [f.astimezone(tz).strftime("%H:%M%z") for f in found]
    if expected_local is None:
        # The day has 25 real hours; after midnight there are 24 top-of-hours before the next
        # midnight, 1:00 coming twice (EDT, then EST).
        assert len(found) == 24
        assert all(b - a == timedelta(hours=1) for a, b in pairwise(found))
    else:
        assert [x[:5] + x[5:8] + ":" + x[8:] for x in local] == expected_local


def test_six_fields_put_seconds_first() -> None:
    at = datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)
    assert next_fire("*/10 * * * * *", UTC, at) == at + timedelta(seconds=10)
    assert next_fire("0 30 * * * *", UTC, at) == at + timedelta(minutes=30)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("* * * *", "5 fields"),
        ("61 * * * *", "not a valid cron expression"),
        ("@sometimes", "unknown macro"),
        ("* * * * * * *", "not 7"),
        ("0 0 30 2 *", "never fires"),
    ],
)
def test_bad_schedules_say_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_schedule(text)


def test_unknown_time_zones_say_so() -> None:
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Base'"):
        parse_timezone("Mars/Base")


def test_naive_instants_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        next_fire("* * * * *", UTC, datetime(2026, 1, 1))


# -- only what every scheduler evaluates identically (issue 12) ----------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        # croniter draws R afresh in each process: two schedulers fired at different instants.
        ("R * * * *", "random"),
        ("r * * * *", "random"),
        ("0 R(0-5) * * *", "random"),
        ("*/5 * * * * R", "random"),
        ("0 0 * * R", "random"),
        ("H * * * *", "hashed"),
        ("H(0-29)/10 * * * *", "hashed"),
        ("0 h * * *", "hashed"),
        ("x" * 2000, "too long"),
        ("0 0 * * 1\x00", "character"),
        ("0 0 * * 1\u00a0", "character"),
        ("٣ * * * *", "character"),
        ("0 0 0 1 1 * 2030", "not 7"),  # croniter's year field
        ("@reboot", "unknown macro"),
        ("@every 5m", "unknown macro"),
        ("0 0 LW * *", "not a valid cron expression"),
    ],
)
def test_schedules_that_processes_could_disagree_on_are_refused(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_schedule(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Month and weekday names are not R or H, though they contain those letters.
        ("0 0 * MAR,APR THU,FRI", "2026-03-05T00:00"),
        ("0 0 ? * MON", "2026-01-05T00:00"),  # '?' is '*'
        ("0 0 L * *", "2026-01-31T00:00"),  # the last day of the month
        ("0 0 * * L5", "2026-01-30T00:00"),  # the last Friday of the month
        ("0 0 * * 1#2", "2026-01-12T00:00"),  # the second Monday
        ("0 0 15W * *", "2026-01-15T00:00"),  # the weekday nearest the 15th
        ("0 0 17W 1 *", "2026-01-16T00:00"),  # the 17th is a Saturday
    ],
)
def test_deterministic_extensions_are_accepted(text: str, expected: str) -> None:
    after = datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC)
    assert next_fire(text, UTC, after).strftime("%Y-%m-%dT%H:%M") == expected


@settings(max_examples=500)
@given(st.text(alphabet="0123456789*,-/?#@LWlwHhRr()JANFEBMARSUNMONabc \t\x00é", max_size=40))
def test_any_text_is_a_schedule_or_a_value_error(text: str) -> None:
    try:
        schedule = parse_schedule(text)
    except ValueError:
        return
    assert "r" not in schedule.text.lower().replace("mar", "").replace("apr", "").replace("fri", "")
    next_fire(schedule.text, UTC, datetime(2026, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("a" * 5000, "too long"),
        ("America", "unknown time zone"),
        ("../etc/passwd", "unknown time zone"),
        ("/etc/localtime", "unknown time zone"),
        ("Europe/Paris\x00", "unknown time zone"),
        ("zone.tab", "unknown time zone"),
        ("", "unknown time zone"),
    ],
)
def test_odd_time_zone_names_are_a_value_error(name: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_timezone(name)


ACCEPTED_EXTENSIONS = ["0 0 L * *", "0 12 * * L5", "0 0 * * 1#2", "0 0 15W * *", "*/7 * ? * MON-FRI"]


def test_every_accepted_schedule_gives_the_same_fires_in_another_process() -> None:
    # What R broke: each scheduler process drew its own value and fired at its own instant.
    after = datetime(2026, 1, 1, tzinfo=UTC)
    script = (
        "import sys; from datetime import datetime, UTC; from zoneinfo import ZoneInfo\n"
        "from common.cron import next_fire\n"
        "at = datetime(2026, 1, 1, tzinfo=UTC)\n"
        "for schedule in sys.argv[1:]:\n"
        "    print(next_fire(schedule, ZoneInfo('Europe/Berlin'), at).isoformat())\n"
    )
    here = [next_fire(s, ZoneInfo("Europe/Berlin"), after).isoformat() for s in ACCEPTED_EXTENSIONS]
    for _ in range(2):
        there = subprocess.run(
            [sys.executable, "-c", script, *ACCEPTED_EXTENSIONS], capture_output=True, text=True, check=True
        )
        assert there.stdout.split() == here
