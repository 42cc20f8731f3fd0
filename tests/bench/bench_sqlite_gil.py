"""Why a SQLite writer thread writes a chunk of rows in one statement, not with executemany.

sqlite3 lets go of the GIL around every step of a statement and must take it back after; while
another thread of the process runs Python (a busy event loop), each taking back can wait for
that thread's switch interval. ``executemany`` steps once a row. This times one transaction of a
worker's claims write (insert the new claims, read back which went in, write the ends), the old
way (``executemany``, a SELECT of the keys) and the way ``common.store.bulk`` does it now, with
the rest of the process idle and with another thread running Python.

    .venv/bin/python tests/bench/bench_sqlite_gil.py [--rows 16] [--transactions 200]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Table
from sqlalchemy.dialects import sqlite
from sqlalchemy.schema import CreateTable

from common.store import TriggerClaimRow, bulk
from common.store.bulk import _sqlite_values

CLAIMS = cast(Table, TriggerClaimRow.__table__)
AT = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
COLUMNS = ("trigger_id", "body_sha256", "run_id", "worker", "claimed_at", "lease_until", "trigger_expires_at")


def rows(prefix: str, count: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """New claims and the ends of the same runs."""
    claims = [
        {
            "trigger_id": f"{prefix}-{n}",
            "body_sha256": "0" * 64,
            "run_id": f"run-{prefix}-{n}",
            "worker": "bench",
            "claimed_at": AT,
            "lease_until": AT + timedelta(seconds=30),
            "trigger_expires_at": AT + timedelta(hours=1),
        }
        for n in range(count)
    ]
    ends = [
        {
            "trigger_id": claim["trigger_id"],
            "run_id": claim["run_id"],
            "finished_at": AT,
            "finished_event": "{}",
            "lease_until": AT,
        }
        for claim in claims
    ]
    return claims, ends


def one_statement_a_chunk(
    connection: sqlite3.Connection, claims: list[dict[str, Any]], ends: list[dict[str, Any]]
) -> None:
    """As the worker writes now (``common.store.bulk``)."""
    bulk.insert_new_rows_now(connection, CLAIMS, "trigger_id", "run_id", claims)
    bulk.update_rows_now(connection, CLAIMS, ("trigger_id", "run_id"), ends)


def executemany(
    connection: sqlite3.Connection, claims: list[dict[str, Any]], ends: list[dict[str, Any]]
) -> None:
    """As it wrote before: a statement a row, and the keys read back row by row."""
    names = ", ".join(COLUMNS)
    connection.executemany(
        f"INSERT INTO trigger_claims ({names}) VALUES ({', '.join('?' for _ in COLUMNS)}) "
        "ON CONFLICT (trigger_id) DO NOTHING",
        _sqlite_values(CLAIMS, COLUMNS, claims),
    )
    keys = [claim["trigger_id"] for claim in claims]
    connection.execute(
        f"SELECT trigger_id, run_id FROM trigger_claims WHERE trigger_id IN ({', '.join('?' for _ in keys)})",
        keys,
    ).fetchall()
    end_columns = ("finished_at", "finished_event", "lease_until", "trigger_id", "run_id")
    connection.executemany(
        "UPDATE trigger_claims SET finished_at = ?, finished_event = ?, lease_until = ? "
        "WHERE trigger_id = ? AND run_id = ?",
        _sqlite_values(CLAIMS, end_columns, ends),
    )


Write = Callable[[sqlite3.Connection, list[dict[str, Any]], list[dict[str, Any]]], None]


def timed(connection: sqlite3.Connection, write: Write, label: str, count: int, transactions: int) -> float:
    """The mean time of a transaction of ``write``, in ms."""
    times = []
    for n in range(transactions):
        claims, ends = rows(f"{label}-{n}", count)
        start = time.perf_counter()
        connection.execute("BEGIN IMMEDIATE")
        write(connection, claims, ends)
        connection.execute("COMMIT")
        times.append(time.perf_counter() - start)
    return 1000 * statistics.mean(times)


def spin(stop: threading.Event) -> None:
    """Run Python until ``stop`` is set, as a busy event loop does."""
    while not stop.is_set():
        sum(range(100))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16, help="claims (and ends) a transaction")
    parser.add_argument("--transactions", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        connection = sqlite3.connect(Path(folder) / "claims.db", isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute(str(CreateTable(CLAIMS).compile(dialect=sqlite.dialect())))
        print(f"one transaction of {args.rows} claims and {args.rows} ends, mean of {args.transactions}")
        print(f"{'':32}{'executemany':>14}{'one statement':>16}")
        for busy in (False, True):
            stop = threading.Event()
            spinner = threading.Thread(target=spin, args=(stop,))
            if busy:
                spinner.start()
            try:
                many = timed(connection, executemany, f"many-{busy}", args.rows, args.transactions)
                one = timed(connection, one_statement_a_chunk, f"one-{busy}", args.rows, args.transactions)
            finally:
                stop.set()
                if busy:
                    spinner.join()
            where = "another thread running Python" if busy else "the rest of the process idle"
            print(f"{where:32}{many:>11.2f} ms{one:>13.2f} ms")


if __name__ == "__main__":
    main()
