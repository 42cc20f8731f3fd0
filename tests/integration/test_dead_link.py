"""Calls in flight when the link to the broker goes dead end as a broker outage, never as a
cancellation of the task that made them, and the next calls succeed once the connection is back.

Found by cutting hosts' links (tests/chaos/test_fleet_across_hosts.py): when aiormq finds a
connection dead (no frame for three heartbeat intervals) it cancels every call in flight, and
the task that made it, which nobody cancelled, got a ``CancelledError``. That ended loops as if
they were asked to stop (a task group ignores a child that ends cancelled): a worker whose host
was cut off ran jobs again once its link was back, but its heartbeats had stopped for good; a
monitor cut off while it waited for its queue to drain never started its deadline timers nor
its fleet watch. The link is cut here by a TCP relay in front of the shared broker that stops
relaying, both ways, without closing anything: a cable pulled mid-conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import pytest
from aio_pika.abc import AbstractRobustConnection

from common.connection import ConnectionDown, connect, open_channel
from common.errors import BrokerUnavailable
from common.messages import WorkerHeartbeat
from common.publisher import Publisher
from common.settings import Settings
from common.store import Store
from common.topology import Topology
from monitor.fleet_watch import FleetWatch, fleet_policy
from monitor.service import EventRecorder, wait_until_drained
from tests.conftest import AMQP_URL
from tests.fleet import eventually


class Relay:
    """A TCP relay to the broker; ``cut`` stops relaying on every connection open now (forever,
    both ways, nothing closed), while connections made later are relayed."""

    def __init__(self) -> None:
        target = urlsplit(AMQP_URL)
        self.target = (target.hostname or "127.0.0.1", target.port or 5672)
        self._flowing: list[asyncio.Event] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen on a free local port; returns it."""
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def cut(self) -> None:
        for flowing in self._flowing:
            flowing.clear()

    def unplug(self) -> None:
        """``cut``, and refuse every new connection: the client cannot reconnect."""
        self.cut()
        if self.server is not None:
            self.server.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in self._tasks:
            task.cancel()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        broker_reader, broker_writer = await asyncio.open_connection(*self.target)
        self._writers += [client_writer, broker_writer]
        flowing = asyncio.Event()
        flowing.set()
        self._flowing.append(flowing)
        for reader, writer in ((client_reader, broker_writer), (broker_reader, client_writer)):
            task = asyncio.create_task(self._pump(reader, writer, flowing))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pump(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                await flowing.wait()
                writer.write(data)
                await writer.drain()


def _beat() -> WorkerHeartbeat:
    return WorkerHeartbeat(worker="w@cut", pool="default", at=datetime.now(UTC), concurrency=1, running=0)


@dataclass
class Link:
    """A connection to the shared broker through a relay that the test may cut."""

    relay: Relay
    connection: AbstractRobustConnection
    topology: Topology
    publisher: Publisher


@pytest.fixture
async def link(settings: Settings) -> AsyncIterator[Link]:
    """A robust connection through a ``Relay``, with one-second AMQP heartbeats (the client takes
    a silent connection for dead within about 6 s), the fleet's queues declared and a publisher."""
    relay = Relay()
    port = await relay.start()
    target = urlsplit(AMQP_URL)
    url = target._replace(netloc=f"{target.username}:{target.password}@127.0.0.1:{port}").geturl()
    connection = await connect(f"{url}?heartbeat=1", "cut-link", wait=False)
    try:
        topology = Topology(settings.namespace)
        await topology.declare_monitor(await connection.channel())  # events are routable
        publisher = await Publisher.open(connection, topology, settings.keyring())
        yield Link(relay, connection, topology, publisher)
    finally:
        await connection.close()
        await relay.close()


async def _published(publisher: Publisher) -> bool:
    try:
        await publisher.event(_beat())
    except BrokerUnavailable:
        return False
    return True


async def test_a_publish_in_flight_when_the_link_dies_is_sent_again_once_the_connection_is_back(
    link: Link,
) -> None:
    await link.publisher.event(_beat())
    link.relay.cut()
    # The client gives up on the silent connection (which cancels the confirm in flight): that
    # is a lost connection, not a stop, and the event goes again once the robust connection is
    # back through the relay (new connections flow), within PUBLISH_RECONNECT_SECONDS.
    await asyncio.wait_for(link.publisher.event(_beat()), timeout=60)
    await eventually(lambda: _published(link.publisher), timeout=60, every=0.5)


async def test_a_monitor_waiting_for_its_queue_to_drain_outlives_a_dead_link(
    link: Link, store: Store, settings: Settings
) -> None:
    recorder = EventRecorder(store, link.publisher, settings.keyring(), "monitor@cut")
    link.relay.cut()
    # Its look at the queue is in flight when the client gives up on the connection; it looks
    # again once reconnected, and returns (the queue is empty): the timers would start.
    await asyncio.wait_for(wait_until_drained(link.connection, link.topology, recorder), timeout=60)


async def test_a_look_at_the_fleet_in_flight_when_the_link_dies_ends_as_broker_unseen(
    link: Link, store: Store, settings: Settings
) -> None:
    watch = FleetWatch(store, link.connection, link.topology, fleet_policy(settings), interval=1.0)
    await watch.look(datetime.now(UTC))
    link.relay.cut()
    # The broker is unseen at this look (no heartbeat is judged); the watch goes on.
    await asyncio.wait_for(watch.look(datetime.now(UTC)), timeout=60)


async def test_a_look_at_the_fleet_while_the_connection_is_down_ends_as_broker_unseen(
    link: Link, store: Store, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # Between two reconnects aio-pika refuses a channel with a bare RuntimeError ("Connection
    # was not opened"): the monitor logged it as an unexpected error, traceback and all, every
    # second until its link came back (seen in tests/chaos/test_fleet_across_hosts.py).
    watch = FleetWatch(store, link.connection, link.topology, fleet_policy(settings), interval=1.0)
    link.relay.unplug()

    async def down() -> bool:
        return link.connection.transport is None

    await eventually(down, timeout=60, every=0.2)
    with caplog.at_level(logging.WARNING, logger="cronfleet.monitor"):
        await asyncio.wait_for(watch.look(datetime.now(UTC)), timeout=60)
    assert "cannot look at the fleet's queues" in caplog.text
    with pytest.raises(ConnectionDown):
        await open_channel(link.connection)
