"""Opening a signed message: signature first, then parse once, then the signing key's role, the
pool, and expiry.

An expected refusal is a value (``Rejected`` with a ``RejectionReason``), never an exception, so
that the consumer can dead-letter it with its reason and go on.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from pydantic import TypeAdapter, ValidationError

from common.bounds import MAX_MESSAGE_BYTES
from common.messages import (
    WIRE_FIELDS,
    EventBatch,
    JobHeartbeat,
    RunFinished,
    RunStarted,
    SchedulerHeartbeat,
    Trigger,
    WorkerHeartbeat,
)
from common.roles import role_refusal, with_article
from common.signing import KEY_ID_HEADER, SIGNATURE_HEADER, Keyring, SignatureCheck
from common.topology import event_routing_key

M = TypeVar("M")

REJECTION_HEADER = "cronfleet-rejection"
REJECTION_DETAIL_HEADER = "cronfleet-rejection-detail"
REJECTED_BY_HEADER = "cronfleet-rejected-by"
ORIGINAL_EXCHANGE_HEADER = "cronfleet-original-exchange"
ORIGINAL_ROUTING_KEY_HEADER = "cronfleet-original-routing-key"
DETAIL_LIMIT = 500
# A signature is 64 hex digits (HMAC-SHA256) or 128 (Ed25519); a header far longer than that is
# not one, whatever it holds.
MAX_SIGNATURE_HEADER_LENGTH = 256


class RejectionReason(enum.StrEnum):
    """Why a message was refused. Each is distinct so operators can tell forgery from rot."""

    MISSING_SIGNATURE = "missing_signature"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    WRONG_ROLE = "wrong_role"
    WRONG_POOL = "wrong_pool"
    WRONG_ROUTING_KEY = "wrong_routing_key"
    EXPIRED = "expired"
    ID_CONFLICT = "id_conflict"
    NOT_ALLOWED = "not_allowed"
    # A retry (``cronfleet-attempt`` header) that the store does not owe: its previous attempt
    # did not end in a failure that is retried, or the job allows fewer attempts.
    BAD_ATTEMPT = "bad_attempt"
    INTERNAL_ERROR = "internal_error"


# The messages published on the events exchange, each under its own topic (event_routing_key).
EVENT_TYPES = (RunStarted, RunFinished, JobHeartbeat, WorkerHeartbeat, SchedulerHeartbeat, EventBatch)

_SIGNATURE_REJECTIONS = {
    SignatureCheck.MISSING_SIGNATURE: RejectionReason.MISSING_SIGNATURE,
    SignatureCheck.UNKNOWN_KEY: RejectionReason.UNKNOWN_KEY,
    SignatureCheck.BAD_SIGNATURE: RejectionReason.BAD_SIGNATURE,
}


@dataclass(frozen=True)
class Accepted(Generic[M]):
    """A verified, parsed message."""

    message: M


@dataclass(frozen=True)
class Rejected:
    """A refused message, with why and a short detail for the dead-letter headers."""

    reason: RejectionReason
    detail: str


def open_envelope(
    body: bytes,
    headers: Mapping[str, object],
    keyring: Keyring,
    adapter: TypeAdapter[M],
    now: datetime,
    *,
    namespace: str,
    routing_key: str,
    consumed_pool: str | None = None,
    check_expiry: bool = True,
) -> Accepted[M] | Rejected:
    """Verify ``body`` against ``headers``, as delivered in ``namespace`` with ``routing_key``,
    then parse it with ``adapter``.

    A body over ``MAX_MESSAGE_BYTES`` is refused unread. The signature is checked on the exact
    bytes received, with the namespace and routing key it must cover, before any parsing;
    parsing is strict JSON (no numbers for strings or booleans for numbers) and needs ``v`` and
    ``type``. Then the key that signed must be of a role allowed to sign that message
    (``wrong_role``, see ``common.roles``), a trigger must have arrived with its own pool as
    routing key and, given ``consumed_pool``, be of that pool (``wrong_pool``), an event must
    have arrived under its own topic, ``event_routing_key`` (``wrong_routing_key``), and a
    message whose ``expires_at`` is not after ``now`` is rejected as expired (unless
    ``check_expiry`` is False: a retry's expiry is its own, ``common.retries.retry_expires_at``).
    Never raises: whatever the bytes or the header values (of any type), the outcome is a value; an exception
    from the parser itself is ``internal_error``.
    """
    if len(body) > MAX_MESSAGE_BYTES:
        return Rejected(
            RejectionReason.TOO_LARGE, f"the body is {len(body)} bytes; at most {MAX_MESSAGE_BYTES}"
        )
    signed = _signature_headers(headers)
    claimed = signed.get(SIGNATURE_HEADER)
    if isinstance(claimed, str | bytes) and len(claimed) > MAX_SIGNATURE_HEADER_LENGTH:
        return Rejected(RejectionReason.BAD_SIGNATURE, "signature check: the signature header is too long")
    checked = keyring.check(namespace, routing_key, body, signed)
    if checked.key is None:  # a key comes with every VALID outcome, and only with one
        return Rejected(_SIGNATURE_REJECTIONS[checked.outcome], f"signature check: {checked.outcome.value}")
    try:
        message = adapter.validate_json(body, strict=True)
    except ValidationError as exc:
        return Rejected(RejectionReason.MALFORMED, _first_error(exc))
    except Exception as exc:  # a parser bug must not stop a consumer: refuse the message instead
        return internal_error(exc)
    missing = _missing_wire_fields(message)
    if missing:
        return Rejected(RejectionReason.MALFORMED, missing)
    refusal = role_refusal(checked.key, message)
    if refusal is not None:
        return Rejected(RejectionReason.WRONG_ROLE, refusal)
    if isinstance(message, Trigger) and message.pool != routing_key:
        return Rejected(
            RejectionReason.WRONG_POOL,
            one_line(f"a trigger for pool {message.pool!r} arrived with routing key {routing_key!r}"),
        )
    if isinstance(message, Trigger) and consumed_pool is not None and message.pool != consumed_pool:
        return Rejected(
            RejectionReason.WRONG_POOL,
            one_line(f"a trigger for pool {message.pool!r} arrived at a worker of pool {consumed_pool!r}"),
        )
    if isinstance(message, EVENT_TYPES) and routing_key != (expected := event_routing_key(message)):
        return Rejected(
            RejectionReason.WRONG_ROUTING_KEY,
            one_line(f"{with_article(message.type)} must be published as {expected!r}, not {routing_key!r}"),
        )
    expires_at = getattr(message, "expires_at", None)
    if check_expiry and isinstance(expires_at, datetime) and expires_at <= now:
        return Rejected(RejectionReason.EXPIRED, f"expired at {expires_at.isoformat()}")
    return Accepted(message)


def _missing_wire_fields(message: object) -> str | None:
    """Why ``message`` (or an event of a batch) lacks ``v`` or ``type`` on the wire; None when
    every one carries both."""
    missing = WIRE_FIELDS - getattr(message, "model_fields_set", WIRE_FIELDS)
    if missing:
        return f"a message must carry {' and '.join(sorted(missing))}"
    if isinstance(message, EventBatch):
        for position, event in enumerate(message.events):
            inner = WIRE_FIELDS - event.model_fields_set
            if inner:
                return f"events.{position}: an event must carry {' and '.join(sorted(inner))}"
    return None


def _signature_headers(headers: Mapping[str, object]) -> dict[str, object]:
    """The two signature headers; an AMQP byte array (decoded as a bytearray) read as bytes."""
    found: dict[str, object] = {}
    for name in (KEY_ID_HEADER, SIGNATURE_HEADER):
        value = headers.get(name)
        found[name] = bytes(value) if isinstance(value, bytearray) else value
    return found


def internal_error(exc: BaseException) -> Rejected:
    """The refusal of a message whose handling raised ``exc`` unexpectedly (a bug, not the sender's
    fault as far as cronfleet can tell): ``internal_error``, detail ``<ExceptionType>: <message>``."""
    return Rejected(RejectionReason.INTERNAL_ERROR, one_line(f"{type(exc).__name__}: {exc}"))


def one_line(text: str, limit: int = DETAIL_LIMIT) -> str:
    """``text`` fit for a header or a log line: one line, no NUL, valid UTF-8, at most ``limit``."""
    cleaned = text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
    return " ".join(cleaned.split())[:limit]


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return one_line(f"{where}: {first['msg']}{more}")
