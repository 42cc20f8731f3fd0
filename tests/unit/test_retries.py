"""Retries as pure decisions, and the jobs-file fields that ask for them (retries, backoff,
on_lost, exclusive): validated with errors naming the field, carried in the signed trigger, and
absent from the wire for a job that sets none of them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.errors import JobFileError
from common.jobs import parse_jobs
from common.messages import (
    MAX_ATTEMPTS,
    TRIGGER_ADAPTER,
    OnLost,
    RetryPolicy,
    RunFinished,
    RunStatus,
    Trigger,
)
from common.retries import (
    DELAY_STEPS,
    attempt_of,
    backoff_delay,
    claim_key,
    delay_step,
    exclusive_key,
    may_follow,
    next_attempt,
    retry_expires_at,
)

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
HEAD = '[jobs.nightly]\nschedule = "0 3 * * *"\naction = { type = "shell", argv = ["false"] }\n'


def _job(extra: str) -> Trigger:
    [spec] = parse_jobs(HEAD + extra)
    return spec.trigger_at(NOW, NOW)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("retries = -1", "field retries: Input should be greater than or equal to 0"),
        ("retries = 101", "field retries: Input should be less than or equal to 100"),
        ('retries = "3"', "field retries: Input should be a valid integer"),
        ('retry_backoff = "10"', "field retry_backoff: '10' is not a duration"),
        ("retry_backoff = 10", "field retry_backoff: Input should be a valid string"),
        ('retry_backoff = "0s"', "field retry_backoff: '0s' is not a duration"),
        ('retry_max_delay = "2d"', "field retry_max_delay: '2d' is longer than a day"),
        (
            'retry_backoff = "1m"\nretry_max_delay = "10s"',
            "field retry_max_delay: '10s' is shorter than retry_backoff ('1m')",
        ),
        ('on_lost = "maybe"', "field on_lost: Input should be 'retry' or 'fail'"),
        ('exclusive = "yes"', "field exclusive: Input should be a valid boolean"),
        ('exclusive = true\nexclusive_ttl = "1y"', "field exclusive_ttl: '1y' is not a duration"),
    ],
)
def test_bad_retry_fields_are_refused_naming_the_line_and_field(extra: str, message: str) -> None:
    with pytest.raises(JobFileError) as raised:
        parse_jobs(HEAD + extra + "\n", "jobs.toml")
    line = 4 + extra.count("\n")  # the field at fault is on the last line
    assert f"jobs.toml:{line}: job 'nightly', {message}" in str(raised.value)


def test_a_job_without_retry_fields_publishes_the_same_bytes_as_before() -> None:
    body = orjson.loads(_job("").to_bytes())
    assert not {"retry", "exclusive", "exclusive_ttl_seconds"} & set(body)
    [spec] = parse_jobs(HEAD)
    assert b"retries" not in spec.canonical_json() and b"exclusive" not in spec.canonical_json()


def test_the_retry_fields_travel_signed_in_the_trigger_and_round_trip() -> None:
    trigger = _job(
        'retries = 3\nretry_backoff = "30s"\nretry_max_delay = "10m"\non_lost = "retry"\n'
        'exclusive = true\nexclusive_ttl = "2m"\n'
    )
    assert trigger.retry == RetryPolicy(
        retries=3, backoff_seconds=30, max_delay_seconds=600, on_lost=OnLost.RETRY
    )
    assert trigger.exclusive and trigger.exclusive_ttl_seconds == 120
    assert trigger.attempts == 4
    assert TRIGGER_ADAPTER.validate_json(trigger.to_bytes(), strict=True) == trigger


def test_a_run_event_leaves_attempt_out_at_1_and_an_old_body_reads_as_attempt_1() -> None:
    event = RunFinished(
        run_id="r",
        trigger_id="t",
        job="j",
        pool="default",
        worker="w",
        scheduled_at=NOW,
        started_at=NOW,
        finished_at=NOW,
        duration_seconds=0,
        status=RunStatus.FAILED,
    )
    assert b"attempt" not in event.to_bytes()
    assert RunFinished.model_validate_json(event.to_bytes()).attempt == 1
    second = event.model_copy(update={"attempt": 2})
    assert orjson.loads(second.to_bytes())["attempt"] == 2


@given(
    backoff=st.integers(1, 86400),
    extra=st.integers(0, 86400),
    attempt=st.integers(2, MAX_ATTEMPTS),
)
def test_backoff_doubles_and_never_passes_the_maximum(backoff: int, extra: int, attempt: int) -> None:
    policy = RetryPolicy(retries=100, backoff_seconds=backoff, max_delay_seconds=min(backoff + extra, 86400))
    delay = backoff_delay(policy, attempt)
    assert delay == min(backoff * 2 ** (attempt - 2), policy.max_delay_seconds)
    assert backoff_delay(policy, min(attempt + 1, MAX_ATTEMPTS)) >= delay


@given(st.floats(0, 200_000, allow_nan=False))
def test_a_delay_waits_the_longest_step_not_longer_than_it(seconds: float) -> None:
    step = delay_step(seconds)
    assert step in DELAY_STEPS
    assert step <= max(seconds, DELAY_STEPS[0])
    later = [s for s in DELAY_STEPS if s > step]
    assert not later or later[0] > seconds


def test_the_delay_ladder_is_bounded_and_exact_on_round_values() -> None:
    assert len(DELAY_STEPS) <= 32 and list(DELAY_STEPS) == sorted(set(DELAY_STEPS))
    assert [delay_step(s) for s in (10, 20, 40, 80, 160, 300)] == [10, 20, 30, 60, 120, 300]


@pytest.mark.parametrize(
    ("headers", "attempt"),
    [
        ({}, 1),
        ({"cronfleet-attempt": 3}, 3),
        ({"cronfleet-attempt": "2"}, 2),
        ({"cronfleet-attempt": b"4"}, 4),
        ({"cronfleet-attempt": 0}, None),
        ({"cronfleet-attempt": -1}, None),
        ({"cronfleet-attempt": True}, None),
        ({"cronfleet-attempt": 1.5}, None),
        ({"cronfleet-attempt": "²"}, None),
        ({"cronfleet-attempt": 10**30}, None),
    ],
)
def test_the_attempt_header_is_a_small_whole_number_or_refused(
    headers: dict[str, object], attempt: int | None
) -> None:
    assert attempt_of(headers) == attempt


def test_which_attempt_may_follow_which() -> None:
    trigger = _job('retries = 2\non_lost = "retry"\n')
    assert next_attempt(trigger, 1, RunStatus.FAILED) == 2
    assert next_attempt(trigger, 2, RunStatus.TIMED_OUT) == 3
    assert next_attempt(trigger, 3, RunStatus.FAILED) is None  # the last failure is final
    assert next_attempt(trigger, 1, RunStatus.LOST) == 2
    for status in (RunStatus.SUCCEEDED, RunStatus.EXPIRED, RunStatus.SKIPPED, RunStatus.DUPLICATE):
        assert next_attempt(trigger, 1, status) is None
    failing = _job('retries = 2\non_lost = "fail"\n')
    assert next_attempt(failing, 1, RunStatus.LOST) is None
    assert next_attempt(_job(""), 1, RunStatus.FAILED) is None

    assert may_follow(trigger, 1, None) is None
    assert may_follow(trigger, 2, RunStatus.FAILED) is None
    assert "has not ended" in (may_follow(trigger, 2, None) or "")
    assert "not retried" in (may_follow(trigger, 2, RunStatus.SUCCEEDED) or "")
    assert "allows 3 attempt(s)" in (may_follow(trigger, 4, RunStatus.FAILED) or "")


def test_a_retry_expires_after_its_own_due_time_not_the_first_attempts() -> None:
    trigger = _job('retries = 1\nretry_backoff = "1m"\nexpires_after_seconds = 120\n')
    ended = NOW + timedelta(hours=2)
    assert retry_expires_at(trigger, 2, ended) == ended + timedelta(seconds=60 + 120)


def test_claim_keys_keep_the_first_attempt_as_before_and_never_meet_a_lease() -> None:
    assert claim_key("job@2026-11-27T12:00:00Z", 1) == "job@2026-11-27T12:00:00Z"
    assert claim_key("job@2026-11-27T12:00:00Z", 2) == "job@2026-11-27T12:00:00Z#2"
    assert exclusive_key("job") == "exclusive:job"
