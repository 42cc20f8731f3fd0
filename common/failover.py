"""A robust connection to a RabbitMQ cluster: every (re)connection attempt goes to the next node
of a list, so that a client whose node is gone comes back on another one.

aio-pika's ``connect_robust`` takes one URL and retries only it (mosquito/aio-pika #141; the
round-robin class proposed in #680 was not merged). This is aio-pika's own RobustConnection with
one change: the URL it connects to rotates. Channels, exchanges and queues declared on it, and
consumers, are restored on the new node by aio-pika as after any reconnection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aio_pika.connection import make_url
from aio_pika.robust_connection import RobustConnection
from pamqp.common import FieldTable
from yarl import URL

from common.errors import ConfigError

# The method of aio-pika's RobustConnection that runs each connection attempt (aio-pika 10; its
# name is private, so a test pins it: tests/integration/test_failover.py). Without it one URL
# still works; several are refused rather than silently never rotated.
_ATTEMPT = "_RobustConnection__connect_transport"
ROTATES = hasattr(RobustConnection, _ATTEMPT)


class FailoverConnection(RobustConnection):
    """A RobustConnection over several broker URLs (the nodes of one cluster): attempt ``n`` goes
    to ``urls[(first + n) % len(urls)]``, the first one included, and so does every reconnection.

    The options in the first URL's query string (``heartbeat``, TLS files, ...) are aio-pika's
    for every node; aiormq reads each URL's own as well.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        first: int = 0,
        client_properties: FieldTable | None = None,
        **kwargs: Any,
    ) -> None:
        if not urls:
            raise ValueError("a FailoverConnection needs at least one URL")
        if len(urls) > 1 and not ROTATES:
            raise ConfigError(
                "CRONFLEET_AMQP_URL names several nodes, but this aio-pika cannot rotate between "
                "them (cronfleet hooks aio-pika 10's RobustConnection): give one URL, or install aio-pika 10"
            )
        self.urls: tuple[URL, ...] = tuple(make_url(url) for url in urls)
        self.attempts = first
        super().__init__(self.urls[first % len(self.urls)], client_properties=client_properties, **kwargs)

    def upcoming(self) -> URL:
        """The URL the next connection attempt goes to."""
        return self.urls[self.attempts % len(self.urls)]

    async def _RobustConnection__connect_transport(self) -> None:
        self.url = self.upcoming()
        self.attempts += 1
        await getattr(super(), _ATTEMPT)()
