"""Writing many rows at once in the driver's own terms: the monitor's hot writes (a herd of jobs
turning ``down``, a batch of runs) without SQLAlchemy's per-value work.

SQLAlchemy compiles a statement and runs each value through its column type's bind processor;
for 5,000 flips that was 0.4 s of a herd's 1.1 s. Here each table's statement is written once per
dialect and each column converted by one plain function, chosen by its type, the same conversion
SQLAlchemy does (``tests/integration/test_bulk_writes.py`` compares the stored values and text).
Statements still go through SQLAlchemy's connection (``exec_driver_sql``): the store's events
(the parameter limit, a deadlock counted as an outage) and its error wrapping apply.

- SQLite: one statement per chunk of rows (``rows_per_insert``), their values in one ``VALUES``
  list; an update joins it (``UPDATE ... FROM (VALUES ...)``). Not executemany: sqlite3 takes
  the GIL back after each step, a step a row, and on a busy process each wait is long (below).
  Inserted ids are read back as the rowids SQLite hands out in order to the one writer holding
  its lock, and checked.
- PostgreSQL: one statement per chunk carrying one array per column (``unnest``), whatever the
  rows; the ids of an INSERT are taken from the table's sequence first, in order.

Only the column types cronfleet's tables use are known; another type is refused when a statement
for it is built, never stored in a form SQLAlchemy would not read back.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from functools import cache, lru_cache
from typing import Any, TypeVar

from sqlalchemy import BigInteger, Boolean, Column, Connection, Float, Integer, String, Table, Text
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession

from common.store.chunks import chunks, rows_per_insert
from common.store.locks import dialect_of
from common.store.models import UTCDateTime

# Rows per statement (PostgreSQL), or per id check (SQLite): bounded, whatever the rows.
BULK_ROWS = 5000

Convert = Callable[[Any], Any]


async def insert_rows(session: AsyncSession, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert ``rows`` (each with the same columns of ``table``) in the session's transaction."""
    if not rows:
        return
    if dialect_of(session) == "sqlite":
        await _on_sqlite(session, lambda run: _insert_sqlite(run, table, rows))
        return
    columns = tuple(rows[0])
    connection = await session.connection()
    statement = _insert_statement(table, columns)
    for some in chunks(rows, BULK_ROWS):
        await connection.exec_driver_sql(statement, _pg_parameters(table, columns, some))


async def insert_rows_with_ids(
    session: AsyncSession, table: Table, rows: Sequence[Mapping[str, Any]], id_column: str = "id"
) -> list[int]:
    """Insert ``rows`` as ``insert_rows`` does and return the ``id_column`` each was given, in the
    order of ``rows`` (and increasing in it)."""
    if not rows:
        return []
    dialect = dialect_of(session)
    connection = await session.connection()
    ids: list[int] = []
    for some in chunks(rows, BULK_ROWS):
        if dialect == "postgresql":
            taken = await connection.exec_driver_sql(
                "SELECT nextval(pg_get_serial_sequence($1, $2)) FROM generate_series(1, $3)",
                (table.name, id_column, len(some)),
            )
            given = sorted(int(row[0]) for row in taken if row[0] is not None)
            if len(given) != len(some):
                raise RuntimeError(
                    f"{table.name}.{id_column} takes its values from no sequence of its own: "
                    "the store's schema is not the one its migrations made"
                )
            some = [{id_column: given_id, **row} for given_id, row in zip(given, some, strict=True)]
            await insert_rows(session, table, some)
            ids.extend(given)
            continue
        await insert_rows(session, table, some)
        last = (await connection.exec_driver_sql("SELECT last_insert_rowid()")).scalar_one()
        first = last - len(some) + 1
        # SQLite gives a new row the highest rowid plus one; the transaction holds the write
        # lock, so the rows just inserted are first..last unless that rule was broken (the
        # highest rowid in use): then fewer than all of them lie in that range.
        counted = (
            await connection.exec_driver_sql(
                f'SELECT count(*) FROM "{table.name}" WHERE "{id_column}" BETWEEN ? AND ?', (first, last)
            )
        ).scalar_one()
        if counted != len(some):
            raise RuntimeError(f"the {len(some)} rows inserted into {table.name} did not get consecutive ids")
        ids.extend(range(first, last + 1))
    return ids


async def insert_new_rows(
    session: AsyncSession, table: Table, key: str, witness: str, rows: Sequence[Mapping[str, Any]]
) -> set[Any]:
    """Insert those of ``rows`` (each with the same columns of ``table``) whose ``key`` no row of
    ``table`` holds yet, skipping the others (of two rows with one key, the first goes in); return
    the keys of the rows that went in. ``witness``: a column whose value each row holds alone
    (a fresh id), by which a row that went in is told from one that was there before."""
    if not rows:
        return set()
    if dialect_of(session) == "sqlite":
        return await _on_sqlite(session, lambda run: _insert_sqlite(run, table, rows, (key, witness)))
    columns = tuple(rows[0])
    connection = await session.connection()
    statement = _insert_statement(table, columns, skip_taken=key)
    inserted: set[Any] = set()
    for some in chunks(rows, BULK_ROWS):
        inserted.update(
            (await connection.exec_driver_sql(statement, _pg_parameters(table, columns, some))).scalars()
        )
    return inserted


def insert_new_rows_now(
    connection: sqlite3.Connection, table: Table, key: str, witness: str, rows: Sequence[Mapping[str, Any]]
) -> set[Any]:
    """``insert_new_rows`` on a SQLite connection of one's own (``common.store.sqlite_writer``),
    in its transaction."""
    if not rows:
        return set()
    return _insert_sqlite(_runs_on(connection), table, rows, (key, witness))


async def update_rows(
    session: AsyncSession, table: Table, key: str | tuple[str, ...], rows: Sequence[Mapping[str, Any]]
) -> None:
    """Write ``rows`` (each the key column ``key``, or every column of a key of several, and the
    same other columns of ``table``) to the rows of ``table`` with that key (of rows with one
    key, the last)."""
    keys = (key,) if isinstance(key, str) else key
    if not rows or not _others(rows, keys):
        return
    if dialect_of(session) == "sqlite":
        await _on_sqlite(session, lambda run: _update_sqlite(run, table, keys, rows))
        return
    others = _others(rows, keys)
    connection = await session.connection()
    statement = _update_statement(table, keys, others)
    for some in chunks(_last_by_key(rows, keys), BULK_ROWS):
        await connection.exec_driver_sql(statement, _pg_parameters(table, (*keys, *others), some))


def update_rows_now(
    connection: sqlite3.Connection,
    table: Table,
    key: str | tuple[str, ...],
    rows: Sequence[Mapping[str, Any]],
) -> None:
    """``update_rows`` on a SQLite connection of one's own (``common.store.sqlite_writer``), in
    its transaction."""
    keys = (key,) if isinstance(key, str) else key
    if rows and _others(rows, keys):
        _update_sqlite(_runs_on(connection), table, keys, rows)


def _others(rows: Sequence[Mapping[str, Any]], keys: tuple[str, ...]) -> tuple[str, ...]:
    """The columns ``rows`` write besides ``keys``."""
    return tuple(name for name in rows[0] if name not in keys)


def _last_by_key(rows: Sequence[Mapping[str, Any]], keys: tuple[str, ...]) -> list[Mapping[str, Any]]:
    """One row per key, the last, as a statement per row would leave it: which of several rows
    one UPDATE ... FROM takes is not defined, on either store."""
    return list({tuple(row[name] for name in keys): row for row in rows}.values())


# SQLite: one statement for each chunk of rows, their values in one VALUES list. sqlite3 lets
# go of the GIL around every step of a statement and must take it back after: with executemany,
# a step a row, a writer thread waited for the busy event loop's thread once a row (a batch of
# 16 claims took 3 ms in the thread, 0.2 ms of it SQLite's); here a few times a chunk.

Run = Callable[[str, Sequence[Any]], list[Any]]
T = TypeVar("T")
# The name of the rows a statement carries (SQLite's VALUES list, PostgreSQL's unnest), joined to
# the table: a query plan scans them, never the table.
GIVEN = "given"


async def _on_sqlite(session: AsyncSession, work: Callable[[Run], T]) -> T:
    """``work`` on the session's SQLite connection, its statements run through SQLAlchemy (its
    events and error wrapping apply) in one hand-over to aiosqlite's thread each."""
    connection = await session.connection()

    def on(sync: Connection) -> T:
        def run(statement: str, parameters: Sequence[Any]) -> list[Any]:
            result = sync.exec_driver_sql(statement, tuple(parameters))
            return list(result.fetchall()) if result.returns_rows else []

        return work(run)

    return await connection.run_sync(on)


def _runs_on(connection: sqlite3.Connection) -> Run:
    """Statements run on a sqlite3 connection, as ``Run`` takes them."""
    return lambda statement, parameters: connection.execute(statement, parameters).fetchall()


def _insert_sqlite(
    run: Run, table: Table, rows: Sequence[Mapping[str, Any]], new_only: tuple[str, str] | None = None
) -> set[Any]:
    """Insert ``rows``; with ``new_only`` (a key column and a witness column, as
    ``insert_new_rows`` takes them), only those whose key is free, and return their keys."""
    columns = tuple(rows[0])
    key = None if new_only is None else new_only[0]
    inserted: set[Any] = set()
    for some in chunks(rows, rows_per_insert(len(columns))):
        values = _sqlite_values(table, columns, some)
        run(_sqlite_insert(table, columns, len(some), key), [value for row in values for value in row])
        if new_only is None:
            continue
        # What went in is read back under the write lock the INSERT took: the rows whose key
        # now holds their witness.
        at_key, at_witness = columns.index(new_only[0]), columns.index(new_only[1])
        given = [value for n, row in enumerate(values) for value in (row[at_key], row[at_witness], n)]
        [(listed,)] = run(_sqlite_went_in(table, *new_only, len(some)), given)
        inserted.update(some[int(n)][new_only[0]] for n in (listed.split(",") if listed else ()))
    return inserted


def _update_sqlite(run: Run, table: Table, keys: tuple[str, ...], rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``rows`` to the rows of ``table`` with their ``keys``."""
    others = _others(rows, keys)
    columns = (*keys, *others)
    for some in chunks(_last_by_key(rows, keys), rows_per_insert(len(columns))):
        values = _sqlite_values(table, columns, some)
        run(_sqlite_update(table, keys, others, len(some)), [value for row in values for value in row])


def _sqlite_values(
    table: Table, columns: tuple[str, ...], rows: Sequence[Mapping[str, Any]]
) -> list[tuple[Any, ...]]:
    """Each of ``rows``' values of ``columns``, as the driver takes them, row by row."""
    values = [
        _converted([row[name] for row in rows], convert)
        for name, convert in zip(columns, _converters("sqlite", table, columns), strict=True)
    ]
    return list(zip(*values, strict=True))


@lru_cache(maxsize=1024)
def _sqlite_insert(table: Table, columns: tuple[str, ...], count: int, skip_taken: str | None) -> str:
    names = ", ".join(_quoted(table, name) for name in columns)
    row = f"({', '.join('?' for _ in columns)})"
    skip = "" if skip_taken is None else f" ON CONFLICT ({_quoted(table, skip_taken)}) DO NOTHING"
    return f'INSERT INTO "{table.name}" ({names}) VALUES {", ".join([row] * count)}{skip}'


@lru_cache(maxsize=1024)
def _sqlite_went_in(table: Table, key: str, witness: str, count: int) -> str:
    """The positions (``n`` of each ``(key, witness, n)`` given) of the rows that hold their key."""
    return (
        f"SELECT group_concat({GIVEN}.column3) FROM (VALUES {', '.join(['(?, ?, ?)'] * count)}) AS {GIVEN} "
        f'JOIN "{table.name}" ON "{table.name}".{_quoted(table, key)} = {GIVEN}.column1 '
        f'AND "{table.name}".{_quoted(table, witness)} = {GIVEN}.column2'
    )


@lru_cache(maxsize=1024)
def _sqlite_update(table: Table, keys: tuple[str, ...], others: tuple[str, ...], count: int) -> str:
    row = f"({', '.join('?' for _ in (*keys, *others))})"
    assignments = ", ".join(
        f"{_quoted(table, name)} = {GIVEN}.column{len(keys) + n}" for n, name in enumerate(others, 1)
    )
    matched = " AND ".join(
        f'"{table.name}".{_quoted(table, name)} = {GIVEN}.column{n}' for n, name in enumerate(keys, 1)
    )
    return (
        f'UPDATE "{table.name}" SET {assignments} FROM (VALUES {", ".join([row] * count)}) AS {GIVEN} '
        f"WHERE {matched}"
    )


def _pg_parameters(table: Table, columns: tuple[str, ...], rows: Sequence[Mapping[str, Any]]) -> Any:
    """What asyncpg takes for ``rows`` in PostgreSQL's ``unnest``: one tuple of an array per
    column. Raises KeyError naming a column a row lacks."""
    return tuple(
        _converted([row[name] for row in rows], convert)
        for name, convert in zip(columns, _converters("postgresql", table, columns), strict=True)
    )


def _converted(values: list[Any], convert: Convert | None) -> list[Any]:
    """``values`` through ``convert``, each distinct value converted once: a herd's rows share
    their instants, and an instant's conversion is most of a row's cost."""
    if convert is None:
        return values
    done: dict[Any, Any] = {}
    converted = []
    for value in values:
        try:
            converted.append(done[value])
        except KeyError:
            converted.append(done.setdefault(value, convert(value)))
    return converted


@cache
def _insert_statement(table: Table, columns: tuple[str, ...], skip_taken: str | None = None) -> str:
    """PostgreSQL's INSERT of rows of ``columns``, one array each; with ``skip_taken``, one that
    skips a row whose value of that (unique) column is taken and returns it of the rows that
    went in."""
    names = ", ".join(_quoted(table, name) for name in columns)
    arrays = ", ".join(f"${i}::{_pg_type(table.c[name])}[]" for i, name in enumerate(columns, 1))
    if skip_taken is None:
        return f'INSERT INTO "{table.name}" ({names}) SELECT * FROM unnest({arrays})'
    taken = _quoted(table, skip_taken)
    return (
        f'INSERT INTO "{table.name}" ({names}) SELECT * FROM unnest({arrays}) '
        f"ON CONFLICT ({taken}) DO NOTHING RETURNING {taken}"
    )


@cache
def _update_statement(table: Table, keys: tuple[str, ...], others: tuple[str, ...]) -> str:
    """PostgreSQL's UPDATE of rows of ``keys`` then ``others``, one array each, by ``keys``."""
    columns = (*keys, *others)
    arrays = ", ".join(f"${i}::{_pg_type(table.c[name])}[]" for i, name in enumerate(columns, 1))
    names = ", ".join(_quoted(table, name) for name in columns)
    assignments = ", ".join(f"{_quoted(table, name)} = {GIVEN}.{_quoted(table, name)}" for name in others)
    matched = " AND ".join(
        f'"{table.name}".{_quoted(table, name)} = {GIVEN}.{_quoted(table, name)}' for name in keys
    )
    return (
        f'UPDATE "{table.name}" SET {assignments} FROM unnest({arrays}) AS {GIVEN}({names}) WHERE {matched}'
    )


def _quoted(table: Table, name: str) -> str:
    return f'"{table.c[name].name}"'


@cache
def _converters(dialect: str, table: Table, columns: tuple[str, ...]) -> tuple[Convert | None, ...]:
    return tuple(_converter(dialect, table.c[name]) for name in columns)


def _converter(dialect: str, column: Column[Any]) -> Convert | None:
    """How a value of ``column`` goes to the driver, as SQLAlchemy's bind processing sends it
    (None: as it is). Refuses a type cronfleet's tables do not use."""
    kind = column.type
    if isinstance(kind, UTCDateTime):
        return _sqlite_instant if dialect == "sqlite" else _naive_utc
    if isinstance(kind, String | Text | Integer | BigInteger | Float | Boolean):
        return None
    raise TypeError(f"no bulk conversion for {column.table.name}.{column.name} of type {kind!r}")


def _naive_utc(value: datetime | None) -> datetime | None:
    """UTCDateTime's stored form: the instant in UTC, without a zone."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError("store instants must be timezone-aware")
    return value.astimezone(UTC).replace(tzinfo=None)


def _sqlite_instant(value: datetime | None) -> str | None:
    """SQLAlchemy's SQLite DATETIME text of a UTCDateTime: ``YYYY-MM-DD HH:MM:SS.ffffff``, always
    with six digits of microseconds, so that stored instants compare as text."""
    naive = _naive_utc(value)
    return None if naive is None else naive.isoformat(" ", "microseconds")


_POSTGRESQL = postgresql.dialect()  # type: ignore[no-untyped-call]


def _pg_type(column: Column[Any]) -> str:
    """The array element type of ``column``'s values. Text goes as VARCHAR without its length, as
    SQLAlchemy sends it: a cast to VARCHAR(n) would cut a longer value short where the column
    refuses it."""
    if isinstance(column.type, String):  # Text too
        return "VARCHAR"
    return str(column.type.compile(dialect=_POSTGRESQL))
