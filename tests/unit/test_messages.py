"""Wire models: strict, frozen, versioned, and stable through bytes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from common.actions import HttpAction, ShellAction
from common.bounds import MAX_TEXT_LENGTH, MAX_TIMEOUT_SECONDS
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
# What the wire carries: no NUL (refused) and no lone surrogate (not UTF-8).
clean_characters = st.characters(exclude_characters="\x00", exclude_categories=["Cs"])
texts = st.text(clean_characters, max_size=200)


arguments = st.text(
    st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), min_size=1, max_size=20
)


@given(names, instants, st.lists(arguments, min_size=1, max_size=5), st.booleans())
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


# -- bounds: what the wire may carry ------------------------------------------------------------

EDGE_INSTANTS = [
    "0001-01-01T00:00:00+14:00",  # before datetime's first day once in UTC
    "9999-12-31T23:59:59-14:00",  # after its last day once in UTC
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59Z",
    "1969-12-31T23:59:59Z",
    "2200-01-01T00:00:00Z",
]

VALID_BODIES: dict[str, dict[str, object]] = {
    "trigger": {
        "v": 1,
        "type": "trigger",
        "id": "j@2026-01-01T00:00:00Z",
        "job": "j",
        "pool": "default",
        "scheduled_at": "2026-01-01T00:00:00Z",
        "published_at": "2026-01-01T00:00:00Z",
        "expires_at": "2026-01-01T00:05:00Z",
        "timeout_seconds": 30,
        "action": {"type": "shell", "argv": ["true"]},
    },
    "run.started": {
        "v": 1,
        "type": "run.started",
        "run_id": "r",
        "trigger_id": "t",
        "job": "j",
        "pool": "default",
        "worker": "w",
        "scheduled_at": "2026-01-01T00:00:00Z",
        "started_at": "2026-01-01T00:00:00Z",
    },
    "run.finished": {
        "v": 1,
        "type": "run.finished",
        "run_id": "r",
        "trigger_id": "t",
        "job": "j",
        "pool": "default",
        "worker": "w",
        "scheduled_at": "2026-01-01T00:00:00Z",
        "started_at": "2026-01-01T00:00:00Z",
        "finished_at": "2026-01-01T00:00:01Z",
        "duration_seconds": 1.0,
        "status": "failed",
        "exit_code": 1,
        "http_status": 500,
        "output_tail": "out",
        "error": "exit code 1",
    },
    "job.heartbeat": {
        "v": 1,
        "type": "job.heartbeat",
        "id": "h",
        "job": "j",
        "kind": "fail",
        "exit_code": 1,
        "at": "2026-01-01T00:00:00Z",
        "message": "m",
    },
    "worker.heartbeat": {
        "v": 1,
        "type": "worker.heartbeat",
        "worker": "w",
        "pool": "default",
        "at": "2026-01-01T00:00:00Z",
        "concurrency": 4,
        "running": 1,
    },
    "scheduler.heartbeat": {
        "v": 1,
        "type": "scheduler.heartbeat",
        "scheduler": "s",
        "at": "2026-01-01T00:00:00Z",
        "jobs": 3,
        "next_fire_at": "2026-01-01T00:01:00Z",
    },
}
INSTANT_FIELDS = {
    "scheduled_at",
    "published_at",
    "expires_at",
    "started_at",
    "finished_at",
    "at",
    "next_fire_at",
}
TEXT_FIELDS = {"id", "run_id", "trigger_id", "worker", "scheduler", "output_tail", "error", "message"}


def _adapter(kind: str) -> TypeAdapter[Any]:
    return TRIGGER_ADAPTER if kind == "trigger" else EVENT_ADAPTER


def _refused(kind: str, body: dict[str, object]) -> bool:
    """Whether the strict wire parser refuses ``body`` with a ValidationError (any other
    exception fails the test: nothing a body says may raise anything else)."""
    try:
        # The standard json module writes integers of any size (orjson stops at 64 bits).
        _adapter(kind).validate_json(json.dumps(body).encode(), strict=True)
    except ValidationError:
        return True
    return False


def test_the_valid_bodies_of_these_tests_are_valid() -> None:
    for kind, body in VALID_BODIES.items():
        assert not _refused(kind, body), kind


def test_an_instant_at_the_edge_of_the_datetime_range_is_refused_not_an_overflow() -> None:
    # Regression: a job.heartbeat `at` of 0001-01-01T00:00:00+14:00 raised OverflowError in the
    # parser and stopped every monitor, on every restart.
    for kind, body in VALID_BODIES.items():
        for name in INSTANT_FIELDS & set(body):
            for edge in EDGE_INSTANTS:
                assert _refused(kind, {**body, name: edge}), (kind, name, edge)


def test_instants_within_1970_and_2200_are_accepted() -> None:
    for edge in ("1970-01-01T00:00:00Z", "2199-12-31T23:59:59.999999Z", "1970-01-01T00:00:00-14:00"):
        assert not _refused("job.heartbeat", {**VALID_BODIES["job.heartbeat"], "at": edge}), edge


def test_text_fields_refuse_nul_and_are_bounded() -> None:
    for kind, body in VALID_BODIES.items():
        for name in TEXT_FIELDS & set(body):
            assert _refused(kind, {**body, name: "a\x00b"}), (kind, name)
            assert _refused(kind, {**body, name: "x" * (MAX_TEXT_LENGTH + 1)}), (kind, name)


def test_numbers_are_finite_and_bounded() -> None:
    trigger = VALID_BODIES["trigger"]
    for timeout in (0, -1, MAX_TIMEOUT_SECONDS + 1, 1e308):
        assert _refused("trigger", {**trigger, "timeout_seconds": timeout}), timeout
    assert not _refused("trigger", {**trigger, "timeout_seconds": MAX_TIMEOUT_SECONDS})
    finished = VALID_BODIES["run.finished"]
    for duration in (-1, 1e308):
        assert _refused("run.finished", {**finished, "duration_seconds": duration}), duration
    for field, values in {
        "exit_code": (2**31, -(2**31) - 1, 2**70),
        "http_status": (2**31, 2**70, -1),
    }.items():
        for value in values:
            assert _refused("run.finished", {**finished, field: value}), (field, value)
    beat = VALID_BODIES["job.heartbeat"]
    assert _refused("job.heartbeat", {**beat, "exit_code": 2**63})
    worker = VALID_BODIES["worker.heartbeat"]
    for field, value in {"concurrency": 2**31, "running": 2**31}.items():
        assert _refused("worker.heartbeat", {**worker, field: value}), field
    assert _refused("scheduler.heartbeat", {**VALID_BODIES["scheduler.heartbeat"], "jobs": 2**64})


def test_non_finite_numbers_in_json_text_are_refused() -> None:
    # JSON has no Infinity or NaN, but a parser may read 1e400 as infinity.
    body = orjson.dumps(VALID_BODIES["trigger"])
    for token in (b"1e400", b"Infinity", b"NaN", b"-1e400"):
        hostile = body.replace(b'"timeout_seconds":30', b'"timeout_seconds":' + token)
        assert hostile != body
        with pytest.raises(ValidationError):
            TRIGGER_ADAPTER.validate_json(hostile, strict=True)
    body = orjson.dumps(VALID_BODIES["run.finished"])
    hostile = body.replace(b'"duration_seconds":1.0', b'"duration_seconds":1e400')
    assert hostile != body
    with pytest.raises(ValidationError):
        EVENT_ADAPTER.validate_json(hostile, strict=True)
