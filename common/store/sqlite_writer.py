"""A SQLite transaction in one hand-over to a thread: the hot writes of a busy worker.

Through SQLAlchemy and aiosqlite, each statement, its cursor, the commit and the connection's
return to the pool are each a hop to aiosqlite's thread and back, and on a busy loop each hop
waits its turn: a claims write of 30 rows took 9 ms, of which SQLite spent well under one, and
each run waits for two such writes. Here the whole transaction (``BEGIN IMMEDIATE``, the
statements, ``COMMIT``) is one call on a thread of the writer's own, holding its own connection
to the same database file in WAL mode, and waiting for another process's write lock as long as
the store's own connections do.

Errors are sqlite3's own: ``sqlite3.OperationalError`` (locked past the timeout, the disk) is in
``STORE_OUTAGES``, like the errors SQLAlchemy raises for the same causes.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

# How long a transaction waits for another process's write lock before it is an outage, as the
# store's own connections do (``busy_timeout``).
LOCK_TIMEOUT_SECONDS = 30
# It waits in steps this long (SQLite's own wait), so that a writer being closed stops waiting:
# a worker that stops is not held up to LOCK_TIMEOUT_SECONDS by a lock someone else keeps.
LOCK_STEP_SECONDS = 0.5


class SqliteWriter:
    """Runs write transactions on the SQLite database at ``path``, one at a time, each whole in
    one call on the writer's thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="cronfleet-sqlite-writer")
        self._connection: sqlite3.Connection | None = None
        self._closing = False

    async def transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """What ``work`` returns, called with the connection inside a transaction that holds the
        write lock from its start; committed when ``work`` returns, rolled back when it raises
        (and what it raised is raised here)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._in_transaction, work)

    async def close(self) -> None:
        """Close the connection (a later ``transaction`` opens it again). A transaction still
        waiting for the write lock gives up ("database is locked") within LOCK_STEP_SECONDS."""
        self._closing = True
        try:
            # On the writer's thread, after what is queued: the connection is that thread's.
            await asyncio.get_running_loop().run_in_executor(self._thread, self._close)
        finally:
            self._closing = False

    def _in_transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        connection = self._connection or self._open()
        self._begin(connection)
        try:
            result = work(connection)
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        return result

    def _begin(self, connection: sqlite3.Connection) -> None:
        """Begin a transaction holding the write lock, waiting for it up to LOCK_TIMEOUT_SECONDS
        (less once the writer is being closed); then "database is locked" is raised."""
        deadline = time.monotonic() + LOCK_TIMEOUT_SECONDS
        while True:
            try:
                connection.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                locked = exc.sqlite_errorcode == sqlite3.SQLITE_BUSY
                if not locked or self._closing or time.monotonic() >= deadline:
                    raise

    def _open(self) -> sqlite3.Connection:
        # Autocommit mode (isolation_level None): the transactions are the writer's own.
        step = min(LOCK_STEP_SECONDS, LOCK_TIMEOUT_SECONDS)
        connection = sqlite3.connect(self.path, timeout=step, isolation_level=None)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            connection.close()  # the next transaction opens one afresh
            raise
        self._connection = connection
        return connection

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
