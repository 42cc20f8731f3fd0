"""The publisher: signs every message (with its namespace and routing key, under the key of the
role that may send it) and returns only once the broker has confirmed it. A run's events that are
ready together go out as one ``event.batch``; a publish whose connection was lost is sent again
once it is back."""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from operator import attrgetter
from typing import Any, Protocol, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from aiormq.exceptions import ChannelAccessRefused, DeliveryError

from common.amqp_headers import amqp_value, kept_headers
from common.batching import Batcher
from common.connection import (
    CONNECT_ERRORS,
    CONNECTION_LOST,
    broker_refusal,
    link_loss_as_error,
    open_channel,
)
from common.envelope import (
    ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    REJECTED_BY_HEADER,
    REJECTION_DETAIL_HEADER,
    REJECTION_HEADER,
    Rejected,
    one_line,
)
from common.errors import BrokerUnavailable, ConfigError
from common.event_batches import batch_body, pack
from common.framing import ConfirmInstants, FramedMessage, forget_message_ids, frame_message, publish_together
from common.messages import (
    BATCHED_EVENT_TYPES,
    EVENT_BATCH_TYPE,
    JOBS_CHANGED_ROUTING_KEY,
    JobHeartbeat,
    JobsChanged,
    WireMessage,
)
from common.retries import ATTEMPT_HEADER, DELAY_HEADER
from common.roles import signing_role
from common.signing import KEY_ID_HEADER, SIGNATURE_HEADER, Key, Keyring, Role
from common.topology import Topology, event_routing_key

log = logging.getLogger("cronfleet.bus")

# How long a publish whose connection was lost waits for it to come back (on this node, or on
# the next one of a cluster) before raising BrokerUnavailable.
PUBLISH_RECONNECT_SECONDS = 15.0


def _message(body: bytes, headers: Mapping[str, Any], message_id: str | None) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        headers=dict(headers),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
        timestamp=datetime.now(UTC),
    )


class Received(Protocol):
    """What a refused message is dead-lettered from: aio-pika's message or a ``Delivery``."""

    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> Mapping[str, Any]: ...
    @property
    def routing_key(self) -> str | None: ...
    @property
    def exchange(self) -> str | None: ...
    @property
    def message_id(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class _OutgoingEvent:
    """An event waiting to be sent: its body, its topic, the key that signs it, and its pool
    when it may travel in a batch (a run event or a worker heartbeat)."""

    body: bytes
    routing_key: str
    signer: Key
    pool: str | None

    def batch_key(self) -> tuple[str, str] | None:
        """Events of one key and one pool may share a batch; None: this one goes alone."""
        return None if self.pool is None else (self.signer.id, self.pool)


def _alone(_event: _OutgoingEvent) -> None:
    """No event shares a message (``CRONFLEET_EVENT_BATCHES=false``)."""
    return None


def _access_refused(exc: BaseException) -> bool:
    """Whether the broker refused ``exc``'s publish for want of a right (``ACCESS_REFUSED``)."""
    seen: BaseException | None = exc
    for _ in range(8):  # the chain: BrokerUnavailable, CancelledError, ChannelAccessRefused
        if seen is None:
            return False
        if isinstance(seen, ChannelAccessRefused) or "ACCESS_REFUSED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Publisher:
    """Signs and publishes messages of one fleet (``namespace``), each confirmed by the broker
    before returning.

    Each message is signed over the namespace, its routing key and its body, with the signing
    key of the role that may send it (``common.roles``). Publishes may run concurrently: their
    confirms are pipelined on one channel. Raises BrokerUnavailable when a message is refused,
    unroutable or the broker is gone, and ConfigError when no key may sign it.
    """

    def __init__(
        self,
        channel: AbstractChannel,
        exchanges: Mapping[str, AbstractExchange],
        keyring: Keyring,
        namespace: str,
        *,
        batch_events: bool = True,
        batch_pools: Collection[str] | None = None,
    ) -> None:
        self.channel = channel
        self.namespace = namespace
        self._exchanges = exchanges
        self._keyring = keyring
        # Whether run events and worker heartbeats published together go as ``event.batch``,
        # and of which pools (None: any). A worker batches its own pool's only: it may publish
        # ``event.batch.<its pool>`` and no other (the end of a lost run of another pool that it
        # records goes alone).
        self._batch_events = batch_events
        self._batch_pools = None if batch_pools is None else frozenset(batch_pools)
        # Event message ids: unique without a call to the system's random source per event.
        self._id_prefix = f"{uuid.uuid4().hex[:16]}-"
        self._ids = itertools.count()
        self._events: Batcher[_OutgoingEvent, datetime | BaseException] = Batcher(self._send_events)

    @classmethod
    async def open(
        cls,
        connection: AbstractRobustConnection,
        topology: Topology,
        keyring: Keyring,
        *,
        declare: bool = True,
        batch_events: bool = True,
        batch_pools: Collection[str] | None = None,
    ) -> Publisher:
        """A publisher of ``topology``'s namespace on a new confirmed channel of ``connection``.

        With ``declare`` the exchanges and both shared queues are declared (created if need be,
        which takes ``configure`` rights); without, the exchanges are only looked up passively,
        which takes no right at all (``cronfleet ping``, workers). Without ``batch_events`` every
        event goes alone (``CRONFLEET_EVENT_BATCHES=false``); with ``batch_pools``, only events of
        those pools may share a message. Raises BrokerUnavailable, in one
        line naming what the broker refused or did not find, when it cannot be opened.
        """
        try:
            channel = await open_channel(connection, on_return_raises=True)
            if declare:
                exchanges = await topology.declare_exchanges(channel)
            else:
                exchanges = await topology.find_exchanges(channel)
        except BrokerUnavailable:
            raise
        except CONNECT_ERRORS as exc:
            raise BrokerUnavailable(
                broker_refusal(f"cannot open a publisher in namespace {topology.namespace!r}", exc)
            ) from exc
        return cls(
            channel,
            exchanges,
            keyring,
            topology.namespace,
            batch_events=batch_events,
            batch_pools=batch_pools,
        )

    async def trigger_body(self, body: bytes, pool: str, message_id: str) -> None:
        """Publish an already serialised trigger ``body`` (as kept in the outbox) to ``pool``."""
        headers = self._keyring.sign(Role.TRIGGER, self.namespace, pool, body)
        await self._publish("triggers", body, headers, pool, message_id)

    async def trigger_bodies(
        self, triggers: Sequence[tuple[bytes, str, str]]
    ) -> list[datetime | BaseException]:
        """Publish already serialised triggers, each ``(body, pool, message id)``, with pipelined
        confirms. Returns, per trigger in order, the instant its own confirm came back, or the
        exception that stopped it (BrokerUnavailable when it was refused, unroutable or the
        broker is gone).

        The burst path of the scheduler: the frames of every trigger go out in one write
        (``publish_together``), not one system call and one task per message."""
        now = datetime.now(UTC)
        return await self.send_triggers(self.frame_triggers([(*t, now) for t in triggers]))

    def frame_triggers(self, triggers: Sequence[tuple[bytes, str, str, datetime]]) -> list[FramedMessage]:
        """Sign and marshal triggers, each ``(body, pool, message id, instant it goes out)``, for
        this publisher's channel as it is now, so that ``send_triggers`` has only the write
        left: the scheduler frames each fire while it prepares it, before its instant. A
        message framed for a channel that has since been replaced is framed again when sent."""
        exchange = self._exchanges["triggers"].name
        number = self._channel_number()
        return [
            frame_message(
                exchange,
                body,
                pool,
                self._keyring.sign(Role.TRIGGER, self.namespace, pool, body),
                message_id,
                at,
                number,
            )
            for body, pool, message_id, at in triggers
        ]

    async def send_triggers(self, framed: Sequence[FramedMessage]) -> list[datetime | BaseException]:
        """Publish triggers framed by ``frame_triggers``, all in one write, with pipelined
        confirms; per trigger, in order, the instant its confirm came back or why it was not
        published (see ``trigger_bodies``)."""
        return await self._send_framed("triggers", framed)

    async def _send_together(
        self, role: str, messages: Sequence[tuple[bytes, str, Mapping[str, Any], str]]
    ) -> list[datetime | BaseException]:
        """Publish signed messages, each ``(body, routing key, headers, message id)``, to
        ``role``'s exchange in one write; per message, the instant its confirm came back or why
        it was not published (see ``trigger_bodies``)."""
        exchange = self._exchanges[role].name
        sent_at = datetime.now(UTC)
        number = self._channel_number()
        framed = [
            frame_message(exchange, body, routing_key, headers, message_id, sent_at, number)
            for body, routing_key, headers, message_id in messages
        ]
        return await self._send_framed(role, framed)

    async def _send_events(self, events: Sequence[_OutgoingEvent]) -> list[datetime | BaseException]:
        """Publish ``events``, those one key signs together as ``event.batch`` messages, in one
        write; per event, the instant its message's confirm came back or why it was not
        published."""
        messages: list[tuple[bytes, str, Mapping[str, Any], str]] = []
        groups = pack(events, _OutgoingEvent.batch_key if self._batch_events else _alone, attrgetter("body"))
        for group in groups:
            if len(group) == 1:
                body, routing_key = group[0].body, group[0].routing_key
            else:
                pool = cast(str, group[0].pool)
                body, routing_key = batch_body(pool, [e.body for e in group]), f"{EVENT_BATCH_TYPE}.{pool}"
            headers = group[0].signer.sign(self.namespace, routing_key, body)
            messages.append((body, routing_key, headers, f"{self._id_prefix}{next(self._ids):x}"))
        results = await self._send_together("events", messages)
        refused = [
            result
            for result, group in zip(results, groups, strict=True)
            if len(group) > 1 and isinstance(result, BaseException) and _access_refused(result)
        ]
        if refused:
            # A broker user with the rights of a worker before event batches: say so once, and
            # send every event alone from now on. What the closed channel refused goes again,
            # alone, once the broker has reopened it (as after a lost connection,
            # ``_until_reconnected``).
            if self._batch_events:
                log.warning(
                    "RabbitMQ refused an event.batch (%s): this process now sends each event alone. "
                    "Give its user the right to publish event.batch.<pool> (cronfleet broker "
                    "permissions --role worker --apply), or set CRONFLEET_EVENT_BATCHES=false",
                    refused[0],
                )
                self._batch_events = False
            for index, result in enumerate(results):
                if isinstance(result, BaseException) and _access_refused(result):
                    again = BrokerUnavailable(f"to be sent again alone: {result}")
                    again.__cause__ = ConnectionError(
                        "the broker closed the channel of a refused event.batch"
                    )
                    results[index] = again
        return [result for result, group in zip(results, groups, strict=True) for _ in group]

    def _channel_number(self) -> int:
        """The number of the channel this publisher writes on now; 0 while it has none."""
        underlay = cast(Any, self.channel)._channel  # aio-pika keeps the open aiormq channel here
        return int(underlay.channel.number) if underlay is not None else 0

    async def _send_framed(
        self, role: str, framed: Sequence[FramedMessage]
    ) -> list[datetime | BaseException]:
        """Publish ``framed`` messages in one write and wait for every confirm; per message, the
        instant its confirm came back or why it was not published."""
        try:
            with link_loss_as_error():
                channel = cast(aiormq.Channel, await self.channel.get_underlay_channel())
                confirmations, tags = await publish_together(channel, framed)
        except CONNECT_ERRORS as exc:
            failed = _not_published(role, "", exc)
            failed.__cause__ = exc
            return [failed] * len(framed)
        confirmed_at = ConfirmInstants(len(confirmations))
        for index, confirmation in enumerate(confirmations):
            confirmation.add_done_callback(partial(confirmed_at.note, index))
        try:
            await confirmed_at.all_done.wait()
        finally:
            forget_message_ids(channel, framed, tags)
        results: list[datetime | BaseException] = []
        for index, confirmation in enumerate(confirmations):
            # aiormq cancels the confirms in flight when it gives up on a dead connection.
            failure = None if confirmation.cancelled() else confirmation.exception()
            if confirmation.cancelled() or isinstance(failure, asyncio.CancelledError):
                failure = ConnectionError("the connection was lost before RabbitMQ answered")
            if failure is None:
                results.append(confirmed_at.at[index])
            else:
                refused = _not_published(role, framed[index].routing_key, failure)
                refused.__cause__ = failure
                results.append(refused)
        return results

    async def retry(
        self, body: bytes, headers: Mapping[str, object], pool: str, attempt: int, delay_step: int
    ) -> None:
        """Publish attempt ``attempt`` of a trigger: its signed ``body`` and signature ``headers``
        as they came, with the attempt number, to the delay queue of ``delay_step`` seconds, which
        hands it back to ``pool`` once that time is over. Raises BrokerUnavailable when the broker
        does not confirm it (no delay queue of that step, for one)."""
        kept = {
            name: amqp_value(headers[name]) for name in (KEY_ID_HEADER, SIGNATURE_HEADER) if name in headers
        }
        kept[ATTEMPT_HEADER] = attempt
        kept[DELAY_HEADER] = str(delay_step)
        if "retry" not in self._exchanges:
            try:
                self._exchanges = {
                    **self._exchanges,
                    "retry": await Topology(self.namespace).find_retry(self.channel),
                }
            except CONNECT_ERRORS as exc:
                raise BrokerUnavailable(broker_refusal("cannot find the retry exchange", exc)) from exc
        await self._publish("retry", body, kept, pool, None)

    async def event(self, event: WireMessage, body: bytes | None = None) -> None:
        """Publish a run event or heartbeat on the events exchange under its topic; returns once
        the broker confirmed it. ``body``: ``event.to_bytes()``, when the caller has it already.
        Events published concurrently (a worker's runs) go out together: those one key signs
        as ``event.batch`` messages (``common.event_batches``), all in one write."""
        body = event.to_bytes() if body is None else body
        routing_key = event_routing_key(event)
        role = signing_role(event)
        job = event.job if isinstance(event, JobHeartbeat) else None
        signer = self._keyring.signer(role, job)
        pool = None
        if isinstance(event, BATCHED_EVENT_TYPES) and (
            self._batch_pools is None or event.pool in self._batch_pools
        ):
            pool = event.pool
        outgoing = _OutgoingEvent(body, routing_key, signer, pool)

        async def once() -> None:
            result = await self._events.submit(outgoing)
            if isinstance(result, BaseException):
                raise result

        # The monitor records an event once, whatever its copies.
        await _until_reconnected(once, f"event {routing_key}")

    async def jobs_changed(self, by: str) -> None:
        """Tell the running schedulers that the jobs changed (``JobsChanged``), signed with a
        trigger key, else an event key. Raises BrokerUnavailable when it cannot be sent (the
        schedulers then see the change at their next poll) and ConfigError without such a key."""
        if "control" not in self._exchanges:
            raise BrokerUnavailable("this publisher did not declare the control exchange")
        message = JobsChanged(by=by, at=datetime.now(UTC))
        body = message.to_bytes()
        try:
            signer = self._keyring.signer(Role.TRIGGER)
        except ConfigError:
            signer = self._keyring.signer(Role.EVENT, who=by)
        headers = signer.sign(self.namespace, JOBS_CHANGED_ROUTING_KEY, body)
        await self._publish("control", body, headers, JOBS_CHANGED_ROUTING_KEY, None)

    async def tell_jobs_changed(self, by: str) -> str | None:
        """``jobs_changed``, never raising: None when the schedulers were told, else why not
        (they then see the change at their next poll, ``CRONFLEET_JOBS_RELOAD_SECONDS``)."""
        try:
            async with asyncio.timeout(5):
                await self.jobs_changed(by)
        except (BrokerUnavailable, ConfigError, TimeoutError) as exc:
            return str(exc) or type(exc).__name__
        return None

    async def dead_letter(self, message: Received, rejected: Rejected, rejected_by: str) -> None:
        """Keep a refused ``message`` on the dead-letter queue, unchanged, with why in its headers.

        The body is kept byte for byte; so are the headers (see ``kept_headers``)."""
        headers = kept_headers(message.headers or {})
        headers[REJECTION_HEADER] = rejected.reason.value
        headers[REJECTION_DETAIL_HEADER] = one_line(rejected.detail)
        headers[REJECTED_BY_HEADER] = rejected_by
        headers[ORIGINAL_ROUTING_KEY_HEADER] = message.routing_key or ""
        headers[ORIGINAL_EXCHANGE_HEADER] = message.exchange or ""
        await self._publish("dead", message.body, headers, "", message.message_id)

    async def _publish(
        self,
        role: str,
        body: bytes,
        headers: Mapping[str, Any],
        routing_key: str,
        message_id: str | None,
    ) -> None:
        exchange = self._exchanges[role]

        async def once() -> None:
            try:
                with link_loss_as_error():
                    await exchange.publish(
                        _message(body, headers, message_id), routing_key=routing_key, mandatory=True
                    )
            except CONNECT_ERRORS as exc:
                raise _not_published(role, routing_key, exc) from exc

        await _until_reconnected(once, f"to {role}/{routing_key or '-'}")


async def _until_reconnected(send: Callable[[], Awaitable[None]], what: str) -> None:
    """``send()``, again each time it fails because the connection was lost (a BrokerUnavailable
    caused by one of CONNECTION_LOST), for up to PUBLISH_RECONNECT_SECONDS; then its error.

    A publish whose connection is lost before its confirm may or may not have been routed: it
    is published again once the connection is back (on another node of a cluster), so that
    nothing the broker may hold (a run.started, say) is left without its sequel. Every consumer
    takes a message twice as once (events by id, triggers by their claim)."""
    give_up = asyncio.get_running_loop().time() + PUBLISH_RECONNECT_SECONDS
    while True:
        try:
            await send()
            return
        except BrokerUnavailable as exc:
            lost = isinstance(exc.__cause__, CONNECTION_LOST)
            if not lost or asyncio.get_running_loop().time() >= give_up:
                raise
            log.debug("publishing %s again once reconnected (%s)", what, exc)
            await asyncio.sleep(0.2)


def _not_published(role: str, routing_key: str, exc: BaseException) -> BrokerUnavailable:
    """Why a message to ``role``'s exchange under ``routing_key`` was not published, in one line:
    refused or unroutable (a delivery error), or the broker is not there."""
    if isinstance(exc, DeliveryError):
        return BrokerUnavailable(
            f"RabbitMQ did not accept the message for {role}/{routing_key or '-'}: {exc}"
        )
    return BrokerUnavailable(f"publishing to RabbitMQ failed: {str(exc) or type(exc).__name__}")
