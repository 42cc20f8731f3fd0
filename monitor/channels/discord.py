"""The Discord channel: a channel webhook, ``{"content": ..., "embeds": [...]}``.

``content`` is the one-line title, the embed carries every fact, coloured by kind (red for an
alarm, green for a recovery, blue for a test). Mentions are switched off (``allowed_mentions``),
so a reason that contains ``@everyone`` pings nobody. Several alerts waiting together (up to the
channel's ``group``, at most ``GROUP_LIMIT``: Discord takes 10 embeds and 6,000 characters of
embeds a message, and about 30 messages a minute per webhook) go in one message, one short embed
each.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson

from common.messages import format_instant
from monitor.channels.base import Alert, group_title
from monitor.channels.http import post_json

COLOURS = {"alarm": 0xD93F0B, "recovery": 0x2EA44F, "test": 0x1F6FEB}
CONTENT_LIMIT = 2000
TITLE_LIMIT = 256
DESCRIPTION_LIMIT = 4096
FIELD_VALUE_LIMIT = 1024
GROUP_LIMIT = 10  # embeds in one message
# A group's embed: title, description and footer within 6,000 characters for ten of them.
GROUP_TITLE_LIMIT, GROUP_DESCRIPTION_LIMIT, GROUP_FOOTER_LIMIT = 200, 300, 80
_MARKDOWN = re.compile(r"([\\*_~`|\[\]])")


def escape(text: str) -> str:
    """``text`` shown as it is in Discord's markdown."""
    return _MARKDOWN.sub(r"\\\1", text)


def discord_message(alert: Alert) -> dict[str, Any]:
    """The webhook payload for ``alert``."""
    facts = dict(alert.facts())
    embed: dict[str, Any] = {
        "title": _clip(alert.title(), TITLE_LIMIT),
        "description": _clip(escape(alert.reason), DESCRIPTION_LIMIT),
        "color": COLOURS[alert.kind],
        "timestamp": format_instant(alert.at),
        "fields": [
            {"name": label, "value": _clip(escape(facts[label]), FIELD_VALUE_LIMIT), "inline": True}
            for label in ("Job", "State", "At", "Fleet", "Recovered from")
            if label in facts
        ],
        "footer": {"text": f"flip {alert.flip_id}"},
    }
    if alert.link is not None:
        embed["url"] = alert.link
    return {
        "content": _clip(escape(alert.title()), CONTENT_LIMIT),
        "embeds": [embed],
        "allowed_mentions": {"parse": []},
    }


def discord_group_message(alerts: Sequence[Alert]) -> dict[str, Any]:
    """The webhook payload for ``alerts``: ``discord_message`` for one, else one message whose
    content counts them and whose embeds (one per alert, in order) say what, when and why."""
    if len(alerts) == 1:
        return discord_message(alerts[0])
    if len(alerts) > GROUP_LIMIT:
        raise ValueError(f"a Discord message holds at most {GROUP_LIMIT} alerts")
    embeds = []
    for alert in alerts:
        embed: dict[str, Any] = {
            "title": _clip(alert.headline(), GROUP_TITLE_LIMIT),
            "description": _clip(escape(alert.reason), GROUP_DESCRIPTION_LIMIT),
            "color": COLOURS[alert.kind],
            "timestamp": format_instant(alert.at),
            "footer": {"text": _clip(f"flip {alert.flip_id}", GROUP_FOOTER_LIMIT)},
        }
        if alert.link is not None:
            embed["url"] = alert.link
        embeds.append(embed)
    return {
        "content": _clip(escape(group_title(alerts)), CONTENT_LIMIT),
        "embeds": embeds,
        "allowed_mentions": {"parse": []},
    }


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DiscordChannel:
    """Posts alerts to a Discord webhook ``url`` (the URL is the secret), up to ``group`` in one
    message."""

    type = "discord"

    def __init__(
        self, name: str, url: str, session: aiohttp.ClientSession, *, timeout: float = 10.0, group: int = 1
    ) -> None:
        self.name = name
        self.group = min(group, GROUP_LIMIT)
        self._url = url
        self._session = session
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"DiscordChannel({self.name!r})"

    async def send(self, alerts: Sequence[Alert]) -> None:
        """Post ``alerts`` in one message. Raises DeliveryFailed."""
        body = orjson.dumps(discord_group_message(alerts))
        await post_json(self._session, self._url, body, timeout=self._timeout)
