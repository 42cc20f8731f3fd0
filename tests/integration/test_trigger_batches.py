"""Triggers published in one write (``Publisher.trigger_bodies``, the scheduler's burst path):
each is signed and confirmed on its own, an unroutable one fails alone, and the channel goes on."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from common.actions import ShellAction
from common.clock import utcnow
from common.envelope import Accepted, open_envelope
from common.errors import BrokerUnavailable
from common.jobs import JobSpec
from common.messages import TRIGGER_ADAPTER
from common.publisher import Publisher
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

    seen = await _received(settings, amqp)
    assert [message.message_id for message in seen] == [triggers[i].id for i in (0, 1, 2, 4, 0)]


async def test_triggers_framed_ahead_go_out_as_framed_or_framed_again_for_a_new_channel(
    settings: Settings, amqp: AbstractRobustConnection
) -> None:
    # The scheduler frames each fire while it prepares it (``frame_triggers``) and only writes it
    # at its instant. Framed for a channel since replaced (a reconnect), it must be framed again:
    # the stale payload here is garbage that would make the broker close the connection.
    topology = Topology(settings.namespace)
    keyring = settings.keyring()
    publisher = await Publisher.open(amqp, topology, keyring)
    await topology.declare_pool(publisher.channel, "default")
    now = utcnow()
    spec = JobSpec(
        name="framed",
        schedule="* * * * * *",
        action=ShellAction(argv=["echo", "x" * 9000]),  # a body over two 4 KiB body frames
    )
    triggers = [spec.trigger_at(now + timedelta(seconds=i), now) for i in range(3)]
    framed = publisher.frame_triggers([(t.to_bytes(), "default", t.id, now) for t in triggers])
    assert all(message.payload for message in framed)
    framed[1] = replace(framed[1], channel_number=framed[1].channel_number + 1, payload=b"\x00garbage")

    results = await publisher.send_triggers(framed)

    assert all(isinstance(r, datetime) for r in results), results
    assert [message.body for message in await _received(settings, amqp)] == [t.to_bytes() for t in triggers]


async def _received(settings: Settings, amqp: AbstractRobustConnection) -> list[AbstractIncomingMessage]:
    """Every trigger waiting in the ``default`` pool, in order; each must verify as sent (its
    signature, namespace and pool) and carry its trigger id as its message id."""
    channel = await amqp.channel()
    queue = await channel.declare_queue(Topology(settings.namespace).pool_queue("default"), passive=True)
    seen = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        opened = open_envelope(
            message.body,
            message.headers,
            settings.keyring(),
            TRIGGER_ADAPTER,
            utcnow(),
            namespace=settings.namespace,
            routing_key=message.routing_key or "",
            consumed_pool="default",
        )
        assert isinstance(opened, Accepted), opened
        assert message.message_id == opened.message.id
        seen.append(message)
    await channel.close()
    return seen
