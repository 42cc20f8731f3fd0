"""Opening a signed message: signature first, then parse once, then check expiry.

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

from common.messages import WIRE_FIELDS
from common.signing import Keyring, SignatureCheck

M = TypeVar("M")

REJECTION_HEADER = "cronfleet-rejection"
REJECTION_DETAIL_HEADER = "cronfleet-rejection-detail"
REJECTED_BY_HEADER = "cronfleet-rejected-by"
ORIGINAL_EXCHANGE_HEADER = "cronfleet-original-exchange"
ORIGINAL_ROUTING_KEY_HEADER = "cronfleet-original-routing-key"


class RejectionReason(enum.StrEnum):
    """Why a message was refused. Each is distinct so operators can tell forgery from rot."""

    MISSING_SIGNATURE = "missing_signature"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    MALFORMED = "malformed"
    EXPIRED = "expired"


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
) -> Accepted[M] | Rejected:
    """Verify ``body`` against ``headers``, then parse it with ``adapter``.

    A message whose ``expires_at`` is not after ``now`` is rejected as expired. The signature
    is checked on the exact bytes received, before any parsing; parsing is strict JSON (no
    numbers for strings or booleans for numbers) and needs ``v`` and ``type``.
    """
    check = keyring.check(body, headers)
    if check is not SignatureCheck.VALID:
        return Rejected(_SIGNATURE_REJECTIONS[check], f"signature check: {check.value}")
    try:
        message = adapter.validate_json(body, strict=True)
    except ValidationError as exc:
        return Rejected(RejectionReason.MALFORMED, _first_error(exc))
    missing = WIRE_FIELDS - getattr(message, "model_fields_set", WIRE_FIELDS)
    if missing:
        return Rejected(RejectionReason.MALFORMED, f"a message must carry {' and '.join(sorted(missing))}")
    expires_at = getattr(message, "expires_at", None)
    if isinstance(expires_at, datetime) and expires_at <= now:
        return Rejected(RejectionReason.EXPIRED, f"expired at {expires_at.isoformat()}")
    return Accepted(message)


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"[:500]
