"""The webhook channel: the alert as JSON, POSTed and signed the Standard Webhooks way.

Three headers travel with the body: ``webhook-id`` (the flip's id: the same on every retry, so a
receiver drops duplicates), ``webhook-timestamp`` (Unix seconds of this attempt) and
``webhook-signature`` (``v1,`` then the base64 HMAC-SHA256, keyed with the channel's secret, of
``<id>.<timestamp>.<body>``). The secret is written ``whsec_<base64 of the key bytes>``, so the
Standard Webhooks libraries verify it as they are. ``docs/alerts.md`` shows a receiver in Python
and in Node.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

import httpx
import orjson

from common.clock import Clock, utcnow
from common.messages import format_instant
from monitor.channels.base import Alert
from monitor.channels.http import post_json

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


def webhook_body(alert: Alert) -> bytes:
    """The JSON body: ``{"type": "cronfleet.<kind>", "timestamp": ..., "data": {...}}``."""
    document: dict[str, Any] = {
        "type": f"cronfleet.{alert.kind}",
        "timestamp": format_instant(alert.at),
        "data": alert.payload(),
    }
    return orjson.dumps(document)


class WebhookChannel:
    """POSTs each alert to ``url``, signed with ``key``, plus the configured ``headers``."""

    type = "webhook"

    def __init__(
        self,
        name: str,
        url: str,
        key: bytes,
        client: httpx.AsyncClient,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        clock: Clock = utcnow,
    ) -> None:
        self.name = name
        self._url = url
        self._key = key
        self._client = client
        self._headers = dict(headers or {})
        self._timeout = timeout
        self._clock = clock

    def __repr__(self) -> str:
        return f"WebhookChannel({self.name!r})"

    async def send(self, alert: Alert) -> None:
        """POST ``alert``, signed at this instant. Raises DeliveryFailed."""
        body = webhook_body(alert)
        timestamp = int(self._clock().timestamp())
        headers = {**self._headers, **signed_headers(self._key, alert.flip_id, timestamp, body)}
        await post_json(self._client, self._url, body, timeout=self._timeout, headers=headers)
