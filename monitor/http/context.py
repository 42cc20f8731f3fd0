"""What every HTTP route may use: the monitor's store, its publisher and settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from common.bus import Publisher
from common.clock import Clock, utcnow
from common.settings import Settings
from common.signing import Keyring
from common.store import Store


@dataclass(frozen=True)
class HttpContext:
    """The monitor's parts the HTTP layer translates requests into: it validates and calls
    these, and holds no state of its own beyond them."""

    settings: Settings
    store: Store
    publisher: Publisher
    keyring: Keyring
    clock: Clock = field(default=utcnow)


def context_of(request: Request) -> HttpContext:
    """The context of the app serving ``request`` (a FastAPI dependency)."""
    context: HttpContext = request.app.state.context
    return context
