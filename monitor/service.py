"""The monitor process: consumes every event, verifies it, records it in batches, then acks;
and keeps each job's health, from those events and from its deadlines' timers.

A batch is what has arrived while the previous one was being written (up to ``BATCH_LIMIT``),
so under load one transaction carries many events and when idle each event is written at once.
Acks follow the commit: an event is never acked before it is in the store. The same transaction
advances the health of the jobs the batch touched (``monitor.recorder``); the timers
(``monitor.deadlines``) and the watch on the fleet (``monitor.fleet_watch``) start once what was
queued for the monitor has been recorded. The flips all three produce that people must be told
about go, once committed, to the alert channels of ``CRONFLEET_CHANNELS_FILE`` in the background
(``monitor.alerts``): alerting never delays recording.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from aio_pika.abc import AbstractRobustConnection

from common.cancel import stop_if_cancelled
from common.clock import Clock, utcnow
from common.connection import CONNECT_ERRORS, connect, link_loss_as_error, open_channel
from common.consuming import Delivery, ack_deliveries, consume_deliveries
from common.envelope import Accepted, Rejected, RejectionReason, internal_error, open_envelope
from common.errors import BrokerUnavailable, ConfigError
from common.http_client import open_session
from common.messages import MONITORED_ADAPTER, Event, EventBatch, MonitoredMessage
from common.publisher import Publisher
from common.retry import until_done
from common.services import ServiceOptions
from common.settings import Settings
from common.signing import Keyring
from common.store import STORE_OUTAGES, Store
from common.topology import Topology
from monitor.alerts import Alerting
from monitor.channels import build_channels, load_channels
from monitor.deadlines import Deadlines
from monitor.fleet_watch import FleetWatch, fleet_policy
from monitor.health_store import Advanced, log_flips, whole
from monitor.http.app import listen, serve_http
from monitor.http.context import EventCounts, HttpContext
from monitor.recorder import BatchOutcome, record_batch
from monitor.retention import purge_forever
from monitor.store_watch import StoreWatch

log = logging.getLogger("cronfleet.monitor")

BATCH_LIMIT = 500
PREFETCH = 2 * BATCH_LIMIT
# How many events may wait verified and parsed for the next batches; more wait as received.
OPENED_AHEAD_LIMIT = 2 * BATCH_LIMIT
# Connections the HTTP alert channels hold at most, all channels together.
ALERT_CONNECTIONS = 100
# How often a starting monitor asks whether its queue is drained.
DRAIN_CHECK_SECONDS = 0.2


class EventRecorder:
    """Drains delivered events into the store, one transaction per batch.

    No event can stop it: whatever fails while verifying, parsing or recording one event ends
    with that event dead-lettered with its reason; only a store outage holds events (unacked)
    until the store is back. Batches are written and settled one after the other, in the order
    they were delivered, so one multiple ack settles a whole batch (``ack_deliveries``).
    """

    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        keyring: Keyring,
        name: str,
        clock: Clock = utcnow,
        on_health: Callable[[Advanced], None] | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.keyring = keyring
        self.name = name
        self.clock = clock
        self.on_health = on_health
        # Sees every verified event (the fleet watch keeps the heartbeats of schedulers and workers).
        self.on_event = on_event
        # Each delivery is verified and parsed as it arrives, while the batch before it is being
        # written (the store works in its own thread or server meanwhile); beyond
        # OPENED_AHEAD_LIMIT events opened and waiting, a delivery waits unopened (a backlog of
        # ``event.batch`` messages would otherwise hold up to PREFETCH x 500 parsed events).
        self.inbox: asyncio.Queue[tuple[Delivery, Accepted[MonitoredMessage] | Rejected | None]] = (
            asyncio.Queue()
        )
        self._opened_ahead = 0
        # A delivery taken from the inbox that did not fit in the batch: the next one starts with it.
        self._next: tuple[Delivery, Accepted[MonitoredMessage] | Rejected] | None = None
        self.recorded = 0
        self.rejected = 0
        self._writing = False

    @property
    def idle(self) -> bool:
        """Nothing delivered is waiting or being written."""
        return self.inbox.empty() and self._next is None and not self._writing

    def receive(self, delivery: Delivery) -> None:
        """Take a delivery from the broker: open it now (unless many events wait opened
        already), write it with the next batch."""
        if self._opened_ahead >= OPENED_AHEAD_LIMIT:
            self.inbox.put_nowait((delivery, None))
            return
        opened = self._open(delivery, self.clock())
        self._opened_ahead += _event_count(opened)
        self.inbox.put_nowait((delivery, opened))

    def _take(
        self, item: tuple[Delivery, Accepted[MonitoredMessage] | Rejected | None]
    ) -> tuple[Delivery, Accepted[MonitoredMessage] | Rejected]:
        """An inbox item, opened now if it waited unopened."""
        delivery, opened = item
        if opened is None:
            return delivery, self._open(delivery, self.clock())
        self._opened_ahead -= _event_count(opened)
        return delivery, opened

    async def write_forever(self) -> None:
        """Take whatever has arrived, verify it, record it, ack it; forever. A batch holds at
        most BATCH_LIMIT events, but for a single message that carries more."""
        while True:
            stop_if_cancelled()  # acking goes through aio-pika, which can swallow a cancellation
            if self._next is None:
                self._next = self._take(await self.inbox.get())
            batch, self._next = [self._next], None
            self._writing = True
            events = _event_count(batch[0][1])
            while events < BATCH_LIMIT and not self.inbox.empty():
                taken = self._take(self.inbox.get_nowait())
                if events + _event_count(taken[1]) > BATCH_LIMIT:
                    self._next = taken
                    break
                batch.append(taken)
                events += _event_count(taken[1])
            try:
                await self._write(batch, self.clock())
            except Exception:
                # _write settles every event itself; this is the backstop for a bug in it.
                # What it left unsettled goes back, and the queue's delivery limit ends a loop.
                log.exception("unexpected error writing a batch of %d event(s); handed back", len(batch))
                await ack_deliveries((delivery for delivery, _opened in batch), requeue_instead=True)
            finally:
                self._writing = False

    async def write_batch(self, batch: list[Delivery]) -> None:
        """Record a batch and ack it; dead-letter what fails verification or cannot be recorded.

        While the store is unavailable the batch is held (not acked, not requeued) and written
        again with backoff, so nothing is acked before it is stored and nothing churns. Any other
        failure to record the batch is narrowed down by recording its events one by one. Every
        delivery of the batch is settled when it returns.
        """
        now = self.clock()
        await self._write([(delivery, self._open(delivery, now)) for delivery in batch], now)

    async def _write(
        self, batch: list[tuple[Delivery, Accepted[MonitoredMessage] | Rejected]], now: datetime
    ) -> None:
        accepted: list[_Received] = []
        for delivery, opened in batch:
            if isinstance(opened, Accepted):
                accepted.extend(_received(delivery, opened.message))
            else:
                await self._refuse(delivery, opened)
        # A message is refused once, for its first event that could not be recorded; the other
        # events of an ``event.batch`` are recorded all the same.
        refusals: dict[Delivery, Rejected] = {}
        if accepted:
            try:
                outcome = await self._record_held(accepted, now)
            except Exception as exc:
                # Not an outage: some event cannot be recorded. Write them one by one so that one
                # bad event goes to the dead-letter queue instead of blocking every other.
                log.warning("a batch of %d event(s) failed (%s); recording one by one", len(accepted), exc)
                for received in accepted:
                    refusal = await self._record_alone(received, now)
                    if refusal is not None:
                        refusals.setdefault(received.delivery, refusal)
            else:
                for position, conflict in outcome.conflicts.items():
                    received = accepted[position]
                    refusals.setdefault(
                        received.delivery, Rejected(RejectionReason.ID_CONFLICT, received.where + conflict)
                    )
        for delivery, refusal in refusals.items():
            await self._refuse(delivery, refusal)
        # What was refused is already settled; the rest was recorded (or repeated): one ack.
        await ack_deliveries(delivery for delivery, _opened in batch)

    def _open(self, delivery: Delivery, now: datetime) -> Accepted[MonitoredMessage] | Rejected:
        """Verify and parse ``delivery``; each verified event is handed to ``on_event`` now, as
        it arrives, not once its batch is written: a heartbeat waiting behind a store outage or a
        slow batch is proof of life all the same."""
        try:
            opened = open_envelope(
                delivery.body,
                delivery.headers,
                self.keyring,
                MONITORED_ADAPTER,
                now,
                namespace=self.publisher.namespace,
                routing_key=delivery.routing_key,
            )
        except Exception as exc:
            log.exception("unexpected error opening event %s", delivery.routing_key)
            return internal_error(exc)
        if isinstance(opened, Accepted) and self.on_event is not None:
            for event in _events_of(opened.message):
                self.on_event(event)
        return opened

    async def _record_held(self, accepted: list[_Received], now: datetime) -> BatchOutcome:
        """Record ``accepted`` in one transaction, waiting out store outages with backoff."""
        outcome = await until_done(
            lambda: whole(self._record(accepted, now)),
            STORE_OUTAGES,
            log,
            f"{len(accepted)} event(s) held until the store answers",
        )
        self.recorded += outcome.recorded
        log_flips(outcome.health)
        if self.on_health is not None:
            self.on_health(outcome.health)
        return outcome

    async def _record(self, accepted: list[_Received], now: datetime) -> BatchOutcome:
        async with self.store.session() as session, session.begin():
            return await record_batch(session, [received.event for received in accepted], now)

    async def _record_alone(self, received: _Received, now: datetime) -> Rejected | None:
        """Record one event; why its message must be dead-lettered when it cannot be recorded
        or conflicts, else None."""
        try:
            outcome = await self._record_held([received], now)
        except Exception as exc:
            log.exception(
                "cannot record event %s%s; dead-lettered", received.where, received.delivery.routing_key
            )
            refusal = internal_error(exc)
            return Rejected(refusal.reason, received.where + refusal.detail)
        if outcome.conflicts:
            return Rejected(RejectionReason.ID_CONFLICT, received.where + outcome.conflicts[0])
        return None

    async def _refuse(self, delivery: Delivery, rejected: Rejected) -> None:
        """Refuse ``delivery``: copied to the dead-letter queue with why (the batch's ack then
        settles it); requeued at once when the copy cannot be made for want of a broker."""
        self.rejected += 1
        log.warning("refused event %s: %s (%s)", delivery.routing_key, rejected.reason.value, rejected.detail)
        try:
            await self.publisher.dead_letter(delivery.incoming(), rejected, self.name)
        except BrokerUnavailable as exc:
            log.warning("could not dead-letter a refused event (%s); requeued", exc)
            await delivery.settle_alone(ack=False, requeue=True)
        except Exception:
            # Even the copy failed: let the broker dead-letter it (without our reason headers).
            log.exception("could not dead-letter event %s; the broker dead-letters it", delivery.routing_key)
            await delivery.settle_alone(ack=False)
        # Otherwise the copy is on the dead-letter queue: the batch's ack settles the original.


@dataclass(frozen=True, slots=True)
class _Received:
    """One verified event and the message it came in; ``where``: its place in that message
    (``"events.3: "`` in a batch, ``""`` alone), to name it in a refusal."""

    delivery: Delivery
    event: Event
    where: str = ""


def _events_of(message: MonitoredMessage) -> list[Event]:
    """The events a verified message carries: itself, or a batch's."""
    return list(message.events) if isinstance(message, EventBatch) else [message]


def _received(delivery: Delivery, message: MonitoredMessage) -> list[_Received]:
    if isinstance(message, EventBatch):
        return [_Received(delivery, event, f"events.{i}: ") for i, event in enumerate(message.events)]
    return [_Received(delivery, message)]


def _event_count(opened: Accepted[MonitoredMessage] | Rejected | None) -> int:
    """How many events an opened delivery adds to a batch (a refused one: one, to settle)."""
    if isinstance(opened, Accepted) and isinstance(opened.message, EventBatch):
        return len(opened.message.events)
    return 1


async def serve(settings: Settings, options: ServiceOptions) -> None:
    """Run a monitor until cancelled; waits out an unreachable broker."""
    keyring = settings.keyring()
    name = options.instance("monitor")
    topology = Topology(settings.namespace)
    channels = load_channels(settings.channels_file, os.environ)
    store = await Store.open(settings.database_url, settings.database_schema)
    try:
        connection = await connect(settings.amqp_url, name, wait=True)
        # One session for every HTTP channel; its connections are kept alive between alerts.
        http = open_session(ALERT_CONNECTIONS, user_agent="cronfleet-alerts/1")
        alerting = Alerting(store, channels, build_channels(channels, http), settings.namespace)
        try:
            publisher = await Publisher.open(connection, topology, keyring)
            deadlines = Deadlines(store, settings.jobs_reload_seconds, on_flips=alerting.note)

            # Job and fleet flips go the same way: the timers learn the deadlines, and the
            # flips people must hear about go to the alert channels.
            def on_health(advanced: Advanced) -> None:
                deadlines.note(advanced)
                alerting.note(advanced)

            fleet_watch = FleetWatch(
                store, connection, topology, fleet_policy(settings), settings.heartbeat_seconds, on_health
            )
            recorder = EventRecorder(
                store, publisher, keyring, name, on_health=on_health, on_event=fleet_watch.note
            )
            log.info(
                "monitor %s consuming %s; alert channels: %s",
                name,
                topology.monitor_queue,
                ", ".join(sorted(channels.channels)),
            )
            watch = StoreWatch(
                store,
                alerting.announce,
                name=name,
                fleet=settings.namespace,
                alert_after=settings.store_outage_alert_seconds,
                every=min(settings.heartbeat_seconds, 5.0),
            )
            alerting.start()
            # Bound before consuming starts: once the monitor is ready, its HTTP port answers.
            http_socket = None if options.http is None else _listen(*options.http)

            async def drained() -> None:
                await options.ready.wait()
                await wait_until_drained(connection, topology, recorder)

            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(watch.watch_forever())
                tasks.create_task(recorder.write_forever())
                tasks.create_task(deadlines.run_forever(drained))
                tasks.create_task(fleet_watch.run_forever(drained))
                tasks.create_task(alerting.keep_forever())
                if http_socket is not None:
                    context = HttpContext(
                        settings,
                        store,
                        publisher,
                        keyring,
                        events=lambda: EventCounts(recorder.recorded, recorder.rejected),
                        connection=connection,
                    )
                    tasks.create_task(serve_http(context, http_socket))
                retention = settings.retention_age()
                if retention is not None:
                    tasks.create_task(purge_forever(store, retention, settings.retention_check_seconds))
                await consume_deliveries(
                    connection, topology.declare_monitor, PREFETCH, recorder.receive, options.ready
                )
        finally:
            try:
                # Bounded (common/cancel.py: a stopping monitor must end): what it could not
                # deliver stays pending in the store for the next monitor.
                await alerting.close()
            finally:
                await http.close()
                await connection.close()
    finally:
        await store.close()


def _listen(host: str, port: int) -> socket.socket:
    """The monitor's HTTP socket; ConfigError in one line when the address cannot be bound."""
    try:
        return listen(host, port)
    except OSError as exc:
        raise ConfigError(f"--http {host}:{port}: cannot listen there ({exc.strerror or exc})") from exc


async def wait_until_drained(
    connection: AbstractRobustConnection, topology: Topology, recorder: EventRecorder
) -> None:
    """Return once the monitor's queue holds no message ready for delivery and the recorder has
    nothing delivered left to write, seen twice in a row (a delivery may be on its way from the
    broker to the inbox at the first look). Waits out an unreachable broker."""
    quiet = 0
    while quiet < 2:
        # aio-pika's channel close can swallow a cancellation: a monitor stopped here must not
        # go on to start its timers.
        stop_if_cancelled()
        await asyncio.sleep(DRAIN_CHECK_SECONDS)
        try:
            with link_loss_as_error():
                channel = await open_channel(connection)
                try:
                    queue = await channel.declare_queue(topology.monitor_queue, passive=True)
                    waiting = queue.declaration_result.message_count
                finally:
                    await channel.close()
        except CONNECT_ERRORS as exc:
            log.debug("cannot see the monitor queue yet (%s)", exc)
            quiet = 0
            continue
        quiet = quiet + 1 if waiting == 0 and recorder.idle else 0
    stop_if_cancelled()
    log.info("queued events recorded; the deadline timers start")
