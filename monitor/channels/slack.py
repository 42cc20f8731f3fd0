"""The Slack channel: an incoming webhook, ``{"text": ..., "blocks": [...]}``.

``text`` is the one-line title (what notifications and old clients show); the blocks carry every
fact of the alert. Text from a job (its reason) is escaped, so it cannot mention or link anyone.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from monitor.channels.base import Alert
from monitor.channels.http import post_json

HEADER_LIMIT = 150  # Slack's limit for a header block's text
FIELD_LIMIT = 2000  # and for one field of a section


def escape(text: str) -> str:
    """``text`` shown as it is in Slack's mrkdwn (``&``, ``<`` and ``>`` escaped)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_message(alert: Alert) -> dict[str, Any]:
    """The incoming-webhook payload for ``alert``."""
    title = alert.title()
    facts = dict(alert.facts())
    fields = [
        {"type": "mrkdwn", "text": _clip(f"*{label}*\n{escape(facts[label])}", FIELD_LIMIT)}
        for label in ("Job", "State", "At", "Fleet", "Recovered from")
        if label in facts
    ]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _clip(title, HEADER_LIMIT)}},
        {"type": "section", "fields": fields},
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": _clip(f"*Reason*\n{escape(alert.reason)}", 3000)},
        },
    ]
    if alert.link is not None:
        blocks.append(
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": f"<{escape(alert.link)}|Open in cronfleet>"},
            }
        )
    blocks.append(
        {"type": "context", "elements": [{"type": "mrkdwn", "text": f"flip {escape(alert.flip_id)}"}]}
    )
    return {"text": escape(title), "blocks": blocks}


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SlackChannel:
    """Posts each alert to a Slack incoming-webhook ``url`` (the URL is the secret)."""

    type = "slack"

    def __init__(self, name: str, url: str, session: aiohttp.ClientSession, *, timeout: float = 10.0) -> None:
        self.name = name
        self._url = url
        self._session = session
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"SlackChannel({self.name!r})"

    async def send(self, alert: Alert) -> None:
        """Post ``alert``. Raises DeliveryFailed."""
        await post_json(self._session, self._url, orjson.dumps(slack_message(alert)), timeout=self._timeout)
