"""Several broker URLs (the nodes of a cluster): a client connects to the first node that answers,
and a lost connection comes back on the next node, with its publisher and its consumer.

The nodes here are TCP proxies in front of the shared broker, so that a test can cut one without
touching the broker; tests/chaos/test_rabbitmq_cluster.py does it with a real three-node cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from urllib.parse import urlsplit

import pytest
from aio_pika.robust_connection import RobustConnection

from common.connection import connect, redact
from common.consuming import Delivery, consume_deliveries
from common.errors import BrokerUnavailable, ConfigError
from common.failover import ROTATES, FailoverConnection
from common.messages import WorkerHeartbeat
from common.publisher import Publisher
from common.settings import Settings, amqp_urls
from common.topology import Topology
from tests.conftest import AMQP_URL, keyring
from tests.fleet import cronfleet, eventually


class Proxy:
    """A TCP proxy to the shared broker that a test can cut, connections and all."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def url(self) -> str:
        parts = urlsplit(AMQP_URL)
        return parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{self.port}").geturl()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        broker = urlsplit(AMQP_URL)
        upstream_reader, upstream_writer = await asyncio.open_connection(
            broker.hostname or "127.0.0.1", broker.port or 5672
        )
        self.writers += [writer, upstream_writer]

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(copy(reader, upstream_writer), copy(upstream_reader, writer))

    async def cut(self) -> None:
        """Stop listening and drop every connection, as a node that goes away."""
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        await self.server.wait_closed()


@pytest.fixture
async def proxies() -> AsyncIterator[list[Proxy]]:
    """Two proxies to the shared broker: two "nodes"."""
    started = [Proxy(), Proxy()]
    for proxy in started:
        await proxy.start()
    yield started
    for proxy in started:
        if proxy.server is not None and proxy.server.is_serving():
            await proxy.cut()


def _dead_url() -> str:
    """A URL where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"amqp://guest:guest@127.0.0.1:{port}/"


def test_urls_split_only_before_another_amqp_url() -> None:
    value = "amqp://u:pa,ss@node1:5672/v, amqps://u:p@node2:5671/v,AMQP://u:p@node3/v"
    assert amqp_urls(value) == [
        "amqp://u:pa,ss@node1:5672/v",
        "amqps://u:p@node2:5671/v",
        "AMQP://u:p@node3/v",
    ]
    assert amqp_urls("amqp://guest:guest@127.0.0.1:5672/") == ["amqp://guest:guest@127.0.0.1:5672/"]
    assert redact(value) == "amqp://u:***@node1:5672/v,amqps://u:***@node2:5671/v,amqp://u:***@node3/v"
    with pytest.raises(ConfigError, match="not an amqp"):
        amqp_urls("amqp://u:p@node1/,")
    with pytest.raises(ValueError, match="not an amqp"):
        Settings(amqp_url="http://node1/")


def test_the_connection_rotation_hook_is_still_there() -> None:
    """FailoverConnection rotates in a private method of aio-pika's RobustConnection."""
    assert ROTATES
    assert "_RobustConnection__connect_transport" in vars(RobustConnection)
    assert "_RobustConnection__connect_transport" in vars(FailoverConnection)


async def test_the_first_node_that_answers_is_taken() -> None:
    connection = await connect(f"{_dead_url()},{AMQP_URL}", "test-failover", wait=False)
    try:
        assert connection.url.port == (urlsplit(AMQP_URL).port or 5672)
    finally:
        await connection.close()


async def test_no_node_answering_is_one_error_naming_each() -> None:
    first, second = _dead_url(), _dead_url()
    with pytest.raises(BrokerUnavailable) as refused:
        await connect(f"{first},{second}", "test-failover", wait=False)
    said = str(refused.value)
    assert urlsplit(first).netloc.split("@")[1] in said and urlsplit(second).netloc.split("@")[1] in said
    assert "guest:guest" not in said


async def test_a_lost_connection_comes_back_on_the_next_node_with_its_publisher_and_consumer(
    settings: Settings, proxies: list[Proxy]
) -> None:
    topology = Topology(settings.namespace)
    connection = await connect(",".join(proxy.url() for proxy in proxies), "test-failover", wait=False)
    consumer: asyncio.Task[None] | None = None
    try:
        assert connection.url.port == proxies[0].port
        publisher = await Publisher.open(connection, topology, keyring())
        received: list[Delivery] = []
        ready = asyncio.Event()
        consumer = asyncio.create_task(
            consume_deliveries(connection, topology.declare_monitor, 10, received.append, ready)
        )
        await asyncio.wait_for(ready.wait(), 20)

        async def beat(worker: str) -> bool:
            try:
                await publisher.event(
                    WorkerHeartbeat(
                        worker=worker, pool="default", at=datetime.now(UTC), concurrency=1, running=0
                    )
                )
            except BrokerUnavailable:
                return False
            return True

        def got(worker: str) -> bool:
            return any(f'"worker":"{worker}"'.encode() in delivery.body for delivery in received)

        assert await beat("before")
        await eventually(lambda: _true(got("before")))
        await proxies[0].cut()
        # The publisher's channel is restored on the other node: a publish succeeds again...
        await eventually(lambda: beat("after"), timeout=30, every=0.5)
        # ...and the consumer consumes again there.
        await eventually(lambda: _true(got("after")), timeout=30)
        assert connection.url.port == proxies[1].port
    finally:
        if consumer is not None:
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
        await connection.close()


async def _true(value: bool) -> bool:
    return value


def test_the_quick_doctor_passes_when_one_node_of_several_answers(settings: Settings) -> None:
    """``cronfleet doctor --quick`` (every container's health check) tries each node in turn."""
    dead = _dead_url()
    result = cronfleet(settings, "doctor", "--quick", CRONFLEET_AMQP_URL=f"{dead},{AMQP_URL}")
    assert result.returncode == 0, result.stdout
    assert f"ok    broker: RabbitMQ at {redact(AMQP_URL)} accepts a connection" in result.stdout
    nobody = cronfleet(settings, "doctor", "--quick", CRONFLEET_AMQP_URL=f"{dead},{_dead_url()}")
    assert nobody.returncode == 1
    assert "FAIL  broker: cannot reach RabbitMQ at " in nobody.stdout and "; nor at " in nobody.stdout
