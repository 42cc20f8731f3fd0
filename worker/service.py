"""The worker process: consumes one pool with prefetch = concurrency and owns every run task."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx

from common.bus import Publisher, connect, consume_forever
from common.clock import utcnow
from common.errors import BrokerUnavailable, ConfigError
from common.messages import WorkerHeartbeat
from common.services import ServiceOptions
from common.settings import Settings
from common.topology import Topology
from worker.actions import executors
from worker.consumer import TriggerHandler

log = logging.getLogger("cronfleet.worker")


async def serve(settings: Settings, options: ServiceOptions) -> None:
    """Run a worker of ``options.pool`` until cancelled; waits out an unreachable broker."""
    if options.concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    keyring = settings.keyring()
    name = options.instance("worker")
    topology = Topology(settings.namespace)
    connection = await connect(settings.amqp_url, name, wait=True)
    try:
        async with httpx.AsyncClient(follow_redirects=False) as client:
            publisher = await Publisher.open(connection, topology, keyring)
            handler = TriggerHandler(publisher, keyring, executors(client), name)
            log.info("worker %s consuming pool %s (concurrency %d)", name, options.pool, options.concurrency)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(_heartbeat_forever(settings, options, publisher, handler, name))
                await consume_forever(
                    connection,
                    lambda channel: topology.declare_pool(channel, options.pool),
                    options.concurrency,
                    lambda message: tasks.create_task(handler.handle(message)),
                    options.ready,
                )
    finally:
        await connection.close()


async def _heartbeat_forever(
    settings: Settings,
    options: ServiceOptions,
    publisher: Publisher,
    handler: TriggerHandler,
    name: str,
) -> None:
    while True:
        beat = WorkerHeartbeat(
            worker=name,
            pool=options.pool,
            at=utcnow(),
            concurrency=options.concurrency,
            running=handler.running,
        )
        with contextlib.suppress(BrokerUnavailable):
            await publisher.event(beat)
        await asyncio.sleep(settings.heartbeat_seconds)
