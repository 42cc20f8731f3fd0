"""Talking to RabbitMQ: a connection that waits out outages, and a publisher that signs every
message (with its namespace and routing key, under the key of the role that may send it) and
returns only once the broker has confirmed it."""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import itertools
import logging
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from operator import attrgetter
from typing import Any, Protocol, cast
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aiormq.abc import ChannelFrame, DeliveredMessage
from aiormq.exceptions import (
    AMQPConnectionError,
    AMQPError,
    ChannelAccessRefused,
    ChannelInvalidStateError,
    DeliveryError,
)
from pamqp import encode as pamqp_encode
from pamqp import frame as pamqp_frame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from common.batching import Batcher
from common.cancel import cancelling, stop_if_cancelled
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
from common.failover import FailoverConnection
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
from common.settings import amqp_urls, split_urls
from common.signing import KEY_ID_HEADER, SIGNATURE_HEADER, Key, Keyring, Role
from common.topology import Topology, event_routing_key

log = logging.getLogger("cronfleet.bus")

# Everything that means "the broker, or our channel to it, is not there right now".
CONNECT_ERRORS = (
    OSError,
    AMQPError,
    ChannelInvalidStateError,
    asyncio.TimeoutError,
    aio_pika.exceptions.AMQPException,
)


@contextlib.contextmanager
def link_loss_as_error() -> Iterator[None]:
    """Inside it, the ``CancelledError`` that aiormq raises in every call in flight when it gives
    up on a dead connection (no frame for three heartbeat intervals: a host cut off) becomes a
    ``ConnectionError``, one of CONNECT_ERRORS; a cancellation of the task itself stays one.

    Let through, that CancelledError ends the caller's loop as if it were asked to stop, and a
    task group takes no notice: a worker's heartbeats, the monitor's fleet watch, each stopped
    for good while the process went on."""
    try:
        yield
    except asyncio.CancelledError as exc:
        if cancelling():
            raise
        raise ConnectionError("the connection was lost before RabbitMQ answered") from exc


class ConnectionDown(ConnectionError):
    """The connection is closed, or between two reconnects: no channel can be opened on it now.
    One of CONNECT_ERRORS and CONNECTION_LOST: an outage to wait out, never a bug."""


async def open_channel(
    connection: AbstractConnection, *, publisher_confirms: bool = True, on_return_raises: bool = False
) -> AbstractChannel:
    """A new channel of ``connection``. Raises ConnectionDown while the connection is closed or
    reconnecting, where aio-pika and aiormq raise a bare RuntimeError ("Connection was not
    opened", "<Connection ...> closed") that every caller would take for a bug."""
    try:
        return await connection.channel(
            publisher_confirms=publisher_confirms, on_return_raises=on_return_raises
        )
    except RuntimeError as exc:
        raise ConnectionDown(f"the connection to RabbitMQ is not open ({exc})") from exc


# The connection (not the broker's will) failed: the same call may succeed once it is back.
CONNECTION_LOST = (
    OSError,
    AMQPConnectionError,
    ChannelInvalidStateError,
    asyncio.TimeoutError,
)
# How long a publish whose connection was lost waits for it to come back (on this node, or on
# the next one of a cluster) before raising BrokerUnavailable.
PUBLISH_RECONNECT_SECONDS = 15.0


def broker_refusal(what: str, exc: BaseException) -> str:
    """One line: ``what``, then what the broker said (``ACCESS_REFUSED - access to exchange
    ...``, ``NOT_FOUND - no queue ...``), with a hint when a name does not exist yet."""
    said = next((arg for arg in getattr(exc, "args", ()) if isinstance(arg, str)), "") or str(exc)
    line = one_line(f"{what}: {said or type(exc).__name__}")
    if "NOT_FOUND" in said:
        line += " (a scheduler or a monitor declares it: start one first)"
    return line


def redact(url: str) -> str:
    """``url`` (one AMQP URL, or several separated by commas) with each password replaced by
    ``***``, safe for logs and error lines."""
    return ",".join(_redact_one(one) for one in split_urls(url))


def _redact_one(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}{port}"))


async def connect(url: str, name: str, *, wait: bool) -> FailoverConnection:
    """A robust connection to ``url``, named ``name`` in the broker's connection list.

    ``url`` may name several nodes of a cluster, separated by commas (``common.settings.amqp_urls``):
    each connection attempt, and each reconnection after a loss, goes to the next node of the list
    (``common.failover``). With ``wait``, brokers that do not answer are retried with backoff (and
    logged) until one does; without, it raises BrokerUnavailable once every node has been tried.
    Once connected, losses and recoveries are logged. Raises ConfigError for a malformed ``url``.
    """
    urls = amqp_urls(url)
    delay = 0.5
    attempt = 0
    failures: list[str] = []
    while True:
        stop_if_cancelled()
        connection = FailoverConnection(urls, first=attempt, client_properties={"connection_name": name})
        node = redact(str(connection.upcoming()))
        attempt += 1
        try:
            await connection.connect(timeout=10)
            break
        except CONNECT_ERRORS as exc:
            with contextlib.suppress(*CONNECT_ERRORS):
                await connection.close()
            failures.append(f"{node}: {exc or type(exc).__name__}")
            if attempt % len(urls):
                log.warning("cannot reach RabbitMQ at %s; trying the next node", failures[-1])
                continue
            reason = f"cannot reach RabbitMQ at {'; nor at '.join(failures)}"
            failures.clear()
            if not wait:
                raise BrokerUnavailable(reason) from exc
            log.warning("%s; retrying in %.1fs", reason, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
    connection.close_callbacks.add(_report_loss)
    connection.reconnect_callbacks.add(_report_recovery)
    return connection


def _report_loss(_connection: object, exc: BaseException | None = None) -> None:
    if exc is not None and not isinstance(exc, asyncio.CancelledError):
        log.warning("lost the connection to RabbitMQ (%s); reconnecting", exc)


def _report_recovery(connection: object) -> None:
    log.warning("reconnected to RabbitMQ at %s", connection)


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
        (``_publish_together``), not one system call and one task per message."""
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
            _framed(
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
            _framed(exchange, body, routing_key, headers, message_id, sent_at, number)
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
                confirmations, tags = await _publish_together(channel, framed)
        except CONNECT_ERRORS as exc:
            failed = _not_published(role, "", exc)
            failed.__cause__ = exc
            return [failed] * len(framed)
        confirmed_at = _ConfirmInstants(len(confirmations))
        for index, confirmation in enumerate(confirmations):
            confirmation.add_done_callback(partial(confirmed_at.note, index))
        try:
            await confirmed_at.all_done.wait()
        finally:
            _forget_message_ids(channel, framed, tags)
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


# Confirms that arrive within this long of one another (the callbacks of one broker ack that
# confirms many messages) share one instant.
_SAME_CONFIRM = timedelta(microseconds=200)


class _ConfirmInstants:
    """When each of ``count`` messages of a batch was confirmed (or failed), by its index;
    ``all_done`` is set once every one has."""

    def __init__(self, count: int) -> None:
        self.at: dict[int, datetime] = {}
        self.all_done = asyncio.Event()
        self._left = count
        self._last: datetime | None = None
        if not count:
            self.all_done.set()

    def note(self, index: int, _future: asyncio.Future[Any]) -> None:
        now = datetime.now(UTC)
        if self._last is None or now - self._last > _SAME_CONFIRM:
            self._last = now
        self.at[index] = self._last
        self._left -= 1
        if not self._left:
            self.all_done.set()


@dataclass(frozen=True, slots=True)
class FramedMessage:
    """A signed message marshalled into its AMQP frames for one channel (``payload``): sending it
    is one write. ``channel_number`` 0 means it is not framed for any channel yet."""

    exchange: str
    routing_key: str
    body: bytes
    properties: Basic.Properties
    channel_number: int
    payload: bytes

    def for_channel(self, number: int) -> bytes:
        """This message's frames on channel ``number``: as framed when it is the same channel,
        framed anew otherwise (the channel was replaced after a reconnect)."""
        if number == self.channel_number:
            return self.payload
        return _marshal(self.exchange, self.routing_key, self.body, self.properties, number)


def _framed(
    exchange: str,
    body: bytes,
    routing_key: str,
    headers: Mapping[str, Any],
    message_id: str,
    sent_at: datetime,
    channel_number: int,
) -> FramedMessage:
    """A persistent JSON message with ``headers``, marshalled for ``channel_number`` (unless 0)."""
    properties = Basic.Properties(
        headers=dict(headers),
        content_type="application/json",
        delivery_mode=2,
        message_id=message_id,
        timestamp=sent_at,
    )
    payload = _marshal(exchange, routing_key, body, properties, channel_number) if channel_number else b""
    return FramedMessage(exchange, routing_key, body, properties, channel_number, payload)


def _marshal(
    exchange: str, routing_key: str, body: bytes, properties: Basic.Properties, number: int
) -> bytes:
    """The frames of one mandatory publish on channel ``number``: method, header, and body
    frames small enough for any frame size a broker may negotiate."""
    frames: list[Any] = [
        Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True),
        ContentHeader(properties=properties, body_size=len(body)),
    ]
    frames.extend(ContentBody(body[i : i + _BODY_FRAME]) for i in range(0, len(body), _BODY_FRAME))
    return b"".join(pamqp_frame.marshal(frame, number) for frame in frames)


# Body frames of at most this size: under the smallest frame_max a broker may negotiate (4 KiB
# is AMQP's minimum) less the frame's 8 bytes of overhead.
_BODY_FRAME = 4096 - 8


async def _publish_together(
    channel: aiormq.Channel, messages: Sequence[FramedMessage]
) -> tuple[list[asyncio.Future[Any]], list[int]]:
    """Publish ``messages``, each mandatory, on a confirming ``channel``, all their frames in
    one write; returns each one's confirmation future (an unroutable message's fails with a
    delivery error) and delivery tag, in order. The caller forgets their message ids once they
    are settled (``_forget_message_ids``).

    This is aiormq's own ``basic_publish`` (7.x) for many messages at once: under the channel's
    lock, each takes the next delivery tag, its confirmation is registered under that tag and
    its message id (so that a returned message fails it), and the frames are queued for the
    connection's writer as one payload. Every message needs a message id."""
    if channel.is_closed:
        raise ChannelInvalidStateError(f"{channel!r} closed")
    async with channel.lock:
        payloads: list[bytes] = []
        confirmations: list[asyncio.Future[Any]] = []
        tags: list[int] = []
        number = channel.number
        for message in messages:
            channel.delivery_tag += 1
            tag = channel.delivery_tag
            confirmation = channel.create_future()
            channel.confirmations[tag] = confirmation
            channel.message_id_delivery_tag[cast(str, message.properties.message_id)] = tag
            payloads.append(message.for_channel(number))
            confirmations.append(confirmation)
            tags.append(tag)
        await channel.write_queue.put(ChannelFrame(payload=b"".join(payloads), should_close=False))
    return confirmations, tags


def _forget_message_ids(
    channel: aiormq.Channel, messages: Sequence[FramedMessage], tags: Sequence[int]
) -> None:
    """Drop the message-id entries ``_publish_together`` made (a later publish may own one)."""
    known = channel.message_id_delivery_tag
    for message, tag in zip(messages, tags, strict=True):
        message_id = cast(str, message.properties.message_id)
        if known.get(message_id) == tag:
            del known[message_id]


def _not_published(role: str, routing_key: str, exc: BaseException) -> BrokerUnavailable:
    """Why a message to ``role``'s exchange under ``routing_key`` was not published, in one line:
    refused or unroutable (a delivery error), or the broker is not there."""
    if isinstance(exc, DeliveryError):
        return BrokerUnavailable(
            f"RabbitMQ did not accept the message for {role}/{routing_key or '-'}: {exc}"
        )
    return BrokerUnavailable(f"publishing to RabbitMQ failed: {str(exc) or type(exc).__name__}")


_INT64 = range(-(2**63), 2**63)
# Headers travel in one frame (RabbitMQ's frame_max is 128 KiB): a refused message whose headers
# leave no room for the reason would make the broker close the whole connection.
MAX_KEPT_HEADER_BYTES = 64 * 1024


def kept_headers(headers: Mapping[str, object]) -> dict[str, Any]:
    """The headers of a refused message, as its dead letter carries them.

    All of them, as AMQP can write them again (``amqp_value``); if together they are over
    ``MAX_KEPT_HEADER_BYTES`` (or cannot be written), only the two signature headers, and only
    if they are short strings.
    """
    kept = {str(name): amqp_value(value) for name, value in headers.items()}
    try:
        size = len(pamqp_encode.field_table(kept))
    except (TypeError, ValueError, OverflowError):
        size = MAX_KEPT_HEADER_BYTES + 1
    if size <= MAX_KEPT_HEADER_BYTES:
        return kept
    return {
        name: value
        for name, value in kept.items()
        if name in (KEY_ID_HEADER, SIGNATURE_HEADER) and isinstance(value, str) and len(value) <= 256
    }


def amqp_value(value: object) -> Any:
    """``value`` (a decoded header) as something the AMQP encoder can write again.

    The decoder hands back what the encoder refuses: ``bytes`` for a string that was not UTF-8.
    Those become byte arrays (the same bytes); anything else it cannot write becomes its text.
    """
    match value:
        case bool() | str() | float() | decimal.Decimal() | datetime() | bytearray() | None:
            return value
        case int():
            return value if value in _INT64 else str(value)
        case bytes():
            return bytearray(value)
        case dict():
            return {str(name): amqp_value(item) for name, item in value.items()}
        case list() | tuple():
            return [amqp_value(item) for item in value]
    return repr(value)


async def settle(message: AbstractIncomingMessage, *, ack: bool = True, requeue: bool = False) -> bool:
    """Ack ``message`` (or, with ``ack=False``, nack it, requeued or dead-lettered).

    Returns False when the channel that delivered it is gone: the broker then requeues the
    message by itself, so there is nothing more to do than to say so.
    """
    try:
        if ack:
            await message.ack()
        else:
            await message.nack(requeue=requeue)
    except CONNECT_ERRORS as exc:
        log.warning(
            "could not settle delivery %s (%s); the broker will redeliver it", message.message_id, exc
        )
        return False
    return True


async def consume_forever(
    connection: AbstractRobustConnection,
    declare: Callable[[AbstractChannel], Awaitable[AbstractQueue]],
    prefetch: int,
    on_message: Callable[[AbstractIncomingMessage], object],
    ready: asyncio.Event,
) -> None:
    """Hand every delivery of the queue that ``declare`` returns to ``on_message``, forever.

    aio-pika 10 restores a consumer the broker cancelled (the queue was deleted, a quorum leader
    moved) and one lost with its connection; this loop is the backstop for when it does not:
    if the delivery iterator ends or the channel fails, the queue is declared again on a new
    channel and consumed again. ``ready`` is set once consuming.
    """
    while True:
        # Closing the delivery iterator or the channel can swallow a cancellation (aio-pika):
        # without this a cancelled consumer would take it for the broker's and consume again.
        stop_if_cancelled()
        channel: AbstractChannel | None = None
        try:
            channel = await open_channel(connection)
            await channel.set_qos(prefetch_count=prefetch)
            queue = await declare(channel)
            async with queue.iterator() as deliveries:
                ready.set()
                async for message in deliveries:
                    on_message(message)
            log.warning("the consumer of %s was cancelled by the broker; consuming again", queue.name)
        except CONNECT_ERRORS as exc:
            log.warning("consuming stopped (%s); starting again", exc or type(exc).__name__)
            await asyncio.sleep(1.0)
        finally:
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(*CONNECT_ERRORS):
                    await channel.close()


class Delivery:
    """One message the broker delivered, as ``consume_deliveries`` hands it over: its body,
    headers and routing key, without aio-pika's per-message wrapper (which costs more than
    verifying and recording an event). Settle a batch of them with ``ack_deliveries``; a single
    one with ``settle_alone``."""

    __slots__ = ("raw", "settled")

    def __init__(self, raw: DeliveredMessage) -> None:
        self.raw = raw
        # Whether it was acked or nacked: AMQP closes a channel that settles a tag twice.
        self.settled = False

    @property
    def body(self) -> bytes:
        return self.raw.body

    @property
    def headers(self) -> Mapping[str, Any]:
        return self.raw.header.properties.headers or {}

    @property
    def routing_key(self) -> str:
        return self.raw.routing_key or ""

    @property
    def message_id(self) -> str | None:
        return self.raw.header.properties.message_id

    @property
    def tag(self) -> int:
        return self.raw.delivery_tag or 0

    @property
    def redelivered(self) -> bool:
        return bool(self.raw.redelivered)

    @property
    def exchange(self) -> str:
        return self.raw.exchange or ""

    def incoming(self) -> AbstractIncomingMessage:
        """The same delivery as aio-pika's message (to dead-letter a copy of it)."""
        return aio_pika.IncomingMessage(self.raw, no_ack=False)

    async def settle_alone(self, *, ack: bool = True, requeue: bool = False) -> bool:
        """``settle`` this delivery by itself (see ``settle``), once."""
        self.settled = True
        return await settle(self.incoming(), ack=ack, requeue=requeue)


async def ack_deliveries(deliveries: Iterable[Delivery], *, requeue_instead: bool = False) -> None:
    """Ack every delivery of ``deliveries`` not yet settled, with one ``multiple`` ack per channel
    at the highest such delivery tag (or, with ``requeue_instead``, nack them back to the queue).

    A multiple ack settles *every* unsettled delivery of the channel up to that tag: call it only
    when no delivery of the channel older than these is still unsettled elsewhere (a consumer that
    settles its batches in the order they were delivered). A channel that is gone needs nothing:
    the broker requeues what it had delivered on it."""
    highest: dict[int, tuple[Any, int]] = {}
    for delivery in deliveries:
        if delivery.settled:
            continue
        delivery.settled = True
        channel = delivery.raw.channel
        known = highest.get(id(channel))
        if known is None or delivery.tag > known[1]:
            highest[id(channel)] = (channel, delivery.tag)
    for channel, tag in highest.values():
        try:
            if requeue_instead:
                await channel.basic_nack(tag, multiple=True, requeue=True)
            else:
                await channel.basic_ack(tag, multiple=True)
        except CONNECT_ERRORS as exc:
            log.warning("could not settle deliveries up to %d (%s); the broker will redeliver them", tag, exc)


# How long a stopping consumer waits for the broker to confirm it no longer delivers.
STOP_CONSUMING_SECONDS = 5.0


async def _stop_consuming(
    channel: aiormq.abc.AbstractChannel, consumer_tag: str | None, on_stop: Callable[[], Awaitable[None]]
) -> None:
    """Cancel the consumer ``consumer_tag`` of ``channel`` (no delivery comes after), then await
    ``on_stop()`` with the channel still open."""
    if consumer_tag is not None:
        # Bounded: on a link that died silently, the drain must not wait for AMQP's heartbeat.
        with contextlib.suppress(*CONNECT_ERRORS):
            await channel.basic_cancel(consumer_tag, timeout=STOP_CONSUMING_SECONDS)
    await on_stop()


def _end(ended: asyncio.Future[None], _frame: object) -> None:
    if not ended.done():
        ended.set_result(None)


async def consume_deliveries(
    connection: AbstractRobustConnection,
    declare: Callable[[AbstractChannel], Awaitable[AbstractQueue]],
    prefetch: int,
    on_delivery: Callable[[Delivery], object],
    ready: asyncio.Event,
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Hand every delivery of the queue that ``declare`` returns to ``on_delivery`` as a
    ``Delivery``, in the order delivered, forever; ``ready`` is set once consuming.

    The consumer sits on the channel under aio-pika's, so nothing restores it by itself: when the
    broker cancels it (the queue was deleted, a quorum leader moved) or the channel or connection
    is lost, the queue is declared again on a new channel and consumed again.

    Cancelled, it stops consuming, then awaits ``on_stop()`` (when given) before it closes the
    channel: the deliveries still being worked on are settled on the channel they came on, which
    closed first would take them back (and the broker closes the whole connection on a frame for
    a channel it closed)."""
    while True:
        stop_if_cancelled()
        channel: AbstractChannel | None = None
        try:
            # After a loss, the robust connection reconnects by itself: wait for it.
            await connection.ready()
            try:
                channel = await open_channel(connection)
            except ConnectionDown:
                # The loss is known to aiormq before the robust connection starts reconnecting.
                log.debug("the connection is closed; consuming again once it is back")
                await asyncio.sleep(1.0)
                continue
            await channel.set_qos(prefetch_count=prefetch)
            queue = await declare(channel)
            raw = await channel.get_underlay_channel()
            ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            async def deliver(message: DeliveredMessage) -> None:
                on_delivery(Delivery(message))

            raw.on_consumer_cancel_callbacks.add(partial(_end, ended))
            consuming = await raw.basic_consume(queue.name, deliver)
            ready.set()
            try:
                await asyncio.wait({ended, raw.closing}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                if on_stop is not None and not raw.is_closed:
                    await _stop_consuming(raw, consuming.consumer_tag, on_stop)
                raise
            if ended.done():
                log.warning("the consumer of %s was cancelled by the broker; consuming again", queue.name)
            else:
                log.warning("the channel consuming %s closed; consuming again", queue.name)
                await asyncio.sleep(1.0)
        except CONNECT_ERRORS as exc:
            log.warning("consuming stopped (%s); starting again", exc or type(exc).__name__)
            await asyncio.sleep(1.0)
        finally:
            if channel is not None and not channel.is_closed:
                with contextlib.suppress(*CONNECT_ERRORS):
                    await channel.close()
