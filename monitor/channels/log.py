"""The log channel: one structured line per alert on the ``cronfleet.alerts`` logger.

The line reads ``alert kind=alarm job=backup from=running to=failing reason="..." ...``, and the
same fields ride on the record (``record.alert``) for a JSON log handler. It never fails.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import orjson

from common.messages import format_instant
from monitor.channels.base import Alert

LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
Level = Literal["info", "warning", "error"]


def log_line(alert: Alert) -> str:
    """The alert as ``key=value`` pairs, values with spaces or quotes JSON-quoted."""
    fields = {
        "kind": alert.kind,
        "job": alert.job,
        "from": alert.from_state,
        "to": alert.to_state,
        "recovered_from": alert.recovered_from,
        "reason": alert.reason,
        "at": format_instant(alert.at),
        "fleet": alert.fleet,
        "flip": alert.flip_id,
        "link": alert.link,
    }
    return "alert " + " ".join(f"{k}={_value(v)}" for k, v in fields.items() if v is not None)


def _value(text: str) -> str:
    if text and all(c.isprintable() and c not in ' "=' for c in text):
        return text
    return orjson.dumps(text).decode()


class LogChannel:
    """Writes each alert to ``logger``, one line each, however many it is given at once: alarms
    at ``level``, recoveries and tests at INFO."""

    type = "log"

    def __init__(
        self, name: str, *, level: Level = "warning", logger: logging.Logger | None = None, group: int = 1
    ) -> None:
        self.name = name
        self.group = group
        self._level = LEVELS[level]
        self._logger = logger or logging.getLogger("cronfleet.alerts")

    def __repr__(self) -> str:
        return f"LogChannel({self.name!r})"

    async def send(self, alerts: Sequence[Alert]) -> None:
        """Log ``alerts``, one line each."""
        for alert in alerts:
            level = self._level if alert.kind == "alarm" else logging.INFO
            self._logger.log(level, "%s", log_line(alert), extra={"alert": alert.payload()})
