"""The store's schema version: which Alembic revision a database is at, upgrading it, and refusing
to run against a schema this code was not written for.

A database made before migrations existed (tables, no ``alembic_version``) is recognised as the
baseline and stamped, then upgraded like any other.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from common.errors import SchemaMismatch

MIGRATIONS = Path(__file__).with_name("migrations")
BASELINE = "0001"
# The tables the baseline made: a database holding all of them but no version is a baseline one.
BASELINE_TABLES = frozenset({"jobs", "fires", "runs", "heartbeats", "job_state", "leases"})
# Two processes upgrading the same PostgreSQL database take turns on this advisory lock.
_UPGRADE_LOCK = 0x63726F6E  # "cron"


class SchemaState(enum.Enum):
    """How a database's schema compares with this code's."""

    CURRENT = "current"
    EMPTY = "empty"
    UNVERSIONED = "unversioned"  # made before migrations: the baseline without a version
    OLDER = "older"
    NEWER = "newer"


@dataclass(frozen=True)
class SchemaVersion:
    """Where a database is (``revision``, None when unversioned) against this code's ``head``."""

    state: SchemaState
    revision: str | None
    head: str


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    """The newest revision this code knows."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None, "the migrations have no head"
    return head


def _known_revisions() -> set[str]:
    return {script.revision for script in ScriptDirectory.from_config(_config()).walk_revisions()}


def _version(connection: Connection) -> SchemaVersion:
    head = head_revision()
    revision = MigrationContext.configure(connection).get_current_revision()
    if revision is not None:
        if revision == head:
            return SchemaVersion(SchemaState.CURRENT, revision, head)
        state = SchemaState.OLDER if revision in _known_revisions() else SchemaState.NEWER
        return SchemaVersion(state, revision, head)
    tables = set(inspect(connection).get_table_names())
    if not tables & BASELINE_TABLES:
        return SchemaVersion(SchemaState.EMPTY, None, head)
    if tables >= BASELINE_TABLES:
        return SchemaVersion(SchemaState.UNVERSIONED, None, head)
    missing = ", ".join(sorted(BASELINE_TABLES - tables))
    raise SchemaMismatch(f"the store holds some cronfleet tables but not {missing}: restore it from a backup")


async def schema_version(engine: AsyncEngine) -> SchemaVersion:
    """Where the database behind ``engine`` is, against this code's head revision."""
    async with engine.connect() as connection:
        return await connection.run_sync(_version)


def _upgrade(connection: Connection, target: str) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _UPGRADE_LOCK})
    version = _version(connection)
    if version.state is SchemaState.NEWER:
        raise SchemaMismatch(f"the store {_newer(version)}")
    config = _config()
    config.attributes["connection"] = connection
    if version.state is SchemaState.UNVERSIONED:
        command.stamp(config, BASELINE)
    command.upgrade(config, target)


async def upgrade(engine: AsyncEngine, target: str = "head") -> SchemaVersion:
    """Bring the database to ``target`` (default: this code's head), in one transaction where the
    database allows it, and return where it is now. Safe to run from several processes at once.

    Raises SchemaMismatch when the database is newer than this code.
    """
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade, target)
    return await schema_version(engine)


def require_current(version: SchemaVersion, where: str) -> None:
    """Raise SchemaMismatch, in one line saying what to do, unless ``version`` is current."""
    match version.state:
        case SchemaState.CURRENT:
            return
        case SchemaState.EMPTY:
            reason = "has no cronfleet tables yet"
        case SchemaState.UNVERSIONED:
            reason = "was made by a cronfleet older than its migrations"
        case SchemaState.OLDER:
            reason = f"is at schema revision {version.revision}, older than this cronfleet's {version.head}"
        case SchemaState.NEWER:
            raise SchemaMismatch(f"the store at {where} {_newer(version)}")
    raise SchemaMismatch(f"the store at {where} {reason}: run `cronfleet db upgrade`")


def _newer(version: SchemaVersion) -> str:
    return (
        f"is at schema revision {version.revision}, newer than this cronfleet knows "
        f"(its newest is {version.head}): upgrade cronfleet"
    )
