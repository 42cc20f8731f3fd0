"""Test hosts on this machine: network namespaces, each with its own address, hostname and link.

Each host's ``eth0`` is one end of a veth pair whose other end is a port of a bridge in a hub
namespace; cutting a host's link sets that port down (a pulled cable: packets vanish, nothing is
refused). Every namespace, address and interface lives inside namespaces the test made, under a
prefix of its own: the machine's own network is never touched. Root only (``refusal`` says why
not). A RabbitMQ node and a PostgreSQL instance can run inside a host, as a broker and database
host would.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

SUBNET = "10.213.0"
_RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")  # Debian's /usr/sbin wrappers switch user


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def refusal() -> str | None:
    """Why this process cannot build test hosts (not root, ``ip netns`` refused), or None."""
    if os.geteuid() != 0:
        return "building test hosts with network namespaces (ip netns) takes root"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "ip (iproute2) and unshare (util-linux) are needed to build test hosts"
    probe = f"cfprobe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"`ip netns add` is not permitted here: {exc.stderr.decode().strip()}"
    _ip("netns", "del", probe)
    return None


@dataclass(frozen=True)
class Host:
    """One test host: its name (also its hostname), namespace, address, and its port on the hub's
    bridge (an interface of the hub namespace)."""

    name: str
    netns: str
    address: str
    port: str

    def command(self, *argv: str, own_hostname: bool = True) -> list[str]:
        """``argv`` run inside this host; with ``own_hostname`` in a UTS namespace of its own
        whose hostname is the host's name (so that ``role@host:pid`` names tell hosts apart).
        Every step execs the next: the process started is ``argv``'s own."""
        inside = ["ip", "netns", "exec", self.netns]
        if not own_hostname:
            return [*inside, *argv]
        return [*inside, "unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', self.name, *argv]

    def run(self, *argv: str, env: dict[str, str] | None = None, timeout: float = 60) -> str:
        """Run ``argv`` inside this host (its machine hostname kept) to its end; its output.
        Raises CalledProcessError (with the output) when it fails."""
        done = subprocess.run(
            self.command(*argv, own_hostname=False), env=env, capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, argv, done.stdout, done.stderr)
        return done.stdout

    def start(
        self, argv: list[str], env: dict[str, str], log: IO[bytes], cwd: Path
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` as a process of this host (hostname included), its output to ``log``."""
        return subprocess.Popen(self.command(*argv), env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


@dataclass
class Network:
    """Hosts on a bridge in a hub namespace, all named ``PREFIX-...``. ``close`` kills every
    process left in them and deletes them, whatever happened.

    The prefix is ``cf<pid>x<random>``: ``sweep_abandoned`` recognises the namespaces of a test
    process that died before it could close them (killed by a timeout, say)."""

    prefix: str = field(default_factory=lambda: f"cf{os.getpid()}x{uuid.uuid4().hex[:4]}")
    hosts: dict[str, Host] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.hub = f"{self.prefix}-hub"
        self._namespaces: list[str] = []
        self._add_namespace(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)

    def add_host(self, name: str, number: int) -> Host:
        """A host ``name`` at ``SUBNET.number``, linked to the hub (loopback up too)."""
        host = Host(name, f"{self.prefix}-{name}", f"{SUBNET}.{number}", f"to-{name}"[:15])
        self._add_namespace(host.netns)
        _ip(
            "-n",
            self.hub,
            "link",
            "add",
            host.port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            host.netns,
        )
        _ip("-n", self.hub, "link", "set", host.port, "master", "br0", "up")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")
        self.hosts[name] = host
        return host

    def cut(self, host: Host) -> None:
        """Pull ``host``'s cable: its port on the hub goes down, and every packet to or from it
        is lost (no error reaches either end)."""
        _ip("-n", self.hub, "link", "set", host.port, "down")

    def restore(self, host: Host) -> None:
        """Plug ``host``'s cable back in."""
        _ip("-n", self.hub, "link", "set", host.port, "up")

    def close(self) -> None:
        """Kill every process still inside these namespaces (they are this test's: the fleet,
        the broker and its epmd, the database) and delete the namespaces."""
        for name in reversed(self._namespaces):
            _kill_everything_in(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self._namespaces.clear()


_OURS = re.compile(r"^cf(\d+)x[0-9a-f]{4}-")


def sweep_abandoned() -> list[str]:
    """Kill what runs in, and delete, the namespaces a ``Network`` of a test process that is
    gone left behind (its pid is in their name), and remove its databases' directories; returns
    the namespaces' names."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    abandoned = []
    for line in listed.stdout.splitlines():
        name = line.split(" ", 1)[0]
        found = _OURS.match(name)
        if found is None or Path(f"/proc/{found.group(1)}").exists():
            continue
        _kill_everything_in(name)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        abandoned.append(name)
    # And the data directories of their databases (``NamespacedPostgres``).
    for directory in Path(tempfile.gettempdir()).glob("cf*x-pg-*"):
        found = re.match(r"^cf(\d+)x-pg-", directory.name)
        if found is not None and not Path(f"/proc/{found.group(1)}").exists():
            shutil.rmtree(directory, ignore_errors=True)
    return abandoned


def _kill_everything_in(netns: str, patience: float = 10.0) -> None:
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        listed = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=30)
        pids = [int(pid) for pid in listed.stdout.split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


@dataclass
class NamespacedBroker:
    """A RabbitMQ node of its own inside ``host`` (its epmd too), on the standard ports, which
    are free there; its data under ``base``."""

    host: Host
    base: Path
    node: str = "cronfleet@localhost"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{self.host.address}:5672/"

    def _environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_PID_FILE": str(self.base / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq"),
        }

    def start(self, timeout: float = 60) -> None:
        """Start the node and wait until it has booted; raises TimeoutError if it does not."""
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "enabled_plugins").write_text("[].\n")
        # guest may log in from the other hosts' addresses.
        (self.base / "rabbitmq.conf").write_text("loopback_users = none\n")
        self.host.run(str(_RABBITMQ_BIN / "rabbitmq-server"), "-detached", env=self._environment())
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ctl("await_startup")
                return
            except (subprocess.SubprocessError, OSError):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"RabbitMQ did not start in {self.host.name} within {timeout}s"
                    ) from None
                time.sleep(0.5)

    def ctl(self, *args: str) -> str:
        """``rabbitmqctl ARGS`` on this node; its output."""
        return self.host.run(
            str(_RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args, env=self._environment()
        )

    def stop(self) -> None:
        """Stop the node (whatever is left is killed with its namespace)."""
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.ctl("stop")


def _postgres_bin() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if not versions:
        raise FileNotFoundError("no PostgreSQL under /usr/lib/postgresql/*/bin")
    return versions[-1]


@dataclass
class NamespacedPostgres:
    """A PostgreSQL instance of its own inside ``host``, run as the ``postgres`` user, listening
    on the host's address and on a Unix socket in its own directory. The socket is not in any
    network namespace: the test reads and writes the store through it without an address."""

    host: Host
    port: int = 5432
    base: Path = field(init=False)

    def __post_init__(self) -> None:
        # The postgres user must reach it: not under pytest's root-only temporary directory.
        self.base = Path(tempfile.mkdtemp(prefix=f"cf{os.getpid()}x-pg-"))
        shutil.chown(self.base, "postgres", "postgres")

    @property
    def url(self) -> str:
        """Its URL from the other hosts."""
        return f"postgresql+asyncpg://postgres@{self.host.address}:{self.port}/postgres"

    @property
    def local_url(self) -> str:
        """Its URL through the Unix socket, for this process."""
        return f"postgresql+asyncpg://postgres@/postgres?host={self.base}&port={self.port}"

    def _as_postgres(self, program: str, *args: str) -> str:
        return self.host.run("runuser", "-u", "postgres", "--", str(_postgres_bin() / program), *args)

    def start(self) -> None:
        """initdb, allow the subnet, start and wait until it accepts connections."""
        data = self.base / "data"
        self._as_postgres(
            "initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"
        )
        with (data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {SUBNET}.0/24 trust\n")
        options = f"-k {self.base} -h {self.host.address} -p {self.port} -c fsync=off -c max_connections=300"
        self._as_postgres(
            "pg_ctl", "-D", str(data), "-l", str(self.base / "log"), "-o", options, "-w", "start"
        )

    def stop(self) -> None:
        """Stop it at once and remove its files."""
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._as_postgres("pg_ctl", "-D", str(self.base / "data"), "-m", "immediate", "stop")
        shutil.rmtree(self.base, ignore_errors=True)
