"""The Slack channel: an incoming webhook, ``{"text": ..., "blocks": [...]}``.

``text`` is the one-line title (what notifications and old clients show); the blocks carry every
fact of the alert. Text from a job (its reason) is escaped, so it cannot mention or link anyone.
Several alerts waiting together (up to the channel's ``group``, at most ``GROUP_LIMIT``: Slack
takes 50 blocks a message and about one message a second per webhook) go in one message: a
header counting them, then one section per alert (what happened, when, why, its flip).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson

from common.messages import format_instant
from monitor.channels.base import Alert, group_title
from monitor.channels.http import post_json

HEADER_LIMIT = 150  # Slack's limit for a header block's text
FIELD_LIMIT = 2000  # and for one field of a section
GROUP_LIMIT = 45  # alerts in one message: a header, one section each and a context, within 50 blocks
GROUP_REASON_LIMIT = 500  # a reason's characters in a group's section (a section holds 3,000)


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


def slack_group_message(alerts: Sequence[Alert]) -> dict[str, Any]:
    """The incoming-webhook payload for ``alerts``: ``slack_message`` for one, else one message
    with a section per alert, in order."""
    if len(alerts) == 1:
        return slack_message(alerts[0])
    if len(alerts) > GROUP_LIMIT:
        raise ValueError(f"a Slack message holds at most {GROUP_LIMIT} alerts")
    title = group_title(alerts)
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _clip(title, HEADER_LIMIT)}}
    ]
    for alert in alerts:
        headline = escape(alert.headline())
        if alert.link is not None:
            headline = f"<{escape(alert.link)}|{headline}>"
        reason = escape(_clip(alert.reason, GROUP_REASON_LIMIT))
        text = f"*{headline}*\n{escape(format_instant(alert.at))}: {reason}\n_flip {escape(alert.flip_id)}_"
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _clip(text, 3000)}})
    return {"text": escape(title), "blocks": blocks}


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SlackChannel:
    """Posts alerts to a Slack incoming-webhook ``url`` (the URL is the secret), up to ``group``
    in one message."""

    type = "slack"

    def __init__(
        self, name: str, url: str, session: aiohttp.ClientSession, *, timeout: float = 10.0, group: int = 1
    ) -> None:
        self.name = name
        self.group = min(group, GROUP_LIMIT)
        self._url = url
        self._session = session
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"SlackChannel({self.name!r})"

    async def send(self, alerts: Sequence[Alert]) -> None:
        """Post ``alerts`` in one message. Raises DeliveryFailed."""
        body = orjson.dumps(slack_group_message(alerts))
        await post_json(self._session, self._url, body, timeout=self._timeout)
