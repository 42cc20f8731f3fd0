"""Routing that the broker cannot restrict, refused by the consumers themselves (issue 13).

RabbitMQ cannot limit the routing key of a binding on a direct exchange: a pool's queue bound by
hand under another pool's name receives that pool's triggers, correctly signed and routed. The
worker runs only triggers of the pool it consumes (``wrong_pool``). Likewise the monitor binds
``#``: an event published under another topic than its own is refused (``wrong_routing_key``).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from common.actions import ShellAction
from common.clock import utcnow
from common.envelope import (
    REJECTED_BY_HEADER,
    REJECTION_DETAIL_HEADER,
    REJECTION_HEADER,
)
from common.messages import JobHeartbeat, Trigger
from common.settings import Settings
from common.signing import Role
from common.topology import Topology
from tests.conftest import Start, keyring
from tests.fleet import eventually


async def _dead_letters(amqp: AbstractRobustConnection, settings: Settings, count: int) -> list[Any]:
    channel = await amqp.channel()
    queue = await channel.get_queue(Topology(settings.namespace).dead_queue)
    found: list[AbstractIncomingMessage] = []

    async def enough() -> bool:
        while (message := await queue.get(fail=False)) is not None:
            found.append(message)
        return len(found) >= count

    await eventually(enough)
    return found


async def _publish(
    amqp: AbstractRobustConnection, exchange: str, body: bytes, headers: dict[str, Any], routing_key: str
) -> None:
    channel = await amqp.channel()
    target = await channel.get_exchange(exchange)
    await target.publish(aio_pika.Message(body, headers=headers), routing_key=routing_key)


async def test_a_worker_refuses_a_trigger_of_another_pool_bound_to_its_queue_by_hand(
    settings: Settings, fleet: Start, amqp: AbstractRobustConnection, tmp_path: Path
) -> None:
    await fleet("monitor", "worker")  # pool "default"
    topology = Topology(settings.namespace)
    channel = await amqp.channel()
    queue = await channel.get_queue(topology.pool_queue("default"))
    await queue.bind(topology.triggers_exchange, routing_key="other")  # by hand
    marker = tmp_path / "ran"
    now = utcnow()
    trigger = Trigger(
        id=f"job@{now.isoformat()}",
        job="job",
        pool="other",
        scheduled_at=now,
        published_at=now,
        expires_at=now + timedelta(minutes=5),
        timeout_seconds=10,
        action=ShellAction(argv=["touch", str(marker)]),
    )
    body = trigger.to_bytes()
    headers = keyring().sign(Role.TRIGGER, settings.namespace, "other", body)  # signed for "other"
    await _publish(amqp, topology.triggers_exchange, body, headers, "other")
    (dead,) = await _dead_letters(amqp, settings, 1)
    assert dead.body == body
    assert dead.headers[REJECTION_HEADER] == "wrong_pool"
    assert dead.headers[REJECTION_DETAIL_HEADER] == (
        "a trigger for pool 'other' arrived at a worker of pool 'default'"
    )
    assert str(dead.headers[REJECTED_BY_HEADER]).startswith("worker")
    assert not marker.exists()


async def test_the_monitor_refuses_an_event_under_another_topic_than_its_own(
    settings: Settings, fleet: Start, amqp: AbstractRobustConnection
) -> None:
    await fleet("monitor")
    topology = Topology(settings.namespace)
    beat = JobHeartbeat(id="h1", job="backup", at=utcnow())
    body = beat.to_bytes()
    moved = "job.heartbeat.report"  # signed and published under it: it verifies
    headers = keyring().sign(Role.EVENT, settings.namespace, moved, body)
    await _publish(amqp, topology.events_exchange, body, headers, moved)
    (dead,) = await _dead_letters(amqp, settings, 1)
    assert dead.body == body
    assert dead.headers[REJECTION_HEADER] == "wrong_routing_key"
    assert dead.headers[REJECTION_DETAIL_HEADER] == (
        "a job.heartbeat must be published as 'job.heartbeat.backup', not 'job.heartbeat.report'"
    )
