"""Opening a message: signature, then parsing, then expiry, each refusal with its own reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
from hypothesis import given
from hypothesis import strategies as st

from common.actions import ShellAction
from common.envelope import Accepted, Rejected, RejectionReason, open_envelope
from common.messages import EVENT_ADAPTER, TRIGGER_ADAPTER, JobHeartbeat, Trigger
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
