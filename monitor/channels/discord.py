"""The Discord channel: a channel webhook, ``{"content": ..., "embeds": [...]}``.

``content`` is the one-line title, the embed carries every fact, coloured by kind (red for an
alarm, green for a recovery, blue for a test). Mentions are switched off (``allowed_mentions``),
so a reason that contains ``@everyone`` pings nobody.
"""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import orjson

from common.messages import format_instant
from monitor.channels.base import Alert
from monitor.channels.http import post_json

COLOURS = {"alarm": 0xD93F0B, "recovery": 0x2EA44F, "test": 0x1F6FEB}
CONTENT_LIMIT = 2000
TITLE_LIMIT = 256
DESCRIPTION_LIMIT = 4096
FIELD_VALUE_LIMIT = 1024
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


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DiscordChannel:
    """Posts each alert to a Discord webhook ``url`` (the URL is the secret)."""

    type = "discord"

    def __init__(self, name: str, url: str, session: aiohttp.ClientSession, *, timeout: float = 10.0) -> None:
        self.name = name
        self._url = url
        self._session = session
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"DiscordChannel({self.name!r})"

    async def send(self, alert: Alert) -> None:
        """Post ``alert``. Raises DeliveryFailed."""
        await post_json(self._session, self._url, orjson.dumps(discord_message(alert)), timeout=self._timeout)
