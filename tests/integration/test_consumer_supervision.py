"""A consumer cancelled by the broker (its queue deleted) is noticed and restarted, not lost.

RobustConnection does not restore a consumer cancelled with basic.cancel (aio-pika #334); the
worker and the monitor supervise their own consumers.
"""

from __future__ import annotations

import asyncio

from aio_pika.abc import AbstractRobustConnection

from common.settings import Settings
from common.store import Store
from common.topology import Topology
from tests.conftest import Start
from tests.fleet import eventually
from tests.integration.helpers import apply_toml, runs_of


async def _consumers(amqp: AbstractRobustConnection, queue_name: str) -> int:
    channel = await amqp.channel()
    try:
        queue = await channel.declare_queue(queue_name, passive=True)
        return queue.declaration_result.consumer_count or 0
    except Exception:  # the queue is not there (yet): no consumer
        return 0
    finally:
        if not channel.is_closed:
            await channel.close()


async def test_deleted_queues_are_declared_and_consumed_again(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection
) -> None:
    """The monitor declares its queue again; a worker, which may not declare (issue 13), keeps
    looking its pool's queue up and consumes it again once a scheduler has declared it."""
    topology = Topology(settings.namespace)
    await fleet("monitor", "worker")
    channel = await amqp.channel()
    await channel.queue_delete(topology.pool_queue("default"))
    await channel.queue_delete(topology.monitor_queue)

    async def consumed(queue_name: str) -> bool:
        return await _consumers(amqp, queue_name) == 1

    await eventually(lambda: consumed(topology.monitor_queue))
    await apply_toml(
        store,
        """
        [jobs.after-cancel]
        schedule = "* * * * * *"
        action = { type = "shell", argv = ["true"] }
        """,
    )
    await fleet("scheduler")  # declares the pool's queue again
    await eventually(lambda: consumed(topology.pool_queue("default")))
    await eventually(lambda: runs_of(store, "after-cancel", status="succeeded"))
    await asyncio.sleep(0)
