"""Standard Webhooks signing (https://www.standardwebhooks.com/), shared by the worker's signed
``http`` calls and the monitor's webhook channel.

A secret is written ``whsec_<base64 of the key bytes>``. A request carries three headers:
``webhook-id``, ``webhook-timestamp`` (Unix seconds) and ``webhook-signature`` (``v1,`` then the
base64 HMAC-SHA256, under the key, of ``<id>.<timestamp>.<body>``), so the Standard Webhooks
libraries verify it as they are. Plain ``hmac``/``hashlib``: the published test vector is checked
in ``tests/unit/test_alert_routing.py``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

SECRET_PREFIX = "whsec_"
MIN_KEY_BYTES = 24
MAX_KEY_BYTES = 64
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"


def webhook_key(secret: str) -> bytes:
    """The HMAC key a ``whsec_<base64>`` secret stands for. Raises ValueError (never quoting the
    secret) when it is not of that form or not 24 to 64 bytes long."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret starts with {SECRET_PREFIX!r} (then the key in base64)")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"what follows {SECRET_PREFIX!r} is not base64") from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"the key is {len(key)} bytes; use {MIN_KEY_BYTES} to {MAX_KEY_BYTES} random bytes")
    return key


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,<base64 HMAC-SHA256 of id.timestamp.body>``."""
    content = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()


def signed_headers(key: bytes, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers for ``body``."""
    return {
        ID_HEADER: message_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(key, message_id, timestamp, body),
    }
