"""common.acks on the real broker: acks written together, a multiple ack only over settled
deliveries, so a delivery still held comes back when its channel goes and the others do not."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection

from common.acks import AckedDelivery, consume_acked
from tests.conftest import AMQP_URL
from tests.fleet import eventually


def count(items: list[AckedDelivery], n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(items) == n

    return check


async def waiting(amqp: AbstractRobustConnection, name: str) -> int:
    channel = await amqp.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count or 0
    finally:
        await channel.close()


async def test_settled_deliveries_are_acked_and_the_one_held_comes_back(
    amqp: AbstractRobustConnection,
) -> None:
    name = f"test-acks-{uuid.uuid4().hex[:8]}"
    publishing = await amqp.channel()
    await publishing.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    for index in range(6):
        await publishing.default_exchange.publish(aio_pika.Message(str(index).encode()), routing_key=name)
    delivered: list[AckedDelivery] = []
    consuming = await aio_pika.connect_robust(AMQP_URL)

    async def declare(channel: AbstractChannel) -> AbstractQueue:
        return await channel.declare_queue(name, passive=True)

    consumer = asyncio.create_task(consume_acked(consuming, declare, 10, delivered.append, asyncio.Event()))
    try:
        await eventually(count(delivered, 6))
        by_body = {delivery.body: delivery for delivery in delivered}
        # Held: b"0" (still running). Acked out of order around it; b"3" requeued by a nack.
        results = await asyncio.gather(
            by_body[b"2"].settle(),
            by_body[b"1"].settle(),
            by_body[b"5"].settle(),
            by_body[b"3"].settle(ack=False, requeue=True),
            by_body[b"4"].settle(),
        )
        assert results == [True] * 5
        # The nacked one comes back (to this consumer); ack it, as a second settle is a no-op.
        await eventually(count(delivered, 7))
        assert delivered[-1].body == b"3"
        assert await delivered[-1].settle() and await by_body[b"2"].settle()
        # A settle the broker refused would close the channel and bring all back again.
        await asyncio.sleep(0.5)
        assert len(delivered) == 7
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await consuming.close()
    # Its channel gone, only the held delivery is back in the queue: nothing acked twice (the
    # broker would have closed the channel), nothing held acked by a multiple ack.
    assert await eventually(lambda: waiting(amqp, name), timeout=10) == 1
    await publishing.queue_delete(name)
    await publishing.close()
