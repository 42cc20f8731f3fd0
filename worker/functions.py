"""The Python functions a worker may call: an application registers them with ``job_function``
in its own module, and a worker started with ``cronfleet worker --import that.module`` imports it
and calls them by name (``module:function``) when a ``python`` action asks.

Only registered functions can be called: importing a module does not make everything in it
callable by whoever can publish a trigger. Example::

    # myapp/jobs.py
    from worker.functions import job_function

    @job_function
    def cleanup(run):            # run: worker.actions.RunContext
        removed = purge(older_than=run.context["days"])
        return {"removed": removed}  # stored as the run's result (JSON, at most 16 KiB)

    # jobs.toml
    [jobs.cleanup]
    schedule = "0 4 * * *"
    action = { type = "python", function = "myapp.jobs:cleanup" }
    context = { days = 30 }
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

from common.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])

_registered: dict[str, Callable[..., Any]] = {}
# The sync functions registered with ``blocking=False``: called on the worker's event loop.
_on_loop: set[str] = set()


@overload
def job_function(function: F) -> F: ...


@overload
def job_function(*, name: str | None = None, blocking: bool = True) -> Callable[[F], F]: ...


def job_function(
    function: F | None = None, *, name: str | None = None, blocking: bool = True
) -> F | Callable[[F], F]:
    """Register ``function`` so that ``python`` actions may call it, as ``module:function`` (its
    own module and name) or as ``name`` when given (``module:function`` too). Returns it
    unchanged. Each is called with the run's ``RunContext``.

    Async functions run on the worker's event loop. Sync functions run in a thread, so that one
    that blocks (I/O, sleeps, heavy work) never stalls the worker; one declared
    ``blocking=False`` (it returns at once and waits for nothing) is called on the loop instead,
    saving the hand-over to a thread, and cannot be timed out while it runs."""

    def register(target: F) -> F:
        key = name or f"{target.__module__}:{target.__qualname__}"
        if key in _registered and _registered[key] is not target:
            raise ValueError(f"{key} is already registered for another function")
        _registered[key] = target
        if blocking:
            _on_loop.discard(key)
        else:
            _on_loop.add(key)
        return target

    return register if function is None else register(function)


def runs_on_loop(name: str) -> bool:
    """Whether the sync function registered as ``name`` said it does not block
    (``job_function(blocking=False)``): it is called on the worker's loop, not in a thread."""
    return name in _on_loop


def registered(name: str) -> Callable[..., Any] | None:
    """The function registered as ``name``, or None."""
    return _registered.get(name)


def registered_names() -> list[str]:
    """Every registered name, sorted."""
    return sorted(_registered)


def import_modules(modules: Iterable[str]) -> None:
    """Import each of ``modules`` (so that their ``job_function``s register). Raises ConfigError,
    in one line naming the module, when one cannot be imported. The current directory is
    importable, as it is for ``python -m``."""
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise ConfigError(f"--import {module}: cannot import it ({type(exc).__name__}: {exc})") from exc
