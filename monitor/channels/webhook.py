"""The webhook channel: the alert as JSON, POSTed and signed the Standard Webhooks way.

Three headers travel with the body: ``webhook-id`` (the flip's id: the same on every retry, so a
receiver drops duplicates), ``webhook-timestamp`` (Unix seconds of this attempt) and
``webhook-signature`` (``v1,`` then the base64 HMAC-SHA256, keyed with the channel's secret, of
``<id>.<timestamp>.<body>``). The secret is written ``whsec_<base64 of the key bytes>``, so the
Standard Webhooks libraries verify it as they are (signing: ``common.webhooks``).
``docs/alerts.md`` shows a receiver in Python and in Node.

With ``group`` above 1 the channel sends every alert as a member of a group, one or many:
``{"type": "cronfleet.alerts", "data": {"alerts": [...]}}``. The body's shape then never depends
on how many alerts were waiting, so a receiver written for it meets that shape on its first alert,
not for the first time on the night a herd of jobs goes down. A group's ``webhook-id`` is a digest
of its alerts' ids (the same on every retry of that group); receivers drop duplicates by each
alert's own ``id``, since after a monitor restart an alert may travel in another group.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
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


def group_body(alerts: Sequence[Alert]) -> bytes:
    """The JSON body of a group: ``{"type": "cronfleet.alerts", "timestamp": <the latest alert's
    instant>, "data": {"alerts": [<each alert's data>, ...]}}``, in the order given."""
    document: dict[str, Any] = {
        "type": "cronfleet.alerts",
        "timestamp": format_instant(max(alert.at for alert in alerts)),
        "data": {"alerts": [alert.payload() for alert in alerts]},
    }
    return orjson.dumps(document)


def group_id(alerts: Sequence[Alert]) -> str:
    """The ``webhook-id`` of a group: ``<fleet>/alerts-<digest of the alerts' ids>``."""
    digest = hashlib.sha256("\n".join(alert.flip_id for alert in alerts).encode()).hexdigest()
    return f"{alerts[0].fleet}/alerts-{digest[:32]}"


class WebhookChannel:
    """POSTs each alert to ``url``, signed with ``key``, plus the configured ``headers``; with
    ``group`` above 1, POSTs groups of up to ``group`` alerts (see the module)."""

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
        group: int = 1,
        clock: Clock = utcnow,
    ) -> None:
        self.name = name
        self.group = group
        self._url = url
        self._key = key
        self._session = session
        self._headers = dict(headers or {})
        self._timeout = timeout
        self._clock = clock

    def __repr__(self) -> str:
        return f"WebhookChannel({self.name!r})"

    async def send(self, alerts: Sequence[Alert]) -> None:
        """POST ``alerts`` (one, or a group), signed at this instant. Raises DeliveryFailed."""
        if self.group > 1:
            body, message_id = group_body(alerts), group_id(alerts)
        else:
            [alert] = alerts
            body, message_id = webhook_body(alert), alert.flip_id
        timestamp = int(self._clock().timestamp())
        headers = {**self._headers, **signed_headers(self._key, message_id, timestamp, body)}
        await post_json(self._session, self._url, body, timeout=self._timeout, headers=headers)
