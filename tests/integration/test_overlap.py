"""Overlap policies and retries with real workers, the real broker and both stores.

Under ``overlap = "skip"`` a fire that finds a run of its job in flight on any worker is recorded
as a ``skipped`` run naming that run, never run beside it, and a duplicated trigger is still one
run; a skipped run is neither a success nor a failure of the job. A repeat of a failed attempt
never publishes a second retry: the attempt's claim records that its retry went out.
(``queue``, the older ``exclusive = true``, is tested in ``test_retries``.)
"""

from __future__ import annotations

import asyncio
import itertools
import signal
from datetime import timedelta
from pathlib import Path

import orjson
from aio_pika.abc import AbstractRobustConnection

from common.clock import utcnow
from common.retries import claim_key
from common.settings import Settings
from common.store import RunRow, Store
from common.trigger_claims import RetryTurn, TriggerClaims
from tests.conftest import Start
from tests.fleet import eventually, run_cronfleet, worker_process
from tests.integration.helpers import apply_toml, runs_of, state_of
from tests.integration.test_retries import _claim, _duplicates, _ended, _job, _publish, _waiting_retries

FIRES = 8


async def test_a_skip_job_fired_while_it_runs_records_skipped_runs_naming_the_run_in_flight(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    first = await _job(
        store, "long", f"echo start >> {log}; sleep 1.5; echo end >> {log}", 'overlap = "skip"'
    )
    await fleet("monitor", "worker", "worker", "worker", concurrency=3)
    # Eight fires of the job (eight trigger ids) a quarter of a second apart, each published
    # twice at once, onto three workers with three slots each.
    for n in range(FIRES):
        body = first.model_copy(update={"id": f"{first.id}-{n}"}).to_bytes()
        await asyncio.gather(_publish(amqp, settings, body), _publish(amqp, settings, body))
        await asyncio.sleep(0.25)

    runs = await eventually(lambda: _ended(store, "long", 2 * FIRES), timeout=60)
    # A duplicated trigger is still one run (executed or skipped) and one duplicate.
    for trigger_id, same in itertools.groupby(sorted(runs, key=_by_trigger), key=_by_trigger):
        assert sorted(r.status for r in same) in (["duplicate", "skipped"], ["duplicate", "succeeded"]), (
            trigger_id
        )
    executed = sorted((r for r in runs if r.status == "succeeded"), key=lambda r: r.started_at)
    skipped = [r for r in runs if r.status == "skipped"]
    assert executed and skipped, [r.status for r in runs]
    # Never two in flight: every run that ran ended before the next began.
    assert log.read_text().split() == ["start", "end"] * len(executed), "two runs of a skip job overlapped"
    for earlier, later in itertools.pairwise(executed):
        assert earlier.finished_at is not None and earlier.finished_at <= later.started_at
    # Each skipped run says why, naming a run that did run (and its worker).
    ran = {r.run_id: r for r in executed}
    for run in skipped:
        assert (run.error or "").startswith('overlap = "skip": run '), run.error
        holder = (run.error or "").removeprefix('overlap = "skip": run ').split()[0]
        assert holder in ran and f"in flight on {ran[holder].worker}" in (run.error or "")
    assert await _claim(store, "exclusive:long") is None  # every lease was given back

    # A skipped run is history, neither a success nor a failure: the job is up, its last run
    # one that ran; the API and ``cronfleet runs`` list the skipped runs.
    state = await state_of(store, "long")
    assert state is not None and state.last_status == "succeeded" and state.consecutive_failures == 0
    listed = orjson.loads((await run_cronfleet(settings, "runs", "long", "--json", "--limit", "100")).stdout)
    assert sorted(r["status"] for r in listed) == sorted(r.status for r in runs)
    assert {r["error"] for r in listed if r["status"] == "skipped"} == {r.error for r in skipped}
    status = orjson.loads((await run_cronfleet(settings, "status", "--json")).stdout)["jobs"]
    [row] = [row for row in status if row["job"] == "long"]
    assert row["health"] == "up"


def _by_trigger(run: RunRow) -> str:
    return run.trigger_id


async def test_a_repeat_of_a_failed_attempt_never_publishes_a_second_retry(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    # The retry waits 30 s in its delay queue: long enough to count it there.
    trigger = await _job(
        store, "once-more", f"echo ran >> {ran}; exit 1", 'retries = 1\nretry_backoff = "30s"'
    )
    body = trigger.to_bytes()
    await fleet("monitor", "worker", "worker", concurrency=2)
    # Published twice at once, then again once the first attempt has ended (a replay).
    await asyncio.gather(_publish(amqp, settings, body), _publish(amqp, settings, body))
    await eventually(lambda: _duplicates(store, "once-more", 1), timeout=40)
    claim = await _claim(store, trigger.id)
    assert claim is not None and claim.finished_at is not None and claim.retry_published_at is not None
    await _publish(amqp, settings, body)
    await eventually(lambda: _duplicates(store, "once-more", 2), timeout=40)

    # One failed run, two duplicates, and one retry waiting: the duplicates published none (each
    # recorded its duplicate run after deciding, so any retry of theirs would be counted here).
    runs = await runs_of(store, "once-more")
    assert sorted(r.status for r in runs) == ["duplicate", "duplicate", "failed"]
    assert ran.read_text() == "ran\n"
    assert await _waiting_retries(amqp, settings) == 1
    assert await _claim(store, claim_key(trigger.id, 2)) is None  # not run yet: it waits


async def test_a_retry_not_published_is_published_by_one_repeat_once_its_worker_stopped(store: Store) -> None:
    now = utcnow()
    lease = timedelta(seconds=30)
    ended, *repeats = [TriggerClaims(store, f"worker-{n}", lease) for n in range(5)]
    await ended.claim("j@t", "sha", "run-1", now + timedelta(hours=1), now)
    await ended.finish("j@t", "run-1", '{"status": "failed"}', now)
    # The worker that ended the attempt is publishing its retry: nobody else does.
    assert await repeats[0].take_retry("j@t", now + timedelta(seconds=1)) is RetryTurn.BUSY
    # It died first: once its lease ran out, exactly one of many repeats publishes it.
    later = now + lease + timedelta(seconds=1)
    turns = await asyncio.gather(*(r.take_retry("j@t", later) for r in repeats))
    assert sorted(t.value for t in turns) == ["busy"] * 3 + ["publish"]
    await repeats[turns.index(RetryTurn.PUBLISH)].retry_published("j@t", later)
    assert await ended.take_retry("j@t", later + 2 * lease) is RetryTurn.PUBLISHED
    assert await ended.take_retry("nobody@t", later) is RetryTurn.PUBLISHED  # nothing to publish


async def test_a_skip_jobs_trigger_whose_worker_died_runs_again_and_is_not_skipped_by_the_dead_run(
    settings: Settings, store: Store, fleet: Start, tmp_path: Path
) -> None:
    done = tmp_path / "done"
    await apply_toml(
        store,
        f"""
        [jobs.lonely]
        schedule = "0 0 1 1 *"
        timeout_seconds = 60
        overlap = "skip"
        exclusive_ttl = "8s"
        action = {{ type = "shell", argv = ["sh", "-c", "sleep 2; echo ran >> {done}"] }}
        """,
    )
    await fleet("monitor")
    worker = worker_process(settings)
    try:
        assert (await run_cronfleet(settings, "trigger", "lonely")).returncode == 0
        [dead] = await eventually(lambda: runs_of(store, "lonely", status="running"), timeout=30)
        worker.send_signal(signal.SIGKILL)
        await asyncio.to_thread(worker.wait, 30)
    finally:
        if worker.poll() is None:
            worker.kill()
    # The dead run's lease on the job outlives its claim (8 s against the tests' 3 s lease): the
    # trigger, redelivered once the claim lapsed, waits the lease out (the dead run is the one it
    # replaces), then runs, instead of being skipped because of it.
    await fleet("worker")
    [again] = await eventually(lambda: runs_of(store, "lonely", status="succeeded"), timeout=30)
    assert again.redelivered and again.trigger_id == dead.trigger_id
    assert not await runs_of(store, "lonely", status="skipped")
    assert done.read_text() == "ran\n"
