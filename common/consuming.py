"""Taking a queue's deliveries, and settling them: a consumer that consumes again after the broker
cancels it or the channel is lost, and deliveries acked together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import partial
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from aiormq.abc import DeliveredMessage

from common.cancel import stop_if_cancelled
from common.connection import CONNECT_ERRORS, ConnectionDown, open_channel

log = logging.getLogger("cronfleet.bus")


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
