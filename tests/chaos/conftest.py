"""A private RabbitMQ node per test module, on its own ports, that tests may stop and start.

The shared broker is never touched: this node has its own name, ports and data directory, and
only it is stopped.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Debian's /usr/sbin wrappers switch to the rabbitmq user, who cannot write this test's
# directories; the scripts behind them run as whoever calls them.
_BIN = Path("/usr/lib/rabbitmq/bin")


def _tool(name: str) -> str:
    return str(_BIN / name) if (_BIN / name).exists() else name


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PrivateBroker:
    """A RabbitMQ node this test owns."""

    name: str
    port: int
    environment: dict[str, str]

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def ctl(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [_tool("rabbitmqctl"), "-n", self.name, *args],
            env=self.environment,
            check=True,
            capture_output=True,
            timeout=timeout,
        )

    def start(self) -> None:
        subprocess.run(
            [_tool("rabbitmq-server"), "-detached"], env=self.environment, check=True, capture_output=True
        )
        self.wait_until_answering()

    def stop_app(self) -> None:
        """Stop RabbitMQ on the node (every connection drops); the node itself stays up."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.wait_until_answering()

    def stop(self) -> None:
        subprocess.run(
            [_tool("rabbitmqctl"), "-n", self.name, "stop"],
            env=self.environment,
            capture_output=True,
            timeout=60,
        )

    def wait_until_answering(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.ctl("await_startup", timeout=30)
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except (subprocess.SubprocessError, OSError):
                time.sleep(0.5)
        raise TimeoutError(f"private RabbitMQ node {self.name} did not start within {timeout}s")


def node_environment(base: Path, name: str, port: int) -> dict[str, str]:
    """The environment of RabbitMQ node ``name`` listening on ``port``, its files under ``base``
    (``enabled_plugins`` and ``rabbitmq.conf`` there are the caller's to write)."""
    return {
        **os.environ,
        "RABBITMQ_NODENAME": name,
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(_free_port()),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_PID_FILE": str(base / "pid"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
    }


@pytest.fixture(scope="module")
def private_broker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrivateBroker]:
    """The module's node; a module may add ``rabbitmq.conf`` lines (``RABBITMQ_CONF``) and an
    ``advanced.config`` (``RABBITMQ_ADVANCED``), e.g. a short ``consumer_timeout``."""
    if shutil.which(_tool("rabbitmq-server")) is None:
        pytest.fail("rabbitmq-server is not installed; deploy/dev installs it")
    base = tmp_path_factory.mktemp("rabbitmq")
    port = _free_port()
    name = f"cronfleet-chaos-{uuid.uuid4().hex[:6]}@localhost"
    (base / "enabled_plugins").write_text("[].\n")
    (base / "rabbitmq.conf").write_text(
        "loopback_users = none\n" + getattr(request.module, "RABBITMQ_CONF", "")
    )
    environment = node_environment(base, name, port)
    advanced = getattr(request.module, "RABBITMQ_ADVANCED", None)
    if advanced is not None:
        (base / "advanced.config").write_text(advanced)
        environment["RABBITMQ_ADVANCED_CONFIG_FILE"] = str(base / "advanced.config")
    broker = PrivateBroker(name, port, environment)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
