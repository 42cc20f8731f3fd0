"""A worker runs only what its own configuration allows, and the jobs it runs cannot read its keys.

Measured before: a job read the worker's keys from /proc/<worker>/environ and signed a trigger that
another pool ran. Now a worker drops the keys from its environment, makes itself non-dumpable and,
as root, runs jobs under the account they name (``run_as``).
"""

from __future__ import annotations

import asyncio
import os
import pwd
from pathlib import Path

import pytest
from aio_pika.abc import AbstractRobustConnection

from common.envelope import REJECTION_DETAIL_HEADER
from common.settings import Settings
from common.store import Store
from tests.fleet import Fleet, declare_pool, eventually, worker_process
from tests.integration.helpers import apply_toml, runs_of
from tests.integration.test_poison import DeadLetters


async def test_a_worker_runs_only_the_commands_it_allows_and_refuses_the_rest_as_not_allowed(
    settings: Settings, store: Store, amqp: AbstractRobustConnection
) -> None:
    await apply_toml(
        store,
        """
        [jobs.allowed]
        schedule = "* * * * * *"
        action = { type = "shell", argv = ["true"] }

        [jobs.a-shell]
        schedule = "* * * * * *"
        action = { type = "shell", argv = ["sh", "-c", "echo anything goes"] }
        """,
    )
    fleet = Fleet(settings.model_copy(update={"allow_commands": "true"}))
    try:
        await fleet.start("monitor", "worker", "scheduler")
        await eventually(lambda: runs_of(store, "allowed", status="succeeded"))
        [refused, *_] = await eventually(lambda: runs_of(store, "a-shell", status="failed"))
        dead = await DeadLetters.open(amqp, settings)
        await dead.wait_for(1)
    finally:
        await fleet.stop()
    assert refused.error is not None and refused.error.startswith("not_allowed: 'sh' is not in")
    assert set(dead.reasons()) == {"not_allowed"}
    assert "CRONFLEET_ALLOW_COMMANDS" in str((dead.messages[0].headers or {})[REJECTION_DETAIL_HEADER])


def _keys_file(directory: Path, keys: str) -> Path:
    """The keys in a file only root can read, in a directory anyone may look into."""
    path = directory / "keys"
    path.write_text(keys)
    path.chmod(0o600)
    directory.chmod(0o755)
    return path


ROOT_ONLY = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="starting a worker or a job as another account needs root; this test runs as another user",
)


@ROOT_ONLY
async def test_a_job_cannot_read_the_workers_keys_from_proc_or_its_keys_file(
    settings: Settings, store: Store, tmp_path: Path
) -> None:
    nobody = pwd.getpwnam("nobody")
    secret = settings.keys.split(",")[0].rsplit(":", 1)[1]
    keys_file = _keys_file(tmp_path, settings.keys)
    # The job tries both ways it had: the worker's environment through /proc, and its keys file;
    # it prints what it read, and a marker once done.
    probe = f"cat /proc/$PPID/environ; cat /proc/$PPID/mem; cat {keys_file}; echo; echo probe-done"
    await apply_toml(
        store,
        f"""
        [jobs.probe]
        schedule = "* * * * * *"
        action = {{ type = "shell", argv = ["sh", "-c", "{probe}"], run_as = "nobody" }}
        """,
    )
    await declare_pool(settings, "default")
    # A real worker process, started with CRONFLEET_KEYS in its environment (as many are).
    worker = worker_process(settings)
    fleet = Fleet(settings)
    try:
        await fleet.start("monitor", "scheduler")
        [run, *_] = await eventually(lambda: runs_of(store, "probe", status="succeeded"), timeout=30)
    finally:
        worker.terminate()
        # Off the loop: the in-process services must go on, or one caught inside a SQLite write
        # would hold the lock the stopping worker needs to end its runs.
        await asyncio.to_thread(worker.wait, 30)
        await fleet.stop()
    output = run.output_tail or ""
    assert "probe-done" in output, output
    assert secret not in output and "CRONFLEET_KEYS" not in output, output
    assert output.count("Permission denied") >= 3, output
    assert nobody.pw_name  # the job ran as nobody: see the denials above
