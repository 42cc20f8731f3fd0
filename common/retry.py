"""Waiting out an outage: try again with backoff, and say so once per new reason."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def until_done(
    attempt: Callable[[], Awaitable[T]],
    outages: tuple[type[BaseException], ...],
    log: logging.Logger,
    what: str,
    *,
    first_delay: float = 0.5,
    longest_delay: float = 10.0,
) -> T:
    """``attempt()``'s result, retried with exponential backoff while it raises one of
    ``outages``. Each new reason is logged once as a warning ("``what``: reason; retrying"), not
    every try, and the first success after a failure is logged too. Anything else propagates."""
    delay, said = first_delay, ""
    while True:
        try:
            result = await attempt()
        except outages as exc:
            reason = str(exc) or type(exc).__name__
            if reason != said:
                said = reason
                log.warning("%s: %s; retrying", what, reason)
            await asyncio.sleep(delay)
            delay = min(delay * 2, longest_delay)
            continue
        if said:
            log.info("%s: done after the outage", what)
        return result
