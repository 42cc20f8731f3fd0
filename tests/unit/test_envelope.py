"""Opening a message: signature (over namespace, routing key and body), then parsing, then the
signing key's role, the pool and expiry, each refusal with its own reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st
from pamqp import decode as pamqp_decode
from pamqp import encode as pamqp_encode

from common.actions import ShellAction
from common.amqp_headers import amqp_value
from common.bounds import MAX_MESSAGE_BYTES
from common.envelope import Accepted, Rejected, RejectionReason, internal_error, open_envelope
from common.messages import (
    BATCHED_EVENT_TYPES,
    CONTROL_ADAPTER,
    JOBS_CHANGED_ROUTING_KEY,
    MONITORED_ADAPTER,
    TRIGGER_ADAPTER,
    EventBatch,
    JobHeartbeat,
    JobsChanged,
    RunFinished,
    RunStarted,
    RunStatus,
    SchedulerHeartbeat,
    Trigger,
    WireMessage,
    WorkerHeartbeat,
)
from common.roles import SIGNED_BY
from common.signing import KEY_ID_HEADER, SIGNATURE_HEADER, Keyring, Role
from common.topology import event_routing_key
from tests.conftest import keyring

NOW = datetime(2026, 11, 1, 5, 30, tzinfo=UTC)
NS = "cronfleet-test"
EVENT_KEY = "job.heartbeat.j"


def _open_trigger(body: bytes, keys: Keyring, headers: Any = None, routing_key: str = "default") -> Any:
    """``body`` opened as a worker of pool ``default`` would, signed by the trigger key unless
    ``headers`` are given."""
    if headers is None:
        headers = keys.sign(Role.TRIGGER, NS, routing_key, body)
    return open_envelope(body, headers, keys, TRIGGER_ADAPTER, NOW, namespace=NS, routing_key=routing_key)


def _open_event(body: bytes, keys: Keyring, headers: Any = None, routing_key: str = EVENT_KEY) -> Any:
    """``body`` opened as the monitor would, signed by the event key unless ``headers`` are given."""
    if headers is None:
        headers = keys.sign(Role.EVENT, NS, routing_key, body)
    return open_envelope(body, headers, keys, MONITORED_ADAPTER, NOW, namespace=NS, routing_key=routing_key)


def _trigger(expires_in: timedelta) -> Trigger:
    return Trigger(
        id="job@2026-11-01T05:30:00Z",
        job="job",
        pool="default",
        scheduled_at=NOW,
        published_at=NOW,
        expires_at=NOW + expires_in,
        timeout_seconds=5,
        action=ShellAction(argv=["true"]),
    )


def test_a_valid_trigger_is_accepted_as_the_model() -> None:
    keys = keyring()
    body = _trigger(timedelta(minutes=5)).to_bytes()
    opened = _open_trigger(body, keys)
    assert isinstance(opened, Accepted) and opened.message == _trigger(timedelta(minutes=5))


def test_an_expired_trigger_is_rejected_as_expired() -> None:
    keys = keyring()
    body = _trigger(timedelta(seconds=-1)).to_bytes()
    opened = _open_trigger(body, keys)
    assert isinstance(opened, Rejected) and opened.reason is RejectionReason.EXPIRED


def test_the_signature_is_checked_before_the_body_is_read() -> None:
    keys = keyring()
    opened = _open_trigger(b"not json", keys, headers={})
    assert isinstance(opened, Rejected) and opened.reason is RejectionReason.MISSING_SIGNATURE


def test_signed_garbage_and_wrong_shapes_are_malformed() -> None:
    keys = keyring()
    for body in (b"not json", b"[]", b'{"v": 2, "type": "trigger"}', orjson.dumps({"v": 1, "type": "nope"})):
        opened = _open_event(body, keys)
        assert isinstance(opened, Rejected) and opened.reason is RejectionReason.MALFORMED, body
        assert opened.detail


def test_unknown_fields_are_refused_not_ignored() -> None:
    keys = keyring()
    data = orjson.loads(JobHeartbeat(id="1", job="j", at=NOW).to_bytes())
    body = orjson.dumps({**data, "extra": True})
    opened = _open_event(body, keys)
    assert isinstance(opened, Rejected) and "extra" in opened.detail


@given(st.binary(max_size=512))
def test_no_signed_bytes_can_crash_the_opener(body: bytes) -> None:
    keys = keyring()
    opened = _open_event(body, keys)
    assert isinstance(opened, (Accepted, Rejected))


def test_the_wire_is_strict_and_needs_v_and_type() -> None:
    keys = keyring()
    good = orjson.loads(_trigger(timedelta(minutes=5)).to_bytes())
    variants = {
        "no v": {k: v for k, v in good.items() if k != "v"},
        "no type": {k: v for k, v in good.items() if k != "type"},
        "number as text": {**good, "timeout_seconds": "5"},
        "unix time": {**good, "expires_at": 1893456000},
        "boolean version": {**good, "v": True},
    }
    for label, data in variants.items():
        body = orjson.dumps(data)
        opened = _open_trigger(body, keys)
        assert isinstance(opened, Rejected) and opened.reason is RejectionReason.MALFORMED, label


def test_instants_with_an_offset_are_kept_in_utc() -> None:
    keys = keyring()
    data = orjson.loads(_trigger(timedelta(minutes=5)).to_bytes())
    body = orjson.dumps({**data, "scheduled_at": "2026-11-01T06:30:00+01:00"})
    opened = _open_trigger(body, keys)
    assert isinstance(opened, Accepted)
    assert opened.message.scheduled_at.utcoffset() == timedelta(0)
    assert opened.message.scheduled_at == NOW


# -- hostile input: nothing a body or a header says makes the opener raise -----------------------


def _signed_open(body: bytes) -> Accepted[Any] | Rejected:
    result: Accepted[Any] | Rejected = _open_event(body, keyring())
    return result


def test_a_signed_heartbeat_at_the_edge_of_time_is_malformed_not_an_overflow() -> None:
    # Regression: this body, signed, raised OverflowError and stopped every monitor.
    for at in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"):
        body = orjson.dumps({"v": 1, "type": "job.heartbeat", "id": "edge", "job": "j", "at": at})
        opened = _signed_open(body)
        assert isinstance(opened, Rejected) and opened.reason is RejectionReason.MALFORMED, at
        assert "at" in opened.detail


def test_a_body_over_the_size_limit_is_refused_before_it_is_read() -> None:
    body = orjson.dumps(
        {"v": 1, "type": "job.heartbeat", "id": "big", "job": "j", "at": "2026-01-01T00:00:00Z"}
    )
    huge = body[:-1] + b"," + b" " * MAX_MESSAGE_BYTES + b"}"
    opened = _signed_open(huge)
    assert isinstance(opened, Rejected) and opened.reason is RejectionReason.TOO_LARGE
    # Size is checked first: an unsigned huge body is refused for its size, unread and unhashed.
    opened = _open_event(huge, keyring(), headers={})
    assert isinstance(opened, Rejected) and opened.reason is RejectionReason.TOO_LARGE


def test_deeply_nested_json_is_malformed() -> None:
    for depth in (100, 2000, 100_000):
        for body in (
            b"[" * depth + b"]" * depth,
            b'{"v":1,"type":"job.heartbeat","id":' + b"[" * depth + b"]" * depth + b"}",
            b'{"a":' * depth + b"1" + b"}" * depth,
        ):
            opened = _signed_open(body)
            assert isinstance(opened, Rejected) and opened.reason is RejectionReason.MALFORMED


def test_invalid_utf8_and_lone_surrogates_are_malformed() -> None:
    good = b'{"v":1,"type":"job.heartbeat","id":"X","job":"j","at":"2026-01-01T00:00:00Z"}'
    for bad in (b"\xff", b"\xc3", b"\\ud800", b"\\udc00", b"\\u0000", b"\xed\xa0\x80"):
        opened = _signed_open(good.replace(b"X", bad))
        assert isinstance(opened, Rejected) and opened.reason is RejectionReason.MALFORMED, bad


header_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.binary(max_size=80),
    st.text(max_size=80),
    st.integers(1, 100_000).map(lambda n: "a" * n),
    st.integers(1, 100_000).map(lambda n: b"\xff" * n),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


@given(header_values, header_values)
def test_header_values_of_any_type_are_refused_never_raised(key_id: object, claimed: object) -> None:
    keys = keyring()
    body = JobHeartbeat(id="1", job="j", at=NOW).to_bytes()
    headers = {KEY_ID_HEADER: key_id, SIGNATURE_HEADER: claimed}
    opened = _open_event(body, keys, headers)
    assert isinstance(opened, Rejected)
    assert opened.reason in {
        RejectionReason.MISSING_SIGNATURE,
        RejectionReason.UNKNOWN_KEY,
        RejectionReason.BAD_SIGNATURE,
    }


def test_a_genuine_signature_in_bytes_still_verifies_but_oversized_headers_do_not() -> None:
    keys = keyring()
    body = JobHeartbeat(id="1", job="j", at=NOW).to_bytes()
    signed = keys.sign(Role.EVENT, NS, EVENT_KEY, body)
    as_bytes = {name: value.encode() for name, value in signed.items()}
    assert isinstance(_open_event(body, keys, as_bytes), Accepted)
    # An AMQP byte array ('x') arrives as a bytearray: ASCII in one still works, as documented.
    as_array = {name: bytearray(value.encode()) for name, value in signed.items()}
    assert isinstance(_open_event(body, keys, as_array), Accepted)
    padded = {**signed, SIGNATURE_HEADER: signed[SIGNATURE_HEADER] + " " * 100_000}
    opened = _open_event(body, keys, padded)
    assert isinstance(opened, Rejected) and opened.reason is RejectionReason.BAD_SIGNATURE


def test_internal_errors_are_refusals_with_the_exception_type() -> None:
    rejected = internal_error(OverflowError("date value out of range\x00" + "x" * 2000))
    assert rejected.reason is RejectionReason.INTERNAL_ERROR
    assert rejected.detail.startswith("OverflowError: date value out of range")
    assert "\x00" not in rejected.detail and len(rejected.detail) <= 500


def test_dead_letters_can_carry_back_every_header_the_broker_can_deliver() -> None:
    # pamqp decodes a header string that is not UTF-8 as bytes, and cannot encode bytes again:
    # dead-lettering such a message must not raise.
    decoded = {
        "not-utf8": b"\xff\xfe",
        "nested": {"a": [b"\xff", 1, None, 2**70]},
        "big": 2**64,
        "fine": "text",
        "array": bytearray(b"\x00"),
    }
    safe = {name: amqp_value(value) for name, value in decoded.items()}
    encoded = pamqp_encode.field_table(safe)
    _, back = pamqp_decode.field_table(encoded)
    assert back["not-utf8"] == bytearray(b"\xff\xfe") and back["fine"] == "text"


# -- roles: who may sign what ---------------------------------------------------------------------

_STARTED = RunStarted(
    run_id="r1",
    trigger_id="j@x",
    job="a",
    pool="default",
    worker="w",
    scheduled_at=NOW,
    started_at=NOW,
)
MESSAGES: dict[str, WireMessage] = {
    "trigger": _trigger(timedelta(minutes=5)),
    "run.started": _STARTED,
    "run.finished": RunFinished(
        **_STARTED.model_dump(exclude={"type"}),
        finished_at=NOW,
        duration_seconds=0,
        status=RunStatus.SUCCEEDED,
    ),
    "job.heartbeat of a": JobHeartbeat(id="h1", job="a", at=NOW),
    "job.heartbeat of b": JobHeartbeat(id="h2", job="b", at=NOW),
    "worker.heartbeat": WorkerHeartbeat(worker="w", pool="default", at=NOW, concurrency=1, running=0),
    "scheduler.heartbeat": SchedulerHeartbeat(scheduler="s", at=NOW, jobs=0),
}
# A batch: a worker's run events and heartbeats of one pool, signed by an event key.
MESSAGES["event.batch"] = EventBatch(
    pool="default",
    events=[MESSAGES["run.started"], MESSAGES["run.finished"], MESSAGES["worker.heartbeat"]],  # type: ignore[list-item]
)
ROLE_KEYS = Keyring.parse(
    f"""
    trigger:trigger-hmac:{"t" * 32}
    trigger:trigger-ed25519:ed25519:{"A" * 43}
    event:event:{"e" * 32}
    ping:ping:{"p" * 32}
    ping:ping-for-a:{"q" * 32}:jobs=a
    legacy:{"l" * 32}
    """
)
# Which key may sign which message: every message type against every kind of key.
ALLOWED = {
    "trigger": {"trigger-hmac", "trigger-ed25519", "legacy"},
    "run.started": {"event", "legacy"},
    "run.finished": {"event", "legacy"},
    "job.heartbeat of a": {"event", "ping", "ping-for-a", "legacy"},
    "job.heartbeat of b": {"event", "ping", "legacy"},
    "worker.heartbeat": {"event", "legacy"},
    "scheduler.heartbeat": {"event", "legacy"},
    "event.batch": {"event", "legacy"},
}


def test_every_message_type_is_accepted_only_under_the_roles_that_may_sign_it() -> None:
    assert {type(message) for message in MESSAGES.values()} | {JobsChanged} == set(SIGNED_BY)
    for label, message in MESSAGES.items():
        body = message.to_bytes()
        adapter: Any = TRIGGER_ADAPTER if isinstance(message, Trigger) else MONITORED_ADAPTER
        routing_key = message.pool if isinstance(message, Trigger) else event_routing_key(message)
        for key in ROLE_KEYS.keys:
            headers = key.sign(NS, routing_key, body)
            opened = open_envelope(
                body, headers, ROLE_KEYS, adapter, NOW, namespace=NS, routing_key=routing_key
            )
            if key.id in ALLOWED[label]:
                assert isinstance(opened, Accepted), (label, key.id, opened)
                assert opened.message == message
            else:
                assert isinstance(opened, Rejected), (label, key.id)
                assert opened.reason is RejectionReason.WRONG_ROLE, (label, key.id, opened)
                assert repr(key.id) in opened.detail and message.type in opened.detail
                assert "ppppppp" not in opened.detail and "qqqqqqq" not in opened.detail


def test_jobs_changed_is_accepted_from_trigger_and_event_keys_only() -> None:
    # It carries no authority (a scheduler only reads the store again), but it is signed like
    # every message: by ``cronfleet apply`` (a trigger key) or the HTTP API (a monitor's event key).
    message = JobsChanged(by="cronfleet apply", at=NOW)
    body = message.to_bytes()
    for key in ROLE_KEYS.keys:
        headers = key.sign(NS, JOBS_CHANGED_ROUTING_KEY, body)
        opened = open_envelope(
            body, headers, ROLE_KEYS, CONTROL_ADAPTER, NOW, namespace=NS, routing_key=JOBS_CHANGED_ROUTING_KEY
        )
        if key.id in {"trigger-hmac", "trigger-ed25519", "event", "legacy"}:
            assert isinstance(opened, Accepted) and opened.message == message, key.id
        else:
            assert isinstance(opened, Rejected) and opened.reason is RejectionReason.WRONG_ROLE, key.id


def test_a_wrong_role_refusal_says_which_key_and_what_it_may_do() -> None:
    beat = MESSAGES["job.heartbeat of b"]
    body = beat.to_bytes()
    routing_key = event_routing_key(beat)
    limited = ROLE_KEYS.get("ping-for-a")
    assert limited is not None
    opened = _open_event(body, ROLE_KEYS, limited.sign(NS, routing_key, body), routing_key)
    assert isinstance(opened, Rejected) and opened.reason is RejectionReason.WRONG_ROLE
    assert opened.detail == "ping key 'ping-for-a' may sign a job.heartbeat of a only, not of job 'b'"
    ping = ROLE_KEYS.get("ping")
    assert ping is not None
    trigger = _trigger(timedelta(minutes=5)).to_bytes()
    opened = _open_trigger(trigger, ROLE_KEYS, ping.sign(NS, "default", trigger))
    assert isinstance(opened, Rejected)
    assert opened.detail == "key 'ping' is a ping key; a trigger must be signed by a trigger key"


def test_a_trigger_of_the_wrong_role_is_refused_for_its_role_even_when_expired() -> None:
    # An expired trigger is reported as an expired run; one nobody allowed to sign must not be.
    keys = keyring()
    body = _trigger(timedelta(seconds=-1)).to_bytes()
    for role in (Role.EVENT, Role.PING):
        opened = _open_trigger(body, keys, keys.sign(role, NS, "default", body))
        assert isinstance(opened, Rejected) and opened.reason is RejectionReason.WRONG_ROLE


# -- replay elsewhere: the namespace and the routing key are signed ---------------------------------


def test_a_trigger_moved_to_another_pool_or_fleet_does_not_verify() -> None:
    keys = keyring()
    body = _trigger(timedelta(minutes=5)).to_bytes()
    signed = keys.sign(Role.TRIGGER, NS, "default", body)
    moved = open_envelope(body, signed, keys, TRIGGER_ADAPTER, NOW, namespace=NS, routing_key="gpu")
    assert isinstance(moved, Rejected) and moved.reason is RejectionReason.BAD_SIGNATURE
    other_fleet = open_envelope(
        body, signed, keys, TRIGGER_ADAPTER, NOW, namespace="prod", routing_key="default"
    )
    assert isinstance(other_fleet, Rejected) and other_fleet.reason is RejectionReason.BAD_SIGNATURE


def test_a_trigger_signed_for_a_routing_key_other_than_its_pool_is_wrong_pool() -> None:
    keys = keyring()
    for expires_in in (timedelta(minutes=5), timedelta(seconds=-1)):
        body = _trigger(expires_in).to_bytes()  # pool "default"
        opened = _open_trigger(body, keys, routing_key="gpu")
        assert isinstance(opened, Rejected) and opened.reason is RejectionReason.WRONG_POOL
        assert opened.detail == "a trigger for pool 'default' arrived with routing key 'gpu'"


def test_a_legacy_key_still_signs_and_verifies_every_message() -> None:
    legacy = Keyring.parse(f"old:{'o' * 32}")
    for message in MESSAGES.values():
        body = message.to_bytes()
        adapter: Any = TRIGGER_ADAPTER if isinstance(message, Trigger) else MONITORED_ADAPTER
        routing_key = message.pool if isinstance(message, Trigger) else event_routing_key(message)
        headers = legacy.sign(Role.TRIGGER, NS, routing_key, body)
        opened = open_envelope(body, headers, legacy, adapter, NOW, namespace=NS, routing_key=routing_key)
        assert isinstance(opened, Accepted)


def test_a_trigger_of_another_pool_than_the_one_consumed_is_wrong_pool() -> None:
    """A queue bound by hand under pool ``gpu`` delivers ``gpu``'s triggers, signed and routed
    correctly, to a worker of ``default``: it refuses them."""
    keys = keyring()
    trigger = _trigger(timedelta(minutes=5)).model_copy(update={"pool": "gpu"})
    body = trigger.to_bytes()
    headers = keys.sign(Role.TRIGGER, NS, "gpu", body)
    opened = open_envelope(
        body, headers, keys, TRIGGER_ADAPTER, NOW, namespace=NS, routing_key="gpu", consumed_pool="default"
    )
    assert isinstance(opened, Rejected) and opened.reason is RejectionReason.WRONG_POOL
    assert opened.detail == "a trigger for pool 'gpu' arrived at a worker of pool 'default'"
    own = open_envelope(
        body, headers, keys, TRIGGER_ADAPTER, NOW, namespace=NS, routing_key="gpu", consumed_pool="gpu"
    )
    assert isinstance(own, Accepted)


def test_an_event_under_another_routing_key_than_its_own_is_wrong_routing_key() -> None:
    keys = keyring()
    for message in MESSAGES.values():
        if isinstance(message, Trigger):
            continue
        body = message.to_bytes()
        own = event_routing_key(message)
        assert isinstance(_open_event(body, keys, routing_key=own), Accepted), own
        for other in ("job.heartbeat.other", "run.finished.x", f"{own}.x", ""):
            if other == own:
                continue
            opened = _open_event(body, keys, routing_key=other)
            assert isinstance(opened, Rejected), (own, other)
            assert opened.reason is RejectionReason.WRONG_ROUTING_KEY, (own, other, opened)
            article = "an" if message.type.startswith("e") else "a"
            assert opened.detail == f"{article} {message.type} must be published as {own!r}, not {other!r}"


def _batch_body(*events: bytes, pool: str = "default") -> bytes:
    return (
        b'{"v":1,"type":"event.batch","pool":"' + pool.encode() + b'","events":[' + b",".join(events) + b"]}"
    )


def test_a_batch_is_accepted_whole_with_its_events_in_order() -> None:
    keys = keyring()
    events = [MESSAGES["run.started"], MESSAGES["run.finished"], MESSAGES["worker.heartbeat"]]
    body = _batch_body(*(e.to_bytes() for e in events))
    opened = _open_event(body, keys, routing_key="event.batch.default")
    assert isinstance(opened, Accepted)
    assert opened.message == EventBatch(pool="default", events=events)  # type: ignore[arg-type]


def test_a_batch_with_one_bad_event_is_refused_whole_naming_that_event() -> None:
    keys = keyring()
    good = MESSAGES["run.started"].to_bytes()
    for bad, detail in (
        (good.replace(b'"run_id":"r1",', b""), "event.batch.events.2.run.started.run_id: Field required"),
        (good.replace(b'{"v":1,', b"{"), "events.2: an event must carry v"),
        (
            _batch_body(good),
            "event.batch.events.2: Input tag 'event.batch' found using 'type' does not match",
        ),
        (
            b'{"v":1,"type":"trigger"}',
            "event.batch.events.2: Input tag 'trigger' found using 'type' does not match",
        ),
        # Job and scheduler heartbeats go alone: they are of no pool.
        (MESSAGES["job.heartbeat of a"].to_bytes(), "event.batch.events.2: Input tag 'job.heartbeat' found"),
        (
            good.replace(b'"pool":"default"', b'"pool":"gpu"'),
            "event.batch: Value error, events.2 is of pool 'gpu', not of the batch's 'default'",
        ),
    ):
        opened = _open_event(_batch_body(good, good, bad), keys, routing_key="event.batch.default")
        assert isinstance(opened, Rejected) and opened.reason is RejectionReason.MALFORMED, bad
        assert opened.detail.startswith(detail), opened.detail


def test_a_batch_of_no_event_or_of_too_many_is_malformed() -> None:
    keys = keyring()
    beat = MESSAGES["worker.heartbeat"].to_bytes()
    for count in (0, 501):
        opened = _open_event(_batch_body(*[beat] * count), keys, routing_key="event.batch.default")
        assert isinstance(opened, Rejected) and opened.reason is RejectionReason.MALFORMED, count
        assert opened.detail.startswith("event.batch.events: "), opened.detail
    assert isinstance(
        _open_event(_batch_body(*[beat] * 500), keys, routing_key="event.batch.default"), Accepted
    )


def test_a_batch_under_another_pool_s_topic_is_wrong_routing_key() -> None:
    keys = keyring()
    opened = _open_event(
        _batch_body(MESSAGES["worker.heartbeat"].to_bytes()), keys, routing_key="event.batch.gpu"
    )
    assert isinstance(opened, Rejected) and opened.reason is RejectionReason.WRONG_ROUTING_KEY
    assert opened.detail == "an event.batch must be published as 'event.batch.default', not 'event.batch.gpu'"


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(
    st.lists(st.one_of(_json, st.just(MESSAGES["run.started"].to_bytes())), max_size=5),
    # Any pool but one holding a line break: no routing key can (nothing could sign it).
    st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=8),
)
def test_no_signed_batch_can_crash_the_opener(events: list[Any], pool: str) -> None:
    parts = [e if isinstance(e, bytes) else orjson.dumps(e) for e in events]
    body = (
        b'{"v":1,"type":"event.batch","pool":'
        + orjson.dumps(pool)
        + b',"events":['
        + b",".join(parts)
        + b"]}"
    )
    opened = _open_event(body, keyring(), routing_key=f"event.batch.{pool}")
    assert isinstance(opened, Accepted) or opened.reason is not RejectionReason.INTERNAL_ERROR, opened


def test_a_key_that_may_sign_a_batch_may_sign_every_event_it_can_carry() -> None:
    """Roles are checked on the batch, not on each event in it: no event may need more."""
    for kind in BATCHED_EVENT_TYPES:
        assert SIGNED_BY[EventBatch] <= SIGNED_BY[kind], kind


def test_a_batch_under_a_ping_key_is_wrong_role_in_plain_words() -> None:
    batch = MESSAGES["event.batch"]
    body = batch.to_bytes()
    headers = ROLE_KEYS.sign(Role.PING, NS, "event.batch.default", body)
    opened = open_envelope(
        body, headers, ROLE_KEYS, MONITORED_ADAPTER, NOW, namespace=NS, routing_key="event.batch.default"
    )
    assert isinstance(opened, Rejected) and opened.reason is RejectionReason.WRONG_ROLE
    assert opened.detail == "key 'ping' is a ping key; an event.batch must be signed by an event key"
