"""A private three-node RabbitMQ cluster on this machine, that a test may take apart node by node.

Each node is a ``tests.chaos.conftest.PrivateBroker``: its own name, AMQP and distribution ports,
data and log directories. The nodes share an Erlang cookie of their own (a private ``HOME`` with
an ``.erlang.cookie``), so the shared broker and other tests' nodes never take part.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tests.chaos.conftest import PrivateBroker, _free_port, _tool, node_environment


@dataclass
class PrivateCluster:
    """Three (or ``size``) clustered nodes; the first one is the seed the others joined."""

    nodes: list[PrivateBroker]
    # The names of the nodes the test has stopped (and not started again).
    down: set[str] = field(default_factory=set)

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated, as ``CRONFLEET_AMQP_URL`` takes them."""
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> PrivateBroker:
        """The node called ``name`` (``rabbit-x@localhost``)."""
        return next(node for node in self.nodes if node.name == name)

    def stop(self, node: PrivateBroker) -> None:
        """Stop ``node`` as an operator would (``rabbitmqctl stop``: it closes its connections)."""
        self.down.add(node.name)
        node.stop()

    def crash(self, node: PrivateBroker) -> None:
        """Kill ``node``'s Erlang VM (SIGKILL): its connections drop without a word."""
        self.down.add(node.name)
        pid = int(Path(node.environment["RABBITMQ_PID_FILE"]).read_text().strip())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def start(self, node: PrivateBroker) -> None:
        """Start ``node`` again and wait until it answers (it rejoins the cluster by itself)."""
        node.start()
        self.down.discard(node.name)

    def leaders(self, namespace: str) -> dict[str, str]:
        """Queue name -> the node that holds its quorum leader, for the queues of ``namespace``."""
        return {name: leader for name, leader in self._list_queues(namespace, "leader") if leader}

    def members(self, queue: str) -> list[str]:
        """The nodes holding a member of quorum queue ``queue``."""
        namespace = queue.split(".")[0]
        for name, members in self._list_queues(namespace, "members"):
            if name == queue:
                return [member.strip(" '\"") for member in members.strip("[]").split(",") if member.strip()]
        return []

    def consumers(self, namespace: str) -> dict[str, int]:
        """Queue name -> its number of consumers, for the queues of ``namespace``."""
        return {name: int(count) for name, count in self._list_queues(namespace, "consumers")}

    def depth(self, queue: str) -> int:
        """How many messages ``queue`` holds."""
        namespace = queue.split(".")[0]
        return sum(int(count) for name, count in self._list_queues(namespace, "messages") if name == queue)

    def _list_queues(self, namespace: str, item: str) -> list[tuple[str, str]]:
        """(queue name, ``item``) of each queue of ``namespace``, as ``rabbitmqctl list_queues``
        run on a node that answers says."""
        command = ["-q", "--no-table-headers", "list_queues", "name", item]
        failures = []
        for asker in (node for node in self.nodes if node.name not in self.down):
            try:
                out = subprocess.run(
                    [_tool("rabbitmqctl"), "-n", asker.name, *command],
                    env=asker.environment,
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=60,
                ).stdout
            except subprocess.CalledProcessError as exc:
                failures.append(f"{asker.name}: {exc.stderr.strip()[:200]}")
                continue
            rows = [line.partition("\t") for line in out.splitlines()]
            return [(name, value.strip()) for name, _, value in rows if name.startswith(f"{namespace}.")]
        raise RuntimeError(f"no node could list the queues: {failures}")


def start_cluster(base: Path, size: int = 3) -> PrivateCluster:
    """Start ``size`` nodes under ``base`` and join them into one cluster (raises
    subprocess.CalledProcessError or TimeoutError when a node does not start or join)."""
    home = base / "home"
    home.mkdir(parents=True)
    cookie = home / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(16))
    cookie.chmod(0o400)
    tag = uuid.uuid4().hex[:6]
    nodes = []
    for index in range(size):
        directory = base / f"node{index}"
        directory.mkdir()
        (directory / "enabled_plugins").write_text("[].\n")
        (directory / "rabbitmq.conf").write_text("loopback_users = none\n")
        port = _free_port()
        name = f"cronfleet-cluster-{tag}-{index}@localhost"
        environment = {**node_environment(directory, name, port), "HOME": str(home)}
        nodes.append(PrivateBroker(name, port, environment))
    cluster = PrivateCluster(nodes)
    try:
        with ThreadPoolExecutor(size) as starting:
            list(starting.map(PrivateBroker.start, nodes))
        seed = nodes[0]
        for node in nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", seed.name)
            node.start_app()
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def stop_cluster(cluster: PrivateCluster) -> None:
    """Stop every node of ``cluster`` (whatever state it is in)."""
    with ThreadPoolExecutor(len(cluster.nodes)) as stopping:
        list(stopping.map(PrivateBroker.stop, cluster.nodes))


def cluster_fixture(base: Path) -> Iterator[PrivateCluster]:
    """Start a cluster under ``base``, hand it over, and stop it after."""
    cluster = start_cluster(base)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
