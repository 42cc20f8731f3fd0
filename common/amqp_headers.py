"""Headers as AMQP can write them again: what a dead letter keeps of a refused message's."""

from __future__ import annotations

import decimal
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pamqp import encode as pamqp_encode

from common.signing import KEY_ID_HEADER, SIGNATURE_HEADER

_INT64 = range(-(2**63), 2**63)
# Headers travel in one frame (RabbitMQ's frame_max is 128 KiB): a refused message whose headers
# leave no room for the reason would make the broker close the whole connection.
MAX_KEPT_HEADER_BYTES = 64 * 1024


def kept_headers(headers: Mapping[str, object]) -> dict[str, Any]:
    """The headers of a refused message, as its dead letter carries them.

    All of them, as AMQP can write them again (``amqp_value``); if together they are over
    ``MAX_KEPT_HEADER_BYTES`` (or cannot be written), only the two signature headers, and only
    if they are short strings.
    """
    kept = {str(name): amqp_value(value) for name, value in headers.items()}
    try:
        size = len(pamqp_encode.field_table(kept))
    except (TypeError, ValueError, OverflowError):
        size = MAX_KEPT_HEADER_BYTES + 1
    if size <= MAX_KEPT_HEADER_BYTES:
        return kept
    return {
        name: value
        for name, value in kept.items()
        if name in (KEY_ID_HEADER, SIGNATURE_HEADER) and isinstance(value, str) and len(value) <= 256
    }


def amqp_value(value: object) -> Any:
    """``value`` (a decoded header) as something the AMQP encoder can write again.

    The decoder hands back what the encoder refuses: ``bytes`` for a string that was not UTF-8.
    Those become byte arrays (the same bytes); anything else it cannot write becomes its text.
    """
    match value:
        case bool() | str() | float() | decimal.Decimal() | datetime() | bytearray() | None:
            return value
        case int():
            return value if value in _INT64 else str(value)
        case bytes():
            return bytearray(value)
        case dict():
            return {str(name): amqp_value(item) for name, item in value.items()}
        case list() | tuple():
            return [amqp_value(item) for item in value]
    return repr(value)
