"""Wire models: strict, frozen, versioned, and stable through bytes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from common.actions import HttpAction, ShellAction
from common.messages import (
    EVENT_ADAPTER,
    TRIGGER_ADAPTER,
    HeartbeatKind,
    JobHeartbeat,
    RunFinished,
    RunStatus,
    SchedulerHeartbeat,
    Trigger,
    WorkerHeartbeat,
    trigger_id,
)

instants = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,20}\Z")
texts = st.text(max_size=200)


@given(names, instants, st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=5), st.booleans())
def test_a_trigger_survives_bytes_unchanged(job: str, at: datetime, argv: list[str], manual: bool) -> None:
    trigger = Trigger(
        id=trigger_id(job, at),
        job=job,
        pool="default",
        scheduled_at=at,
        published_at=at,
        expires_at=at + timedelta(minutes=5),
        timeout_seconds=30,
        action=ShellAction(argv=argv),
        manual=manual,
    )
    assert TRIGGER_ADAPTER.validate_json(trigger.to_bytes(), strict=True) == trigger


@given(
    names,
    instants,
    st.sampled_from([s for s in RunStatus if s is not RunStatus.RUNNING]),
    st.none() | st.integers(-255, 255),
    st.none() | texts,
)
def test_run_events_survive_bytes_unchanged(
    job: str, at: datetime, status: RunStatus, code: int | None, tail: str | None
) -> None:
    event = RunFinished(
        run_id="r",
        trigger_id=trigger_id(job, at),
        job=job,
        pool="p",
        worker="w",
        scheduled_at=at,
        started_at=at,
        finished_at=at + timedelta(seconds=1),
        duration_seconds=1,
        status=status,
        exit_code=code,
        output_tail=tail,
    )
    assert EVENT_ADAPTER.validate_json(event.to_bytes(), strict=True) == event


@given(names, instants, st.sampled_from(list(HeartbeatKind)))
def test_heartbeats_survive_bytes_unchanged(job: str, at: datetime, kind: HeartbeatKind) -> None:
    for event in (
        JobHeartbeat(id="h", job=job, kind=kind, at=at),
        WorkerHeartbeat(worker="w", pool=job, at=at, concurrency=2, running=1),
        SchedulerHeartbeat(scheduler="s", at=at, jobs=3, next_fire_at=at),
    ):
        assert EVENT_ADAPTER.validate_json(event.to_bytes(), strict=True) == event


def test_trigger_ids_are_job_at_utc_instant() -> None:
    paris = timezone(timedelta(hours=1))
    assert trigger_id("backup", datetime(2026, 3, 29, 3, 0, tzinfo=paris)) == "backup@2026-03-29T02:00:00Z"
    assert trigger_id("x", datetime(2026, 1, 1, 0, 0, 0, 500, tzinfo=UTC)) == "x@2026-01-01T00:00:00.000500Z"


def test_messages_are_versioned_strict_and_frozen() -> None:
    beat = JobHeartbeat(id="1", job="j", at=datetime(2026, 1, 1, tzinfo=UTC))
    assert orjson.loads(beat.to_bytes())["v"] == 1
    with pytest.raises(ValidationError):
        JobHeartbeat.model_validate({**beat.model_dump(), "v": 2})
    with pytest.raises(ValidationError):
        JobHeartbeat.model_validate({**beat.model_dump(), "surprise": 1})
    with pytest.raises(ValidationError):
        JobHeartbeat.model_validate({**beat.model_dump(), "at": "2026-01-01T00:00:00"})  # no zone
    with pytest.raises(ValidationError):
        beat.job = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        JobHeartbeat(id="1", job="has.dot", at=beat.at)  # a dot would break topic routing


def test_http_actions_validate_their_url_and_statuses() -> None:
    HttpAction(url="https://example.com/hook", expect_status=[204])  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        HttpAction(url="not a url")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        HttpAction(url="https://example.com", expect_status=[700])  # type: ignore[arg-type]
