"""Triggers published in one write (``Publisher.trigger_bodies``, the scheduler's burst path):
each is signed and confirmed on its own, an unroutable one fails alone, and the channel goes on."""

from __future__ import annotations

from datetime import datetime, timedelta

from aio_pika.abc import AbstractRobustConnection

from common.actions import ShellAction
from common.bus import Publisher
from common.clock import utcnow
from common.envelope import Accepted, open_envelope
from common.errors import BrokerUnavailable
from common.jobs import JobSpec
from common.messages import TRIGGER_ADAPTER
from common.settings import Settings
from common.topology import Topology


async def test_each_trigger_of_a_batch_is_signed_confirmed_and_refused_on_its_own(
    settings: Settings, amqp: AbstractRobustConnection
) -> None:
    topology = Topology(settings.namespace)
    keyring = settings.keyring()
    publisher = await Publisher.open(amqp, topology, keyring)
    await topology.declare_pool(publisher.channel, "default")
    now = utcnow()
    spec = JobSpec(name="batch", schedule="* * * * * *", action=ShellAction(argv=["true"]))
    triggers = [spec.trigger_at(now + timedelta(seconds=i), now) for i in range(5)]
    batch = [(t.to_bytes(), "default", t.id) for t in triggers]
    # The fourth goes to a pool nobody declared: unroutable, so the broker returns it.
    batch[3] = (batch[3][0], "nowhere", batch[3][2])

    results = await publisher.trigger_bodies(batch)

    assert [isinstance(r, datetime) for r in results] == [True, True, True, False, True]
    assert isinstance(results[3], BrokerUnavailable) and "did not accept" in str(results[3])
    # The channel is still good for the next batch.
    again = await publisher.trigger_bodies([batch[0]])
    assert isinstance(again[0], datetime)

    channel = await amqp.channel()
    queue = await channel.declare_queue(topology.pool_queue("default"), passive=True)
    seen = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        opened = open_envelope(
            message.body,
            message.headers,
            keyring,
            TRIGGER_ADAPTER,
            utcnow(),
            namespace=settings.namespace,
            routing_key=message.routing_key or "",
            consumed_pool="default",
        )
        assert isinstance(opened, Accepted), opened
        assert message.message_id == opened.message.id
        seen.append(opened.message.id)
    assert seen == [triggers[i].id for i in (0, 1, 2, 4, 0)]
    await channel.close()
