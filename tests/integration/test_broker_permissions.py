"""The broker as a second wall: users given a role's rights by ``cronfleet broker permissions
--apply`` do what the role does, with cronfleet's own code, and RabbitMQ itself refuses them
(ACCESS_REFUSED) everything else.

Each test runs on a private virtual host of the shared broker, with users of its own; both are
deleted at the end. Nothing existing on the broker is touched."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from aiormq.exceptions import ChannelAccessRefused

from common.actions import ShellAction
from common.clock import utcnow
from common.connection import connect
from common.envelope import Rejected, RejectionReason
from common.errors import BrokerUnavailable
from common.messages import (
    JobHeartbeat,
    RunFinished,
    RunStarted,
    RunStatus,
    SchedulerHeartbeat,
    Trigger,
    WorkerHeartbeat,
)
from common.publisher import Publisher
from common.settings import Settings
from common.store import Store
from common.topology import Topology
from tests.conftest import AMQP_URL, TEST_KEYS, keyring
from tests.fleet import Fleet, cronfleet, eventually, run_cronfleet

pytestmark = pytest.mark.skipif(
    shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl on the shared broker's host"
)


def rabbitmqctl(*args: str, check: bool = True) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=check, capture_output=True, timeout=120)


@dataclass
class PrivateVhost:
    """A virtual host of the test's own, a namespace in it, and the users made for it."""

    name: str
    settings: Settings
    users: list[str] = field(default_factory=list)
    connections: list[AbstractRobustConnection] = field(default_factory=list)

    @property
    def topology(self) -> Topology:
        return Topology(self.settings.namespace)

    def add_user(self, role: str, *options: str) -> Settings:
        """A new user with ``role``'s rights, as ``cronfleet broker permissions --create-user
        --apply`` makes it; returns the settings of a process that logs in as that user."""
        user = f"test-perm-{role}-{uuid.uuid4().hex[:8]}"
        self.users.append(user)
        command = ["broker", "permissions", "--role", role, "--user", user, "--create-user", "--apply"]
        result = cronfleet(self.settings, *command, *options)
        assert result.returncode == 0, result.stderr
        found = re.search(r"CRONFLEET_AMQP_URL=(\S+)", result.stdout)
        assert found is not None, result.stdout
        return self.settings.model_copy(update={"amqp_url": found.group(1)})


@pytest.fixture
async def vhost(tmp_path: Path) -> AsyncIterator[PrivateVhost]:
    name = f"test-perm-{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", name)
    url = urlsplit(AMQP_URL)._replace(path=f"/{name}").geturl()
    # The fleet's store (a worker keeps its trigger claims there), at the current schema.
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'cronfleet.db'}"
    await (await Store.open(database_url, upgrade=True)).close()
    private = PrivateVhost(
        name,
        Settings(
            amqp_url=url,
            database_url=database_url,
            keys=TEST_KEYS,
            namespace=f"perm-{uuid.uuid4().hex[:8]}",
            allow_commands="*",
        ),
    )
    try:
        yield private
    finally:
        for connection in private.connections:
            await connection.close()
        # Together: each rabbitmqctl is a second or so of starting an Erlang VM.
        await asyncio.gather(
            *(asyncio.to_thread(rabbitmqctl, "delete_user", user, check=False) for user in private.users),
            asyncio.to_thread(rabbitmqctl, "delete_vhost", name),
        )


async def opened(vhost: PrivateVhost, settings: Settings, name: str, *, declare: bool = True) -> Publisher:
    """A publisher as the processes open it: ``Publisher.open`` (with ``declare``, every
    exchange and both shared queues are declared; without, as pings and workers open it, only
    looked up) on a connection as ``settings``' user, closed when the test ends."""
    connection = await connect(settings.amqp_url, name, wait=False)
    vhost.connections.append(connection)
    return await Publisher.open(connection, Topology(settings.namespace), keyring(), declare=declare)


def granted(vhost: PrivateVhost, user: str) -> tuple[str, str, str]:
    """(configure, write, read) as the broker holds them for ``user`` in the test's vhost."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_permissions", "-p", vhost.name],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for line in listed.splitlines():
        fields = line.split("\t")
        if fields[0] == user:
            return fields[1], fields[2], fields[3]
    raise AssertionError(f"{user} has no permissions in {vhost.name}: {listed}")


@dataclass(frozen=True)
class Action:
    """Something done on a channel, and what the broker names when it refuses it."""

    run: Callable[[AbstractChannel], Awaitable[object]]
    refusal: str


def publish(exchange: str, routing_key: str) -> Action:
    """Publish to ``exchange``: refused for want of write on it."""

    async def run(channel: AbstractChannel) -> None:
        target = await channel.get_exchange(exchange, ensure=False)
        await target.publish(aio_pika.Message(b'{"forged": true}'), routing_key=routing_key)

    return Action(run, f"access to exchange '{exchange or 'amq.default'}'")


def publish_topic(exchange: str, routing_key: str) -> Action:
    """Publish to topic ``exchange`` under ``routing_key``: refused by the topic rights."""
    return Action(publish(exchange, routing_key).run, f"access to topic '{routing_key}'")


def consume(queue: str) -> Action:
    """Consume ``queue``: refused for want of read on it."""

    async def ignore(_message: AbstractIncomingMessage) -> None:
        pass

    async def run(channel: AbstractChannel) -> None:
        await (await channel.get_queue(queue, ensure=False)).consume(ignore)

    return Action(run, f"access to queue '{queue}'")


def delete_queue(queue: str) -> Action:
    """Delete ``queue``: refused for want of configure on it."""

    async def run(channel: AbstractChannel) -> None:
        await channel.queue_delete(queue)

    return Action(run, f"access to queue '{queue}'")


def declare_exchange(exchange: str) -> Action:
    """Declare (not passively) ``exchange``: refused for want of configure on it."""

    async def run(channel: AbstractChannel) -> None:
        await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)

    return Action(run, f"access to exchange '{exchange}'")


async def refused(settings: Settings, action: Action) -> None:
    """Do ``action`` on a confirmed channel as ``settings``' user: the broker itself refuses it
    (ACCESS_REFUSED, naming the exchange, topic or queue)."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        with pytest.raises(ChannelAccessRefused) as caught:
            await action.run(channel)
    assert "ACCESS_REFUSED" in str(caught.value)
    assert action.refusal in str(caught.value), str(caught.value)


async def get_one(publisher: Publisher, queue: str) -> AbstractIncomingMessage:
    found = await publisher.channel.get_queue(queue, ensure=False)

    async def one() -> AbstractIncomingMessage | None:
        return await found.get(no_ack=False, fail=False)

    message: AbstractIncomingMessage = await eventually(one)
    return message


async def declare_everything(vhost: PrivateVhost, *pools: str) -> tuple[Settings, Publisher]:
    """As a new scheduler user: declare the topology and the pools' queues (a fresh namespace is
    created by a scheduler, a monitor or ``cronfleet apply``, never by a ping or a worker)."""
    scheduler = vhost.add_user("scheduler")
    publisher = await opened(vhost, scheduler, "test-scheduler")
    for pool in pools:
        await vhost.topology.declare_pool(publisher.channel, pool)
    return scheduler, publisher


def run_started(job: str, pool: str) -> RunStarted:
    now = utcnow()
    return RunStarted(
        run_id=uuid.uuid4().hex,
        trigger_id="t1",
        job=job,
        pool=pool,
        worker="w1",
        scheduled_at=now,
        started_at=now,
    )


async def test_a_scheduler_declares_the_topology_and_publishes_triggers_and_only_its_heartbeat(
    vhost: PrivateVhost,
) -> None:
    scheduler, publisher = await declare_everything(vhost, "a", "b")
    await publisher.trigger_body(b'{"t": 1}', "a", "trigger-1")
    await publisher.trigger_body(b'{"t": 2}', "b", "trigger-2")
    await publisher.event(SchedulerHeartbeat(scheduler="s1", at=utcnow(), jobs=0))
    events = vhost.topology.events_exchange
    await refused(scheduler, publish_topic(events, "run.finished.backup"))
    await refused(scheduler, publish_topic(events, "job.heartbeat.backup"))


async def test_a_ping_user_publishes_job_heartbeats_and_nothing_else(vhost: PrivateVhost) -> None:
    await declare_everything(vhost, "a")
    ping = vhost.add_user("ping")
    configure, _write, read = granted(vhost, vhost.users[-1])
    assert (configure, read) == ("^$", "^$")  # it can neither declare, delete nor read anything
    sent = await run_cronfleet(ping, "ping", "backup")
    assert sent.returncode == 0, sent.stderr
    topology = vhost.topology
    await refused(ping, delete_queue(topology.monitor_queue))
    await refused(ping, declare_exchange(topology.events_exchange))
    await refused(ping, publish(topology.triggers_exchange, "a"))
    await refused(ping, publish_topic(topology.events_exchange, "run.finished.backup"))
    await refused(ping, publish_topic(topology.events_exchange, "run.started.backup"))
    await refused(ping, publish_topic(topology.events_exchange, "worker.heartbeat.a"))
    await refused(ping, publish_topic(topology.events_exchange, "job.heartbeat.backup.x"))
    await refused(ping, publish_topic(topology.events_exchange, "job.heartbeat.backup\n"))
    await refused(ping, publish("", topology.pool_queue("a")))  # the default exchange
    await refused(ping, consume(topology.monitor_queue))
    await refused(ping, consume(topology.pool_queue("a")))
    # cronfleet's own publisher, opened passively as `cronfleet ping` does: a run event is refused.
    publisher = await opened(vhost, ping, "test-ping", declare=False)
    await publisher.event(JobHeartbeat(id="h1", job="backup", at=utcnow()))
    with pytest.raises(BrokerUnavailable, match="ACCESS_REFUSED"):
        await publisher.event(_finished(run_started("backup", "a")))


async def test_a_ping_user_narrowed_to_jobs_cannot_ping_another(vhost: PrivateVhost) -> None:
    await declare_everything(vhost)
    ping = vhost.add_user("ping", "--job", "backup")
    assert (await run_cronfleet(ping, "ping", "backup")).returncode == 0
    other = await run_cronfleet(ping, "ping", "report")
    assert other.returncode == 1
    assert "ACCESS_REFUSED" in other.stderr and "job.heartbeat.report" in other.stderr, other.stderr
    assert len(other.stderr.strip().splitlines()) == 1, other.stderr


async def test_a_worker_consumes_its_pool_and_publishes_events_and_dead_letters_never_a_trigger(
    vhost: PrivateVhost,
) -> None:
    _scheduler, scheduling = await declare_everything(vhost, "a", "b")
    await scheduling.trigger_body(b'{"t": 1}', "a", "trigger-1")
    worker = vhost.add_user("worker", "--pool", "a")
    assert granted(vhost, vhost.users[-1])[0] == "^$"  # no configure right at all
    topology = vhost.topology
    publisher = await opened(vhost, worker, "test-worker", declare=False)
    await topology.find_pool(publisher.channel, "a")  # as the worker's consumer does
    trigger = await get_one(publisher, topology.pool_queue("a"))
    assert trigger.body == b'{"t": 1}'
    started = run_started("backup", "a")
    await publisher.event(started)
    await publisher.event(_finished(started))
    await publisher.event(WorkerHeartbeat(worker="w1", pool="a", at=utcnow(), concurrency=1, running=0))
    # Events published together travel as one ``event.batch.a``, which its rights allow.
    beat = WorkerHeartbeat(worker="w1", pool="a", at=utcnow(), concurrency=1, running=1)
    await asyncio.gather(publisher.event(run_started("backup", "a")), publisher.event(beat))
    await publisher.dead_letter(trigger, Rejected(RejectionReason.MALFORMED, "test"), "w1")
    # A retry: the trigger again, through the 1 s delay queue, back in its pool with its attempt.
    await publisher.retry(trigger.body, trigger.headers, "a", 2, 1)
    await trigger.ack()
    retried = await get_one(publisher, topology.pool_queue("a"))
    assert retried.body == b'{"t": 1}' and retried.headers["cronfleet-attempt"] == 2
    assert retried.routing_key == "a"
    await retried.ack()
    await refused(worker, publish(topology.triggers_exchange, "a"))
    await refused(worker, publish(topology.triggers_exchange, "b"))
    await refused(worker, consume(topology.pool_queue("b")))
    await refused(worker, consume(topology.monitor_queue))
    await refused(worker, publish_topic(topology.events_exchange, "job.heartbeat.backup"))
    await refused(worker, publish_topic(topology.events_exchange, "worker.heartbeat.b"))
    await refused(worker, publish_topic(topology.events_exchange, "scheduler.heartbeat"))
    await refused(worker, publish_topic(topology.events_exchange, "event.batch.b"))
    await refused(worker, delete_queue(topology.pool_queue("a")))
    await refused(worker, delete_queue(topology.monitor_queue))
    await refused(worker, declare_exchange(topology.triggers_exchange))


async def test_a_worker_whose_user_may_not_publish_batches_sends_each_event_alone_after_one_warning(
    vhost: PrivateVhost,
) -> None:
    """A worker upgraded before its broker user's rights (docs/operations.md, "Upgrading to event
    batches"): its first batch is refused; its events then go alone, nothing is lost, and it says
    so once."""
    _scheduler, scheduling = await declare_everything(vhost, "a")
    worker = vhost.add_user("worker", "--pool", "a")
    topology = vhost.topology
    # The rights of a worker before event batches: its run events and its pool's heartbeats only.
    old = r"^(run\.(started|finished)\..*|worker\.heartbeat\.a)$"
    await asyncio.to_thread(
        rabbitmqctl,
        "set_topic_permissions",
        "-p",
        vhost.name,
        vhost.users[-1],
        topology.events_exchange,
        old,
        "^$",
    )
    publisher = await opened(vhost, worker, "test-worker", declare=False)
    with capture_logs("cronfleet.bus") as logged:
        for round_ in range(2):
            beat = WorkerHeartbeat(worker="w1", pool="a", at=utcnow(), concurrency=1, running=round_)
            async with asyncio.timeout(30):
                await asyncio.gather(
                    publisher.event(run_started(f"job-{round_}", "a")), publisher.event(beat)
                )
    assert sum("event.batch" in line for line in logged) == 1, logged
    monitor_queue = await scheduling.channel.get_queue(topology.monitor_queue, ensure=False)
    keys = []
    while (message := await monitor_queue.get(no_ack=True, fail=False)) is not None:
        keys.append(message.routing_key)
    assert sorted(keys) == [
        "run.started.job-0",
        "run.started.job-1",
        "worker.heartbeat.a",
        "worker.heartbeat.a",
    ]


async def test_a_worker_without_configure_rights_runs_triggers_end_to_end(vhost: PrivateVhost) -> None:
    """A real worker process, as a worker user, waits (one log line) for its pool's queue until
    a scheduler declares it, then runs a signed trigger; the run is in the monitor's queue."""
    _scheduler, scheduling = await declare_everything(vhost)
    worker = vhost.add_user("worker", "--pool", "a")
    running = Fleet(worker, declare_pools=False)
    try:
        starting = asyncio.create_task(running.start("worker", pool="a"))
        waiting = f"the queue {vhost.topology.pool_queue('a')!r} of pool 'a'"
        with capture_logs("cronfleet.worker") as logged:
            await eventually(lambda: _async(any(waiting in line for line in logged)))
            assert not starting.done()
            await vhost.topology.declare_pool(scheduling.channel, "a")  # as a scheduler does
            await starting
        assert sum(waiting in line for line in logged) == 1, logged
        trigger = _trigger("backup", "a")
        await scheduling.trigger_body(trigger.to_bytes(), "a", trigger.id)

        async def finished() -> dict[str, Any] | None:
            found = await (await scheduling.channel.get_queue(vhost.topology.monitor_queue)).get(
                no_ack=True, fail=False
            )
            if found is None:
                return None
            body = orjson.loads(found.body)  # one event, or a batch of them (event.batch.a)
            for event in body["events"] if body["type"] == "event.batch" else [body]:
                if event["type"] == "run.finished" and event["job"] == "backup":
                    return dict(event)
            return None

        event = await eventually(finished)
        assert event["status"] == "succeeded"
    finally:
        await running.stop()


async def test_a_monitor_consumes_events_and_dead_letters_them_but_publishes_no_trigger(
    vhost: PrivateVhost,
) -> None:
    _scheduler, scheduling = await declare_everything(vhost, "a")
    await scheduling.event(SchedulerHeartbeat(scheduler="s1", at=utcnow(), jobs=0))
    monitor = vhost.add_user("monitor")
    topology = vhost.topology
    publisher = await opened(vhost, monitor, "test-monitor")
    await topology.declare_monitor(publisher.channel)  # as the monitor's consumer does
    event = await get_one(publisher, topology.monitor_queue)
    assert event.routing_key == "scheduler.heartbeat"
    await publisher.dead_letter(event, Rejected(RejectionReason.MALFORMED, "test"), "m1")
    await event.ack()
    await refused(monitor, publish(topology.triggers_exchange, "a"))
    await refused(monitor, publish(topology.events_exchange, "scheduler.heartbeat"))
    await refused(monitor, consume(topology.pool_queue("a")))


async def test_an_admin_may_trigger_and_ping(vhost: PrivateVhost) -> None:
    await declare_everything(vhost)
    admin = vhost.add_user("admin")
    publisher = await opened(vhost, admin, "test-admin")
    await vhost.topology.declare_pool(publisher.channel, "a")
    await publisher.trigger_body(b'{"t": 1}', "a", "trigger-1")
    await publisher.event(JobHeartbeat(id="h1", job="backup", at=utcnow()))
    await refused(admin, publish_topic(vhost.topology.events_exchange, "run.finished.backup"))


async def test_apply_fails_in_one_line_without_rabbitmqctl_or_without_the_user(vhost: PrivateVhost) -> None:
    command = ["broker", "permissions", "--role", "ping", "--apply"]
    missing = await run_cronfleet(vhost.settings, *command, "--rabbitmqctl", "/nonexistent/rabbitmqctl")
    assert missing.returncode == 1
    assert missing.stderr.startswith("cronfleet: cannot run '/nonexistent/rabbitmqctl'"), missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    nobody = f"test-perm-nobody-{uuid.uuid4().hex[:8]}"
    absent = await run_cronfleet(vhost.settings, *command, "--user", nobody)
    assert absent.returncode == 1
    assert f"rabbitmqctl set_permissions for user {nobody!r} failed" in absent.stderr, absent.stderr
    assert "does not exist" in absent.stderr
    assert len(absent.stderr.strip().splitlines()) == 1


def test_print_shows_the_commands_and_runs_none(vhost: PrivateVhost) -> None:
    printed = cronfleet(
        vhost.settings, "broker", "permissions", "--role", "worker", "--pool", "gpu", "--print"
    )
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    user = f"{vhost.settings.namespace}-worker-gpu"
    assert lines[1].startswith(f"rabbitmqctl set_permissions -p {vhost.name} {user} '^$' '^(?:")
    assert lines[2].startswith(f"rabbitmqctl set_topic_permissions -p {vhost.name} {user} ")
    assert "add_user" not in printed.stdout


async def _async(value: bool) -> bool:
    return value


@contextlib.contextmanager
def capture_logs(name: str) -> Iterator[list[str]]:
    """The messages logged by logger ``name`` (at INFO and above) while inside."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler, logger = Keep(logging.INFO), logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def _trigger(job: str, pool: str) -> Trigger:
    now = utcnow()
    return Trigger(
        id=f"{job}@{now.isoformat()}",
        job=job,
        pool=pool,
        scheduled_at=now,
        published_at=now,
        expires_at=now + timedelta(minutes=5),
        timeout_seconds=10,
        action=ShellAction(argv=["true"]),
    )


def _finished(started: RunStarted) -> RunFinished:
    return RunFinished(
        **started.model_dump(exclude={"type"}),
        finished_at=started.started_at,
        duration_seconds=0,
        status=RunStatus.SUCCEEDED,
    )
