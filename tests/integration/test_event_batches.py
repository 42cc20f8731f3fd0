"""Events sent together as one ``event.batch``: the publisher packs what it has ready, the monitor
records each event as if it had come alone, and a batch it cannot take whole ends on the
dead-letter queue with the place of the event at fault (docs/protocol.md 9.8)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection

import monitor.service
from common.clock import utcnow
from common.connection import connect
from common.consuming import Delivery
from common.envelope import REJECTION_DETAIL_HEADER, REJECTION_HEADER
from common.event_batches import batch_body
from common.messages import MONITORED_ADAPTER, EventBatch, RunFinished, RunStarted, RunStatus
from common.publisher import Publisher
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


async def _batch_delivered(
    settings: Settings, channel: AbstractChannel, queue: AbstractQueue, events: list[RunStarted]
) -> Delivery:
    """An ``event.batch`` of ``events`` published to ``queue`` and taken from it unacked."""
    exchange = (await Topology(settings.namespace).declare_exchanges(channel))["events"]
    await queue.bind(exchange, "event.batch.default")
    body = batch_body("default", [e.to_bytes() for e in events])
    headers = settings.keyring().sign(Role.EVENT, settings.namespace, "event.batch.default", body)
    await exchange.publish(aio_pika.Message(body, headers=headers), "event.batch.default")
    raw = await channel.get_underlay_channel()

    async def get() -> Delivery | None:
        delivered = await raw.basic_get(queue.name, no_ack=False)
        return Delivery(delivered) if delivered.delivery_tag is not None else None

    return await eventually(get)


async def test_a_backlog_of_batches_waits_unopened_and_is_written_in_transactions_of_at_most_500_events(
    settings: Settings, store: Store, amqp: AbstractRobustConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefetch counts messages: 1,000 batches of 500 events would hold 500,000 parsed events.
    Beyond OPENED_AHEAD_LIMIT events opened and waiting, a delivery waits as it came."""
    sizes: list[int] = []
    real = monitor.service.record_batch

    async def counted(session: Any, events: Any, now: Any) -> Any:
        sizes.append(len(events))
        return await real(session, events, now)

    monkeypatch.setattr(monitor.service, "record_batch", counted)
    channel = await amqp.channel()
    queue = await channel.declare_queue(exclusive=True)
    deliveries = [
        await _batch_delivered(
            settings, channel, queue, [_started(f"r{b}-{i}", "backlog") for i in range(400)]
        )
        for b in range(4)
    ]
    publisher = await Publisher.open(amqp, Topology(settings.namespace), settings.keyring())
    seen: list[Any] = []
    recorder = monitor.service.EventRecorder(
        store, publisher, settings.keyring(), "monitor-test", on_event=seen.append
    )
    for delivery in deliveries:
        recorder.receive(delivery)
    assert len(seen) == 3 * 400, "the fourth batch waits unopened: 1,200 events already wait opened"
    writing = asyncio.create_task(recorder.write_forever())
    try:
        await eventually(lambda: _recorded(store, "backlog", 1600))
        await eventually(lambda: asyncio.sleep(0, recorder.idle))
    finally:
        writing.cancel()
        await asyncio.gather(writing, return_exceptions=True)
        await channel.close()
    assert len(seen) == 1600
    assert sum(sizes) == 1600 and max(sizes) <= monitor.service.BATCH_LIMIT, sizes


async def test_a_worker_batches_the_events_of_its_own_pool_only(
    settings: Settings, amqp: AbstractRobustConnection
) -> None:
    """A worker may publish ``event.batch.<its pool>`` and no other: the ends it records for lost
    runs of another pool go alone."""
    topology = Topology(settings.namespace)
    connection = await connect(settings.amqp_url, "pool-publisher", wait=False)
    try:
        publisher = await Publisher.open(connection, topology, settings.keyring(), batch_pools=["default"])
        watch = await amqp.channel()
        everything = await watch.declare_queue(exclusive=True)
        await everything.bind(topology.events_exchange, routing_key="#")
        other = [_started(f"g{i}", "elsewhere").model_copy(update={"pool": "gpu"}) for i in range(5)]
        own = [_started(f"d{i}", "here") for i in range(5)]
        await asyncio.gather(*(publisher.event(e) for e in other + own))
    finally:
        await connection.close()
    keys = []
    while (message := await everything.get(fail=False)) is not None:
        keys.append(message.routing_key)
    assert sorted(keys) == ["event.batch.default"] + ["run.started.elsewhere"] * 5
