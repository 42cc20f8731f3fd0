"""While the store is down the monitor holds what it received: nothing acked, nothing lost."""

from __future__ import annotations

import asyncio

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from sqlalchemy.ext.asyncio import create_async_engine

from common.bus import Delivery, Publisher
from common.clock import utcnow
from common.messages import HeartbeatKind, JobHeartbeat
from common.settings import Settings
from common.signing import Role
from common.store import Store
from common.topology import Topology, event_routing_key
from monitor.service import EventRecorder
from tests.fleet import eventually
from tests.integration.helpers import runs_of


async def test_events_are_held_while_the_store_is_down_and_recorded_when_it_is_back(
    settings: Settings, store: Store, amqp: AbstractRobustConnection
) -> None:
    keyring = settings.keyring()
    channel = await amqp.channel()
    topology = Topology(settings.namespace)
    events = (await topology.declare_exchanges(channel))["events"]
    queue = await channel.declare_queue(exclusive=True)
    beat = JobHeartbeat(id="held-1", job="held", kind=HeartbeatKind.SUCCESS, at=utcnow())
    body = beat.to_bytes()
    # Under its own topic: the monitor refuses an event under another one (wrong_routing_key).
    routing_key = event_routing_key(beat)
    await queue.bind(events, routing_key)
    headers = keyring.sign(Role.PING, settings.namespace, routing_key, body, job=beat.job)
    await events.publish(aio_pika.Message(body, headers=headers), routing_key)
    raw = await channel.get_underlay_channel()

    async def get() -> Delivery | None:
        delivered = await raw.basic_get(queue.name, no_ack=False)
        return Delivery(delivered) if delivered.delivery_tag is not None else None

    message = await eventually(get)

    publisher = await Publisher.open(amqp, Topology(settings.namespace), keyring)
    unreachable = Store(create_async_engine("postgresql+asyncpg://cronfleet@127.0.0.1:1/none"))
    recorder = EventRecorder(unreachable, publisher, keyring, "monitor-test")
    writing = asyncio.create_task(recorder.write_batch([message]))
    try:
        await asyncio.sleep(1.5)  # several retries against the dead store
        assert not writing.done(), "the batch was given up while the store was down"
        assert await runs_of(store, "held") == []

        recorder.store = store  # the store is back
        await asyncio.wait_for(writing, timeout=20)
    finally:
        writing.cancel()
        await unreachable.close()

    runs = await runs_of(store, "held")
    assert [r.status for r in runs] == ["succeeded"]
    await channel.close()  # an unacked delivery would go back to the queue now
    check = await amqp.channel()
    left = await check.declare_queue(queue.name, passive=True)
    assert left.declaration_result.message_count == 0, "the event was recorded but never acked"
