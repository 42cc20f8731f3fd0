"""The monitor's retention loop: purge old history on a schedule when ``CRONFLEET_RETENTION`` is set."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from common.cancel import stop_if_cancelled
from common.clock import Clock, utcnow
from common.store import STORE_OUTAGES, Store
from common.store.retention import purge

log = logging.getLogger("cronfleet.monitor")


async def purge_forever(store: Store, older_than: timedelta, every: float, clock: Clock = utcnow) -> None:
    """Purge history older than ``older_than`` now and every ``every`` seconds, until cancelled.

    A store outage is logged and the purge tried again at the next turn; nothing else stops it.
    """
    while True:
        stop_if_cancelled()
        try:
            purged = await purge(store, older_than, clock())
        except STORE_OUTAGES as exc:
            log.warning("retention: the store is unavailable (%s); trying again in %gs", exc, every)
        else:
            if purged.total:
                log.info("retention: purged %s older than %s", purged, older_than)
        await asyncio.sleep(every)
