"""Whether the monitor reaches its store, and telling people when it does not.

While its store is down the monitor records nothing: events wait on the broker, unacknowledged,
no flip is stored, and no alert about a job can be sent (alerts are stored flips). Nobody else can
tell either, since everything else reads the store. So the monitor watches the store itself:
``StoreWatch`` tries a trivial statement every ``every`` seconds and, once the store has been
unreachable for ``alert_after`` seconds, announces an alarm to every alert channel directly
(``announce``), without going through the store; when the store answers again it announces the
recovery. A shorter outage is logged once when it begins and once when it ends, never once per
retry. The announced alerts' attempts are stored once the store is back (``monitor.alerts``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from common.cancel import stop_if_cancelled
from common.clock import Clock, utcnow
from common.messages import format_instant
from common.store import STORE_OUTAGES, Store
from monitor.channels import Alert

log = logging.getLogger("cronfleet.monitor")

# The name the store's alerts carry, as the fleet's own components do ("@scheduler"...): no job has it.
STORE_ALERT_JOB = "@store"


@dataclass
class Outage:
    """The store has been unreachable since ``since``; ``error``: the latest reason (one line);
    ``alerted``: its alarm was announced."""

    since: datetime
    error: str
    alerted: bool = False


class StoreWatch:
    """Watches ``store`` on behalf of the monitor ``name`` of ``fleet`` (see the module)."""

    def __init__(
        self,
        store: Store,
        announce: Callable[[Alert], None],
        *,
        name: str,
        fleet: str,
        alert_after: float,
        every: float,
        clock: Clock = utcnow,
    ) -> None:
        self.store = store
        self.announce = announce
        self.name = name
        self.fleet = fleet
        self.alert_after = alert_after
        self.every = every
        self.clock = clock
        self.outage: Outage | None = None

    async def watch_forever(self) -> None:
        """Try the store every ``every`` seconds, forever; never raises but to be cancelled."""
        while True:
            stop_if_cancelled()
            await self.check()
            await asyncio.sleep(self.every)

    async def check(self) -> bool:
        """Try the store once (bounded by ``every``, at least a second) and note the outcome:
        True when it answered."""
        try:
            async with asyncio.timeout(max(self.every, 1.0)):
                async with self.store.engine.connect() as connection:
                    await connection.execute(text("SELECT 1"))
        except (*STORE_OUTAGES, TimeoutError, SQLAlchemyError) as exc:  # whatever keeps it from answering
            stop_if_cancelled()
            self.unreachable(exc)
            return False
        self.reachable()
        return True

    def unreachable(self, exc: BaseException) -> None:
        """Note that the store could not be reached just now (``exc`` says why)."""
        now = self.clock()
        error = _one_line(exc)
        if self.outage is None:
            self.outage = Outage(since=now, error=error)
            log.error(
                "the store is unreachable (%s): events are held on the broker until it is back; "
                "alerting every channel if it lasts %gs",
                error,
                self.alert_after,
            )
            return
        self.outage.error = error
        if not self.outage.alerted and (now - self.outage.since).total_seconds() >= self.alert_after:
            self.outage.alerted = True
            self.announce(self._alarm(self.outage))
            log.error(
                "the store has been unreachable since %s (%s): alert sent to every channel",
                format_instant(self.outage.since),
                error,
            )

    def reachable(self) -> None:
        """Note that the store answered just now; ends an outage (announcing its recovery when its
        alarm went out)."""
        outage, self.outage = self.outage, None
        if outage is None:
            return
        lasted = (self.clock() - outage.since).total_seconds()
        log.warning("the store is reachable again after %.1fs", lasted)
        if outage.alerted:
            self.announce(self._recovery(outage, lasted))

    def _alarm(self, outage: Outage) -> Alert:
        return Alert(
            job=STORE_ALERT_JOB,
            from_state="up",
            to_state="down",
            reason=(
                f"monitor {self.name} cannot reach its store since {format_instant(outage.since)} "
                f"({outage.error}): nothing is recorded and no job's alert can be sent until it is "
                "back; events wait on the broker"
            ),
            at=self.clock(),
            flip_id=self._id(outage, "down"),
            fleet=self.fleet,
        )

    def _recovery(self, outage: Outage, lasted: float) -> Alert:
        return Alert(
            job=STORE_ALERT_JOB,
            from_state="down",
            to_state="up",
            reason=(
                f"monitor {self.name} reaches its store again after {lasted:.0f}s unreachable; "
                "held events are being recorded and jobs' alerts sent"
            ),
            at=self.clock(),
            flip_id=self._id(outage, "up"),
            fleet=self.fleet,
            recovered_from="down",
        )

    def _id(self, outage: Outage, state: str) -> str:
        """The same id on every channel and attempt; distinct per outage and per monitor."""
        return f"{self.fleet}/store-{state}-{self.name}-{int(outage.since.timestamp())}"


def _one_line(exc: BaseException) -> str:
    text_ = " ".join(str(exc).split()) or type(exc).__name__
    return text_[:300]
