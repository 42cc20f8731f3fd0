"""What every HTTP route may use: the monitor's store, its publisher and settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from aio_pika.abc import AbstractRobustConnection
from fastapi import Request

from common.clock import Clock, utcnow
from common.publisher import Publisher
from common.settings import Settings
from common.signing import Keyring
from common.store import Store


@dataclass(frozen=True)
class EventCounts:
    """What this monitor's recorder did since it started: events recorded (that changed
    something in the store) and events refused (dead-lettered with a reason)."""

    recorded: int = 0
    refused: int = 0


@dataclass(frozen=True)
class HttpContext:
    """The monitor's parts the HTTP layer translates requests into: it validates and calls
    these, and holds no state of its own beyond them."""

    settings: Settings
    store: Store
    publisher: Publisher
    keyring: Keyring
    clock: Clock = field(default=utcnow)
    # This monitor's own event counters, read at each scrape of /metrics.
    events: Callable[[], EventCounts] = field(default=EventCounts)
    # The monitor's broker connection, for declares on channels of their own (a refused declare
    # closes its channel: never the publisher's).
    connection: AbstractRobustConnection | None = None


def context_of(request: Request) -> HttpContext:
    """The context of the app serving ``request`` (a FastAPI dependency)."""
    context: HttpContext = request.app.state.context
    return context
