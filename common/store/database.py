"""Opening the store: an async engine on SQLite (WAL) or PostgreSQL, at this code's schema version."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from common.errors import ConfigError, CronfleetError, StatementTooLarge, StoreUnavailable
from common.store import schema
from common.store.schema import SchemaVersion
from common.store.sqlite_writer import SqliteWriter

# What "the database is not there right now" looks like, as opposed to a bad statement (and a
# transaction the server rolled back to settle a conflict: see _rolled_back_as_outage). sqlite3's
# own OperationalError comes from the writer that bypasses SQLAlchemy (``SqliteWriter``).
STORE_OUTAGES = (OperationalError, InterfaceError, OSError, TimeoutError, sqlite3.OperationalError)

# PostgreSQL (asyncpg) takes at most 32,767 bind parameters in one statement and stock SQLite
# builds 32,766. No statement may come near: statements are chunked (``common.store.chunks``), and
# one that grows past this anyway is refused here, on every database, before the driver sees it.
MAX_STATEMENT_PARAMETERS = 16_000


class Store:
    """An open database: an engine and a session factory."""

    def __init__(self, engine: AsyncEngine, schema_name: str | None = None) -> None:
        self.engine = engine
        self.schema_name = schema_name
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._sqlite_writer: SqliteWriter | None = None

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    @property
    def where(self) -> str:
        """The database's URL without its password, for messages."""
        return self.engine.url.render_as_string(hide_password=True)

    @classmethod
    async def connect(cls, url: str, schema_name: str | None = None) -> Store:
        """Connect to ``url`` (an async SQLAlchemy URL) whatever its schema version.

        On PostgreSQL, ``schema_name`` (created if needed) holds the tables. Raises
        StoreUnavailable with the reason in one line.
        """
        engine = _engine(url, schema_name)
        try:
            async with engine.begin() as connection:
                if schema_name and engine.dialect.name == "postgresql":
                    # Looked up first: a role without CREATE on the database (a worker's) is
                    # refused even CREATE SCHEMA IF NOT EXISTS of a schema that exists.
                    exists = await connection.scalar(
                        text("SELECT 1 FROM pg_namespace WHERE nspname = :name"), {"name": schema_name}
                    )
                    if not exists:
                        await connection.execute(text(f'CREATE SCHEMA "{schema_name}"'))
        except (SQLAlchemyError, OSError) as exc:
            await engine.dispose()
            raise _unavailable(engine, exc) from exc
        return cls(engine, schema_name)

    @property
    def url(self) -> str:
        """The database's URL, password included (never print it: see ``where``)."""
        return self.engine.url.render_as_string(hide_password=False)

    @classmethod
    async def open(cls, url: str, schema_name: str | None = None, *, upgrade: bool = False) -> Store:
        """Connect to ``url`` and make sure its schema is the one this code was written for.

        With ``upgrade``, an older (or empty) schema is first migrated to this code's head.
        Raises SchemaMismatch, in one line saying what to do, when the schema is not current,
        and StoreUnavailable when the database cannot be reached.
        """
        store = await cls.connect(url, schema_name)
        try:
            version = await (store.upgrade() if upgrade else store.schema_version())
            schema.require_current(version, store.where)
        except BaseException:
            await store.close()
            raise
        return store

    async def schema_version(self) -> SchemaVersion:
        """Where this database's schema is, against this code's head revision."""
        try:
            return await schema.schema_version(self.engine)
        except (SQLAlchemyError, OSError) as exc:
            raise _unavailable(self.engine, exc) from exc

    async def upgrade(self, target: str = "head") -> SchemaVersion:
        """Migrate this database to ``target``; see ``common.store.schema.upgrade``."""
        try:
            return await schema.upgrade(self.engine, target)
        except CronfleetError:
            raise
        except (SQLAlchemyError, OSError) as exc:
            raise _unavailable(self.engine, exc) from exc

    async def close(self) -> None:
        """Release every connection."""
        if self._sqlite_writer is not None:
            await self._sqlite_writer.close()
        await self.engine.dispose()

    def sqlite_writer(self) -> SqliteWriter | None:
        """The writer of whole transactions, each one call on a thread of its own
        (``common.store.sqlite_writer``), on this store's SQLite database file; None on
        PostgreSQL, or on SQLite in memory or opened with URL options, where a connection of its
        own would not be the same database."""
        url = self.engine.url
        if self.dialect != "sqlite" or not url.database or url.database == ":memory:" or url.query:
            return None
        if self._sqlite_writer is None:
            self._sqlite_writer = SqliteWriter(url.database)
        return self._sqlite_writer

    def session(self) -> AsyncSession:
        """A new session; use ``async with store.session() as s, s.begin():``."""
        return self.sessions()


# SQLSTATE classes that no amount of waiting fixes: invalid authorization (a wrong user or
# password) and access rule violations (no right to connect or to a table).
_REFUSALS = ("28", "42")


def _unavailable(engine: AsyncEngine, exc: BaseException) -> StoreUnavailable | ConfigError:
    reason = getattr(exc, "orig", None) or exc
    where = engine.url.render_as_string(hide_password=True)
    sqlstate = str(getattr(reason, "sqlstate", "") or "")
    if sqlstate[:2] in _REFUSALS:
        return ConfigError(f"the store at {where} refused us: {reason} (check the user and its rights)")
    return StoreUnavailable(f"cannot open the store at {where}: {reason}")


def postgresql_settings(schema_name: str | None) -> dict[str, str]:
    """The settings of every PostgreSQL connection of a store: its schema first on the search
    path, and a plan made for each execution's own values (``plan_cache_mode``).

    A prepared statement run five times may switch to a generic plan, made without the values.
    For ``job IN ($1, ..., $1000)`` on a table the planner believes small (never analysed: a
    fleet just applied), that plan is a sequential scan comparing every row with each of the
    1,000 values in turn: 0.5 s per chunk, 2.5 s to lock 5,000 health records for a herd's tick,
    instead of 10 ms with the values known (PostgreSQL then hashes the list)."""
    settings = {"plan_cache_mode": "force_custom_plan"}
    if schema_name:
        settings["search_path"] = schema_name
    return settings


def _engine(url: str, schema_name: str | None) -> AsyncEngine:
    options: dict[str, Any] = {}
    if url.startswith("sqlite"):
        options["connect_args"] = {"timeout": 30}
    else:
        options["connect_args"] = {"server_settings": postgresql_settings(schema_name)}
    engine = create_async_engine(url, **options)
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    event.listen(engine.sync_engine, "before_cursor_execute", _refuse_huge_statements)
    event.listen(engine.sync_engine, "handle_error", _rolled_back_as_outage)
    return engine


# SQLSTATEs of a transaction PostgreSQL rolled back to settle a conflict with another: a
# deadlock (40P01) or a serialization failure (40001). Nothing of it was written, and the same
# work done again goes through. psycopg counts them as OperationalError; asyncpg's SQLAlchemy
# dialect leaves them as a bare DBAPIError, which no caller would retry.
_ROLLED_BACK_BY_THE_SERVER = frozenset({"40P01", "40001"})


def _rolled_back_as_outage(context: ExceptionContext) -> BaseException | None:
    """A transaction rolled back by the server to break a deadlock or a serialization conflict is
    raised as an OperationalError (in STORE_OUTAGES): every caller then does what it does in a
    store outage, retry or hand the work back, rather than treat it as a bug."""
    original = context.original_exception
    if getattr(original, "sqlstate", None) not in _ROLLED_BACK_BY_THE_SERVER:
        return None
    if isinstance(context.sqlalchemy_exception, OperationalError):
        return None  # a driver that classes it so already
    return OperationalError(context.statement, context.parameters, original)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def statement_parameters(parameters: Any, executemany: bool) -> int:
    """How many bind parameters one execution of a statement carries (per row for executemany).

    SQLAlchemy's "insertmanyvalues" (an ORM flush of many rows, an INSERT ... RETURNING of many)
    reports each of its batches as an executemany whose parameters are already one flat row of
    every value: that row is what one statement carries."""
    if executemany:
        if not parameters:
            return 0
        first = parameters[0]
        return len(first) if isinstance(first, Mapping | list | tuple) else len(parameters)
    return len(parameters) if parameters else 0


def _refuse_huge_statements(
    _connection: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, executemany: bool
) -> None:
    count = statement_parameters(parameters, executemany)
    if count > MAX_STATEMENT_PARAMETERS:
        raise StatementTooLarge(
            f"a statement with {count} bind parameters (at most {MAX_STATEMENT_PARAMETERS}): "
            f"{statement[:80]!r}... must be chunked"
        )


def dialect_insert(dialect: str, table: Any) -> postgresql.Insert | sqlite.Insert:
    """An INSERT for ``table`` in ``dialect``, with ``on_conflict_do_nothing`` available."""
    if dialect == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)
