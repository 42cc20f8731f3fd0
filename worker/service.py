"""The worker process: consumes one pool with prefetch = concurrency and owns every run task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from datetime import timedelta
from typing import Any, TypeVar

from aio_pika.abc import AbstractRobustConnection
from aiormq.exceptions import ChannelNotFoundEntity

from common.acks import consume_acked
from common.clock import utcnow
from common.connection import CONNECT_ERRORS, broker_refusal, connect, open_channel
from common.errors import BrokerUnavailable, ConfigError, StoreUnavailable
from common.http_client import open_session
from common.messages import WorkerHeartbeat
from common.publisher import Publisher
from common.retry import until_done
from common.services import ServiceOptions
from common.settings import Settings
from common.store import Store
from common.topology import Topology
from common.trigger_claims import TriggerClaims
from worker.actions import executors
from worker.allow import CommandAllowList
from worker.consumer import TriggerHandler
from worker.functions import import_modules, registered_names
from worker.hardening import protect_secrets

log = logging.getLogger("cronfleet.worker")
T = TypeVar("T")


async def serve(settings: Settings, options: ServiceOptions) -> None:
    """Run a worker of ``options.pool`` until cancelled; waits out an unreachable broker."""
    if options.concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    keyring = settings.keyring()
    name = options.instance("worker")
    commands = CommandAllowList.parse(settings.allow_commands)
    protect_secrets()
    import_modules(options.imports)
    if options.imports:
        log.info("python functions this worker may run: %s", ", ".join(registered_names()) or "none")
    topology = Topology(settings.namespace)
    # The store holds the trigger claims that keep the fleet from running a trigger twice.
    store = await until_done(
        lambda: Store.open(settings.database_url, settings.database_schema),
        (StoreUnavailable,),
        log,
        "worker waiting for the store",
    )
    claims = TriggerClaims(store, name, timedelta(seconds=settings.claim_lease_seconds))
    try:
        connection = await connect(settings.amqp_url, name, wait=True)
    except BaseException:
        await store.close()
        raise
    try:
        # One session for every http run: at most one connection per run at a time.
        async with open_session(options.concurrency, user_agent="cronfleet-worker/1") as session:
            publisher = await _until_ready(
                lambda: Publisher.open(
                    connection,
                    topology,
                    keyring,
                    declare=False,
                    batch_events=settings.event_batches,
                    batch_pools=(options.pool,),
                )
            )
            await _until_ready(lambda: _find_pool(connection, topology, options.pool))
            handler = TriggerHandler(
                publisher,
                keyring,
                executors(session, commands),
                claims,
                pool=options.pool,
                early_ack_seconds=settings.early_ack_seconds,
            )
            log.info(
                "worker %s consuming pool %s (concurrency %d); shell commands allowed: %s",
                name,
                options.pool,
                options.concurrency,
                ", ".join(commands.patterns) or "none (CRONFLEET_ALLOW_COMMANDS is not set)",
            )
            runs = RunningJobs()
            try:
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(_heartbeat_forever(settings, options, publisher, handler, name))
                    tasks.create_task(handler.keep_claims())
                    tasks.create_task(handler.recover_lapsed())
                    # Asked to stop, it stops consuming and lets the running jobs finish, report
                    # and ack on their channel before it closes.
                    await consume_acked(
                        connection,
                        lambda channel: topology.find_pool(channel, options.pool),
                        options.concurrency,
                        lambda message: runs.start(
                            handler.handle(message), f"trigger {message.message_id or '?'}"
                        ),
                        options.ready,
                        on_stop=lambda: runs.drain(settings.drain_seconds),
                    )
            finally:
                # Whatever else ended consuming: the jobs still running finish on the open
                # connection (their channel gone, the broker has taken their triggers back).
                await runs.drain(settings.drain_seconds)
    finally:
        await connection.close()
        await store.close()


async def _until_ready(attempt: Callable[[], Awaitable[T]]) -> T:
    """``attempt()``'s result, retried with backoff while it raises BrokerUnavailable (the broker
    refused us, or what we use is not declared yet): one log line per new reason, not per try."""
    return await until_done(attempt, (BrokerUnavailable,), log, "worker waiting for the broker")


async def _find_pool(connection: AbstractRobustConnection, topology: Topology, pool: str) -> None:
    """Whether ``pool``'s queue exists, looked up passively on a channel of its own: a worker
    consumes it but does not create it (it has no ``configure`` right). Raises BrokerUnavailable
    naming the queue when it is missing or refused."""
    try:
        channel = await open_channel(connection)
        try:
            await topology.find_pool(channel, pool)
        finally:
            if not channel.is_closed:
                await channel.close()
    except CONNECT_ERRORS as exc:
        what = f"cannot consume the queue {topology.pool_queue(pool)!r} of pool {pool!r}"
        if isinstance(exc, ChannelNotFoundEntity):
            raise BrokerUnavailable(
                f"{what}: it does not exist yet (a scheduler declares it for the pools of its jobs, "
                "`cronfleet trigger` for the pool it triggers)"
            ) from exc
        raise BrokerUnavailable(broker_refusal(what, exc)) from exc


class RunningJobs:
    """The worker's run tasks: one per delivery, owned here, drained when the worker stops."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, run: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``run`` as a task named ``name`` that this object keeps until it ends."""
        task = asyncio.create_task(run, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, seconds: float) -> None:
        """Wait up to ``seconds`` for the running jobs, then kill what is left (their triggers
        go back to the queue and run again elsewhere, marked as redeliveries)."""
        if not self._tasks:
            return
        log.warning("stopping: waiting up to %gs for %d running job(s)", seconds, len(self._tasks))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        try:
            # A delivery that arrived as consuming stopped may start a job while these are waited for.
            while self._tasks and loop.time() < deadline:
                await asyncio.wait(set(self._tasks), timeout=deadline - loop.time())
        except asyncio.CancelledError:
            # Asked to stop again while waiting (a second signal): the jobs end now.
            await self._kill("were killed: asked to stop again")
            raise
        await self._kill("did not finish in time and were killed")

    async def _kill(self, why: str) -> None:
        """Cancel the jobs still running and wait for them to end."""
        left = set(self._tasks)
        for task in left:
            task.cancel()
        if left:
            log.warning(
                "stopping: %d job(s) %s: %s", len(left), why, ", ".join(sorted(t.get_name() for t in left))
            )
            await asyncio.gather(*left, return_exceptions=True)


async def _heartbeat_forever(
    settings: Settings,
    options: ServiceOptions,
    publisher: Publisher,
    handler: TriggerHandler,
    name: str,
) -> None:
    while True:
        beat = WorkerHeartbeat(
            worker=name,
            pool=options.pool,
            at=utcnow(),
            concurrency=options.concurrency,
            running=handler.running,
        )
        with contextlib.suppress(BrokerUnavailable):
            await publisher.event(beat)
        await asyncio.sleep(settings.heartbeat_seconds)
