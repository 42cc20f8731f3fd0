"""Events sent together as one ``event.batch``: the publisher packs what it has ready, the monitor
records each event as if it had come alone, and a batch it cannot take whole ends on the
dead-letter queue with the place of the event at fault (docs/protocol.md 9.8)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from common.bus import Publisher, connect
from common.clock import utcnow
from common.envelope import REJECTION_DETAIL_HEADER, REJECTION_HEADER
from common.event_batches import batch_body
from common.messages import MONITORED_ADAPTER, EventBatch, RunFinished, RunStarted, RunStatus
from common.settings import Settings
from common.signing import Role
from common.store import Store
from common.topology import Topology
from tests.conftest import Start
from tests.fleet import eventually
from tests.integration.helpers import runs_of
from tests.integration.test_poison import DeadLetters


async def _send_batch(amqp: AbstractRobustConnection, settings: Settings, body: bytes) -> None:
    """``body`` published as an ``event.batch`` of pool ``default``, signed by the event key."""
    channel = await amqp.channel()
    exchange = await channel.get_exchange(Topology(settings.namespace).events_exchange)
    headers = settings.keyring().sign(Role.EVENT, settings.namespace, "event.batch.default", body)
    await exchange.publish(aio_pika.Message(body, headers=headers), routing_key="event.batch.default")


def _started(run_id: str, job: str, trigger: str | None = None) -> RunStarted:
    now = utcnow()
    return RunStarted(
        run_id=run_id,
        trigger_id=trigger or f"t-{run_id}",
        job=job,
        pool="default",
        worker="w",
        scheduled_at=now,
        started_at=now,
    )


async def _recorded(store: Store, job: str, count: int) -> bool:
    return len(await runs_of(store, job)) == count


async def test_events_published_together_travel_as_batches_and_are_each_recorded(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection
) -> None:
    await fleet("monitor")
    topology = Topology(settings.namespace)
    watch = await amqp.channel()
    batches = await watch.declare_queue(exclusive=True)
    await batches.bind(topology.events_exchange, routing_key="event.batch.*")
    connection = await connect(settings.amqp_url, "batch-publisher", wait=False)
    try:
        publisher = await Publisher.open(connection, topology, settings.keyring(), declare=False)
        starts = [_started(f"r{i}", "together") for i in range(60)]
        ends = [
            RunFinished(
                **s.model_dump(exclude={"type"}),
                finished_at=s.started_at + timedelta(seconds=1),
                duration_seconds=1,
                status=RunStatus.SUCCEEDED,
            )
            for s in starts
        ]
        await asyncio.gather(*(publisher.event(e) for e in starts))
        await asyncio.gather(*(publisher.event(e) for e in ends))
    finally:
        await connection.close()

    async def all_ended() -> bool:
        return len(await runs_of(store, "together", status="succeeded")) == 60

    await eventually(all_ended)
    carried = 0
    while (message := await batches.get(fail=False)) is not None:
        batch = MONITORED_ADAPTER.validate_json(message.body)
        assert isinstance(batch, EventBatch) and message.routing_key == "event.batch.default"
        carried += len(batch.events)
    assert carried == 120, "every event published together went in a batch"


async def test_a_batch_whose_event_reuses_an_id_records_the_others_and_dead_letters_a_copy_naming_it(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection
) -> None:
    await fleet("monitor")
    dead = await DeadLetters.open(amqp, settings)
    await _send_batch(amqp, settings, batch_body("default", [_started("r1", "owner").to_bytes()]))
    await eventually(lambda: _recorded(store, "owner", 1))

    body = batch_body(
        "default",
        [
            _started("r2", "owner").to_bytes(),
            _started("r1", "intruder").to_bytes(),  # r1 is owner's
            _started("r3", "owner").to_bytes(),
        ],
    )
    await _send_batch(amqp, settings, body)
    [letter] = await dead.wait_for(1)
    headers = letter.headers or {}
    assert headers[REJECTION_HEADER] == "id_conflict"
    assert str(headers[REJECTION_DETAIL_HEADER]).startswith("events.1: run 'r1' is recorded for job 'owner'")
    assert letter.body == body
    await eventually(lambda: _recorded(store, "owner", 3))
    assert await runs_of(store, "intruder") == []

    # Replaying the copy records nothing twice, and is refused again for the same event.
    await _send_batch(amqp, settings, body)
    await dead.wait_for(2)
    assert dead.reasons() == {"id_conflict": 2}
    assert len(await runs_of(store, "owner")) == 3


async def test_a_batch_with_one_malformed_event_is_dead_lettered_whole_and_records_nothing(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection
) -> None:
    await fleet("monitor")
    dead = await DeadLetters.open(amqp, settings)
    good = _started("r1", "whole").to_bytes()
    bad = _started("r2", "whole").to_bytes().replace(b'"job":"whole"', b'"job":7')
    await _send_batch(amqp, settings, batch_body("default", [good, bad]))
    [letter] = await dead.wait_for(1)
    headers = letter.headers or {}
    assert headers[REJECTION_HEADER] == "malformed"
    assert str(headers[REJECTION_DETAIL_HEADER]).startswith("event.batch.events.1.run.started.job: ")
    assert await runs_of(store, "whole") == []

    # The monitor goes on: the good event, sent again in a batch of its own, is recorded.
    await _send_batch(amqp, settings, batch_body("default", [good]))
    await eventually(lambda: _recorded(store, "whole", 1))


async def test_with_batches_off_every_event_goes_alone_under_its_own_topic(
    settings: Settings, amqp: AbstractRobustConnection
) -> None:
    """``CRONFLEET_EVENT_BATCHES=false``: for a monitor or broker rights not yet upgraded."""
    topology = Topology(settings.namespace)
    connection = await connect(settings.amqp_url, "single-publisher", wait=False)
    try:
        publisher = await Publisher.open(connection, topology, settings.keyring(), batch_events=False)
        watch = await amqp.channel()
        everything = await watch.declare_queue(exclusive=True)
        await everything.bind(topology.events_exchange, routing_key="#")
        await asyncio.gather(*(publisher.event(_started(f"r{i}", "alone")) for i in range(20)))
    finally:
        await connection.close()
    keys = []
    while (message := await everything.get(fail=False)) is not None:
        keys.append(message.routing_key)
    assert keys == ["run.started.alone"] * 20
