"""A connection to RabbitMQ that waits out outages, and which errors mean "the broker, or our
channel to it, is not there right now" (an outage to wait out, never a bug)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.exceptions import AMQPConnectionError, AMQPError, ChannelInvalidStateError

from common.cancel import cancelling, stop_if_cancelled
from common.envelope import one_line
from common.errors import BrokerUnavailable
from common.failover import FailoverConnection
from common.redact import redact_url
from common.settings import amqp_urls, split_urls

log = logging.getLogger("cronfleet.bus")

# Everything that means "the broker, or our channel to it, is not there right now".
CONNECT_ERRORS = (
    OSError,
    AMQPError,
    ChannelInvalidStateError,
    asyncio.TimeoutError,
    aio_pika.exceptions.AMQPException,
)


@contextlib.contextmanager
def link_loss_as_error() -> Iterator[None]:
    """Inside it, the ``CancelledError`` that aiormq raises in every call in flight when it gives
    up on a dead connection (no frame for three heartbeat intervals: a host cut off) becomes a
    ``ConnectionError``, one of CONNECT_ERRORS; a cancellation of the task itself stays one.

    Let through, that CancelledError ends the caller's loop as if it were asked to stop, and a
    task group takes no notice: a worker's heartbeats, the monitor's fleet watch, each stopped
    for good while the process went on."""
    try:
        yield
    except asyncio.CancelledError as exc:
        if cancelling():
            raise
        raise ConnectionError("the connection was lost before RabbitMQ answered") from exc


class ConnectionDown(ConnectionError):
    """The connection is closed, or between two reconnects: no channel can be opened on it now.
    One of CONNECT_ERRORS and CONNECTION_LOST: an outage to wait out, never a bug."""


async def open_channel(
    connection: AbstractConnection, *, publisher_confirms: bool = True, on_return_raises: bool = False
) -> AbstractChannel:
    """A new channel of ``connection``. Raises ConnectionDown while the connection is closed or
    reconnecting, where aio-pika and aiormq raise a bare RuntimeError ("Connection was not
    opened", "<Connection ...> closed") that every caller would take for a bug."""
    try:
        return await connection.channel(
            publisher_confirms=publisher_confirms, on_return_raises=on_return_raises
        )
    except RuntimeError as exc:
        raise ConnectionDown(f"the connection to RabbitMQ is not open ({exc})") from exc


# The connection (not the broker's will) failed: the same call may succeed once it is back.
CONNECTION_LOST = (
    OSError,
    AMQPConnectionError,
    ChannelInvalidStateError,
    asyncio.TimeoutError,
)
# How long a publish whose connection was lost waits for it to come back (on this node, or on


def broker_refusal(what: str, exc: BaseException) -> str:
    """One line: ``what``, then what the broker said (``ACCESS_REFUSED - access to exchange
    ...``, ``NOT_FOUND - no queue ...``), with a hint when a name does not exist yet."""
    said = next((arg for arg in getattr(exc, "args", ()) if isinstance(arg, str)), "") or str(exc)
    line = one_line(f"{what}: {said or type(exc).__name__}")
    if "NOT_FOUND" in said:
        line += " (a scheduler or a monitor declares it: start one first)"
    return line


def redact(url: str) -> str:
    """``url`` (one AMQP URL, or several separated by commas) with each password replaced by
    ``***``, safe for logs and error lines."""
    return ",".join(redact_url(one) for one in split_urls(url))


async def connect(url: str, name: str, *, wait: bool) -> FailoverConnection:
    """A robust connection to ``url``, named ``name`` in the broker's connection list.

    ``url`` may name several nodes of a cluster, separated by commas (``common.settings.amqp_urls``):
    each connection attempt, and each reconnection after a loss, goes to the next node of the list
    (``common.failover``). With ``wait``, brokers that do not answer are retried with backoff (and
    logged) until one does; without, it raises BrokerUnavailable once every node has been tried.
    Once connected, losses and recoveries are logged. Raises ConfigError for a malformed ``url``.
    """
    urls = amqp_urls(url)
    delay = 0.5
    attempt = 0
    failures: list[str] = []
    while True:
        stop_if_cancelled()
        connection = FailoverConnection(urls, first=attempt, client_properties={"connection_name": name})
        node = redact(str(connection.upcoming()))
        attempt += 1
        try:
            await connection.connect(timeout=10)
            break
        except CONNECT_ERRORS as exc:
            with contextlib.suppress(*CONNECT_ERRORS):
                await connection.close()
            failures.append(f"{node}: {exc or type(exc).__name__}")
            if attempt % len(urls):
                log.warning("cannot reach RabbitMQ at %s; trying the next node", failures[-1])
                continue
            reason = f"cannot reach RabbitMQ at {'; nor at '.join(failures)}"
            failures.clear()
            if not wait:
                raise BrokerUnavailable(reason) from exc
            log.warning("%s; retrying in %.1fs", reason, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
    connection.close_callbacks.add(_report_loss)
    connection.reconnect_callbacks.add(_report_recovery)
    return connection


def _report_loss(_connection: object, exc: BaseException | None = None) -> None:
    if exc is not None and not isinstance(exc, asyncio.CancelledError):
        log.warning("lost the connection to RabbitMQ (%s); reconnecting", exc)


def _report_recovery(connection: object) -> None:
    log.warning("reconnected to RabbitMQ at %s", connection)
