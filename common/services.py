"""How the command line finds the three processes without importing them.

``scheduler``, ``worker`` and ``monitor`` each register a ``serve(settings, options)`` coroutine
under the ``cronfleet.services`` entry-point group (see ``pyproject.toml``).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from common.errors import NotFound
from common.settings import Settings

SERVICE_NAMES = ("scheduler", "worker", "monitor")


def default_instance_name(role: str) -> str:
    """``role@host:pid``: unique enough to tell processes apart in logs and events."""
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class ServiceOptions:
    """What a process is told on start: its name, and for a worker its pool and concurrency.

    ``ready`` is set once the process is connected and consuming (tests and ``run`` wait on it).
    """

    pool: str = "default"
    concurrency: int = 4
    name: str | None = None
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
