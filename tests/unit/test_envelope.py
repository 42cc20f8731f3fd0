"""Opening a message: signature, then parsing, then expiry, each refusal with its own reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st
from pamqp import decode as pamqp_decode
from pamqp import encode as pamqp_encode

from common.actions import ShellAction
from common.bounds import MAX_MESSAGE_BYTES
from common.bus import amqp_value
from common.envelope import Accepted, Rejected, RejectionReason, internal_error, open_envelope
from common.messages import EVENT_ADAPTER, TRIGGER_ADAPTER, JobHeartbeat, Trigger
from common.signing import KEY_ID_HEADER, SIGNATURE_HEADER
from tests.conftest import keyring

NOW = datetime(2026, 11, 1, 5, 30, tzinfo=UTC)


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
    opened = open_envelope(body, keys.sign(body), keys, TRIGGER_ADAPTER, NOW)
    assert isinstance(opened, Accepted) and opened.message == _trigger(timedelta(minutes=5))


def test_an_expired_trigger_is_rejected_as_expired() -> None:
    keys = keyring()
    body = _trigger(timedelta(seconds=-1)).to_bytes()
    opened = open_envelope(body, keys.sign(body), keys, TRIGGER_ADAPTER, NOW)
    assert isinstance(opened, Rejected) and opened.reason is RejectionReason.EXPIRED


def test_the_signature_is_checked_before_the_body_is_read() -> None:
    keys = keyring()
    opened = open_envelope(b"not json", {}, keys, TRIGGER_ADAPTER, NOW)
    assert isinstance(opened, Rejected) and opened.reason is RejectionReason.MISSING_SIGNATURE


def test_signed_garbage_and_wrong_shapes_are_malformed() -> None:
    keys = keyring()
    for body in (b"not json", b"[]", b'{"v": 2, "type": "trigger"}', orjson.dumps({"v": 1, "type": "nope"})):
        opened = open_envelope(body, keys.sign(body), keys, EVENT_ADAPTER, NOW)
        assert isinstance(opened, Rejected) and opened.reason is RejectionReason.MALFORMED, body
        assert opened.detail


def test_unknown_fields_are_refused_not_ignored() -> None:
    keys = keyring()
    data = orjson.loads(JobHeartbeat(id="1", job="j", at=NOW).to_bytes())
    body = orjson.dumps({**data, "extra": True})
    opened = open_envelope(body, keys.sign(body), keys, EVENT_ADAPTER, NOW)
    assert isinstance(opened, Rejected) and "extra" in opened.detail


@given(st.binary(max_size=512))
def test_no_signed_bytes_can_crash_the_opener(body: bytes) -> None:
    keys = keyring()
    opened = open_envelope(body, keys.sign(body), keys, EVENT_ADAPTER, NOW)
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
        opened = open_envelope(body, keys.sign(body), keys, TRIGGER_ADAPTER, NOW)
        assert isinstance(opened, Rejected) and opened.reason is RejectionReason.MALFORMED, label


def test_instants_with_an_offset_are_kept_in_utc() -> None:
    keys = keyring()
    data = orjson.loads(_trigger(timedelta(minutes=5)).to_bytes())
    body = orjson.dumps({**data, "scheduled_at": "2026-11-01T06:30:00+01:00"})
    opened = open_envelope(body, keys.sign(body), keys, TRIGGER_ADAPTER, NOW)
    assert isinstance(opened, Accepted)
    assert opened.message.scheduled_at.utcoffset() == timedelta(0)
    assert opened.message.scheduled_at == NOW


# -- hostile input: nothing a body or a header says makes the opener raise -----------------------


def _signed_open(body: bytes, adapter: Any = EVENT_ADAPTER) -> Accepted[Any] | Rejected:
    keys = keyring()
    return open_envelope(body, keys.sign(body), keys, adapter, NOW)


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
    opened = open_envelope(huge, {}, keyring(), EVENT_ADAPTER, NOW)
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
    opened = open_envelope(body, headers, keys, EVENT_ADAPTER, NOW)
    assert isinstance(opened, Rejected)
    assert opened.reason in {
        RejectionReason.MISSING_SIGNATURE,
        RejectionReason.UNKNOWN_KEY,
        RejectionReason.BAD_SIGNATURE,
    }


def test_a_genuine_signature_in_bytes_still_verifies_but_oversized_headers_do_not() -> None:
    keys = keyring()
    body = JobHeartbeat(id="1", job="j", at=NOW).to_bytes()
    signed = keys.sign(body)
    as_bytes = {name: value.encode() for name, value in signed.items()}
    assert isinstance(open_envelope(body, as_bytes, keys, EVENT_ADAPTER, NOW), Accepted)
    # An AMQP byte array ('x') arrives as a bytearray: ASCII in one still works, as documented.
    as_array = {name: bytearray(value.encode()) for name, value in signed.items()}
    assert isinstance(open_envelope(body, as_array, keys, EVENT_ADAPTER, NOW), Accepted)
    padded = {**signed, SIGNATURE_HEADER: signed[SIGNATURE_HEADER] + " " * 100_000}
    opened = open_envelope(body, padded, keys, EVENT_ADAPTER, NOW)
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
