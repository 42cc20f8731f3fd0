"""Durations as people write them on a command line or in a setting: ``90s``, ``15m``, ``12h``,
``30d``, ``2w``."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d{1,6})\s*([smhdw])\s*$")


def parse_duration(text: str) -> timedelta:
    """``text`` as a positive timedelta. Raises ValueError saying the accepted form."""
    found = _DURATION.match(text)
    if found is None or int(found.group(1)) == 0:
        raise ValueError(
            f"{text!r} is not a duration: use a positive number and a unit, like 30d, 12h or 90m"
        )
    return timedelta(seconds=int(found.group(1)) * _UNITS[found.group(2)])
