"""End-to-end benchmark: cronfleet's trigger path against a bare aio-pika ceiling, in one run.

Not a test (pytest does not collect ``bench_*.py``). Run it from the repository root::

    .venv/bin/python tests/bench/bench_e2e.py --triggers 2000

It measures, against the RabbitMQ at ``--amqp-url`` and a throwaway SQLite store:

1. **Trigger throughput.** N triggers are claimed and published the way the scheduler does
   (``common.fires.publish_claimed``: outbox insert, signed, pipelined confirms, in batches),
   consumed by the real worker (``worker.service.serve``, its executors swapped for a no-op so the
   action costs nothing), whose ``run.started`` and ``run.finished`` events are recorded by the real
   monitor (``monitor.service.serve``). The clock runs from the first publish until the runs table
   holds N succeeded runs.
2. **Fire lag.** The real scheduler (``scheduler.service.serve``) plans ``--fire-jobs`` jobs, all
   on ``* * * * * *``, for ``--seconds`` seconds, with the worker and monitor consuming. The lag
   is ``fires.published_at - fires.scheduled_at`` from the fires table; beside it, the confirmed
   lag (when the broker confirmed the trigger, from wrappers around ``Publisher.trigger_body(ies)``),
   the dispatch lag ``runs.started_at - runs.scheduled_at``, and how many triggers were published
   and run more than once.
3. **The ceiling.** A bare aio-pika loop with the same message size and headers: publish with
   confirms (pipelined the same way) -> consume -> ack, on throwaway quorum and classic queues.

``--mode inproc`` (the default) runs the worker and the monitor as tasks in this event loop, as
``cronfleet run`` does; ``--mode procs`` runs each in its own process, as a real deployment does.
``--celery-beat`` runs Celery beat after each fire-lag run, on as many ``schedule(1.0)`` entries
for as long (``ref_celery_beat.py``), and prints both side by side.
Every queue and exchange it creates is deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import math
import multiprocessing
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import Any

import aio_pika
from sqlalchemy import func, select

import monitor.service
import scheduler.service
import worker.service
from common import fires

# The repository, so that tests.bench imports when this file runs as a script.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common.actions import AnyAction, ShellAction
from common.catalog import apply_jobs
from common.clock import utcnow
from common.connection import connect
from common.framing import FramedMessage
from common.jobs import JobSpec
from common.messages import RunStatus, Trigger, trigger_id
from common.publisher import Publisher
from common.services import ServiceOptions
from common.settings import Settings
from common.signing import Role
from common.store import FireRow, RunRow, Store
from common.topology import Topology
from tests.bench.machine import machine
from worker.actions import ActionResult, Executor, RunContext

ROOT = str(Path(__file__).resolve().parents[2])
POOL = "default"
SUCCEEDED = RunStatus.SUCCEEDED.value
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SERVICES: dict[str, Callable[[Settings, ServiceOptions], Awaitable[None]]] = {
    "worker": worker.service.serve,
    "monitor": monitor.service.serve,
    "scheduler": scheduler.service.serve,
}


# --- the no-op action -------------------------------------------------------------------------


class NoopExecutor:
    """Succeeds at once: the benchmark measures cronfleet's path, not ``fork``/``exec``."""

    async def run(self, action: AnyAction, timeout: float, context: RunContext) -> ActionResult:
        return ActionResult(RunStatus.SUCCEEDED)


def _noop_executors(_client: object, _commands: object) -> dict[str, Executor]:
    return {"shell": NoopExecutor(), "http": NoopExecutor(), "python": NoopExecutor()}


def install_noop_executors() -> None:
    """Make ``worker.service.serve`` build its TriggerHandler with no-op executors.

    Everything else in the worker (connection, confirmed publisher, prefetch, one task per
    delivery, verify + parse, run.started / run.finished, ack) is the real code.
    """
    worker.service.executors = _noop_executors  # type: ignore[assignment]


# --- running the services ---------------------------------------------------------------------


def make_settings(amqp_url: str, database_url: str, keys: str, namespace: str) -> Settings:
    return Settings(amqp_url=amqp_url, database_url=database_url, keys=keys, namespace=namespace)


async def start_service(name: str, settings: Settings, concurrency: int) -> asyncio.Task[None]:
    """Start ``name``'s real ``serve`` as a task; return once it is consuming (options.ready)."""
    options = ServiceOptions(pool=POOL, concurrency=concurrency, name=f"bench-{name}")
    task = asyncio.create_task(SERVICES[name](settings, options), name=name)
    ready = asyncio.create_task(options.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if ready not in done:
        ready.cancel()
        if task in done:
            task.result()  # raises what stopped it
        task.cancel()
        raise RuntimeError(f"{name} did not become ready in 60 s")
    return task


async def stop_task(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it; report (not raise) an error it died of before or on the way."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return
    except Exception as exc:
        print(f"!! {task.get_name()} died: {exc!r}", file=sys.stderr, flush=True)


def _child(
    name: str, settings: dict[str, str], concurrency: int, ready: ProcessEvent, stop: ProcessEvent, level: str
) -> None:
    """Entry point of a service child process (``--mode procs``)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    install_noop_executors()

    async def main() -> None:
        task = await start_service(name, Settings(**settings), concurrency)
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        await stop_task(task)

    asyncio.run(main())


@dataclass
class Fleet:
    """The worker and the monitor of one namespace, in this event loop or in child processes."""

    settings: Settings
    mode: str
    concurrency: int
    log_level: str
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _procs: list[tuple[Any, ProcessEvent]] = field(default_factory=list)

    async def start(self) -> None:
        if self.mode == "none":
            return  # the scheduler alone: its triggers wait in the pool's queue
        for name in ("monitor", "worker"):
            if self.mode == "inproc":
                self._tasks.append(await start_service(name, self.settings, self.concurrency))
                continue
            context = multiprocessing.get_context("spawn")
            ready, stop = context.Event(), context.Event()
            fields = {
                "amqp_url": self.settings.amqp_url,
                "database_url": self.settings.database_url,
                "keys": self.settings.keys,
                "namespace": self.settings.namespace,
            }
            process = context.Process(
                target=_child,
                args=(name, fields, self.concurrency, ready, stop, self.log_level),
                name=f"bench-{name}",
                daemon=True,
            )
            process.start()
            self._procs.append((process, stop))
            loop = asyncio.get_running_loop()
            if not await loop.run_in_executor(None, ready.wait, 60):
                raise RuntimeError(f"{name} process did not become ready in 60 s")

    async def stop(self) -> None:
        for task in reversed(self._tasks):
            await stop_task(task)
        self._tasks.clear()
        loop = asyncio.get_running_loop()
        for process, stop in reversed(self._procs):
            stop.set()
            await loop.run_in_executor(None, process.join, 30)
            if process.is_alive():
                process.terminate()
                await loop.run_in_executor(None, process.join, 5)
        self._procs.clear()


# --- measuring --------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of ``values`` (``p`` in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(p / 100 * len(ordered))))
    return ordered[rank - 1]


async def count_succeeded(store: Store, since: datetime | None = None) -> int:
    """Succeeded runs finished at or after ``since``: counted through the ``finished_at`` index
    (ix_runs_finished), not by scanning the growing table every 20 ms."""
    query = select(func.count()).select_from(RunRow).where(RunRow.finished_at >= (since or EPOCH))
    async with store.session() as session:
        return int(await session.scalar(query.where(RunRow.status == SUCCEEDED)) or 0)


async def wait_for_runs(
    store: Store, n: int, since: datetime, *, poll: float = 0.02, stall: float = 60.0
) -> float:
    """Poll the runs table until it holds ``n`` succeeded runs; return that instant (perf_counter).

    Raises RuntimeError when the count has not moved for ``stall`` seconds.
    """
    last, moved = -1, time.perf_counter()
    while True:
        count = await count_succeeded(store, since)
        now = time.perf_counter()
        if count >= n:
            return now
        if count != last:
            last, moved = count, now
        elif now - moved > stall:
            raise RuntimeError(f"stalled at {count}/{n} succeeded runs")
        await asyncio.sleep(poll)


async def declare_pool(connection: Any, namespace: str) -> None:
    """Declare the pool's queue as a scheduler would: a worker waits for it before consuming."""
    channel = await connection.channel()
    try:
        await Topology(namespace).declare_pool(channel, POOL)
    finally:
        await channel.close()


def bench_jobs(count: int, schedule: str) -> list[JobSpec]:
    return [
        JobSpec(name=f"bench-{i:04d}", schedule=schedule, action=ShellAction(argv=["true"]), pool=POOL)
        for i in range(count)
    ]


FIRE_LAG_ZONES = ("UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe")


# Two points that split the seconds field 0-59 into three ranges: 1,711 ways.
_SPLITS = [(a, b) for a in range(59) for b in range(a + 1, 59)]


def every_second_schedule(index: int) -> str:
    """A schedule that fires every second, written differently for each ``index`` (up to 1,711):
    the seconds field split into three ranges at two points. The scheduler must evaluate each
    job's own expression, as for a real fleet, not one expression shared by every job."""
    a, b = _SPLITS[index]
    return f"0-{a},{a + 1}-{b},{b + 1}-59 * * * * *"


def fire_lag_jobs(count: int) -> list[JobSpec]:
    """``count`` jobs firing every second, each with its own expression and one of five zones."""
    if count > len(_SPLITS):
        raise ValueError("at most 1,711 fire-lag jobs (distinct every-second expressions)")
    return [
        JobSpec(
            name=f"bench-{i:04d}",
            schedule=every_second_schedule(i),
            timezone=FIRE_LAG_ZONES[i % len(FIRE_LAG_ZONES)],
            action=ShellAction(argv=["true"]),
            pool=POOL,
        )
        for i in range(count)
    ]


@dataclass
class Throughput:
    triggers: int
    publish_seconds: float
    total_seconds: float
    body_bytes: int
    round: int = 0

    @property
    def per_second(self) -> float:
        return self.triggers / self.total_seconds

    @property
    def publish_per_second(self) -> float:
        return self.triggers / self.publish_seconds


async def trigger_throughput(
    settings: Settings, n: int, batch: int, jobs: int, fleet: Fleet
) -> tuple[Throughput, Trigger]:
    """Publish ``n`` triggers as the scheduler does; time until ``n`` runs are recorded."""
    store = await Store.open(settings.database_url, upgrade=True)
    connection = await connect(settings.amqp_url, "bench-publisher", wait=False)
    try:
        specs = bench_jobs(jobs, "*/5 * * * *")
        await apply_jobs(store, specs, utcnow())
        await declare_pool(connection, settings.namespace)
        await fleet.start()
        publisher = await Publisher.open(connection, Topology(settings.namespace), settings.keyring())
        base = utcnow()
        # Built before the clock starts (the scheduler builds them in fire_due, before the claim).
        triggers = [specs[i % jobs].trigger_at(base + timedelta(microseconds=i), base) for i in range(n)]
        started = time.perf_counter()
        for first in range(0, n, batch):
            won = await fires.publish_claimed(
                store, publisher, triggers[first : first + batch], "bench", utcnow()
            )
            if len(won) != len(triggers[first : first + batch]):
                raise RuntimeError("a bench trigger was already claimed")
        published = time.perf_counter()
        finished = await wait_for_runs(store, n, base)
        await fleet.stop()
        result = Throughput(
            n, published - started, finished - started, body_bytes=len(triggers[0].to_bytes())
        )
        return result, triggers[0]
    finally:
        await fleet.stop()
        await connection.close()
        await store.close()


class ConfirmLog:
    """Instrumentation only: when each trigger's publish returned, i.e. the broker confirmed it.

    ``Publisher.trigger_body`` returns once the confirm is in, and ``Publisher.send_triggers``
    (the scheduler's path, ``trigger_bodies`` included) returns each trigger's own confirm
    instant: wrapping both gives the instant each fire really left the scheduler.
    """

    def __init__(self) -> None:
        self.times: dict[str, list[datetime]] = defaultdict(list)
        self._originals: tuple[Any, Any] | None = None

    def __enter__(self) -> ConfirmLog:
        one, many = Publisher.trigger_body, Publisher.send_triggers
        self._originals = (one, many)
        times = self.times

        async def trigger_body(publisher: Publisher, body: bytes, pool: str, message_id: str) -> None:
            await one(publisher, body, pool, message_id)
            times[message_id].append(utcnow())

        async def send_triggers(
            publisher: Publisher, framed: Sequence[FramedMessage]
        ) -> list[datetime | BaseException]:
            results = await many(publisher, framed)
            for message, result in zip(framed, results, strict=True):
                if isinstance(result, datetime):
                    times[str(message.properties.message_id)].append(result)
            return results

        Publisher.trigger_body = trigger_body  # type: ignore[method-assign,assignment]
        Publisher.send_triggers = send_triggers  # type: ignore[method-assign]
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self._originals is not None
        Publisher.trigger_body, Publisher.send_triggers = self._originals  # type: ignore[method-assign]


@dataclass
class FireLag:
    jobs: int
    seconds: float
    fires: int
    lag: list[float]
    confirmed: list[float]
    dispatch: list[float]
    due: int
    published_due: int
    per_second: float
    duplicate_publishes: int
    duplicate_runs: int
    stop_seconds: float
    drained: bool
    by_second: list[tuple[float, float, float]] = field(default_factory=list)
    steady: list[float] = field(default_factory=list)
    warmup: int = 0
    cpu_seconds: float = 0.0


async def settle_runs(store: Store, triggers: int, *, stall: float = 30.0) -> bool:
    """Wait until ``triggers`` distinct triggers have a succeeded run and the runs table is still.

    Returns False (and says so) when the count stops moving for ``stall`` seconds first.
    """
    distinct = select(func.count(RunRow.trigger_id.distinct())).where(RunRow.status == SUCCEEDED)
    last, moved = -1, time.perf_counter()
    while True:
        async with store.session() as session:
            done = int(await session.scalar(distinct) or 0)
        total = await count_succeeded(store)
        now = time.perf_counter()
        if total != last:
            last, moved = total, now
        elif done >= triggers and now - moved > 1.0:
            return True
        elif now - moved > stall:
            print(
                f"!! the runs stalled at {done}/{triggers} triggers; reporting what was recorded", flush=True
            )
            return False
        await asyncio.sleep(0.05)


async def fire_lag(settings: Settings, jobs: int, seconds: float, fleet: Fleet, warmup: int = 0) -> FireLag:
    """Run the real scheduler on ``jobs`` every-second jobs for ``seconds``; read the fires table.
    ``steady`` leaves out the fires of the first ``warmup`` seconds (the scheduler's start-up:
    its first read of every spec, its first sweep)."""
    store = await Store.open(settings.database_url, upgrade=True)
    try:
        specs = fire_lag_jobs(jobs)
        await apply_jobs(store, specs, utcnow())
        connection = await connect(settings.amqp_url, "bench-declare", wait=False)
        try:
            await declare_pool(connection, settings.namespace)
        finally:
            await connection.close()
        await fleet.start()
        with ConfirmLog() as confirms:
            task = await start_service("scheduler", settings, 1)
            began, cpu = utcnow(), time.process_time()
            await asyncio.sleep(seconds)
            ended, cpu = utcnow(), time.process_time() - cpu
            await stop_task(task)
            stopping = (utcnow() - ended).total_seconds()
        # A service cancelled mid-transaction can leave its SQLite connection (and the write
        # lock) behind until it is collected; collect it so the monitor can go on writing.
        gc.collect()
        async with store.session() as session:
            fired = (
                await session.execute(select(FireRow.trigger_id, FireRow.scheduled_at, FireRow.published_at))
            ).all()
        published_at = {fire_id: published for fire_id, _at, published in fired}
        # Every fire due while the scheduler ran (each job once per whole second in (began,
        # ended]) counts, published or not: a fire never published is late by at least
        # ``ended - due`` and counts with that lag (no survivor bias).
        first = math.floor(began.timestamp()) + 1
        last = math.floor(ended.timestamp())
        slots = max(1, last - first + 1)
        due = [
            (trigger_id(spec.name, at), at)
            for second in range(first, last + 1)
            for at in [datetime.fromtimestamp(second, UTC)]
            for spec in specs
        ]
        recorded, confirmed, unpublished = [], [], 0
        for fire_id, at in due:
            published = published_at.get(fire_id)
            confirm = confirms.times.get(fire_id)
            if published is None or not confirm:
                unpublished += 1
            recorded.append(((published or ended) - at).total_seconds())
            confirmed.append(((confirm[0] if confirm else ended) - at).total_seconds())
        in_window = len(due) - unpublished
        steady = recorded[warmup * len(specs) :]
        # Each second's first, median and last fire: where in a second the lag builds up.
        by_second = [
            (min(chunk), percentile(chunk, 50), max(chunk))
            for start in range(0, len(recorded), len(specs))
            for chunk in [recorded[start : start + len(specs)]]
        ]
        # Let the worker and the monitor drain what was published, then read the dispatch lag.
        drained = fleet.mode == "none" or await settle_runs(store, len(confirms.times))
        await fleet.stop()
        async with store.session() as session:
            runs = (
                []
                if fleet.mode == "none"
                else (
                    await session.execute(
                        select(
                            RunRow.trigger_id,
                            func.min(RunRow.scheduled_at),
                            func.min(RunRow.started_at),
                            func.count(),
                        )
                        .where(RunRow.status == SUCCEEDED)
                        .group_by(RunRow.trigger_id)
                    )
                ).all()
            )
        window = (ended - began).total_seconds()
        return FireLag(
            jobs=jobs,
            seconds=window,
            fires=len(confirms.times),
            lag=recorded,
            confirmed=confirmed,
            dispatch=[(_aware(start) - _aware(at)).total_seconds() for _id, at, start, _n in runs],
            due=len(due),
            published_due=in_window,
            per_second=in_window / slots,
            stop_seconds=stopping,
            drained=drained,
            by_second=by_second,
            steady=steady,
            warmup=warmup,
            duplicate_publishes=sum(1 for times in confirms.times.values() if len(times) > 1),
            duplicate_runs=sum(1 for *_rest, n in runs if n > 1),
            cpu_seconds=cpu,
        )
    finally:
        await fleet.stop()
        await store.close()


def _aware(moment: datetime) -> datetime:
    """Aggregates (min) bypass the column type: SQLite gives back naive UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass
class Ceiling:
    queue_type: str
    messages: int
    publish_seconds: float
    total_seconds: float
    round: int = 0

    @property
    def per_second(self) -> float:
        return self.messages / self.total_seconds


async def bare_ceiling(
    amqp_url: str, queue_name: str, queue_type: str, n: int, batch: int, sample: Trigger, keys: str
) -> Ceiling:
    """publish (confirmed, pipelined in batches) -> consume -> ack, nothing else."""
    body = sample.to_bytes()
    headers = Settings(keys=keys).keyring().sign(Role.TRIGGER, "bench", sample.pool, body)
    producer = await aio_pika.connect_robust(
        amqp_url, client_properties={"connection_name": "bench-bare-pub"}
    )
    consumer = await aio_pika.connect_robust(
        amqp_url, client_properties={"connection_name": "bench-bare-sub"}
    )
    try:
        publish_channel = await producer.channel(publisher_confirms=True, on_return_raises=True)
        consume_channel = await consumer.channel()
        await consume_channel.set_qos(prefetch_count=monitor.service.PREFETCH)
        queue = await consume_channel.declare_queue(
            queue_name, durable=True, arguments={"x-queue-type": queue_type}
        )
        received = 0
        done = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal received
            await message.ack()
            received += 1
            if received >= n:
                done.set()

        consumer_tag = await queue.consume(on_message)
        exchange = publish_channel.default_exchange

        def message(i: int) -> aio_pika.Message:
            return aio_pika.Message(
                body,
                headers=dict(headers),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=f"bare-{i}",
                timestamp=datetime.now(UTC),
            )

        started = time.perf_counter()
        for first in range(0, n, batch):
            await asyncio.gather(
                *(
                    exchange.publish(message(i), routing_key=queue_name, mandatory=True)
                    for i in range(first, min(n, first + batch))
                )
            )
        published = time.perf_counter()
        await asyncio.wait_for(done.wait(), timeout=120)
        finished = time.perf_counter()
        await queue.cancel(consumer_tag)
        await consume_channel.queue_delete(queue_name)
        return Ceiling(queue_type, n, published - started, finished - started)
    finally:
        await producer.close()
        await consumer.close()


async def cleanup(amqp_url: str, namespaces: Sequence[str], queues: Sequence[str]) -> None:
    """Delete the namespaces' queues and exchanges and the bare queues (each in its own channel)."""
    connection = await aio_pika.connect_robust(amqp_url, client_properties={"connection_name": "bench-clean"})
    try:
        for namespace in namespaces:
            channel = await connection.channel()
            await Topology(namespace).delete(channel, [POOL])
            await channel.close()
        for queue in queues:
            channel = await connection.channel()
            await channel.queue_delete(queue)
            await channel.close()
    finally:
        await connection.close()


# --- the run ----------------------------------------------------------------------------------


async def broker_version(amqp_url: str) -> str:
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        version = connection.transport.connection.server_properties.get("version", b"?")
        return version.decode() if isinstance(version, bytes) else str(version)
    finally:
        await connection.close()


def _git_revision(directory: Path) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(directory), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    return done.stdout.strip()


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


async def run(args: argparse.Namespace) -> int:
    run_id = uuid.uuid4().hex[:8]
    keys = ",".join(f"{role}:bench-{role}:{secrets.token_hex(16)}" for role in ("trigger", "event", "ping"))
    namespaces = [f"bench-{run_id}", f"bench-{run_id}-sched"]
    bare_queues: list[str] = []
    version = await broker_version(args.amqp_url)
    print(f"cronfleet code from {args.code}", flush=True)
    print(
        f"cronfleet e2e bench: {machine()}, "
        f"RabbitMQ {version}, mode={args.mode}, worker concurrency={args.concurrency}, batch={args.batch}",
        flush=True,
    )
    results: list[Throughput] = []
    lags: list[FireLag] = []
    ceilings: list[Ceiling] = []
    beats: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cronfleet-bench-") as tmp:
        try:
            sample: Trigger | None = None
            # Each round measures cronfleet, then the bare ceiling right after it, so that each
            # ratio compares two figures taken minutes apart on the same machine, not a whole
            # run apart.
            for round_ in range(args.rounds):
                for index, n in enumerate(args.triggers):
                    database = f"sqlite+aiosqlite:///{Path(tmp) / f'throughput-{round_}-{index}.db'}"
                    settings = make_settings(args.amqp_url, database, keys, namespaces[0])
                    fleet = Fleet(settings, args.mode, args.concurrency, args.log_level)
                    print(f"[1.{round_}] {n} triggers through publish -> worker -> monitor ...", flush=True)
                    result, sample = await trigger_throughput(settings, n, args.batch, args.jobs, fleet)
                    result.round = round_
                    results.append(result)
                    print(
                        f"    {result.per_second:.0f} triggers/s end to end ({result.total_seconds:.2f} s); "
                        f"publish alone {result.publish_per_second:.0f}/s",
                        flush=True,
                    )
                assert sample is not None
                for kind in args.bare_queue_types:
                    queue = f"bench-{run_id}.bare.{kind}.{round_}"
                    bare_queues.append(queue)
                    n = max(args.triggers)
                    print(f"[3.{round_}] bare aio-pika, {kind} queue, {n} messages ...", flush=True)
                    ceiling = await bare_ceiling(args.amqp_url, queue, kind, n, args.batch, sample, keys)
                    ceiling.round = round_
                    ceilings.append(ceiling)
                    print(f"    {ceiling.per_second:.0f} msgs/s", flush=True)
            for jobs in args.fire_jobs:
                database = f"sqlite+aiosqlite:///{Path(tmp) / f'scheduler-{jobs}.db'}"
                settings = make_settings(args.amqp_url, database, keys, namespaces[1])
                mode = "none" if args.scheduler_alone else args.mode
                fleet = Fleet(settings, mode, args.concurrency, args.log_level)
                alone = " alone (nothing consumes its pool)" if args.scheduler_alone else ""
                print(
                    f"[2] scheduler{alone}: {jobs} jobs every second for {args.seconds:g} s ...", flush=True
                )
                lag = await fire_lag(settings, jobs, args.seconds, fleet, args.warmup)
                lags.append(lag)
                print(
                    f"    {lag.fires} fires, {lag.per_second:.0f}/s; lag p50 {_ms(percentile(lag.lag, 50))} "
                    f"p99 {_ms(percentile(lag.lag, 99))}; "
                    f"confirmed p99 {_ms(percentile(lag.confirmed, 99))}; "
                    f"{lag.duplicate_publishes} published twice; "
                    f"scheduler stopped in {lag.stop_seconds:.1f} s",
                    flush=True,
                )
                if args.celery_beat:
                    print(f"[2] Celery beat: {jobs} entries @1/s for {args.seconds:g} s ...", flush=True)
                    beats.append(await celery_beat_lag(args.amqp_url, jobs, args.seconds, Path(tmp)))
        finally:
            await cleanup(args.amqp_url, namespaces, bare_queues)
    print_table(results, lags, ceilings, args)
    print_beats(lags, beats)
    return 0


async def celery_beat_lag(amqp_url: str, jobs: int, seconds: float, tmp: Path) -> dict[str, Any]:
    """The Celery beat reference of the fire-lag run (``tests/bench/ref_celery_beat.py``)."""
    from tests.bench import ref_celery_beat

    directory = Path(tempfile.mkdtemp(prefix="beat-", dir=tmp))
    return await ref_celery_beat.sustained(amqp_url, jobs, seconds, directory)


def print_beats(lags: list[FireLag], beats: list[dict[str, Any]]) -> None:
    """cronfleet's fire-lag rows beside Celery beat's, run after run."""
    if not beats:
        return
    print(f"\n{'every-second jobs, side by side':<58} {'cronfleet':>14} {'Celery beat':>14}")
    print("-" * 88)
    for lag, beat in zip(lags, beats, strict=True):
        rows = [
            (f"{lag.jobs} jobs: window", f"{lag.seconds:.1f} s", f"{beat['seconds']:.1f} s"),
            (
                "  fires sent / due on the 1-s grid",
                f"{lag.published_due}/{lag.due}",
                f"{beat['sent_due']}/{beat['grid_due']}",
            ),
            ("  lag p50 (cronfleet: published_at; beat: arrival)", *_both(lag.lag, beat["lag"], 50)),
            ("  lag p99", *_both(lag.lag, beat["lag"], 99)),
            (
                "  confirmed lag p50 / p99 (cronfleet)",
                f"{1000 * percentile(lag.confirmed, 50):.0f}/{1000 * percentile(lag.confirmed, 99):.0f} ms",
                "",
            ),
            (
                "  CPU of the bench process (procs: scheduler) / of beat",
                f"{lag.cpu_seconds:.2f} s",
                f"{beat['cpu_s']:.2f} s",
            ),
            (
                "  CPU per fire sent",
                _ms(lag.cpu_seconds / max(1, lag.fires)),
                _ms(beat["cpu_s"] / max(1, beat["sent_due"])),
            ),
        ]
        for label, ours, theirs in rows:
            print(f"{label:<58} {ours:>14} {theirs:>14}")


def _both(ours: Sequence[float], theirs: Sequence[float], p: float) -> tuple[str, str]:
    return _ms(percentile(ours, p)), _ms(percentile(theirs, p))


def print_table(
    results: list[Throughput], lags: list[FireLag], ceilings: list[Ceiling], args: argparse.Namespace
) -> None:
    best = max((c.per_second for c in ceilings), default=float("nan"))

    def quorum(round_: int) -> float:
        """The bare quorum ceiling measured in the same round (else the best one)."""
        return next((c.per_second for c in ceilings if c.queue_type == "quorum" and c.round == round_), best)

    print()
    print(f"{'measure':<58} {'value':>14}")
    print("-" * 73)
    body = results[0].body_bytes if results else 0
    for r in results:
        label = f"cronfleet triggers/s end to end (N={r.triggers}, round {r.round})"
        print(f"{label:<58} {r.per_second:>14.0f}")
        print(f"{f'  publish phase alone, triggers/s (N={r.triggers})':<58} {r.publish_per_second:>14.0f}")
        print(f"{'  = broker messages/s (trigger + 2 events, all confirmed)':<58} {3 * r.per_second:>14.0f}")
    for c in ceilings:
        label = f"bare aio-pika msgs/s, {c.queue_type} queue (N={c.messages}, {body} B, round {c.round})"
        print(f"{label:<58} {c.per_second:>14.0f}")
    for r in results:
        label = f"ratio cronfleet / bare quorum, same round (N={r.triggers}, round {r.round})"
        print(f"{label:<58} {r.per_second / quorum(r.round):>13.1%}")
        label = "  per broker message (3 per trigger)"
        print(f"{label:<58} {3 * r.per_second / quorum(r.round):>13.1%}")
    for n in sorted({r.triggers for r in results}):
        ratios = [r.per_second / quorum(r.round) for r in results if r.triggers == n]
        label = f"ratio per trigger, median of {len(ratios)} round(s) (N={n})"
        print(f"{label:<58} {percentile(ratios, 50):>13.1%}")
    for lag in lags:
        rows = [
            (f"scheduler, {lag.jobs} jobs @1/s: fires published/s", f"{lag.per_second:.0f}"),
            ("  fires published / due while it ran", f"{lag.published_due}/{lag.due}"),
            ("  (an unpublished due fire counts with lag end - due)", ""),
            ("  fire lag p50 (fires.published_at - scheduled_at)", _ms(percentile(lag.lag, 50))),
            ("  fire lag p99", _ms(percentile(lag.lag, 99))),
            (f"  sustained, after the first {lag.warmup} s: fire lag p50", _ms(percentile(lag.steady, 50))),
            (f"  sustained, after the first {lag.warmup} s: fire lag p99", _ms(percentile(lag.steady, 99))),
            ("  confirmed lag p50 (broker confirm - scheduled_at)", _ms(percentile(lag.confirmed, 50))),
            ("  confirmed lag p99", _ms(percentile(lag.confirmed, 99))),
            ("  dispatch lag p50 (runs.started_at - scheduled_at)", _ms(percentile(lag.dispatch, 50))),
            ("  dispatch lag p99", _ms(percentile(lag.dispatch, 99))),
            ("  triggers published more than once", str(lag.duplicate_publishes)),
            ("  triggers run more than once", str(lag.duplicate_runs)),
        ]
        for second, (first, median, last) in enumerate(lag.by_second):
            rows.append(
                (
                    f"  second {second}: lag first / median / last",
                    f"{first * 1000:.0f}/{median * 1000:.0f}/{last * 1000:.0f} ms",
                )
            )
        if not lag.drained:
            rows.append(("  (runs stalled before all were recorded: partial)", "!"))
        for label, value in rows:
            print(f"{label:<58} {value:>14}")
    print(f"\nmode={args.mode} concurrency={args.concurrency} batch={args.batch} jobs={args.jobs}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--triggers", type=int, nargs="+", default=[2000], help="N triggers per throughput run (several ok)"
    )
    parser.add_argument("--batch", type=int, default=500, help="triggers per publish_claimed batch")
    parser.add_argument(
        "--jobs", type=int, default=100, help="distinct jobs the throughput triggers cycle over"
    )
    parser.add_argument("--concurrency", type=int, default=64, help="worker concurrency (prefetch)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds of (cronfleet throughput, then the bare ceiling)"
    )
    parser.add_argument(
        "--fire-jobs", type=int, nargs="*", default=[500], help="every-second jobs for the fire-lag run(s)"
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="how long the scheduler runs")
    parser.add_argument("--mode", choices=["inproc", "procs"], default="inproc")
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="seconds of the fire-lag window left out of the sustained lag (also shown whole)",
    )
    parser.add_argument(
        "--scheduler-alone",
        action="store_true",
        help="fire lag with no worker or monitor sharing the machine (the triggers wait in the queue)",
    )
    parser.add_argument(
        "--bare-queue-types", nargs="*", default=["quorum", "classic"], choices=["quorum", "classic"]
    )
    parser.add_argument(
        "--amqp-url", default=os.environ.get("CRONFLEET_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument(
        "--celery-beat",
        action="store_true",
        help="after each fire-lag run, Celery beat on as many every-second entries (pip install celery)",
    )
    args = parser.parse_args(argv)
    if min(args.triggers) < 1 or args.batch < 1 or args.jobs < 1 or args.concurrency < 1 or args.rounds < 1:
        parser.error("--triggers, --batch, --jobs and --concurrency must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args.log_level = args.log_level.upper()
    install_noop_executors()
    code = Path(monitor.service.__file__).resolve().parent.parent
    args.code = f"{code} ({_git_revision(code)})"
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
