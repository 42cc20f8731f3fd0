"""A publish in flight when the link to the broker goes dead ends as BrokerUnavailable, and the
next one goes out once the connection is back.

Found by cutting a worker host's link (tests/chaos/test_fleet_across_hosts.py): when aiormq finds
a connection dead (no frame for three heartbeat intervals) it cancels the confirm of every
publish in flight, and the publisher's task, which nobody cancelled, got a ``CancelledError``.
That ended the worker's heartbeat loop as if asked to stop (a task group ignores a child that
ends cancelled): the worker ran jobs again once its link was back, but the monitor never heard
from it again. The link is cut here by a TCP relay in front of the shared broker that stops
relaying, both ways, without closing anything: a cable pulled mid-conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from urllib.parse import urlsplit

import pytest

from common.bus import Publisher, connect
from common.errors import BrokerUnavailable
from common.messages import WorkerHeartbeat
from common.settings import Settings
from common.topology import Topology
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


async def test_a_publish_in_flight_when_the_link_dies_is_broker_unavailable_then_publishing_resumes(
    settings: Settings,
) -> None:
    relay = Relay()
    port = await relay.start()
    target = urlsplit(AMQP_URL)
    # One-second AMQP heartbeats: the client takes the silent connection for dead within ~6 s.
    url = target._replace(netloc=f"{target.username}:{target.password}@127.0.0.1:{port}").geturl()
    connection = await connect(f"{url}?heartbeat=1", "cut-link", wait=False)
    try:
        topology = Topology(settings.namespace)
        await topology.declare_monitor(await connection.channel())  # events are routable
        publisher = await Publisher.open(connection, topology, settings.keyring())
        await publisher.event(_beat())

        relay.cut()
        with pytest.raises(BrokerUnavailable, match="connection was lost"):
            await asyncio.wait_for(publisher.event(_beat()), timeout=60)

        async def published() -> bool:
            try:
                await publisher.event(_beat())
            except BrokerUnavailable:
                return False
            return True

        # The robust connection reconnects through the relay (new connections flow).
        await eventually(published, timeout=60, every=0.5)
    finally:
        await connection.close()
        await relay.close()
