"""A job's health is a pure function of its spec, its state and the instant."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from common.health import Health, JobState, judge
from common.jobs import parse_jobs

T0 = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
SPEC = parse_jobs('[jobs.j]\nschedule = "0 * * * *"\ngrace_seconds = 60\ntimeout_seconds = 600\n')[0]


def test_a_job_that_never_ran_waits_then_is_late_after_grace() -> None:
    assert judge(SPEC, JobState(), T0, T0 + timedelta(minutes=30)).health is Health.WAITING
    assert judge(SPEC, JobState(), T0, T0 + timedelta(minutes=61)).health is Health.WAITING
    late = judge(SPEC, JobState(), T0, T0 + timedelta(minutes=61, seconds=1))
    assert late.health is Health.LATE and late.due_at == T0 + timedelta(hours=1)


def test_last_status_decides_between_ok_and_failing() -> None:
    due = T0 + timedelta(hours=1)
    ok = JobState(last_status="succeeded", last_finished_at=T0, next_expected_at=due)
    failed = JobState(last_status="timed_out", last_finished_at=T0, next_expected_at=due)
    assert judge(SPEC, ok, T0, T0 + timedelta(minutes=5)).health is Health.OK
    assert judge(SPEC, failed, T0, T0 + timedelta(minutes=5)).health is Health.FAILING
    assert judge(SPEC, ok, T0, due + timedelta(minutes=2)).health is Health.LATE


def test_a_run_past_its_timeout_is_late_not_running() -> None:
    running = JobState(last_status="running", last_started_at=T0, next_expected_at=T0 + timedelta(hours=1))
    assert judge(SPEC, running, T0, T0 + timedelta(minutes=5)).health is Health.RUNNING
    assert judge(SPEC, running, T0, T0 + timedelta(minutes=12)).health is Health.LATE


def test_a_disabled_job_is_paused() -> None:
    paused = SPEC.model_copy(update={"enabled": False})
    assert judge(paused, JobState(), T0, T0 + timedelta(days=3)).health is Health.PAUSED
