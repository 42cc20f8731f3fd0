"""A SQLite transaction in one step of the event loop: the hot writes of a busy worker.

Through SQLAlchemy and aiosqlite, each statement, its cursor, the commit and the connection's
return to the pool are each a hop to aiosqlite's thread and back, and on a busy loop each hop
waits its turn: a claims write of 30 rows took 9 ms, of which SQLite spent well under one, and
each run waits for two such writes. Here the whole transaction (``BEGIN IMMEDIATE``, the
statements, ``COMMIT``) is one call on a thread of the writer's own, holding its own connection
to the same database file, with the store's settings (WAL, ``busy_timeout``).

Errors are sqlite3's own: ``sqlite3.OperationalError`` (locked past the timeout, the disk) is in
``STORE_OUTAGES``, like the errors SQLAlchemy raises for the same causes.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

# How long a transaction waits for another process's write lock before it is an outage, as the
# store's own connections do (``busy_timeout``).
LOCK_TIMEOUT_SECONDS = 30


class SqliteWriter:
    """Runs write transactions on the SQLite database at ``path``, one at a time, each whole in
    one call on the writer's thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="cronfleet-sqlite-writer")
        self._connection: sqlite3.Connection | None = None

    async def transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """What ``work`` returns, called with the connection inside a transaction that holds the
        write lock from its start; committed when ``work`` returns, rolled back when it raises
        (and what it raised is raised here)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._in_transaction, work)

    async def close(self) -> None:
        """Close the connection and stop the thread; a later ``transaction`` opens them again."""
        thread, self._thread = (
            self._thread,
            ThreadPoolExecutor(1, thread_name_prefix="cronfleet-sqlite-writer"),
        )
        await asyncio.get_running_loop().run_in_executor(thread, self._close)
        thread.shutdown()

    def _in_transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        connection = self._connection or self._open()
        connection.execute("BEGIN IMMEDIATE")
        try:
            result = work(connection)
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        return result

    def _open(self) -> sqlite3.Connection:
        # Autocommit mode (isolation_level None): the transactions are the writer's own.
        connection = sqlite3.connect(self.path, timeout=LOCK_TIMEOUT_SECONDS, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        self._connection = connection
        return connection

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
