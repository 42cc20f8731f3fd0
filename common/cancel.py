"""Stopping a task whose cancellation a library swallowed.

aio-pika 10 / aiormq 7 now and then swallow a cancellation: a task cancelled while it closes a
channel (and in a few other calls) sees the call return normally or raise one of the library's
own errors, and no ``CancelledError`` follows. A loop that runs "until cancelled" would then run
forever, and whoever cancelled it (a task group, a test's fixture) waits forever for it to end.
Every such loop calls ``stop_if_cancelled`` once per turn.
"""

from __future__ import annotations

import asyncio


def stop_if_cancelled() -> None:
    """Raise ``CancelledError`` if the running task has a cancellation request pending
    (``Task.cancelling()``: ``cancel()`` was called and no ``uncancel()`` followed), so a request
    a library swallowed is honoured here. Outside a task, or in a task nobody cancelled, it does
    nothing."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
