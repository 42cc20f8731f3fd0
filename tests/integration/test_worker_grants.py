"""On PostgreSQL a worker runs under a role that may keep trigger claims and nothing else: it
cannot write the jobs or fires the scheduler signs (``cronfleet db grant-worker``)."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from common.settings import Settings
from common.store import Store
from tests.conftest import Start
from tests.fleet import Fleet, eventually, run_cronfleet
from tests.integration.helpers import apply_toml, runs_of

pytestmark = pytest.mark.both_stores


async def test_a_worker_under_its_granted_role_runs_triggers_and_cannot_touch_jobs_or_fires(
    settings: Settings, store: Store, fleet: Start
) -> None:
    if store.dialect != "postgresql":
        assert (await run_cronfleet(settings, "db", "grant-worker", "someone")).returncode == 1
        pytest.skip("PostgreSQL only: SQLite has no roles (its variant checks the refusal above)")
    role = f"cfw_{uuid.uuid4().hex[:10]}"
    async with store.engine.begin() as connection:
        await connection.execute(text(f'CREATE ROLE "{role}" LOGIN'))
    worker_fleet = None
    try:
        printed = await run_cronfleet(settings, "db", "grant-worker", role)
        assert printed.returncode == 0 and f'TO "{role}"' in printed.stdout, printed.stderr
        assert "trigger_claims" in printed.stdout and "fires" not in printed.stdout
        assert (await run_cronfleet(settings, "db", "grant-worker", role, "--apply")).returncode == 0

        as_worker = settings.model_copy(
            update={
                "database_url": make_url(settings.database_url).set(username=role).render_as_string(False)
            }
        )
        await apply_toml(
            store,
            """
            [jobs.granted]
            schedule = "0 0 1 1 *"
            action = { type = "shell", argv = ["true"] }
            """,
        )
        await fleet("monitor")
        worker_fleet = Fleet(as_worker)
        await worker_fleet.start("worker")
        assert (await run_cronfleet(settings, "trigger", "granted")).returncode == 0
        await eventually(lambda: runs_of(store, "granted", status="succeeded"))

        # A role the database refuses stops the worker at once with one line; it does not wait.
        stranger = settings.model_copy(
            update={
                "database_url": make_url(settings.database_url)
                .set(username="cf_nobody")
                .render_as_string(False)
            }
        )
        refused = await run_cronfleet(stranger, "worker")
        assert (
            refused.returncode == 1 and "refused us" in refused.stderr and "Traceback" not in refused.stderr
        )

        limited = await Store.open(as_worker.database_url, as_worker.database_schema)
        try:
            for forbidden in (
                "UPDATE jobs SET enabled = true",
                "DELETE FROM fires",
                "INSERT INTO runs (run_id, job, source, status, started_at, redelivered) "
                "VALUES ('x', 'granted', 'worker', 'succeeded', now(), false)",
            ):
                with pytest.raises(DBAPIError, match="permission denied"):
                    async with limited.engine.begin() as connection:
                        await connection.execute(text(forbidden))
        finally:
            await limited.close()
    finally:
        if worker_fleet is not None:
            await worker_fleet.stop()
        async with store.engine.begin() as connection:
            await connection.execute(text(f'DROP OWNED BY "{role}"'))
            await connection.execute(text(f'DROP ROLE "{role}"'))
