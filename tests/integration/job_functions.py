"""Python functions a test worker may run (``--import tests.integration.job_functions``)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from worker.actions import RunContext
from worker.functions import job_function


@job_function
def add_days(run: RunContext) -> dict[str, Any]:
    """Sync, in a thread: echoes what the run was handed."""
    return {
        "run_id": run.run_id,
        "trigger_id": run.trigger_id,
        "job": run.job,
        "scheduled_at": run.scheduled_at,
        "attempt": run.attempt,
        "days_plus_one": run.context["days"] + 1,  # type: ignore[operator]
    }


@job_function(name="tests.integration.job_functions:renamed")
async def async_job(run: RunContext) -> list[str]:
    """Async, on the worker's loop."""
    await asyncio.sleep(0)
    return [run.job, "async"]


@job_function
async def a_second_and_a_half(run: RunContext) -> None:
    """Async, on the worker's loop, for 1.5 s: a job firing every second is always running."""
    await asyncio.sleep(1.5)


@job_function
def explode(run: RunContext) -> None:
    """Fails the run with its traceback."""
    raise RuntimeError(f"cannot do {run.job}")


@job_function
def unserialisable(run: RunContext) -> object:
    """Returns what JSON cannot say: the run succeeds without a result."""
    return {"when": datetime.now(), "what": object()}


def not_registered(run: RunContext) -> None:
    """In the imported module but not registered: no trigger may call it."""
