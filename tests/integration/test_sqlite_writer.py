"""The SQLite writer of a worker's claims (``common.store.sqlite_writer``): a transaction is whole
or nothing, another process's write lock held past the timeout is a store outage (the trigger
goes back to the broker), and the writer carries on once the lock is free."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import timedelta

import pytest
from sqlalchemy import text

from common.clock import utcnow
from common.errors import StoreUnavailable
from common.store import Store, sqlite_writer
from common.trigger_claims import ClaimOutcome, TriggerClaims


def _writer_of(store: Store) -> sqlite_writer.SqliteWriter:
    writer = store.sqlite_writer()
    if writer is None:
        assert store.dialect == "postgresql"  # the writer is SQLite's own
        pytest.skip("PostgreSQL's writes go through its connections")
    return writer


async def _claims_held(store: Store) -> list[str]:
    async with store.session() as session:
        return list((await session.execute(text("SELECT trigger_id FROM trigger_claims"))).scalars())


async def test_a_transaction_that_raises_writes_nothing(store: Store) -> None:
    writer = _writer_of(store)

    def half_done(connection: sqlite3.Connection) -> None:
        connection.execute(
            "INSERT INTO trigger_claims (trigger_id, body_sha256, run_id, worker, claimed_at, "
            "lease_until, trigger_expires_at) VALUES ('half', '', 'r', 'w', '', '', '')"
        )
        raise RuntimeError("a bug after the first statement")

    with pytest.raises(RuntimeError, match="a bug"):
        await writer.transaction(half_done)
    assert await _claims_held(store) == []
    assert await writer.transaction(lambda connection: connection.in_transaction) is True


async def test_a_write_lock_held_past_the_timeout_is_an_outage_and_the_writer_carries_on(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = _writer_of(store)
    monkeypatch.setattr(sqlite_writer, "LOCK_TIMEOUT_SECONDS", 0.2)
    claims = TriggerClaims(store, "worker-1", timedelta(seconds=30))
    now = utcnow()
    # Another process (here a connection of the test's own) holds SQLite's write lock.
    other = sqlite3.connect(writer.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailable, match="database is locked"):
            await claims.claim("job@1", "0" * 64, "run-1", now + timedelta(hours=1), now)
    finally:
        other.execute("ROLLBACK")
        other.close()
    claim = await claims.claim("job@1", "0" * 64, "run-2", now + timedelta(hours=1), now)
    assert claim.outcome is ClaimOutcome.RUN
    assert await _claims_held(store) == ["job@1"]


async def test_a_store_closed_while_its_writer_waits_for_the_lock_does_not_wait_with_it(store: Store) -> None:
    writer = _writer_of(store)
    claims = TriggerClaims(store, "worker-1", timedelta(seconds=30))
    now = utcnow()
    other = sqlite3.connect(writer.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        waiting = asyncio.create_task(claims.claim("job@2", "0" * 64, "run-1", now + timedelta(hours=1), now))
        await asyncio.sleep(1)  # the claim now waits for the lock the other connection holds
        assert not waiting.done()
        # Far less than the 30 s the claim would wait for the lock: closing does not wait for it.
        await asyncio.wait_for(store.close(), timeout=20)
        with pytest.raises(StoreUnavailable, match="database is locked"):
            await waiting
    finally:
        other.execute("ROLLBACK")
        other.close()
