"""While the store is down the monitor holds what it received: nothing acked, nothing lost; and
when the outage lasts, it tells every alert channel, and again when it ends."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection
from sqlalchemy import make_url, select
from sqlalchemy.ext.asyncio import create_async_engine

from common.clock import utcnow
from common.consuming import Delivery
from common.messages import Event, HeartbeatKind, JobHeartbeat, WorkerHeartbeat
from common.publisher import Publisher
from common.settings import Settings
from common.signing import Role
from common.store import AlertAttemptRow, FleetHealthRow, Store
from common.topology import Topology, event_routing_key
from monitor.service import EventRecorder
from monitor.store_watch import STORE_ALERT_JOB
from tests.conftest import POSTGRES_URL
from tests.fleet import Fleet, eventually, run_cronfleet
from tests.integration import test_alert_channels as receivers
from tests.integration.helpers import apply_toml, flips_of, runs_of
from tests.integration.test_alert_channels import SECRET, Receiver
from tests.tcp_proxy import TcpProxy

# The real HTTP receiver of the channels' own tests.
receiver_fixture = pytest.fixture(name="receiver")(receivers.receiver.__wrapped__)


async def test_events_are_held_while_the_store_is_down_and_recorded_when_it_is_back(
    settings: Settings, store: Store, amqp: AbstractRobustConnection
) -> None:
    keyring = settings.keyring()
    channel = await amqp.channel()
    queue = await channel.declare_queue(exclusive=True)
    beat = JobHeartbeat(id="held-1", job="held", kind=HeartbeatKind.SUCCESS, at=utcnow())
    message = await _delivered(settings, channel, queue, beat, Role.PING)

    publisher = await Publisher.open(amqp, Topology(settings.namespace), keyring)
    unreachable = Store(create_async_engine("postgresql+asyncpg://cronfleet@127.0.0.1:1/none"))
    recorder = EventRecorder(unreachable, publisher, keyring, "monitor-test")
    writing = asyncio.create_task(recorder.write_batch([message]))
    try:
        await asyncio.sleep(1.5)  # several retries against the dead store
        assert not writing.done(), "the batch was given up while the store was down"
        assert await runs_of(store, "held") == []

        recorder.store = store  # the store is back
        await asyncio.wait_for(writing, timeout=20)
    finally:
        writing.cancel()
        await unreachable.close()

    runs = await runs_of(store, "held")
    assert [r.status for r in runs] == ["succeeded"]
    await channel.close()  # an unacked delivery would go back to the queue now
    check = await amqp.channel()
    left = await check.declare_queue(queue.name, passive=True)
    assert left.declaration_result.message_count == 0, "the event was recorded but never acked"


@pytest.mark.skipif(not POSTGRES_URL, reason="needs PostgreSQL (CRONFLEET_TEST_DATABASE_URL) to cut")
@pytest.mark.parametrize("settings", ["postgresql"], indirect=True)
async def test_a_long_store_outage_is_told_to_every_channel_and_so_is_its_end(
    settings: Settings, store: Store, receiver: Receiver, tmp_path: Path
) -> None:
    # The monitor reaches PostgreSQL through a proxy the test cuts: a real outage of a real store.
    target = make_url(settings.database_url)
    proxy = await TcpProxy(target.host or "127.0.0.1", target.port or 5432).start()
    through_proxy = target.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    channels = tmp_path / "channels.toml"
    channels.write_text(
        f'[channels.ops]\ntype = "webhook"\nurl = "{receiver.url("/ops")}"\nsecret = "{SECRET}"\n'
        "[delivery]\nattempts = 3\nfirst_delay_seconds = 0.1\nmax_delay_seconds = 0.2\n"
        # No job's alert goes to ops: the store's own alerts go to every channel regardless.
        "[routes]\ndefault = []\n"
    )
    monitor_settings = settings.model_copy(
        update={"database_url": through_proxy, "channels_file": channels, "store_outage_alert_seconds": 1.0}
    )
    fleet = Fleet(monitor_settings)
    await fleet.start("monitor")

    def told(kind: str) -> dict[str, Any] | None:
        for request in receiver.seen("/ops"):
            data = orjson.loads(request.body)["data"]
            if data["job"] == STORE_ALERT_JOB and data["kind"] == kind:
                return cast(dict[str, Any], data)
        return None

    try:
        await proxy.cut()
        alarm = await eventually(lambda: asyncio.sleep(0, told("alarm")), timeout=30)
        assert alarm["to_state"] == "down"
        assert "cannot reach its store" in alarm["reason"]
        assert told("recovery") is None, "recovered while the store was still cut"

        await proxy.start()
        recovery = await eventually(lambda: asyncio.sleep(0, told("recovery")), timeout=30)
        assert recovery["recovered_from"] == "down" and recovery["id"] != alarm["id"]

        async def stored() -> list[AlertAttemptRow] | None:
            async with store.session() as session:
                query = select(AlertAttemptRow).where(AlertAttemptRow.job == STORE_ALERT_JOB)
                rows = list((await session.execute(query)).scalars())
            return rows if {row.kind for row in rows if row.delivered} == {"alarm", "recovery"} else None

        # The alarm's attempt could not be stored when it was made: it is stored once the store is back.
        rows = await eventually(stored, timeout=30)
        assert {row.alert_id for row in rows} == {alarm["id"], recovery["id"]}
    finally:
        await fleet.stop()
        await proxy.cut()


async def test_a_store_outage_longer_than_the_heartbeat_timeout_takes_no_live_worker_for_silent(
    settings: Settings, store: Store
) -> None:
    """While the store is down the monitor's heartbeats wait with the events it holds. Once it is
    back, the fleet watch must not judge a worker by the heartbeats it had before the outage: the
    worker never stopped sending them, and its run goes on."""
    if store.dialect != "postgresql":
        pytest.skip("the monitor reaches the store through a TCP proxy the test cuts")
    await apply_toml(
        store,
        '[jobs.long]\nschedule = "0 0 1 1 *"\ntimeout_seconds = 120\n'
        'action = { type = "shell", argv = ["sleep", "60"] }\n',
    )
    target = make_url(settings.database_url)
    proxy = await TcpProxy(target.host or "127.0.0.1", target.port or 5432).start()
    through_proxy = target.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    # A heartbeat timeout of 3 s (not the suite's 1.5 s): a busy machine stalling this event loop
    # for a moment must not pass for a silent worker.
    watching = settings.model_copy(update={"database_url": through_proxy, "fleet_missed_heartbeats": 6})
    monitor = Fleet(watching)
    # Stopped at the end with its job still running: nothing to wait for.
    worker = Fleet(settings.model_copy(update={"drain_seconds": 0}))
    try:
        await monitor.start("monitor")
        await worker.start("worker")
        assert (await run_cronfleet(settings, "trigger", "long")).returncode == 0
        [run] = await eventually(lambda: runs_of(store, "long", status="running"), timeout=30)
        component = f"@worker:{run.worker}"
        await eventually(lambda: _component_state(store, component, "up"), timeout=30)

        await proxy.cut()
        # Two heartbeat timeouts without the store.
        await asyncio.sleep(2 * watching.fleet_missed_heartbeats * watching.heartbeat_seconds)
        await proxy.start()
        restored = utcnow()

        async def seen_since_restored() -> bool:
            found = await _component_state(store, component, "up")
            return found is not None and found > restored

        await eventually(seen_since_restored, timeout=30)
        # And a few looks more, in case one was still on its way.
        await asyncio.sleep(3 * settings.heartbeat_seconds)
    finally:
        await worker.stop()
        await monitor.stop()
        await proxy.cut()
    assert await flips_of(store, component) == [("new", "up")]
    assert [r.status for r in await runs_of(store, "long")] in (["running"], ["succeeded"], ["failed"])


async def _component_state(store: Store, component: str, state: str) -> datetime | None:
    """When the monitor last saw ``component`` (its ``seen_at``), if it is in ``state``."""
    async with store.session() as session:
        row = await session.get(FleetHealthRow, component)
    return row.seen_at if row is not None and row.state == state else None


async def test_a_heartbeat_reaches_the_fleet_watch_as_it_arrives_even_while_the_store_holds_events_up(
    settings: Settings, amqp: AbstractRobustConnection
) -> None:
    """The fleet watch judges workers by the heartbeats the recorder hands it. It handed them
    over when their batch was written: behind a store outage or a slow batch, a live worker's
    heartbeats waited unseen, and a worker could be judged silent while its proof of life sat in
    the monitor's own inbox."""
    keyring = settings.keyring()
    channel = await amqp.channel()
    queue = await channel.declare_queue(exclusive=True)
    job_beat = JobHeartbeat(id="held-2", job="held", kind=HeartbeatKind.SUCCESS, at=utcnow())
    held = await _delivered(settings, channel, queue, job_beat, Role.PING)
    worker_beat = WorkerHeartbeat(worker="w-alive", pool="default", at=utcnow(), concurrency=1, running=0)
    alive = await _delivered(settings, channel, queue, worker_beat, Role.EVENT)

    publisher = await Publisher.open(amqp, Topology(settings.namespace), keyring)
    unreachable = Store(create_async_engine("postgresql+asyncpg://cronfleet@127.0.0.1:1/none"))
    seen: list[Event] = []
    recorder = EventRecorder(unreachable, publisher, keyring, "monitor-test", on_event=seen.append)
    writing = asyncio.create_task(recorder.write_forever())
    try:
        recorder.receive(held)
        await eventually(lambda: asyncio.sleep(0, recorder.inbox.empty() and not recorder.idle))
        # The first batch is held by the store outage; the worker's heartbeat arrives meanwhile.
        recorder.receive(alive)
        assert worker_beat in seen
    finally:
        writing.cancel()
        await asyncio.gather(writing, return_exceptions=True)
        await unreachable.close()
        await channel.close()


async def _delivered(
    settings: Settings, channel: AbstractChannel, queue: AbstractQueue, event: Event, role: Role
) -> Delivery:
    """``event`` published signed with ``role`` under its own topic (the monitor refuses an event
    under another one, wrong_routing_key) to ``queue``, and taken from it unacked."""
    events = (await Topology(settings.namespace).declare_exchanges(channel))["events"]
    body = event.to_bytes()
    routing_key = event_routing_key(event)
    await queue.bind(events, routing_key)
    job = event.job if isinstance(event, JobHeartbeat) else None
    headers = settings.keyring().sign(role, settings.namespace, routing_key, body, job=job)
    await events.publish(aio_pika.Message(body, headers=headers), routing_key)
    raw = await channel.get_underlay_channel()

    async def get() -> Delivery | None:
        delivered = await raw.basic_get(queue.name, no_ack=False)
        return Delivery(delivered) if delivered.delivery_tag is not None else None

    return await eventually(get)
