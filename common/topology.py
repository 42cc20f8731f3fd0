"""Every exchange and queue cronfleet uses, with its arguments: declared here and nowhere else.

All names start with the namespace (``CRONFLEET_NAMESPACE``, default ``cronfleet``), so several
fleets, or several tests, can share one broker without seeing each other's messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue
from aiormq.exceptions import ChannelPreconditionFailed

from common.errors import BrokerUnavailable
from common.messages import (
    EventBatch,
    JobHeartbeat,
    RunFinished,
    RunStarted,
    SchedulerHeartbeat,
    WireMessage,
    WorkerHeartbeat,
)
from common.retries import DELAY_HEADER, DELAY_STEPS

# A message redelivered this many times (its consumers kept dying on it) is poison: the broker
# dead-letters it instead of handing it out forever. Every consumed queue has this limit; the
# consumers themselves dead-letter what they refuse, so only a crash ever reaches it.
DELIVERY_LIMIT = 5


class QueueMismatch(BrokerUnavailable):
    """A queue exists under our name with other arguments (the broker says PRECONDITION_FAILED)."""


@dataclass(frozen=True)
class Topology:
    """Names and declarations of one fleet's exchanges and queues."""

    namespace: str = "cronfleet"

    @property
    def triggers_exchange(self) -> str:
        """Direct exchange: triggers, routed by pool name."""
        return f"{self.namespace}.triggers"

    @property
    def events_exchange(self) -> str:
        """Topic exchange: run events and heartbeats (see ``event_routing_key``)."""
        return f"{self.namespace}.events"

    @property
    def dead_exchange(self) -> str:
        """Fanout exchange behind the dead-letter queue."""
        return f"{self.namespace}.dead"

    @property
    def dead_queue(self) -> str:
        """Where refused and poison messages are kept, with their reason in the headers."""
        return f"{self.namespace}.dead"

    @property
    def retry_exchange(self) -> str:
        """Headers exchange: retries of triggers, routed to a delay queue by their
        ``cronfleet-delay`` header (their routing key stays their pool)."""
        return f"{self.namespace}.retry"

    def delay_queue(self, seconds: int) -> str:
        """The queue where retries wait ``seconds`` (a step of ``common.retries.DELAY_STEPS``)
        before the broker dead-letters them back to the triggers exchange, to their pool."""
        return f"{self.namespace}.retry.{seconds}s"

    @property
    def control_exchange(self) -> str:
        """Fanout exchange: ``jobs.changed``, to every running scheduler."""
        return f"{self.namespace}.control"

    def control_queue(self, instance: str) -> str:
        """A scheduler's own (exclusive) queue of control messages; ``instance`` is random."""
        return f"{self.namespace}.control.{instance}"

    @property
    def monitor_queue(self) -> str:
        """The monitors' shared queue of every event."""
        return f"{self.namespace}.monitor"

    def pool_queue(self, pool: str) -> str:
        """The queue the workers of ``pool`` consume."""
        return f"{self.namespace}.pool.{pool}"

    def _quorum(self, **extra: Any) -> dict[str, Any]:
        return {"x-queue-type": "quorum", "x-dead-letter-exchange": self.dead_exchange, **extra}

    async def declare_exchanges(self, channel: AbstractChannel) -> dict[str, AbstractExchange]:
        """Declare the three exchanges, the dead-letter queue and the monitor's queue; return the
        exchanges by role.

        Every publisher declares both queues, so that no event is ever unroutable: events
        published before any monitor starts wait for it in its queue.
        """
        triggers = await channel.declare_exchange(
            self.triggers_exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        events = await channel.declare_exchange(
            self.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        dead = await channel.declare_exchange(self.dead_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
        dead_queue = await channel.declare_queue(
            self.dead_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead_queue.bind(dead)
        await self._monitor_queue(channel)
        await channel.declare_exchange(self.retry_exchange, aio_pika.ExchangeType.HEADERS, durable=True)
        control = await channel.declare_exchange(
            self.control_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        return {"triggers": triggers, "events": events, "dead": dead, "control": control}

    async def _delay_queues(self, channel: AbstractChannel) -> None:
        """One delay queue per step, bound to the retry exchange. A retry's signed body and
        routing key (its pool) stay as they were: the broker dead-letters it, once its time in
        the queue is over, to the triggers exchange under that same routing key; at least once (a
        quorum queue's ``at-least-once`` dead-lettering, which needs ``reject-publish``).
        Declared with the pools' queues, by what publishes triggers: creating a queue that
        dead-letters to the triggers exchange takes the right to write to it."""
        retry = self.retry_exchange
        for seconds in DELAY_STEPS:
            queue = await _declare_queue(channel, self.delay_queue(seconds), self._delaying(seconds))
            await queue.bind(retry, arguments={"x-match": "all", DELAY_HEADER: str(seconds)})

    def _delaying(self, seconds: int) -> dict[str, Any]:
        """Arguments of a delay queue: nobody consumes it; every message leaves it by expiring."""
        return {
            "x-queue-type": "quorum",
            "x-message-ttl": seconds * 1000,
            "x-dead-letter-exchange": self.triggers_exchange,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    async def find_exchanges(self, channel: AbstractChannel) -> dict[str, AbstractExchange]:
        """The three exchanges by role, declared passively: nothing is created, bound or changed,
        so no ``configure`` right is needed. Raises the broker's NOT_FOUND (closing ``channel``)
        when one does not exist yet: a scheduler or a monitor declares them."""
        return {
            role: await channel.get_exchange(name, ensure=True)
            for role, name in (
                ("triggers", self.triggers_exchange),
                ("events", self.events_exchange),
                ("dead", self.dead_exchange),
            )
        }

    async def find_retry(self, channel: AbstractChannel) -> AbstractExchange:
        """The retry exchange, declared passively (a worker publishes retries to it; a scheduler,
        ``cronfleet trigger`` or a monitor declares it with the rest)."""
        return await channel.get_exchange(self.retry_exchange, ensure=True)

    async def find_pool(self, channel: AbstractChannel, pool: str) -> AbstractQueue:
        """``pool``'s queue, declared passively (what a worker consumes: it needs only ``read``).
        Raises the broker's NOT_FOUND (closing ``channel``) until a scheduler or ``cronfleet
        trigger`` has declared it."""
        return await channel.get_queue(self.pool_queue(pool), ensure=True)

    async def declare_pool(self, channel: AbstractChannel, pool: str) -> AbstractQueue:
        """Declare ``pool``'s quorum queue, bound to the triggers exchange by the pool name (and
        everything else: the shared topology, the retries' delay queues)."""
        await self.declare_exchanges(channel)
        await self._delay_queues(channel)
        queue = await _declare_queue(channel, self.pool_queue(pool), self._consumed())
        await queue.bind(self.triggers_exchange, routing_key=pool)
        return queue

    async def declare_control(self, channel: AbstractChannel, instance: str) -> AbstractQueue:
        """Declare a scheduler's own queue of control messages, bound to the control exchange:
        exclusive to its connection, gone with it."""
        queue = await channel.declare_queue(
            self.control_queue(instance), exclusive=True, auto_delete=True, durable=False
        )
        await queue.bind(self.control_exchange)
        return queue

    async def declare_monitor(self, channel: AbstractChannel) -> AbstractQueue:
        """Declare everything (see ``declare_exchanges``) and return the monitor's queue."""
        await self.declare_exchanges(channel)
        return await self._monitor_queue(channel)

    async def _monitor_queue(self, channel: AbstractChannel) -> AbstractQueue:
        queue = await _declare_queue(channel, self.monitor_queue, self._consumed())
        await queue.bind(self.events_exchange, routing_key="#")
        return queue

    def _consumed(self) -> dict[str, Any]:
        """Arguments of a queue cronfleet consumes: quorum, dead-lettered, delivery-limited."""
        return self._quorum(**{"x-delivery-limit": DELIVERY_LIMIT})

    async def delete(self, channel: AbstractChannel, pools: list[str]) -> None:
        """Remove this namespace's queues and exchanges (for tests and ``cronfleet`` teardown)."""
        delays = [self.delay_queue(seconds) for seconds in DELAY_STEPS]
        for queue in [*(self.pool_queue(p) for p in pools), self.monitor_queue, self.dead_queue, *delays]:
            await channel.queue_delete(queue)
        for exchange in (
            self.triggers_exchange,
            self.events_exchange,
            self.dead_exchange,
            self.retry_exchange,
            self.control_exchange,
        ):
            await channel.exchange_delete(exchange)


async def _declare_queue(channel: AbstractChannel, name: str, arguments: dict[str, Any]) -> AbstractQueue:
    """Declare durable queue ``name``; raises QueueMismatch, in one line, when the broker holds
    one of that name with other arguments (say, a monitor queue of a version before its delivery
    limit)."""
    try:
        return await channel.declare_queue(name, durable=True, arguments=arguments)
    except ChannelPreconditionFailed as exc:
        raise QueueMismatch(
            f"RabbitMQ holds a queue {name!r} declared with other arguments than {arguments} "
            f"(from an older cronfleet?): drain and delete it, then start again "
            f"(docs/operations.md, 'Upgrading'); the broker said: {exc}"
        ) from exc


def event_routing_key(event: WireMessage) -> str:
    """The topic an event is published under: ``<type>.<job or pool or scheduler>`` (a batch of
    events: ``event.batch.<pool>``)."""
    match event:
        case RunStarted() | RunFinished() | JobHeartbeat():
            return f"{event.type}.{event.job}"
        case WorkerHeartbeat():
            return f"{event.type}.{event.pool}"
        case SchedulerHeartbeat():
            return event.type
        case EventBatch():
            return f"{event.type}.{event.pool}"
    raise TypeError(f"{type(event).__name__} is not an event")
