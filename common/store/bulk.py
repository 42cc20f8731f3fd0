"""Writing many rows at once in the driver's own terms: the monitor's hot writes (a herd of jobs
turning ``down``, a batch of runs) without SQLAlchemy's per-value work.

SQLAlchemy compiles a statement and runs each value through its column type's bind processor;
for 5,000 flips that was 0.4 s of a herd's 1.1 s. Here each table's statement is written once per
dialect and each column converted by one plain function, chosen by its type, the same conversion
SQLAlchemy does (``tests/integration/test_bulk_writes.py`` compares the stored values and text).
Statements still go through SQLAlchemy's connection (``exec_driver_sql``): the store's events
(the parameter limit, a deadlock counted as an outage) and its error wrapping apply.

- SQLite: one executemany of a one-row statement (the database is in process: a statement per
  row costs no round trip). Inserted ids are read back as the rowids SQLite hands out in order to
  the one writer holding its lock, and checked.
- PostgreSQL: one statement per chunk carrying one array per column (``unnest``), whatever the
  rows; the ids of an INSERT are taken from the table's sequence first, in order.

Only the column types cronfleet's tables use are known; another type is refused when a statement
for it is built, never stored in a form SQLAlchemy would not read back.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from functools import cache
from typing import Any

from sqlalchemy import BigInteger, Boolean, Column, Float, Integer, String, Table, Text
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession

from common.store.chunks import IN_LIST_CHUNK, chunks
from common.store.locks import dialect_of
from common.store.models import UTCDateTime

# Rows per statement (PostgreSQL) or per executemany (SQLite): bounded, whatever the rows.
BULK_ROWS = 5000

Convert = Callable[[Any], Any]


async def insert_rows(session: AsyncSession, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert ``rows`` (each with the same columns of ``table``) in the session's transaction."""
    if not rows:
        return
    dialect, columns = dialect_of(session), tuple(rows[0])
    connection = await session.connection()
    statement = _insert_statement(dialect, table, columns)
    for some in chunks(rows, BULK_ROWS):
        await connection.exec_driver_sql(statement, _parameters(dialect, table, columns, some))


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
    dialect, columns = dialect_of(session), tuple(rows[0])
    connection = await session.connection()
    statement = _insert_statement(dialect, table, columns, skip_taken=key)
    inserted: set[Any] = set()
    for some in chunks(rows, BULK_ROWS):
        parameters = _parameters(dialect, table, columns, some)
        if dialect == "postgresql":
            inserted.update((await connection.exec_driver_sql(statement, parameters)).scalars())
            continue
        await connection.exec_driver_sql(statement, parameters)
        for query, keys in _held_queries(table, key, witness, some):
            inserted |= _went_in(await connection.exec_driver_sql(query, keys), some, key, witness)
    return inserted


def insert_new_rows_now(
    connection: sqlite3.Connection, table: Table, key: str, witness: str, rows: Sequence[Mapping[str, Any]]
) -> set[Any]:
    """``insert_new_rows`` on a SQLite connection of one's own (``common.store.sqlite_writer``),
    in its transaction."""
    if not rows:
        return set()
    columns = tuple(rows[0])
    statement = _insert_statement("sqlite", table, columns, skip_taken=key)
    inserted: set[Any] = set()
    for some in chunks(rows, BULK_ROWS):
        connection.executemany(statement, _parameters("sqlite", table, columns, some))
        for query, keys in _held_queries(table, key, witness, some):
            inserted |= _went_in(connection.execute(query, keys), some, key, witness)
    return inserted


def _held_queries(
    table: Table, key: str, witness: str, rows: Sequence[Mapping[str, Any]]
) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """The SELECTs (and their parameters) that read back, on SQLite, each of ``rows``' keys with
    the ``witness`` of the row holding it. SQLite's executemany hands back no rows: what went in
    is read back under the write lock the transaction holds since its INSERT."""
    keys = list(dict.fromkeys(row[key] for row in rows))
    for few in chunks(keys, IN_LIST_CHUNK):
        query = (
            f'SELECT {_quoted(table, key)}, {_quoted(table, witness)} FROM "{table.name}" '
            f"WHERE {_quoted(table, key)} IN ({', '.join('?' for _ in few)})"
        )
        yield query, tuple(few)


def _went_in(
    held: Iterable[Sequence[Any]], rows: Sequence[Mapping[str, Any]], key: str, witness: str
) -> set[Any]:
    """The keys whose row, as ``held`` reads it back, is one of ``rows``."""
    mine = {(row[key], row[witness]) for row in rows}
    return {held_key for held_key, held_witness in held if (held_key, held_witness) in mine}


async def update_rows(
    session: AsyncSession, table: Table, key: str | tuple[str, ...], rows: Sequence[Mapping[str, Any]]
) -> None:
    """Write ``rows`` (each the key column ``key``, or every column of a key of several, and the
    same other columns of ``table``) to the rows of ``table`` with that key."""
    dialect = dialect_of(session)
    plan = _update_plan(dialect, table, key, rows)
    if plan is None:
        return
    statement, columns = plan
    connection = await session.connection()
    for some in chunks(rows, BULK_ROWS):
        await connection.exec_driver_sql(statement, _parameters(dialect, table, columns, some))


def update_rows_now(
    connection: sqlite3.Connection,
    table: Table,
    key: str | tuple[str, ...],
    rows: Sequence[Mapping[str, Any]],
) -> None:
    """``update_rows`` on a SQLite connection of one's own (``common.store.sqlite_writer``), in
    its transaction."""
    plan = _update_plan("sqlite", table, key, rows)
    if plan is None:
        return
    statement, columns = plan
    for some in chunks(rows, BULK_ROWS):
        connection.executemany(statement, _parameters("sqlite", table, columns, some))


def _update_plan(
    dialect: str, table: Table, key: str | tuple[str, ...], rows: Sequence[Mapping[str, Any]]
) -> tuple[str, tuple[str, ...]] | None:
    """The UPDATE of ``rows`` by ``key`` and the order of its parameters' columns; None when
    there is nothing to write."""
    if not rows:
        return None
    keys = (key,) if isinstance(key, str) else key
    others = tuple(name for name in rows[0] if name not in keys)
    if not others:
        return None
    # The order of the statement's parameters: the key first in PostgreSQL's join, last in
    # SQLite's WHERE.
    columns = (*keys, *others) if dialect == "postgresql" else (*others, *keys)
    return _update_statement(dialect, table, keys, others), columns


def _parameters(
    dialect: str, table: Table, columns: tuple[str, ...], rows: Sequence[Mapping[str, Any]]
) -> Any:
    """What the driver takes for ``rows``: a tuple per row (SQLite's executemany), or one tuple of
    an array per column (PostgreSQL's ``unnest``). Raises KeyError naming a column a row lacks."""
    values = [
        _converted([row[name] for row in rows], convert)
        for name, convert in zip(columns, _converters(dialect, table, columns), strict=True)
    ]
    return tuple(values) if dialect == "postgresql" else list(zip(*values, strict=True))


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
def _insert_statement(
    dialect: str, table: Table, columns: tuple[str, ...], skip_taken: str | None = None
) -> str:
    """The INSERT of rows of ``columns``; with ``skip_taken``, one that skips a row whose value of
    that (unique) column is taken and, on PostgreSQL, returns it of the rows that went in."""
    names = ", ".join(_quoted(table, name) for name in columns)
    skip = "" if skip_taken is None else f" ON CONFLICT ({_quoted(table, skip_taken)}) DO NOTHING"
    if dialect == "postgresql":
        arrays = ", ".join(f"${i}::{_pg_type(table.c[name])}[]" for i, name in enumerate(columns, 1))
        returning = "" if skip_taken is None else f" RETURNING {_quoted(table, skip_taken)}"
        return f'INSERT INTO "{table.name}" ({names}) SELECT * FROM unnest({arrays}){skip}{returning}'
    return f'INSERT INTO "{table.name}" ({names}) VALUES ({", ".join("?" for _ in columns)}){skip}'


@cache
def _update_statement(dialect: str, table: Table, keys: tuple[str, ...], others: tuple[str, ...]) -> str:
    if dialect == "postgresql":
        columns = (*keys, *others)
        arrays = ", ".join(f"${i}::{_pg_type(table.c[name])}[]" for i, name in enumerate(columns, 1))
        given = ", ".join(_quoted(table, name) for name in columns)
        assignments = ", ".join(f"{_quoted(table, name)} = given.{_quoted(table, name)}" for name in others)
        matched = " AND ".join(
            f'"{table.name}".{_quoted(table, name)} = given.{_quoted(table, name)}' for name in keys
        )
        return (
            f'UPDATE "{table.name}" SET {assignments} FROM unnest({arrays}) AS given({given}) WHERE {matched}'
        )
    assignments = ", ".join(f"{_quoted(table, name)} = ?" for name in others)
    matched = " AND ".join(f"{_quoted(table, name)} = ?" for name in keys)
    return f'UPDATE "{table.name}" SET {assignments} WHERE {matched}'


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
