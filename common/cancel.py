"""Stopping a task whose cancellation a library swallowed.

aio-pika 10 / aiormq 7 now and then swallow a cancellation: a task cancelled while it closes a
channel (and in a few other calls) sees the call return normally or raise one of the library's
own errors, and no ``CancelledError`` follows. A loop that runs "until cancelled" would then run
forever, and whoever cancelled it (a task group, a test's fixture) waits forever for it to end.
Every such loop calls ``stop_if_cancelled`` once per turn.

The reverse happens too: aiormq cancels every call in flight (a publish's confirm, a channel
open, a passive declare) when it finds its connection dead (no frame for three heartbeat
intervals), and the task that made it, which nobody cancelled, gets a ``CancelledError``.
``cancelling`` tells the two apart (``common.connection.link_loss_as_error``).
"""

from __future__ import annotations

import asyncio


def cancelling() -> bool:
    """Whether the running task has a cancellation request pending (``cancel()`` was called on
    it and no ``uncancel()`` followed). A ``CancelledError`` seen while this is False came from
    a library's own future, not from whoever owns the task. Outside a task: False."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def stop_if_cancelled() -> None:
    """Raise ``CancelledError`` if the running task has a cancellation request pending
    (``Task.cancelling()``: ``cancel()`` was called and no ``uncancel()`` followed), so a request
    a library swallowed is honoured here. Outside a task, or in a task nobody cancelled, it does
    nothing."""
    if cancelling():
        raise asyncio.CancelledError
