"""Opening the store: an async engine on SQLite (WAL) or PostgreSQL, and its tables."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from common.errors import StoreUnavailable
from common.store.models import Base

# What "the database is not there right now" looks like, as opposed to a bad statement.
STORE_OUTAGES = (OperationalError, InterfaceError, OSError, TimeoutError)


class Store:
    """An open database: an engine and a session factory. ``open`` creates missing tables."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    @classmethod
    async def open(cls, url: str, schema: str | None = None) -> Store:
        """Connect to ``url`` (an async SQLAlchemy URL) and create the tables that are missing.

        On PostgreSQL, ``schema`` (created if needed) holds the tables. Raises StoreUnavailable
        with the reason in one line.
        """
        engine = _engine(url, schema)
        try:
            async with engine.begin() as connection:
                if schema and engine.dialect.name == "postgresql":
                    await connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
                await connection.run_sync(Base.metadata.create_all)
        except (SQLAlchemyError, OSError) as exc:
            await engine.dispose()
            reason = getattr(exc, "orig", None) or exc
            raise StoreUnavailable(
                f"cannot open the store at {engine.url.render_as_string(hide_password=True)}: {reason}"
            ) from exc
        return cls(engine)

    async def close(self) -> None:
        """Release every connection."""
        await self.engine.dispose()

    def session(self) -> AsyncSession:
        """A new session; use ``async with store.session() as s, s.begin():``."""
        return self.sessions()


def _engine(url: str, schema: str | None) -> AsyncEngine:
    options: dict[str, Any] = {}
    if url.startswith("sqlite"):
        options["connect_args"] = {"timeout": 30}
    elif schema:
        options["connect_args"] = {"server_settings": {"search_path": schema}}
    engine = create_async_engine(url, **options)
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def dialect_insert(dialect: str, table: Any) -> postgresql.Insert | sqlite.Insert:
    """An INSERT for ``table`` in ``dialect``, with ``on_conflict_do_nothing`` available."""
    if dialect == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)
