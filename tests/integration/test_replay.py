"""The fleet runs a trigger once: a replayed, duplicated or redelivered trigger is not executed
again by any worker; each repeat is recorded as a ``duplicate`` run, seen in ``runs`` and
``status``. A trigger whose worker died is run again once that worker's claim has lapsed."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta
from pathlib import Path

import aio_pika
import orjson
from aio_pika.abc import AbstractRobustConnection, FieldValue

from common.catalog import find_job
from common.clock import utcnow
from common.messages import Trigger
from common.settings import Settings
from common.signing import Role
from common.store import RunRow, Store, TriggerClaimRow
from common.topology import Topology
from common.trigger_claims import ClaimOutcome, TriggerClaims
from tests.conftest import Start
from tests.fleet import eventually, run_cronfleet
from tests.integration.helpers import apply_toml, runs_of, state_of


async def _job(store: Store, name: str, ran: Path, seconds: float = 0.0) -> Trigger:
    """Apply a shell job that appends a line to ``ran`` (after ``seconds``); its trigger now."""
    await apply_toml(
        store,
        f"""
        [jobs.{name}]
        schedule = "0 0 1 1 *"
        timeout_seconds = 60
        action = {{ type = "shell", argv = ["sh", "-c", "sleep {seconds}; echo ran >> {ran}"] }}
        """,
    )
    spec = await find_job(store, name)
    assert spec is not None
    now = utcnow()
    return spec.trigger_at(now, now, manual=True)


async def _publish_bytes(amqp: AbstractRobustConnection, settings: Settings, body: bytes) -> None:
    """Publish ``body`` as a trigger of the default pool, signed with the fleet's trigger key:
    what a captured and replayed trigger looks like to a worker."""
    topology = Topology(settings.namespace)
    channel = await amqp.channel()
    exchange = await channel.get_exchange(topology.triggers_exchange)
    headers: dict[str, FieldValue] = {
        **settings.keyring().sign(Role.TRIGGER, settings.namespace, "default", body)
    }
    await exchange.publish(aio_pika.Message(body, headers=headers), routing_key="default")
    await channel.close()


async def test_a_trigger_published_five_times_to_two_workers_runs_once_and_four_duplicates_are_recorded(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    trigger = await _job(store, "replayed", ran, seconds=1)
    await fleet("monitor", "worker", "worker", concurrency=4)
    body = trigger.to_bytes()
    await asyncio.gather(*(_publish_bytes(amqp, settings, body) for _ in range(5)))

    runs = await eventually(lambda: _ended_runs(store, "replayed", 5))
    assert sorted(run.status for run in runs) == ["duplicate"] * 4 + ["succeeded"]
    assert ran.read_text() == "ran\n"
    [executed] = [run for run in runs if run.status == "succeeded"]
    for repeat in (run for run in runs if run.status == "duplicate"):
        assert repeat.trigger_id == trigger.id and repeat.run_id.startswith(f"{trigger.id}#duplicate-")
        assert executed.run_id in (repeat.error or "")
    # A repeat is history, not the job's last run.
    state = await state_of(store, "replayed")
    assert state is not None and state.last_run_id == executed.run_id and state.last_status == "succeeded"

    listed = orjson.loads((await run_cronfleet(settings, "runs", "replayed", "--json")).stdout)
    assert sorted(run["status"] for run in listed) == ["duplicate"] * 4 + ["succeeded"]
    status = orjson.loads((await run_cronfleet(settings, "status", "--json")).stdout)["jobs"]
    [row] = [row for row in status if row["job"] == "replayed"]
    assert row["duplicates_24h"] == 4 and row["health"] == "up"
    assert "DUPLICATES_24H" in (await run_cronfleet(settings, "status")).stdout


async def test_a_trigger_replayed_after_its_run_is_not_run_again(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    trigger = await _job(store, "again", ran)
    await fleet("monitor", "worker")
    body = trigger.to_bytes()
    await _publish_bytes(amqp, settings, body)
    await eventually(lambda: runs_of(store, "again", status="succeeded"))

    # A second worker joins; the captured bytes are replayed to the pool twice.
    await fleet("worker")
    await _publish_bytes(amqp, settings, body)
    await _publish_bytes(amqp, settings, body)
    await eventually(lambda: _ended_runs(store, "again", 3))
    assert ran.read_text() == "ran\n"
    assert len(await runs_of(store, "again", status="succeeded")) == 1


async def test_a_trigger_whose_worker_died_runs_again_as_a_redelivery_once_the_claim_lapsed(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    trigger = await _job(store, "orphan", ran)
    body = trigger.to_bytes()
    # What a worker that died mid-run leaves behind: an unfinished claim it no longer renews.
    dead = TriggerClaims(store, "worker@dead-host:1", timedelta(seconds=1))
    claimed = await dead.claim(
        trigger.id, hashlib.sha256(body).hexdigest(), "dead-run", trigger.expires_at, utcnow()
    )
    assert claimed.outcome is ClaimOutcome.RUN
    await fleet("monitor", "worker")
    await _publish_bytes(amqp, settings, body)

    [run] = await eventually(lambda: runs_of(store, "orphan", status="succeeded"))
    assert run.redelivered is True
    assert ran.read_text() == "ran\n"
    async with store.session() as session:
        claim = await session.get(TriggerClaimRow, trigger.id)
    assert claim is not None and claim.run_id == run.run_id and claim.finished_at is not None


async def test_claims_let_exactly_one_of_many_concurrent_claimers_run_a_trigger(store: Store) -> None:
    now = utcnow()
    expires = now + timedelta(minutes=5)
    claimers = [TriggerClaims(store, f"worker-{n}", timedelta(seconds=30)) for n in range(20)]
    answers = await asyncio.gather(
        *(
            claims.claim("job@2026-01-01T00:00:00Z", "a" * 64, f"run-{n}", expires, now)
            for n, claims in enumerate(claimers)
        )
    )
    assert [a.outcome for a in answers].count(ClaimOutcome.RUN) == 1
    assert {a.outcome for a in answers} == {ClaimOutcome.RUN, ClaimOutcome.HELD}
    [winner] = [n for n, a in enumerate(answers) if a.outcome is ClaimOutcome.RUN]
    assert {a.run_id for a in answers} == {f"run-{winner}"}

    # Another body under the same id is a conflict; once finished, a repeat is a duplicate that
    # carries the finished event; a lapsed unfinished claim is taken over by exactly one.
    other = await claimers[0].claim("job@2026-01-01T00:00:00Z", "b" * 64, "run-x", expires, now)
    assert other.outcome is ClaimOutcome.CONFLICT
    await claimers[winner].finish("job@2026-01-01T00:00:00Z", f"run-{winner}", '{"ended": true}', now)
    repeat = await claimers[1].claim("job@2026-01-01T00:00:00Z", "a" * 64, "run-y", expires, now)
    assert (repeat.outcome, repeat.finished_event) == (ClaimOutcome.DUPLICATE, '{"ended": true}')

    await claimers[0].claim("lapsed@x", "c" * 64, "first", expires, now)
    later = now + timedelta(seconds=31)
    takers = await asyncio.gather(
        *(
            claims.claim("lapsed@x", "c" * 64, f"taker-{n}", expires, later)
            for n, claims in enumerate(claimers[1:])
        )
    )
    assert [t.outcome for t in takers].count(ClaimOutcome.TAKEN_OVER) == 1

    # Renewing keeps a live claim held; releasing lets the next claimer run it at once.
    await claimers[0].claim("renewed@x", "d" * 64, "mine", expires, now)
    await claimers[0].renew(["renewed@x"], later)
    held = await claimers[1].claim("renewed@x", "d" * 64, "theirs", expires, later + timedelta(seconds=5))
    assert held.outcome is ClaimOutcome.HELD
    await claimers[0].release("renewed@x", "mine")
    freed = await claimers[1].claim("renewed@x", "d" * 64, "theirs", expires, later)
    assert freed.outcome is ClaimOutcome.RUN


async def _ended_runs(store: Store, job: str, count: int) -> list[RunRow]:
    """``job``'s runs once there are ``count`` and all have ended; an empty list until then."""
    runs = await runs_of(store, job)
    return runs if len(runs) == count and all(run.finished_at for run in runs) else []
