"""Runs longer than RabbitMQ's consumer_timeout, on a private node whose timeout is 2 s.

A trigger whose timeout is above ``CRONFLEET_EARLY_ACK_SECONDS`` is acked once its run has
started: the run completes and is recorded once, where a trigger acked at the end is taken back
by the broker mid-run. Such a run lost with its worker (no redelivery will come) is found by
another worker through its lapsed claim, recorded ``lost`` and retried per ``on_lost``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import orjson
import pytest

from common.catalog import find_job
from common.clock import utcnow
from common.retries import claim_key
from common.settings import Settings
from common.signing import Role
from common.store import RunRow, Store, TriggerClaimRow
from common.topology import Topology
from tests.chaos.conftest import PrivateBroker
from tests.conftest import TEST_KEYS
from tests.fleet import Fleet, eventually
from tests.integration.helpers import apply_toml, runs_of

# The broker takes back a delivery unacked for 2 s; it looks every half second (the default
# look is once a minute).
RABBITMQ_CONF = "consumer_timeout = 2000\n"
RABBITMQ_ADVANCED = "[{rabbit, [{channel_tick_interval, 500}]}].\n"


def _settings(broker: PrivateBroker, tmp_path: Path, namespace: str, **extra: float) -> Settings:
    return Settings(
        amqp_url=broker.url,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'cronfleet.db'}",
        keys=TEST_KEYS,
        namespace=namespace,
        heartbeat_seconds=0.5,
        jobs_reload_seconds=0.3,
        claim_lease_seconds=3,
        allow_commands="*",
        **extra,
    )


@pytest.fixture
async def long_store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'cronfleet.db'}", upgrade=True)
    yield store
    await store.close()


async def _publish_job(settings: Settings, store: Store, name: str, script: str, extra: str = "") -> str:
    """Apply a shell job of 60 s timeout running ``script`` and publish its trigger; its id."""
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
    body = spec.trigger_at(now, now, manual=True).to_bytes()
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(Topology(settings.namespace).triggers_exchange)
        headers = settings.keyring().sign(Role.TRIGGER, settings.namespace, "default", body)
        await exchange.publish(aio_pika.Message(body, headers=dict(headers)), routing_key="default")
    return spec.trigger_at(now, now, manual=True).id


async def _ended(store: Store, job: str, count: int) -> list[RunRow] | None:
    runs = [run for run in await runs_of(store, job) if run.finished_at is not None]
    return runs if len(runs) >= count else None


async def test_a_run_longer_than_the_consumer_timeout_completes_and_is_recorded_once(
    private_broker: PrivateBroker, long_store: Store, tmp_path: Path
) -> None:
    settings = _settings(private_broker, tmp_path, f"long-{uuid.uuid4().hex[:8]}", early_ack_seconds=30)
    fleet = Fleet(settings)
    log = tmp_path / "log"
    try:
        await fleet.start("monitor", "worker", "worker")
        # A 60 s timeout is above the 30 s early-ack threshold: acked once it has started.
        await _publish_job(settings, long_store, "long", f"sleep 5; echo ran >> {log}")
        [run] = await eventually(lambda: _ended(long_store, "long", 1), timeout=60)
        assert run.status == "succeeded" and run.redelivered is False
        assert log.read_text() == "ran\n"
        # Another look once its end is recorded: nothing else was ever run or recorded for it.
        assert len(await runs_of(long_store, "long")) == 1
    finally:
        await fleet.stop()


async def test_without_the_early_ack_the_broker_takes_the_trigger_back_mid_run(
    private_broker: PrivateBroker, long_store: Store, tmp_path: Path
) -> None:
    """The control: the same run, acked at its end, outlives the consumer timeout and its trigger
    is delivered again mid-run (recorded as a duplicate, since its claim is held)."""
    settings = _settings(private_broker, tmp_path, f"late-{uuid.uuid4().hex[:8]}", early_ack_seconds=600)
    fleet = Fleet(settings)
    log = tmp_path / "log"
    try:
        await fleet.start("monitor", "worker", "worker")
        await _publish_job(settings, long_store, "late-ack", f"sleep 5; echo ran >> {log}")
        runs = await eventually(lambda: _ended(long_store, "late-ack", 2), timeout=60)
        assert "duplicate" in {run.status for run in runs}
    finally:
        await fleet.stop()


async def test_a_long_run_lost_with_its_worker_after_the_early_ack_is_recorded_lost_and_retried(
    private_broker: PrivateBroker, long_store: Store, tmp_path: Path
) -> None:
    namespace = f"lost-{uuid.uuid4().hex[:8]}"
    dying = Fleet(_settings(private_broker, tmp_path, namespace, early_ack_seconds=30, drain_seconds=0))
    surviving = Fleet(_settings(private_broker, tmp_path, namespace, early_ack_seconds=30))
    mark, log = tmp_path / "mark", tmp_path / "log"
    script = f"if [ -e {mark} ]; then echo second >> {log}; exit 0; fi; touch {mark}; sleep 60"
    try:
        await surviving.start("monitor")
        await dying.start("worker")
        trigger_id = await _publish_job(
            dying.settings,
            long_store,
            "lost-long",
            script,
            'retries = 1\nretry_backoff = "1s"\non_lost = "retry"',
        )
        [first] = await eventually(lambda: runs_of(long_store, "lost-long", status="running"))
        await eventually(lambda: _kept(long_store, trigger_id))
        await surviving.start("worker")
        await dying.stop()  # the worker dies mid-run; its trigger was acked: no redelivery

        runs = await eventually(lambda: _ended(long_store, "lost-long", 2), timeout=60)
        assert sorted((run.run_id == first.run_id, run.status) for run in runs) == [
            (False, "succeeded"),
            (True, "lost"),
        ]
        assert log.read_text() == "second\n"
        async with long_store.session() as session:
            second = await session.get(TriggerClaimRow, claim_key(trigger_id, 2))
        assert second is not None and second.finished_event is not None
        assert orjson.loads(second.finished_event)["attempt"] == 2
    finally:
        await surviving.stop()
        await dying.stop()


async def _kept(store: Store, trigger_id: str) -> bool:
    """Whether the run's claim keeps its trigger (it was acked)."""
    async with store.session() as session:
        claim = await session.get(TriggerClaimRow, trigger_id)
    return claim is not None and claim.trigger_body is not None
