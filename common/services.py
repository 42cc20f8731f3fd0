"""How the command line finds the three processes without importing them.

``scheduler``, ``worker`` and ``monitor`` each register a ``serve(settings, options)`` coroutine
under the ``cronfleet.services`` entry-point group (see ``pyproject.toml``).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from common.errors import NotFound
from common.settings import Settings

SERVICE_NAMES = ("scheduler", "worker", "monitor")


def default_instance_name(role: str) -> str:
    """``role@host:pid``: unique enough to tell processes apart in logs and events."""
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


def local_prefix(role: str) -> str:
    """What the default names of ``role``'s processes on this host start with: ``role@host:``."""
    return f"{role}@{socket.gethostname()}:"


def dead_local_instances(role: str, names: Iterable[str]) -> list[str]:
    """Those of ``names`` that are default names of ``role`` processes of this host
    (``role@host:pid``) whose process is gone: not this one, and no process has that pid now.
    A pid taken by another process since counts as alive (the caller then waits, as for a
    process of another host)."""
    prefix, dead = local_prefix(role), []
    for name in names:
        pid_text = name.removeprefix(prefix) if name.startswith(prefix) else ""
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            dead.append(name)
        except (PermissionError, OverflowError):
            continue
    return dead


@dataclass(frozen=True)
class ServiceOptions:
    """What a process is told on start: its name, and for a worker its pool and concurrency.

    ``ready`` is set once the process is connected and consuming (tests and ``run`` wait on it).
    """

    pool: str = "default"
    concurrency: int = 4
    name: str | None = None
    # A monitor serves its HTTP interface (pings, API, dashboard, metrics) here when set:
    # (host, port); port 0 picks a free one.
    http: tuple[str, int] | None = None
    # A worker imports these modules first: the Python functions they register with
    # ``worker.functions.job_function`` are what its ``python`` actions may call.
    imports: tuple[str, ...] = ()
    ready: asyncio.Event = field(default_factory=asyncio.Event, compare=False)

    def instance(self, role: str) -> str:
        """This process's name, or a default one for ``role``."""
        return self.name or default_instance_name(role)


Service = Callable[[Settings, ServiceOptions], Coroutine[Any, Any, None]]


def load_service(name: str) -> Service:
    """The ``serve`` coroutine registered as ``name``. Raises NotFound when none is installed."""
    for entry in entry_points(group="cronfleet.services"):
        if entry.name == name:
            service: Service = entry.load()
            return service
    raise NotFound(f"no cronfleet service called {name!r} is installed (reinstall cronfleet)")


def parse_listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) as (host, port). Raises ValueError in one line."""
    host, colon, port = text.rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (for example 127.0.0.1:8080)")
    return host, int(port)
