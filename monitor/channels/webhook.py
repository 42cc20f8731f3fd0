"""The webhook channel: the alert as JSON, POSTed and signed the Standard Webhooks way.

Three headers travel with the body: ``webhook-id`` (the flip's id: the same on every retry, so a
receiver drops duplicates), ``webhook-timestamp`` (Unix seconds of this attempt) and
``webhook-signature`` (``v1,`` then the base64 HMAC-SHA256, keyed with the channel's secret, of
``<id>.<timestamp>.<body>``). The secret is written ``whsec_<base64 of the key bytes>``, so the
Standard Webhooks libraries verify it as they are (signing: ``common.webhooks``).
``docs/alerts.md`` shows a receiver in Python and in Node.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

from common.clock import Clock, utcnow
from common.messages import format_instant
from common.webhooks import signed_headers
from monitor.channels.base import Alert
from monitor.channels.http import post_json


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
        session: aiohttp.ClientSession,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        clock: Clock = utcnow,
    ) -> None:
        self.name = name
        self._url = url
        self._key = key
        self._session = session
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
        await post_json(self._session, self._url, body, timeout=self._timeout, headers=headers)
