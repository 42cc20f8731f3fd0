"""The store evolves without losing data: baseline databases upgrade to head with everything in
them, the models and the migrations agree, and no process runs against a schema it was not
written for. Each test runs on SQLite and, when configured, PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError

from common.errors import SchemaMismatch
from common.messages import HeartbeatKind, RunStatus
from common.settings import Settings, normalise_database_url
from common.store import Store
from common.store.models import (
    ALARM_STATES,
    HEALTH_STATES,
    Base,
    FlipRow,
    HeartbeatRow,
    JobHealthRow,
    RunRow,
)
from common.store.schema import BASELINE, SchemaState, head_revision
from monitor.health import ALARM_STATES as MACHINE_ALARM_STATES
from monitor.health import State
from tests.conftest import AMQP_URL, POSTGRES_URL, STORES, TEST_KEYS
from tests.fleet import run_cronfleet

T0 = datetime(2026, 11, 1, 12, 0)  # naive UTC, as the columns hold instants

# One row per baseline table, as the cronfleet of before migrations wrote them.
BASELINE_ROWS: dict[str, list[dict[str, Any]]] = {
    "jobs": [
        {
            "name": "backup",
            "spec": '{"name":"backup","schedule":"0 3 * * *"}',
            "fingerprint": "f" * 16,
            "pool": "default",
            "enabled": True,
            "created_at": T0,
            "updated_at": T0,
        }
    ],
    "fires": [
        {
            "trigger_id": "backup@2026-11-01T03:00:00Z",
            "job": "backup",
            "scheduled_at": T0,
            "expires_at": T0,
            "claimed_by": "scheduler-1",
            "claimed_at": T0,
            "published_at": T0,
            "pool": "default",
            "manual": False,
            "body": "{}",
        }
    ],
    "runs": [
        {
            "run_id": "r1",
            "trigger_id": "backup@2026-11-01T03:00:00Z",
            "job": "backup",
            "source": "worker",
            "pool": "default",
            "worker": "w1",
            "redelivered": False,
            "status": "failed",
            "scheduled_at": T0,
            "started_at": T0,
            "finished_at": T0,
            "duration_seconds": 1.5,
            "exit_code": 3,
            "http_status": None,
            "output_tail": "disk full",
            "error": "exit code 3",
        }
    ],
    "heartbeats": [
        {"id": "hb1", "job": "outside", "kind": "success", "exit_code": 0, "at": T0, "message": "ok"}
    ],
    "job_state": [
        {
            "job": "backup",
            "last_run_id": "r1",
            "last_status": "failed",
            "last_started_at": T0,
            "last_finished_at": T0,
            "next_expected_at": T0,
            "consecutive_failures": 1,
            "updated_at": T0,
        }
    ],
    "leases": [{"name": "scheduler", "holder": "s1", "epoch": 7, "expires_at": T0}],
}


@pytest.fixture(params=STORES)
async def blank(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A connected store with nothing in it, at no schema version."""
    if request.param == "sqlite":
        store = await Store.connect(f"sqlite+aiosqlite:///{tmp_path / 'old.db'}")
        yield store
        await store.close()
        return
    schema = f"m_{uuid.uuid4().hex[:10]}"
    store = await Store.connect(normalise_database_url(POSTGRES_URL), schema)
    yield store
    async with store.engine.begin() as connection:
        await connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    await store.close()


async def _insert_baseline_rows(store: Store) -> None:
    async with store.engine.begin() as connection:
        for table, rows in BASELINE_ROWS.items():
            for row in rows:
                columns = ", ".join(row)
                values = ", ".join(f":{c}" for c in row)
                await connection.execute(text(f"INSERT INTO {table} ({columns}) VALUES ({values})"), row)


# Columns a migration fills in rows it finds: 0011 marks an enabled job whose spec has an action
# as planned (the baseline job has no action key at all, so it counts as one, until a scheduler
# reads its spec) and stamps version 0; 0013 makes every run found attempt 1.
FILLED: dict[str, dict[str, Any]] = {"jobs": {"planned": 1, "version": 0}, "runs": {"attempt": 1}}


async def _rows(store: Store, table: str) -> list[dict[str, Any]]:
    async with store.engine.connect() as connection:
        result = await connection.execute(text(f"SELECT * FROM {table}"))
        return [_plain(dict(row._mapping)) for row in result]


async def _baseline_rows_kept(store: Store) -> None:
    """Every baseline row is still there, as it was; columns added since are empty in them, but
    for those a migration fills from what the row holds."""
    for table, rows in BASELINE_ROWS.items():
        found = await _rows(store, table)
        added = [{k: v for k, v in row.items() if k not in rows[0]} for row in found]
        filled = [{k: row.pop(k) for k in FILLED.get(table, {}) if k in row} for row in added]
        assert all(v is None for row in added for v in row.values()), (table, added)
        assert all(row == FILLED.get(table, {}) for row in filled), (table, filled)
        assert [{k: row[k] for k in rows[0] if k in row} for row in found] == rows, table


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    # SQLite gives booleans back as 0/1 and instants as text: compare what the values mean.
    return {
        k: (bool(v) if k in ("enabled", "manual", "redelivered") else _instant(v)) for k, v in row.items()
    }


def _instant(value: Any) -> Any:
    if isinstance(value, str) and value[:4].isdigit() and len(value) >= 19 and value[10] in " T":
        return datetime.fromisoformat(value)
    return value


async def test_a_baseline_database_with_data_upgrades_to_head_and_keeps_everything(blank: Store) -> None:
    at_baseline = await blank.upgrade(BASELINE)
    assert at_baseline.revision == BASELINE and at_baseline.state is SchemaState.OLDER
    await _insert_baseline_rows(blank)

    upgraded = await blank.upgrade()

    assert upgraded.state is SchemaState.CURRENT and upgraded.revision == head_revision()
    await _baseline_rows_kept(blank)
    again = await blank.upgrade()  # idempotent
    assert again.revision == head_revision()


async def test_a_database_made_before_migrations_is_recognised_and_upgraded(blank: Store) -> None:
    await blank.upgrade(BASELINE)
    await _insert_baseline_rows(blank)
    async with blank.engine.begin() as connection:
        await connection.execute(text("DROP TABLE alembic_version"))
    assert (await blank.schema_version()).state is SchemaState.UNVERSIONED
    with pytest.raises(SchemaMismatch, match="older than its migrations: run `cronfleet db upgrade`"):
        await Store.open(blank.url, blank.schema_name)

    assert (await blank.upgrade()).state is SchemaState.CURRENT
    await _baseline_rows_kept(blank)


async def test_models_and_migrations_agree(blank: Store) -> None:
    await blank.upgrade()

    def differences(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))

    async with blank.engine.connect() as connection:
        found = await connection.run_sync(differences)
    assert found == [], f"the models differ from the migrations: add a revision ({found})"


async def test_every_status_the_code_writes_fits_the_checks_and_nothing_else_does(blank: Store) -> None:
    await blank.upgrade()
    now = datetime.now(UTC)
    async with blank.session() as session, session.begin():
        for status in RunStatus:
            session.add(
                RunRow(run_id=status.value, job="j", source="worker", status=status.value, started_at=now)
            )
        for kind in HeartbeatKind:
            session.add(HeartbeatRow(id=kind.value, job="j", kind=kind.value, at=now))
        for state in State:
            alarm = state.value if state in MACHINE_ALARM_STATES else None
            session.add(_health(state.value, now, open_alarm=alarm))
            session.add(_flip(state.value, state.value, now, recovered_from=alarm))
    for bad in (
        RunRow(run_id="bad", job="j", source="worker", status="finished", started_at=now),
        RunRow(run_id="bad2", job="j", source="cron", status="failed", started_at=now),
        HeartbeatRow(id="bad", job="j", kind="ok", at=now),
        _health("ok", now),
        _health("up", now, job="bad-alarm", open_alarm="late"),
        _flip("up", "waiting", now),
        _flip("ok", "up", now),
        _flip("down", "up", now, recovered_from="up"),
    ):
        with pytest.raises(IntegrityError):
            async with blank.session() as session, session.begin():
                session.add(bad)


def _health(
    state: str, now: datetime, *, job: str | None = None, open_alarm: str | None = None
) -> JobHealthRow:
    return JobHealthRow(
        job=job or state,
        state=state,
        since=now,
        consecutive_failures=0,
        open_alarm=open_alarm,
        updated_at=now,
    )


def _flip(from_state: str, to_state: str, now: datetime, *, recovered_from: str | None = None) -> FlipRow:
    return FlipRow(
        job="j",
        at=now,
        from_state=from_state,
        to_state=to_state,
        reason="r",
        recovered_from=recovered_from,
        created_at=now,
    )


def test_the_stores_health_states_are_the_machines() -> None:
    assert tuple(State) == HEALTH_STATES
    assert set(ALARM_STATES) == set(MACHINE_ALARM_STATES)


async def test_no_process_runs_against_a_schema_it_was_not_written_for(blank: Store) -> None:
    with pytest.raises(SchemaMismatch, match=r"has no cronfleet tables yet: run `cronfleet db upgrade`$"):
        await Store.open(blank.url, blank.schema_name)
    await blank.upgrade(BASELINE)
    with pytest.raises(
        SchemaMismatch, match=f"revision {BASELINE}, older than .* run `cronfleet db upgrade`$"
    ):
        await Store.open(blank.url, blank.schema_name)
    await blank.upgrade()
    async with blank.engine.begin() as connection:
        await connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    newer = r"revision 9999, newer than this cronfleet knows .*: upgrade cronfleet$"
    with pytest.raises(SchemaMismatch, match=newer):
        await Store.open(blank.url, blank.schema_name)
    with pytest.raises(SchemaMismatch, match="newer than this cronfleet knows"):
        await blank.upgrade()  # never "downgrades" by accident


async def test_db_commands_show_upgrade_and_refuse_in_one_line(blank: Store) -> None:
    settings = Settings(
        amqp_url=AMQP_URL, database_url=blank.url, database_schema=blank.schema_name, keys=TEST_KEYS
    )
    env: dict[str, str] = {}
    empty = await run_cronfleet(settings, "db", "current", **env)
    assert empty.returncode == 1 and empty.stdout.startswith("empty (this cronfleet's head is ")
    assert empty.stderr.strip().endswith("has no cronfleet tables yet: run `cronfleet db upgrade`")
    refused = await run_cronfleet(settings, "jobs", **env)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "run `cronfleet db upgrade`" in refused.stderr and "Traceback" not in refused.stderr

    upgraded = await run_cronfleet(settings, "db", "upgrade", **env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.strip() == f"upgraded from empty to revision {head_revision()} (head)"
    assert (await run_cronfleet(settings, "db", "upgrade", **env)).stdout.strip() == (
        f"already at revision {head_revision()} (head)"
    )
    current = await run_cronfleet(settings, "db", "current", **env)
    assert current.returncode == 0 and current.stdout.strip() == f"{head_revision()} (head)"
    assert (await run_cronfleet(settings, "jobs", **env)).returncode == 0
