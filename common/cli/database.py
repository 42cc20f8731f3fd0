"""``cronfleet db``: the store's schema version, upgrading it, purging old history, and a
worker's PostgreSQL rights."""

from __future__ import annotations

import argparse

from sqlalchemy import text

from common.clock import utcnow
from common.durations import parse_duration
from common.errors import ConfigError
from common.settings import Settings
from common.store import Store
from common.store.grants import worker_grants
from common.store.retention import purge
from common.store.schema import SchemaState, require_current


async def _connect(settings: Settings) -> Store:
    return await Store.connect(settings.database_url, settings.database_schema)


async def upgrade(settings: Settings, args: argparse.Namespace) -> int:
    """``cronfleet db upgrade``: migrate the store to this cronfleet's schema (idempotent)."""
    store = await _connect(settings)
    try:
        before = await store.schema_version()
        after = await store.upgrade()
    finally:
        await store.close()
    if before.revision == after.revision:
        print(f"already at revision {after.revision} (head)")
    else:
        print(f"upgraded from {before.revision or before.state.value} to revision {after.revision} (head)")
    return 0


async def current(settings: Settings, args: argparse.Namespace) -> int:
    """``cronfleet db current``: the store's schema revision; exits 1 unless it is this code's."""
    store = await _connect(settings)
    try:
        version = await store.schema_version()
    finally:
        await store.close()
    if version.state is SchemaState.CURRENT:
        print(f"{version.revision} (head)")
        return 0
    print(f"{version.revision or version.state.value} (this cronfleet's head is {version.head})")
    require_current(version, store.where)  # raises the one line that says what to do
    return 1


async def purge_history(settings: Settings, args: argparse.Namespace) -> int:
    """``cronfleet db purge --older-than 30d``: delete finished runs, heartbeats and fires
    older than that, in small batches."""
    try:
        older_than = parse_duration(args.older_than)
    except ValueError as exc:
        raise ConfigError(f"--older-than: {exc}") from exc
    store = await Store.open(settings.database_url, settings.database_schema)
    try:
        purged = await purge(store, older_than, utcnow())
    finally:
        await store.close()
    print(f"purged {purged} older than {args.older_than}")
    return 0


async def grant_worker(settings: Settings, args: argparse.Namespace) -> int:
    """``cronfleet db grant-worker ROLE [--apply]``: print (or run) the GRANTs that let a
    PostgreSQL role run workers and nothing more."""
    if not settings.database_url.startswith("postgresql"):
        raise ConfigError(
            "grant-worker is for PostgreSQL: with SQLite every process runs on the host that has the file"
        )
    statements = worker_grants(args.role, settings.database_schema)
    if not args.apply:
        print("".join(f"{statement};\n" for statement in statements), end="")
        return 0
    store = await Store.open(settings.database_url, settings.database_schema)
    try:
        async with store.engine.begin() as connection:
            for statement in statements:
                await connection.execute(text(statement))
    finally:
        await store.close()
    print(f"granted {args.role} the rights of a worker on {store.where}")
    return 0
