"""A worker killed mid-run does not lose the run: the trigger goes to another worker, whose run
is marked as a redelivery, and the killed worker's run is marked lost."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from aio_pika.abc import AbstractRobustConnection

from common.settings import Settings
from common.store import Store
from common.topology import Topology
from tests.conftest import Start
from tests.fleet import eventually, run_cronfleet, worker_process
from tests.integration.helpers import apply_toml, flips_of, runs_of


async def _signal_a_worker_mid_run(
    settings: Settings, store: Store, fleet: Start, done: Path, job: str, sig: signal.Signals
) -> int:
    """Run a 2-second job on a worker process, send ``sig`` to it mid-run; its exit code."""
    await apply_toml(
        store,
        f"""
        [jobs.{job}]
        schedule = "0 0 1 1 *"
        timeout_seconds = 60
        action = {{ type = "shell", argv = ["sh", "-c", "sleep 2; echo ran >> {done}"] }}
        """,
    )
    await fleet("monitor")
    worker = worker_process(settings)
    try:
        # Off the event loop: the monitor runs in it, and a write transaction it has open when the
        # loop blocks would hold SQLite's lock until the command gave up (database is locked).
        assert (await run_cronfleet(settings, "trigger", job)).returncode == 0
        await eventually(lambda: runs_of(store, job, status="running"), timeout=30)
        worker.send_signal(sig)
        return await asyncio.to_thread(worker.wait, 30)
    finally:
        if worker.poll() is None:
            worker.kill()


async def test_a_trigger_held_by_a_killed_worker_runs_again_marked_as_redelivered(
    settings: Settings, store: Store, fleet: Start, tmp_path: Path
) -> None:
    done = tmp_path / "done"
    await _signal_a_worker_mid_run(settings, store, fleet, done, "slow", signal.SIGKILL)
    await fleet("worker")

    redelivered = await eventually(lambda: runs_of(store, "slow", status="succeeded"), timeout=30)
    assert redelivered[0].redelivered is True
    first = [r for r in await runs_of(store, "slow") if r.run_id != redelivered[0].run_id]
    assert len(first) == 1 and first[0].trigger_id == redelivered[0].trigger_id
    # The killed run never finished: the monitor marks it lost once its worker's heartbeats
    # stopped; the redelivered one ran the action to its end once.
    await eventually(lambda: runs_of(store, "slow", status="lost"), timeout=30)
    assert done.read_text() == "ran\n"


async def test_a_worker_asked_to_stop_lets_its_running_job_finish_and_acks_its_trigger(
    settings: Settings, store: Store, fleet: Start, tmp_path: Path, amqp: AbstractRobustConnection
) -> None:
    done = tmp_path / "done"
    # SIGTERM, as a rolling deploy sends it.
    exit_code = await _signal_a_worker_mid_run(settings, store, fleet, done, "deploying", signal.SIGTERM)
    assert exit_code == 0
    runs = await eventually(lambda: runs_of(store, "deploying", status="succeeded"), timeout=30)
    assert len(runs) == 1 and runs[0].redelivered is False
    assert done.read_text() == "ran\n"
    assert len(await runs_of(store, "deploying")) == 1
    # Its heartbeats went on while it waited for the job: the monitor never took the run for
    # lost (before, it did, and alerted that the job failed).
    assert ("running", "failing") not in await flips_of(store, "deploying")
    # The trigger was acked before the worker let its channel go: nothing waits in the queue for
    # the next worker to find and record as a duplicate. (The worker closed its consuming channel
    # first, then acked on it: the broker took the trigger back, and closed the connection with
    # CHANNEL_ERROR "expected 'channel.open'".)
    channel = await amqp.channel()
    queue = await channel.declare_queue(Topology(settings.namespace).pool_queue("default"), passive=True)
    assert queue.declaration_result.message_count == 0
    await channel.close()


async def test_a_worker_asked_to_stop_twice_kills_its_jobs_at_once(
    settings: Settings, store: Store, fleet: Start, tmp_path: Path
) -> None:
    """A second SIGTERM (or Ctrl-C) during the drain ends the running jobs now, as an operator who
    asks twice expects: the worker no longer waits out the drain (25 s by default) twice over."""
    await apply_toml(
        store,
        """
        [jobs.endless]
        schedule = "0 0 1 1 *"
        timeout_seconds = 120
        action = { type = "shell", argv = ["sleep", "100"] }
        """,
    )
    await fleet("monitor")
    log = tmp_path / "worker.log"
    worker = worker_process(settings, log=log)
    try:
        assert (await run_cronfleet(settings, "trigger", "endless")).returncode == 0
        await eventually(lambda: runs_of(store, "endless", status="running"), timeout=30)
        worker.send_signal(signal.SIGTERM)

        async def draining() -> bool:
            return "stopping: waiting up to" in log.read_text(errors="replace")

        await eventually(draining, timeout=30)
        worker.send_signal(signal.SIGTERM)
        # Well within the 25 s the drain would otherwise wait.
        assert await asyncio.to_thread(worker.wait, 15) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    assert "1 job(s) were killed: asked to stop again" in log.read_text(errors="replace")
