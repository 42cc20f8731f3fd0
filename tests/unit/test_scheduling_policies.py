"""Interval schedules, deterministic jitter and the misfire policy: the pure functions, with
hypothesis, against plain references written here."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import JobFileError
from common.intervals import EPOCH, MAX_INTERVAL_SECONDS, next_interval_fire, parse_interval
from common.jitter import jitter_offset
from common.jobs import JobSpec, parse_jobs, spec_from_json
from common.messages import RunStatus
from monitor.health import (
    HealthRecord,
    RunFinishedInput,
    RunStartedInput,
    State,
    Tick,
    advance,
    initial_record,
    next_deadline,
)
from scheduler.misfire import MAX_CATCHUP_FIRES, START_TOLERANCE, count_fires, missed_before, settle_backlog

ACTION = {"type": "shell", "argv": ["true"]}
instants = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
intervals = st.integers(min_value=1, max_value=MAX_INTERVAL_SECONDS)


def job(**fields: object) -> JobSpec:
    """A job of ``fields`` (an every-10s job with a shell action unless they say otherwise)."""
    data: dict[str, object] = {"name": "j", "action": ACTION}
    if "schedule" not in fields:
        data["every"] = "10s"
    return JobSpec.model_validate({**data, **fields}, strict=True)


# Interval schedules.


@given(every=intervals, after=instants)
def test_an_interval_fire_is_the_next_multiple_of_the_interval_since_the_epoch(
    every: int, after: datetime
) -> None:
    fire = next_interval_fire(every, after)
    assert after < fire <= after + timedelta(seconds=every)
    assert (fire - EPOCH) % timedelta(seconds=every) == timedelta(0)
    assert fire.tzinfo is not None and fire.utcoffset() == timedelta(0)


@given(every=intervals, after=instants, millionths=st.integers(0, 999_999))
def test_every_scheduler_computes_the_same_fire_whenever_it_asks(
    every: int, after: datetime, millionths: int
) -> None:
    """Anchored to the epoch, never to "now": two schedulers asking at different moments between
    the same two fires (or one restarted) get the same instant, so the same trigger id."""
    fire = next_interval_fire(every, after)
    previous = fire - timedelta(seconds=every)
    other = previous + timedelta(microseconds=every * millionths)
    assert next_interval_fire(every, other) == fire


@given(every=st.integers(min_value=1, max_value=3600), after=instants)
def test_chained_interval_fires_step_by_exactly_the_interval(every: int, after: datetime) -> None:
    at = next_interval_fire(every, after)
    for _ in range(5):
        following = next_interval_fire(every, at)
        assert following - at == timedelta(seconds=every)
        at = following


def test_intervals_are_bounded_and_naive_instants_refused() -> None:
    assert parse_interval("45s") == 45
    assert parse_interval("2h") == 7200
    for bad in ("0s", "1.5s", "every 5s", "367d", "100w"):
        with pytest.raises(ValueError):
            parse_interval(bad)
    with pytest.raises(ValueError):
        next_interval_fire(10, datetime(2026, 1, 1))
    assert next_interval_fire(45, datetime(2026, 1, 1, tzinfo=UTC)) == datetime(
        2026, 1, 1, 0, 0, 45, tzinfo=UTC
    )


# The jobs file.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('schedule = "* * * * *"\nevery = "45s"\n', r"^jobs.toml:2: job 'a', field schedule: .*not both"),
        ('pool = "default"\n', r"^jobs.toml:1: job 'a', field schedule: a job needs a schedule"),
        ('\nevery = "45 seconds"\n', r"^jobs.toml:3: job 'a', field every: .*not a duration"),
        ('eveyr = "45s"\n', r"field eveyr: unknown field"),
    ],
)
def test_a_job_has_a_schedule_or_an_interval_never_both_nor_neither(text: str, expected: str) -> None:
    with pytest.raises(JobFileError, match=expected):
        parse_jobs("[jobs.a]\n" + text, "jobs.toml")


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"every": "10s", "jitter": "11s"}, "jitter", "longer than the interval"),
        ({"every": "10s", "jitter": "2d"}, "jitter", "longer than a day"),
        ({"every": "10s", "misfire": "skip", "catchup": "1h"}, "catchup", "no meaning"),
        ({"every": "10s", "misfire": "all", "catchup": "8d"}, "catchup", "longer than a week"),
        ({"every": "10s", "misfire": "some"}, "misfire", "'skip', 'once' or 'all'"),
    ],
)
def test_policy_fields_are_checked_and_named(fields: dict[str, str], field: str, reason: str) -> None:
    text = "[jobs.a]\n" + "".join(f'{key} = "{value}"\n' for key, value in fields.items())
    with pytest.raises(JobFileError, match=rf"field {field}: .*{reason}"):
        parse_jobs(text, "jobs.toml")


def test_a_cron_job_stored_before_these_fields_keeps_its_fingerprint() -> None:
    cron = job(schedule="0 3 * * *")
    assert b'"every"' not in cron.canonical_json()
    assert b'"misfire"' not in cron.canonical_json() and b'"jitter"' not in cron.canonical_json()
    every = job(every="45s", jitter="5s", misfire="all", catchup="2h")
    assert spec_from_json(every.canonical_json()) == every
    assert b'"schedule"' not in every.canonical_json()
    assert every.schedule_text() == "every 45s"


# Jitter.


NAMES = st.from_regex(r"[a-z][a-z0-9_-]{0,20}", fullmatch=True)


@given(name=NAMES, at=instants, window=st.integers(1, 86400))
def test_a_jitter_offset_is_stable_and_inside_the_window(name: str, at: datetime, window: int) -> None:
    offset = jitter_offset(name, at, window)
    assert timedelta(0) <= offset < timedelta(seconds=window)
    assert jitter_offset(name, at, window) == offset
    # The same instant written in another zone is the same fire: the same offset.
    assert jitter_offset(name, at.astimezone(EST), window) == offset


EST = datetime(2026, 1, 1, tzinfo=UTC).astimezone().tzinfo or UTC


def test_jitter_offsets_spread_over_the_window() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    offsets = [jitter_offset("j", start + timedelta(minutes=i), 60).total_seconds() for i in range(2000)]
    quarters = [sum(1 for o in offsets if q * 15 <= o < (q + 1) * 15) for q in range(4)]
    assert all(400 <= count <= 600 for count in quarters), quarters
    names = {jitter_offset(f"job-{i}", start, 60) for i in range(100)}
    assert len(names) > 90  # different jobs due together go out at different moments
    assert jitter_offset("j", start, 0) == timedelta(0)


def test_a_fire_goes_out_at_its_instant_plus_its_offset_and_its_trigger_keeps_the_instant() -> None:
    spec = job(every="1m", jitter="30s")
    at = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    out = spec.publish_at(at)
    assert out == at + jitter_offset("j", at, 30) and at <= out < at + timedelta(seconds=30)
    trigger = spec.trigger_at(at, out)
    assert trigger.id == "j@2026-01-01T12:00:00Z" and trigger.scheduled_at == at
    assert trigger.expires_at == out + timedelta(seconds=spec.expires_after_seconds)


@given(start=instants, runs=st.integers(1, 20))
@settings(max_examples=50)
def test_the_monitor_never_calls_a_jittered_job_late_for_its_jitter(start: datetime, runs: int) -> None:
    """Each run starts at the instant the scheduler sends it (instant + offset): never late."""
    spec = job(every="1m", jitter="50s", grace_seconds=0)
    record: HealthRecord = initial_record(spec, start)
    for index in range(runs):
        assert record.due_at is not None
        sent = spec.publish_at(record.due_at)
        assert next_deadline(record, spec) == record.due_at + timedelta(seconds=50)
        record, flips = advance(record, Tick(), spec, sent)
        assert not [f for f in flips if f.to_state is State.LATE]
        record, _ = advance(record, RunStartedInput(f"r{index}", sent), spec, sent)
        end = sent + timedelta(seconds=1)
        finished = RunFinishedInput(f"r{index}", RunStatus.SUCCEEDED, end, sent)
        record, _ = advance(record, finished, spec, end)
        assert record.state is State.UP


# The misfire policy.


def _reference(spec: JobSpec, first: datetime, now: datetime) -> list[datetime]:
    """Every instant of ``spec`` in [first, now], walked one by one."""
    found, at = [], first - timedelta(microseconds=1)
    while (at := spec.next_fire(at)) <= now:
        found.append(at)
    return found


POLICIES = st.sampled_from(["skip", "once", "all"])


@given(
    every=st.integers(1, 600),
    policy=POLICIES,
    catchup=st.one_of(st.none(), st.integers(1, 7200)),
    down=st.integers(5, 20000),
    start=instants,
)
@settings(max_examples=300, deadline=None)
def test_a_backlog_is_settled_by_the_policy_and_every_missed_fire_is_counted(
    every: int, policy: str, catchup: int | None, down: int, start: datetime
) -> None:
    fields: dict[str, object] = {"every": f"{every}s", "misfire": policy}
    if catchup is not None and policy != "skip":
        fields["catchup"] = f"{catchup}s"
    spec = job(**fields)
    first = spec.next_fire(start)
    now = first + timedelta(seconds=down)
    backlog = _reference(spec, first, now)
    settled = settle_backlog(spec, first, now, now)
    window = spec.catchup_seconds()
    recent = [at for at in backlog if window is None or at >= now - timedelta(seconds=window)]
    if policy == "skip":
        assert settled.fire == ()
    elif policy == "once":
        assert list(settled.fire) == recent[-1:]
    else:
        assert list(settled.fire) == recent[-len(settled.fire) :] if settled.fire else recent == []
        assert len(settled.fire) == min(len(recent), MAX_CATCHUP_FIRES) or (
            MAX_CATCHUP_FIRES // 2 < len(settled.fire) <= MAX_CATCHUP_FIRES
        )
    assert settled.counted_all
    assert settled.skipped + len(settled.fire) == len(backlog)
    assert settled.first_missed == first and settled.last_missed == backlog[-1]
    assert settled.next_at is not None and settled.next_at > now >= settled.last_missed


@pytest.mark.parametrize("policy", ["skip", "once", "all"])
def test_a_year_of_downtime_of_an_every_second_cron_job_is_bounded_work(policy: str) -> None:
    spec = job(schedule="* * * * * *", misfire=policy)
    now = datetime(2026, 6, 1, tzinfo=UTC)
    settled = settle_backlog(spec, now - timedelta(days=365), now, now)
    assert len(settled.fire) <= MAX_CATCHUP_FIRES
    assert settled.fire == () or settled.fire[-1] == now
    assert not settled.counted_all and settled.skipped >= 9000  # counted up to a bound
    interval = job(every="1s", misfire=policy)
    exact = settle_backlog(interval, now - timedelta(days=365), now, now)
    assert exact.counted_all and exact.skipped + len(exact.fire) == 365 * 86400 + 1


def test_once_with_catchup_fires_nothing_when_the_latest_missed_fire_is_too_old() -> None:
    spec = job(schedule="0 3 * * *", misfire="once", catchup="1h")
    now = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    settled = settle_backlog(spec, datetime(2026, 5, 30, 3, 0, tzinfo=UTC), now, now)
    assert settled.fire == () and settled.skipped == 3
    unbounded = settle_backlog(job(schedule="0 3 * * *"), datetime(2026, 5, 30, 3, 0, tzinfo=UTC), now, now)
    assert unbounded.fire == (datetime(2026, 6, 1, 3, 0, tzinfo=UTC),) and unbounded.skipped == 2


def test_a_fire_is_missed_well_before_the_start_or_past_its_expiry() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    spec = job()  # expires after 300 s
    assert missed_before(spec, None, now) == now - timedelta(seconds=300)
    started = now - timedelta(seconds=2)
    assert missed_before(spec, started, now) == started - START_TOLERANCE
    assert missed_before(spec, now - timedelta(days=1), now) == now - timedelta(seconds=300)
    short = job(expires_after_seconds=2)
    assert missed_before(short, now, now) == now - timedelta(seconds=2)
    assert count_fires(spec, now, now + timedelta(seconds=95)) == (10, True)


@given(every=st.integers(1, 600), policy=POLICIES, down=st.integers(0, 5000), late=st.integers(0, 600))
@settings(max_examples=200, deadline=None)
def test_a_backlog_cut_at_the_start_sends_each_late_fire_once_and_settles_the_rest(
    every: int, policy: str, down: int, late: int
) -> None:
    """Up to the cutoff, the policy; after it, every instant as usual: together each instant of
    the backlog is sent at most once, and every one after the cutoff exactly once."""
    spec = job(every=f"{every}s", misfire=policy)
    first = spec.next_fire(datetime(2026, 1, 1, tzinfo=UTC))
    cutoff = first + timedelta(seconds=down)
    now = cutoff + timedelta(seconds=late)
    settled = settle_backlog(spec, first, cutoff, now)
    assert all(first <= at <= cutoff for at in settled.fire)
    assert settled.next_at is not None and settled.next_at > cutoff
    assert settled.skipped + len(settled.fire) == len(_reference(spec, first, cutoff))
