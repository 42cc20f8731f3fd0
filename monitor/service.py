"""The monitor process: consumes every event, verifies it, records it in batches, then acks.

A batch is what has arrived while the previous one was being written (up to ``BATCH_LIMIT``),
so under load one transaction carries many events and when idle each event is written at once.
Acks follow the commit: an event is never acked before it is in the store.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy.exc import SQLAlchemyError

from common.bus import Publisher, connect, consume_forever, settle
from common.clock import Clock, utcnow
from common.envelope import Accepted, Rejected, open_envelope
from common.errors import BrokerUnavailable
from common.messages import EVENT_ADAPTER, Event
from common.services import ServiceOptions
from common.settings import Settings
from common.signing import Keyring
from common.store import STORE_OUTAGES, Store
from common.topology import Topology
from monitor.recorder import record_batch

log = logging.getLogger("cronfleet.monitor")

BATCH_LIMIT = 500
PREFETCH = 2 * BATCH_LIMIT


class EventRecorder:
    """Drains delivered events into the store, one transaction per batch."""

    def __init__(
        self, store: Store, publisher: Publisher, keyring: Keyring, name: str, clock: Clock = utcnow
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.keyring = keyring
        self.name = name
        self.clock = clock
        self.inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self.recorded = 0
        self.rejected = 0

    async def write_forever(self) -> None:
        """Take whatever has arrived, verify it, record it, ack it; forever."""
        while True:
            batch = [await self.inbox.get()]
            while len(batch) < BATCH_LIMIT and not self.inbox.empty():
                batch.append(self.inbox.get_nowait())
            await self.write_batch(batch)

    async def write_batch(self, batch: list[AbstractIncomingMessage]) -> None:
        """Record a batch and ack it; dead-letter what fails verification.

        While the store is unavailable the batch is held (not acked, not requeued) and written
        again with backoff, so nothing is acked before it is stored and nothing churns.
        """
        now = self.clock()
        accepted: list[tuple[AbstractIncomingMessage, Event]] = []
        for message in batch:
            opened = open_envelope(message.body, message.headers or {}, self.keyring, EVENT_ADAPTER, now)
            if isinstance(opened, Accepted):
                accepted.append((message, opened.message))
            else:
                await self._refuse(message, opened)
        delay = 0.5
        while accepted:
            try:
                await self._record(accepted, now)
            except STORE_OUTAGES as exc:
                log.error("the store is unavailable (%s); %d event(s) held, retrying", exc, len(accepted))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            except SQLAlchemyError:
                # Not an outage: some event cannot be recorded. Write them one by one so that one
                # bad event goes to the dead-letter queue instead of blocking every other.
                for message, event in accepted:
                    await self._record_alone(message, event, now)
                return
            for message, _event in accepted:
                await settle(message)
            return

    async def _record(self, accepted: list[tuple[AbstractIncomingMessage, Event]], now: datetime) -> None:
        async with self.store.session() as session, session.begin():
            self.recorded += await record_batch(session, [event for _message, event in accepted], now)

    async def _record_alone(self, message: AbstractIncomingMessage, event: Event, now: datetime) -> None:
        try:
            await self._record([(message, event)], now)
        except STORE_OUTAGES:
            await settle(message, ack=False, requeue=True)
        except SQLAlchemyError as exc:
            log.error("cannot record event %s (%s); dead-lettered", message.routing_key, exc)
            await settle(message, ack=False)
        else:
            await settle(message)

    async def _refuse(self, message: AbstractIncomingMessage, rejected: Rejected) -> None:
        self.rejected += 1
        log.warning("refused event %s: %s (%s)", message.routing_key, rejected.reason.value, rejected.detail)
        try:
            await self.publisher.dead_letter(message, rejected, self.name)
        except BrokerUnavailable as exc:
            log.warning("could not dead-letter a refused event (%s); requeued", exc)
            await settle(message, ack=False, requeue=True)
            return
        await settle(message)


async def serve(settings: Settings, options: ServiceOptions) -> None:
    """Run a monitor until cancelled; waits out an unreachable broker."""
    keyring = settings.keyring()
    name = options.instance("monitor")
    topology = Topology(settings.namespace)
    store = await Store.open(settings.database_url, settings.database_schema)
    try:
        connection = await connect(settings.amqp_url, name, wait=True)
        try:
            publisher = await Publisher.open(connection, topology, keyring)
            recorder = EventRecorder(store, publisher, keyring, name)
            log.info("monitor %s consuming %s", name, topology.monitor_queue)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(recorder.write_forever())
                await consume_forever(
                    connection, topology.declare_monitor, PREFETCH, recorder.inbox.put_nowait, options.ready
                )
        finally:
            await connection.close()
    finally:
        await store.close()
