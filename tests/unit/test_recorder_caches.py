"""The recorder's caches answer exactly what they cache: next fires, parsed specs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from common.actions import ShellAction
from common.cron import next_fire
from common.jobs import JobSpec
from common.next_fires import NextFires
from monitor.health_store import _readable

SCHEDULES = ["* * * * *", "*/7 * * * *", "30 2 * * *", "0 0 * * 0", "*/5 * * * * *", "@hourly"]
ZONES = ["UTC", "America/New_York", "Europe/Berlin", "Australia/Lord_Howe"]
START = datetime(2026, 3, 1, tzinfo=UTC)


def _spec(schedule: str, zone: str) -> JobSpec:
    return JobSpec(name="j", schedule=schedule, timezone=zone, action=ShellAction(argv=["true"]))


@settings(max_examples=60, deadline=None)
@given(
    schedule=st.sampled_from(SCHEDULES),
    zone=st.sampled_from(ZONES),
    offsets=st.lists(st.integers(min_value=0, max_value=300 * 86400), min_size=1, max_size=40),
)
def test_next_fires_answers_as_next_fire_whatever_the_order_of_the_questions(
    schedule: str, zone: str, offsets: list[int]
) -> None:
    spec = _spec(schedule, zone)
    fires = NextFires()
    for offset in offsets + sorted(offsets):
        after = START + timedelta(seconds=offset)
        assert fires.after(spec, after) == next_fire(schedule, spec.zone(), after)
        # Right before and at the fire it gave: the interval's two ends.
        fire = fires.after(spec, after)
        assert fires.after(spec, fire - timedelta(microseconds=1)) == fire
        assert fires.after(spec, fire) == next_fire(schedule, spec.zone(), fire)


def test_a_parsed_spec_is_parsed_once_and_a_refused_one_stays_refused() -> None:
    text = _spec("*/5 * * * *", "UTC").canonical_json().decode()
    first = _readable(text)
    assert first is not None and first.schedule == "*/5 * * * *"
    assert _readable(text) is first
    assert _readable('{"name": "j", "schedule": "not cron"}') is None
    assert _readable('{"name": "j", "schedule": "not cron"}') is None
