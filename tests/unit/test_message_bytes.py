"""A message marked flat is written from its values straight (``WireMessage.to_bytes``): its bytes
are pydantic's JSON mode's, byte for byte, whatever its values, so that a worker's fast way and
every other writer's way sign the same body."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import assume, given
from hypothesis import strategies as st
from pydantic import ValidationError

from common.messages import (
    ALL_MESSAGES,
    HeartbeatKind,
    JobHeartbeat,
    RunFinished,
    RunStarted,
    RunStatus,
    SchedulerHeartbeat,
    WireMessage,
    WorkerHeartbeat,
)

FLAT = {RunStarted, RunFinished, JobHeartbeat, WorkerHeartbeat, SchedulerHeartbeat}

instants = st.datetimes(
    min_value=datetime(1970, 1, 1),
    max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]),
)
texts = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), min_size=1, max_size=40)
names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,20}\Z")
numbers = st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)


def _run(**extra: Any) -> dict[str, Any]:
    return {"run_id": texts, "trigger_id": texts, "job": names, "pool": names, "worker": texts, **extra}


run_started = st.fixed_dictionaries(
    _run(scheduled_at=instants, started_at=instants),
    optional={"redelivered": st.booleans(), "attempt": st.integers(1, 101)},
).map(lambda values: (RunStarted, values))
run_finished = st.fixed_dictionaries(
    _run(
        scheduled_at=instants,
        started_at=instants,
        finished_at=instants,
        duration_seconds=numbers,
        status=st.sampled_from([s for s in RunStatus if s is not RunStatus.RUNNING]),
    ),
    optional={
        "redelivered": st.booleans(),
        "attempt": st.integers(1, 101),
        "exit_code": st.integers(-(2**31), 2**31 - 1) | st.none(),
        "http_status": st.integers(100, 999) | st.none(),
        "output_tail": texts | st.none(),
        "error": texts | st.none(),
        "result": json_values,
        "endpoint_request_id": texts | st.none(),
    },
).map(lambda values: (RunFinished, values))
heartbeats = st.one_of(
    st.fixed_dictionaries(
        {"id": texts, "job": names, "at": instants},
        optional={
            "kind": st.sampled_from(list(HeartbeatKind)),
            "exit_code": st.integers(-(2**31), 2**31 - 1) | st.none(),
            "message": texts | st.none(),
            "rid": st.from_regex(r"\A[A-Za-z0-9._~-]{1,20}\Z") | st.none(),
        },
    ).map(lambda values: (JobHeartbeat, values)),
    st.fixed_dictionaries(
        {
            "worker": texts,
            "pool": names,
            "at": instants,
            "concurrency": st.integers(1, 2**31 - 1),
            "running": st.integers(0, 2**31 - 1),
        }
    ).map(lambda values: (WorkerHeartbeat, values)),
    st.fixed_dictionaries(
        {"scheduler": texts, "at": instants, "jobs": st.integers(0, 2**63 - 1)},
        optional={"next_fire_at": instants | st.none()},
    ).map(lambda values: (SchedulerHeartbeat, values)),
)


@given(st.one_of(run_started, run_finished, heartbeats))
def test_a_flat_message_is_written_as_pydantic_writes_it(
    drawn: tuple[type[WireMessage], dict[str, Any]],
) -> None:
    kind, values = drawn
    try:
        message = kind(**values)
    except ValidationError:
        assume(False)
        raise
    assert message.to_bytes() == message.model_bytes()


def test_the_flat_messages_are_those_this_test_draws() -> None:
    # A message marked flat that this test does not draw would go unchecked.
    assert {kind for kind in ALL_MESSAGES if kind._flat} == FLAT
