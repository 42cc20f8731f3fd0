"""Retries, lost runs and exclusive jobs with real workers, the real broker and both stores.

A failing job with ``retries`` runs again through the delay queues, each attempt its own run,
the last failure final; a repeat of an attempt is a duplicate, a forged attempt is refused; a run
lost with its worker follows ``on_lost``; an exclusive job's runs never overlap across workers,
even with every trigger published twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from datetime import timedelta
from pathlib import Path
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from common.catalog import find_job
from common.clock import utcnow
from common.messages import Trigger
from common.retries import ATTEMPT_HEADER, DELAY_STEPS, claim_key
from common.settings import Settings
from common.signing import Role
from common.store import RunRow, Store, TriggerClaimRow
from common.topology import Topology
from common.trigger_claims import ClaimOutcome, TriggerClaims
from tests.conftest import Start
from tests.fleet import eventually
from tests.integration.helpers import apply_toml, runs_of, state_of


async def _job(store: Store, name: str, script: str, extra: str = "") -> Trigger:
    """Apply a shell job running ``script`` (``sh -c``), with ``extra`` fields; its trigger now."""
    await apply_toml(
        store,
        f"""
        [jobs.{name}]
        schedule = "0 0 1 1 *"
        timeout_seconds = 60
        action = {{ type = "shell", argv = ["sh", "-c", {orjson.dumps(script).decode()}] }}
        {extra}
        """,
    )
    spec = await find_job(store, name)
    assert spec is not None
    now = utcnow()
    return spec.trigger_at(now, now, manual=True)


async def _publish(amqp: AbstractRobustConnection, settings: Settings, body: bytes, **headers: Any) -> None:
    """Publish ``body`` as a trigger of the default pool, signed with the fleet's trigger key."""
    channel = await amqp.channel()
    exchange = await channel.get_exchange(Topology(settings.namespace).triggers_exchange)
    signed = settings.keyring().sign(Role.TRIGGER, settings.namespace, "default", body)
    await exchange.publish(aio_pika.Message(body, headers={**signed, **headers}), routing_key="default")
    await channel.close()


async def _ended(store: Store, job: str, count: int) -> list[RunRow] | None:
    runs = [run for run in await runs_of(store, job) if run.finished_at is not None]
    return runs if len(runs) >= count else None


async def _executed(store: Store, job: str, count: int) -> list[RunRow] | None:
    """The ended runs that were executed (not duplicates), by attempt, once there are ``count``."""
    runs = [r for r in await runs_of(store, job) if r.finished_at is not None and r.status != "duplicate"]
    return sorted(runs, key=lambda r: r.attempt) if len(runs) >= count else None


async def _duplicates(store: Store, job: str, count: int) -> list[RunRow] | None:
    """The duplicate runs, once there are ``count``."""
    runs = [r for r in await runs_of(store, job) if r.status == "duplicate"]
    return runs if len(runs) >= count else None


async def _claim(store: Store, key: str) -> TriggerClaimRow | None:
    async with store.session() as session:
        return await session.get(TriggerClaimRow, key)


async def _waiting_retries(amqp: AbstractRobustConnection, settings: Settings) -> int:
    """How many retries wait in the delay queues."""
    channel = await amqp.channel()
    topology = Topology(settings.namespace)
    total = 0
    for seconds in DELAY_STEPS:
        queue = await channel.declare_queue(topology.delay_queue(seconds), passive=True)
        total += queue.declaration_result.message_count or 0
    await channel.close()
    return total


async def test_a_failing_job_is_tried_retries_more_times_each_attempt_its_own_run_the_last_final(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    trigger = await _job(
        store,
        "flaky",
        f"echo ran >> {ran}; exit 3",
        'retries = 2\nretry_backoff = "1s"\nretry_max_delay = "2s"',
    )
    await fleet("monitor", "worker", "worker")
    await _publish(amqp, settings, trigger.to_bytes())

    runs = await eventually(lambda: _ended(store, "flaky", 3), timeout=40)
    assert [run.status for run in runs] == ["failed"] * 3
    assert len({run.run_id for run in runs}) == 3 and {run.trigger_id for run in runs} == {trigger.id}
    assert sorted(run.attempt for run in runs) == [1, 2, 3]  # each run knows which attempt it was
    assert ran.read_text() == "ran\n" * 3
    for attempt in (1, 2, 3):
        claim = await _claim(store, claim_key(trigger.id, attempt))
        assert claim is not None and claim.finished_event is not None
        assert orjson.loads(claim.finished_event).get("attempt", 1) == attempt
    # The third failure was final: its end was recorded after any retry of it would have been
    # published, and none was.
    assert await _claim(store, claim_key(trigger.id, 4)) is None
    assert await _waiting_retries(amqp, settings) == 0
    state = await state_of(store, "flaky")
    assert state is not None and state.last_status == "failed"


async def test_a_job_that_fails_once_then_succeeds_ends_succeeded_on_its_second_attempt(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection, tmp_path: Path
) -> None:
    mark = tmp_path / "failed-once"
    trigger = await _job(
        store, "second-time", f"if [ -e {mark} ]; then exit 0; fi; touch {mark}; exit 1", "retries = 3"
    )
    # 10 s is the shortest wait the default backoff gives: the delay queue holds it that long.
    await fleet("monitor", "worker")
    await _publish(amqp, settings, trigger.to_bytes())
    runs = await eventually(lambda: _ended(store, "second-time", 2), timeout=40)
    assert [(run.status, run.attempt) for run in runs] == [("failed", 1), ("succeeded", 2)]
    assert await _claim(store, claim_key(trigger.id, 3)) is None
    state = await state_of(store, "second-time")
    assert state is not None and state.last_status == "succeeded"


async def test_a_repeated_attempt_is_a_duplicate_and_a_forged_attempt_is_refused(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    trigger = await _job(store, "twice", f"echo ran >> {ran}; exit 1", 'retries = 1\nretry_backoff = "1s"')
    body = trigger.to_bytes()
    await fleet("monitor", "worker", "worker", concurrency=2)
    # An attempt nobody owes (the first has not even run) is refused, never run.
    await _publish(amqp, settings, body, **{ATTEMPT_HEADER: 2})
    await _publish(amqp, settings, body, **{ATTEMPT_HEADER: 9})
    await _publish(amqp, settings, body, **{ATTEMPT_HEADER: "two"})
    dead = await _dead_letters(amqp, settings, 3)
    reasons = sorted(str(m.headers["cronfleet-rejection"]) for m in dead)
    assert reasons == ["bad_attempt", "bad_attempt", "malformed"]
    assert not ran.exists()

    # The first attempt published twice: one run and one duplicate; then one retry, final (the
    # duplicate publishes no second retry: ``test_overlap`` counts them).
    await asyncio.gather(_publish(amqp, settings, body), _publish(amqp, settings, body))
    runs = await eventually(lambda: _executed(store, "twice", 2), timeout=40)
    assert [(run.status, run.attempt) for run in runs] == [("failed", 1), ("failed", 2)]
    assert ran.read_text() == "ran\n" * 2
    duplicates = await eventually(lambda: _duplicates(store, "twice", 1))

    # The retry's bytes replayed with its attempt: a duplicate of attempt 2, not a third run.
    await _publish(amqp, settings, body, **{ATTEMPT_HEADER: 2})
    more = await eventually(lambda: _duplicates(store, "twice", len(duplicates) + 1))
    repeats = [r for r in more if r.run_id.startswith(f"{trigger.id}#2#")]
    assert repeats and all("attempt 2" in (r.error or "") for r in repeats)
    assert len(await _executed(store, "twice", 2) or []) == 2
    assert ran.read_text() == "ran\n" * 2


async def _dead_letters(
    amqp: AbstractRobustConnection, settings: Settings, count: int
) -> list[AbstractIncomingMessage]:
    channel = await amqp.channel()
    queue = await channel.get_queue(Topology(settings.namespace).dead_queue)
    found: list[AbstractIncomingMessage] = []

    async def enough() -> bool:
        while (message := await queue.get(fail=False)) is not None:
            found.append(message)
        return len(found) >= count

    await eventually(enough)
    return found


async def _orphan(store: Store, trigger: Trigger) -> None:
    """What a worker that died mid-run leaves behind: an unfinished claim it no longer renews."""
    dead = TriggerClaims(store, "worker@dead-host:1", timedelta(seconds=1))
    body = trigger.to_bytes()
    claimed = await dead.claim(
        trigger.id, hashlib.sha256(body).hexdigest(), "dead-run", trigger.expires_at, utcnow()
    )
    assert claimed.outcome is ClaimOutcome.RUN


async def test_a_lost_run_of_an_on_lost_fail_job_is_recorded_lost_and_not_run_again(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    trigger = await _job(store, "fragile", f"echo ran >> {ran}", 'retries = 2\non_lost = "fail"')
    await _orphan(store, trigger)
    await fleet("monitor", "worker")
    await _publish(amqp, settings, trigger.to_bytes())  # the broker's redelivery of it

    [lost] = await eventually(lambda: runs_of(store, "fragile", status="lost"))
    assert lost.run_id == "dead-run" and "worker@dead-host:1" in (lost.error or "")
    claim = await _claim(store, trigger.id)
    assert claim is not None and claim.finished_at is not None
    assert await _claim(store, claim_key(trigger.id, 2)) is None
    assert await _waiting_retries(amqp, settings) == 0
    assert not ran.exists()


async def test_a_lost_run_of_an_on_lost_retry_job_is_followed_by_its_next_attempt(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    trigger = await _job(
        store, "resilient", f"echo ran >> {ran}", 'retries = 1\nretry_backoff = "1s"\non_lost = "retry"'
    )
    await _orphan(store, trigger)
    await fleet("monitor", "worker")
    await _publish(amqp, settings, trigger.to_bytes())

    runs = await eventually(lambda: _ended(store, "resilient", 2), timeout=40)
    assert sorted((run.run_id == "dead-run", run.status) for run in runs) == [
        (False, "succeeded"),
        (True, "lost"),
    ]
    assert ran.read_text() == "ran\n"
    second = await _claim(store, claim_key(trigger.id, 2))
    assert second is not None and second.finished_event is not None
    assert orjson.loads(second.finished_event)["attempt"] == 2


async def test_an_exclusive_job_never_overlaps_across_workers_even_with_every_trigger_published_twice(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    first = await _job(
        store, "solo", f"echo start >> {log}; sleep 0.3; echo end >> {log}", "exclusive = true"
    )
    await fleet("monitor", "worker", "worker", "worker", concurrency=3)
    # Four fires of the job (four trigger ids), each published twice, all at once.
    bodies = [first.model_copy(update={"id": f"{first.id}-{n}"}).to_bytes() for n in range(4)]
    await asyncio.gather(*(_publish(amqp, settings, body) for body in bodies * 2))

    runs = await eventually(lambda: _ended(store, "solo", 8), timeout=60)
    assert sorted(run.status for run in runs) == ["duplicate"] * 4 + ["succeeded"] * 4
    lines = log.read_text().split()
    assert lines == ["start", "end"] * 4, "two runs of an exclusive job overlapped"
    executed = sorted((r for r in runs if r.status == "succeeded"), key=lambda r: r.started_at)
    for earlier, later in itertools.pairwise(executed):
        assert earlier.finished_at is not None and earlier.finished_at <= later.started_at
    # Every lease was given back.
    assert await _claim(store, "exclusive:solo") is None


async def test_leases_let_exactly_one_of_many_concurrent_takers_hold_a_job(store: Store) -> None:
    now = utcnow()
    takers = [TriggerClaims(store, f"worker-{n}", timedelta(seconds=30)) for n in range(20)]
    answers = await asyncio.gather(
        *(t.take_lease("exclusive:j", f"run-{n}", timedelta(seconds=5), now) for n, t in enumerate(takers))
    )
    assert [a.outcome for a in answers].count(ClaimOutcome.RUN) == 1
    [holder] = [n for n, a in enumerate(answers) if a.outcome is ClaimOutcome.RUN]
    # Until its ttl runs out; after, the next taker has it and the first cannot give it back.
    later = now + timedelta(seconds=6)
    taken = await takers[0 if holder else 1].take_lease(
        "exclusive:j", "run-late", timedelta(seconds=5), later
    )
    assert taken.outcome is ClaimOutcome.TAKEN_OVER and taken.run_id == f"run-{holder}"
    await takers[holder].give_back("exclusive:j", f"run-{holder}")
    row = await _claim(store, "exclusive:j")
    assert row is not None and row.run_id == "run-late"
