"""A job stored by an older, laxer cronfleet with a value this one refuses (grace = null, an expiry
of 1e12 seconds) stops nothing: it is named by status, jobs and doctor, and every other job runs."""

from __future__ import annotations

from pathlib import Path

import orjson
from sqlalchemy import update

from common.messages import RunStatus
from common.settings import Settings
from common.store import JobRow, Store
from tests.conftest import Start
from tests.fleet import cronfleet, eventually, run_cronfleet
from tests.integration.helpers import apply_toml, runs_of

JOBS = """
[jobs.fine]
schedule = "* * * * * *"
action = { type = "shell", argv = ["true"] }

[jobs.rotten]
schedule = "* * * * * *"
action = { type = "shell", argv = ["true"] }
"""


async def _rot(store: Store, job: str, **values: object) -> None:
    """Store ``job`` with values today's validation refuses, as an older cronfleet could have."""
    async with store.session() as session, session.begin():
        row = await session.get(JobRow, job)
        assert row is not None
        spec = {**orjson.loads(row.spec), **values}
        await session.execute(
            update(JobRow).where(JobRow.name == job).values(spec=orjson.dumps(spec).decode())
        )


async def test_a_stored_spec_this_cronfleet_refuses_is_named_and_stops_nothing(
    settings: Settings, store: Store, fleet: Start
) -> None:
    await apply_toml(store, JOBS)
    await _rot(store, "rotten", grace_seconds=None, expires_after_seconds=1e12)

    await fleet("monitor", "worker", "scheduler")
    await eventually(lambda: runs_of(store, "fine", status=RunStatus.SUCCEEDED.value))

    status = await run_cronfleet(settings, "status", "--json")
    assert status.returncode == 1 and "Traceback" not in status.stderr
    rows = {row["job"]: row for row in orjson.loads(status.stdout)["jobs"]}
    assert rows["rotten"]["health"] == "invalid" and "apply it again" in rows["rotten"]["reason"]
    assert rows["fine"]["health"] in ("up", "running", "late")  # due every second
    listed = await run_cronfleet(settings, "jobs", "--json")
    assert listed.returncode == 1
    assert {row["name"]: row["action"] for row in orjson.loads(listed.stdout)} == {
        "fine": "shell",
        "rotten": "invalid",
    }
    doctor = await run_cronfleet(settings, "doctor")
    assert doctor.returncode == 1 and "job(s) stored with a spec this cronfleet refuses" in doctor.stdout
    trigger = await run_cronfleet(settings, "trigger", "rotten")
    assert trigger.returncode == 1 and trigger.stderr.count("\n") == 1 and "apply it again" in trigger.stderr
    assert await runs_of(store, "rotten") == []


def test_run_refuses_a_jobs_file_with_no_jobs(settings: Settings, tmp_path: Path) -> None:
    empty = tmp_path / "jobs.toml"
    empty.write_text("# nothing yet\n")
    result = cronfleet(settings, "run", "--jobs", str(empty))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"cronfleet: {empty}:1: the file defines no jobs; `run --jobs` would remove every job"
    )
