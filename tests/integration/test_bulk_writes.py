"""Rows written through ``common.store.bulk`` are stored exactly as SQLAlchemy stores them: the
same values read back, the same text in the column (SQLite compares instants as text), on each
store; inserted ids come back in order, across chunks; updates touch only the rows named."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast

import pytest
from sqlalchemy import JSON, Column, Integer, MetaData, Table, select, text
from sqlalchemy.exc import DBAPIError

from common.store import AlertAttemptRow, FlipRow, Store, TriggerClaimRow, bulk

FLIPS = cast(Table, FlipRow.__table__)
ATTEMPTS = cast(Table, AlertAttemptRow.__table__)
AT = datetime(2026, 11, 28, 9, 0, 0, tzinfo=UTC)  # no microseconds: isoformat would drop them


def flip(job: str, **changes: Any) -> dict[str, Any]:
    """A flip row as the monitor writes it."""
    return {
        "alert": "pending",
        "alert_lease_until": AT + timedelta(seconds=60, microseconds=7),
        "job": job,
        "at": AT,
        "from_state": "late",
        "to_state": "down",
        "reason": "no run since it was due",
        "recovered_from": None,
        "created_at": AT.astimezone(timezone(timedelta(hours=-5))),  # another zone, the same instant
        **changes,
    }


async def stored(store: Store, ids: list[int]) -> dict[int, tuple[Any, ...]]:
    """Each flip's columns as SQLAlchemy reads them, and its instants' text as the store keeps it."""
    instant_text = "CAST(at AS TEXT) || '|' || CAST(alert_lease_until AS TEXT)"
    async with store.session() as session:
        rows = await session.execute(select(FLIPS).where(FLIPS.c.id.in_(ids)))
        values = {row.id: tuple(row._mapping[name] for name in flip("x")) for row in rows}
        texts = await session.execute(
            text(f"SELECT id, {instant_text} FROM flips WHERE id IN ({','.join(map(str, ids))})")
        )
        return {flip_id: (*values[flip_id], stored_text) for flip_id, stored_text in texts}


async def test_inserted_rows_read_back_and_are_stored_as_sqlalchemy_stores_them(store: Store) -> None:
    rows = [flip("bulk"), flip("bulk-2", alert=None, alert_lease_until=None, recovered_from="down")]
    async with store.session() as session, session.begin():
        ids = await bulk.insert_rows_with_ids(session, FLIPS, rows)
        reference = [
            (await session.execute(FLIPS.insert().values(row).returning(FLIPS.c.id))).scalar_one()
            for row in rows
        ]
    assert ids == sorted(ids) and len(set(ids)) == 2
    written, by_sqlalchemy = await stored(store, ids), await stored(store, reference)
    assert [written[i] for i in ids] == [by_sqlalchemy[i] for i in reference]
    assert written[ids[0]][:4] == ("pending", AT + timedelta(seconds=60, microseconds=7), "bulk", AT)


async def test_ids_follow_the_rows_order_across_chunks(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bulk, "BULK_ROWS", 7)
    monkeypatch.setattr(bulk, "rows_per_insert", lambda _columns: 3)
    rows = [flip(f"job-{i:02d}") for i in range(30)]
    async with store.session() as session, session.begin():
        ids = await bulk.insert_rows_with_ids(session, FLIPS, rows)
    assert ids == sorted(ids) and len(set(ids)) == 30
    async with store.session() as session:
        jobs = dict(list(await session.execute(select(FLIPS.c.id, FLIPS.c.job).where(FLIPS.c.id.in_(ids)))))
    assert [jobs[i] for i in ids] == [row["job"] for row in rows]


async def test_an_update_writes_the_columns_given_to_the_rows_named_and_no_other(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulk, "BULK_ROWS", 2)
    monkeypatch.setattr(bulk, "rows_per_insert", lambda _columns: 2)
    async with store.session() as session, session.begin():
        ids = await bulk.insert_rows_with_ids(session, FLIPS, [flip(f"u-{i}") for i in range(5)])
    later = AT + timedelta(hours=1, microseconds=1)
    changes = [{"id": i, "alert": "done", "alert_lease_until": None, "at": later} for i in ids[:4]]
    async with store.session() as session, session.begin():
        await bulk.update_rows(session, FLIPS, "id", changes)
    rows = await stored(store, ids)
    assert [rows[i][:4] for i in ids[:4]] == [("done", None, f"u-{n}", later) for n in range(4)]
    assert rows[ids[4]][:4] == ("pending", AT + timedelta(seconds=60, microseconds=7), "u-4", AT)


async def test_attempts_with_booleans_and_no_flip_read_back(store: Store) -> None:
    row = {
        "flip_id": None,
        "alert_id": "fleet/test",
        "kind": "test",
        "job": "j",
        "channel": "hook",
        "attempt": 1,
        "at": AT,
        "delivered": True,
        "error": None,
        "final": False,
        "retry_at": None,
    }
    async with store.session() as session, session.begin():
        await bulk.insert_rows(session, ATTEMPTS, [row])
    async with store.session() as session:
        [read] = await session.execute(select(ATTEMPTS).where(ATTEMPTS.c.alert_id == "fleet/test"))
    assert {name: read._mapping[name] for name in row} == row


async def test_a_column_type_it_does_not_know_is_refused_before_anything_is_written(store: Store) -> None:
    table = Table("not_bulk", MetaData(), Column("id", Integer, primary_key=True), Column("data", JSON))
    async with store.session() as session:
        with pytest.raises(TypeError, match=r"not_bulk.data"):
            await bulk.insert_rows(session, table, [{"id": 1, "data": {}}])


async def test_a_value_longer_than_its_column_is_refused_not_cut_on_postgresql(store: Store) -> None:
    if store.dialect != "postgresql":
        pytest.skip("SQLite keeps text of any length whatever the column says")
    async with store.session() as session:
        with pytest.raises(DBAPIError, match="too long"):
            await bulk.insert_rows(session, FLIPS, [flip("j" * 65)])


CLAIMS = cast(Table, TriggerClaimRow.__table__)


def claim(trigger_id: str, run_id: str) -> dict[str, Any]:
    """A claim row as a worker writes it."""
    return {
        "trigger_id": trigger_id,
        "body_sha256": "0" * 64,
        "run_id": run_id,
        "worker": "w",
        "claimed_at": AT,
        "lease_until": AT + timedelta(seconds=30, microseconds=1),
        "trigger_expires_at": AT + timedelta(hours=1),
    }


async def test_new_rows_go_in_and_those_whose_key_is_taken_do_not(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two rows with one key in one statement, on each store.
    monkeypatch.setattr(bulk, "BULK_ROWS", 3)
    monkeypatch.setattr(bulk, "rows_per_insert", lambda _columns: 3)
    async with store.session() as session, session.begin():
        assert await bulk.insert_new_rows(session, CLAIMS, "trigger_id", "run_id", [claim("t-1", "old")]) == {
            "t-1"
        }
    rows = [claim("t-1", "r-1"), claim("t-2", "r-2"), claim("t-2", "r-2b"), claim("t-3", "r-3")]
    async with store.session() as session, session.begin():
        inserted = await bulk.insert_new_rows(session, CLAIMS, "trigger_id", "run_id", rows)
    assert inserted == {"t-2", "t-3"}
    async with store.session() as session:
        held = dict(list(await session.execute(select(CLAIMS.c.trigger_id, CLAIMS.c.run_id))))
        [lease] = (
            await session.execute(select(CLAIMS.c.lease_until).where(CLAIMS.c.trigger_id == "t-3"))
        ).all()
    # Of two new rows with one key the first goes in; a taken key keeps its row.
    assert held == {"t-1": "old", "t-2": "r-2", "t-3": "r-3"}
    assert lease[0] == AT + timedelta(seconds=30, microseconds=1)


async def test_an_update_by_a_key_of_two_columns_touches_only_rows_matching_both(store: Store) -> None:
    async with store.session() as session, session.begin():
        await bulk.insert_rows(session, CLAIMS, [claim("k-1", "a"), claim("k-2", "b")])
    ended = AT + timedelta(minutes=1)
    changes = [
        {"trigger_id": "k-1", "run_id": "a", "finished_at": AT, "finished_event": "{}"},
        {"trigger_id": "k-2", "run_id": "not-b", "finished_at": ended, "finished_event": "{}"},
        # Of two rows for one key, the last is written.
        {"trigger_id": "k-1", "run_id": "a", "finished_at": ended, "finished_event": "{}"},
    ]
    async with store.session() as session, session.begin():
        await bulk.update_rows(session, CLAIMS, ("trigger_id", "run_id"), changes)
    async with store.session() as session:
        finished = dict(list(await session.execute(select(CLAIMS.c.trigger_id, CLAIMS.c.finished_at))))
    assert finished == {"k-1": ended, "k-2": None}
