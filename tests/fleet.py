"""Running real cronfleet processes inside a test, and waiting for what they should bring about."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from common.services import ServiceOptions, load_service
from common.settings import Settings


class Fleet:
    """Real scheduler, worker and monitor processes, run as tasks of the test's event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, *names: str, **options: Any) -> None:
        """Start each named process and wait until it is consuming (20 s at most)."""
        for name in names:
            service_options = ServiceOptions(name=f"{name}-{len(self.tasks)}", **options)
            task = asyncio.create_task(load_service(name)(self.settings, service_options))
            self.tasks.append(task)
            ready = asyncio.create_task(service_options.ready.wait())
            done, _ = await asyncio.wait({task, ready}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                ready.cancel()
                task.result()  # raises what stopped the process
            if ready not in done:
                ready.cancel()
                raise TimeoutError(f"{name} did not become ready within 20s")

    async def stop(self) -> None:
        """Cancel every process and wait for each to finish."""
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tasks.clear()


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 20.0, every: float = 0.1) -> Any:
    """Wait until ``check()`` returns something truthy, and return it; fail after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {result!r})")
        await asyncio.sleep(every)


def cronfleet(
    settings: Settings, *args: str, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``cronfleet ARGS`` in a child process with the test fleet's settings."""
    environment = {
        **os.environ,
        "CRONFLEET_AMQP_URL": settings.amqp_url,
        "CRONFLEET_DATABASE_URL": settings.database_url,
        "CRONFLEET_KEYS": settings.keys,
        "CRONFLEET_NAMESPACE": settings.namespace,
        **env,
    }
    if settings.database_schema:
        environment["CRONFLEET_DATABASE_SCHEMA"] = settings.database_schema
    return subprocess.run(
        [str(Path(sys.executable).parent / "cronfleet"), *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=cwd,
        timeout=60,
        check=False,
    )
