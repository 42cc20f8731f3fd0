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
    delay, outage = first_delay, OutageLog(log, what)
    while True:
        try:
            result = await attempt()
        except outages as exc:
            outage.failed(exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, longest_delay)
            continue
        outage.ended("done after the outage")
        return result


class OutageLog:
    """What a loop that retries forever says of an outage: a warning once per new reason ("``what``:
    reason; retrying"), not at every try, and one line when it ends. A warning every second for
    as long as the outage lasts would bury the rest of the log."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log = log
        self.what = what
        self._said = ""

    def failed(self, exc: BaseException) -> None:
        """Note a failed try; say it if its reason is new."""
        # A driver's error names the statement it failed on, which changes from try to try.
        reason = (str(exc) or type(exc).__name__).splitlines()[0].split(" [SQL:")[0]
        if reason != self._said:
            self._said = reason
            self.log.warning("%s: %s; retrying", self.what, reason)

    def ended(self, how: str = "back after the outage") -> None:
        """Note a successful try; say that the outage ended, if there was one."""
        if self._said:
            self._said = ""
            self.log.info("%s: %s", self.what, how)
