"""Monitor benchmark: event ingestion against a bare aio-pika consume+ack loop, and deadline lag.

Not a test (pytest does not collect ``bench_*.py``). Run it from the repository root::

    .venv/bin/python tests/bench/bench_monitor.py --events 20000 --jobs 1000 --deadline-jobs 10000

It measures, against the RabbitMQ at ``--amqp-url``, on a throwaway SQLite store and on a private
schema of the PostgreSQL at ``--postgres-url`` (dropped at the end):

1. **Ingestion.** ``--jobs`` jobs are applied; N signed events over them (``run.started`` /
   ``run.finished`` pairs, and one ``start`` / ``success`` job-heartbeat pair in every five) are
   published to a private namespace *before* the monitor starts, ``--together`` at a time as a
   busy worker publishes them: its run events go as ``event.batch`` messages of up to that many
   events (job heartbeats always alone; ``--together 1``: one message per event). Then the real
   monitor (``monitor.service.serve``: verify, record in batches, advance each job's health, ack
   after commit) drains them; the clock runs from the moment it consumes (``options.ready``)
   until the store holds every run and heartbeat (polled).
2. **The bare loop, same run.** The same N bodies and signed headers, one message per event,
   pre-published to a quorum queue with the monitor queue's arguments, drained by a bare
   aio-pika loop (same prefetch, one ack per message): what merely consuming the events costs
   when each is a message. The ratio monitor / bare is reported per store.
3. **Deadlines.** ``--deadline-jobs`` jobs all due at the same instant (the worst case: one herd),
   or with ``--spread S`` due over S seconds (as many each second), with ``--grace`` seconds of
   grace, no run ever. The real monitor learns them (first health record), ticks them ``late`` at
   the due instant and ``down`` at the end of the grace period, and alerts each ``down`` flip on a
   webhook channel (``--channel webhook``, the default) whose receiver, a small HTTP server in a
   process of its own (so it does not share the monitor's event loop), notes when each alert
   arrives. Two lags per job, from its grace end: to the *log line* of its ``late -> down`` flip,
   which the monitor writes once the flip's transaction has committed, and to the *arrival* of its
   alert at the receiver. ``--channel log`` alerts on the log channel instead (no delivery lag).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import logging
import math
import multiprocessing
import os
import secrets
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import orjson
from sqlalchemy import func, select, text

import monitor.service

# The repository, so that tests.bench imports when this file runs as a script.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common.actions import ShellAction
from common.catalog import apply_jobs
from common.cli.fleet import run_services
from common.clock import utcnow
from common.collector import freeze_startup_heap
from common.connection import connect
from common.jobs import JobSpec
from common.messages import (
    Event,
    HeartbeatKind,
    JobHeartbeat,
    RunFinished,
    RunStarted,
    RunStatus,
    trigger_id,
)
from common.publisher import Publisher
from common.roles import signing_role
from common.services import ServiceOptions
from common.settings import Settings, normalise_database_url
from common.store import AlertAttemptRow, FlipRow, HeartbeatRow, RunRow, Store
from common.topology import Topology, event_routing_key
from tests.bench.machine import machine

POOL = "default"
PUBLISH_BATCH = 500
# How often the ingestion run looks whether the last events are stored. Each look is two point
# queries in the monitor's own process, on its store: every 10 ms they took a third of the
# drain's time on SQLite (the GIL and the store's thread). The drain's end is known to this much.
POLL_SECONDS = 0.1
# Set by --profile-drain: profiles only the monitor draining pre-published events.
DRAIN_PROFILER: cProfile.Profile | None = None


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of ``values`` (``p`` in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(p / 100 * len(ordered))))
    return ordered[rank - 1]


# --- stores -----------------------------------------------------------------------------------


@dataclass
class StorePlace:
    """Where one run's store lives: a URL and, on PostgreSQL, a private schema."""

    label: str
    url: str
    schema: str | None

    async def create(self) -> None:
        await (await Store.open(self.url, self.schema, upgrade=True)).close()

    async def drop(self) -> None:
        if self.schema is None:
            return
        store = await Store.connect(self.url)
        try:
            async with store.engine.begin() as connection:
                await connection.execute(text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
        finally:
            await store.close()


def places(args: argparse.Namespace, tmp: Path, tag: str) -> list[StorePlace]:
    found = []
    if "sqlite" in args.stores:
        found.append(StorePlace("sqlite", f"sqlite+aiosqlite:///{tmp / f'{tag}.db'}", None))
    if "postgresql" in args.stores:
        found.append(StorePlace("postgresql", normalise_database_url(args.postgres_url), f"bench_{tag}"))
    return found


# --- the events -------------------------------------------------------------------------------


def bench_jobs(count: int) -> list[JobSpec]:
    """``count`` jobs every five minutes, with an hour of grace: the ingestion run flips nothing
    by deadline, only by its events."""
    return [
        JobSpec(
            name=f"ing-{i:05d}",
            schedule="*/5 * * * *",
            grace_seconds=3600,
            action=ShellAction(argv=["true"]),
            pool=POOL,
        )
        for i in range(count)
    ]


@dataclass
class EventSet:
    events: list[Event]
    runs: int
    heartbeats: int


def make_events(jobs: Sequence[JobSpec], n: int, base: datetime) -> EventSet:
    """About ``n`` events over ``jobs``, in the order a fleet would send them: each unit is a run
    (started, finished) or, one in five, a heartbeat pair (start, success), of the next job."""
    events: list[Event] = []
    runs = heartbeats = 0
    unit = 0
    while len(events) < n:
        job = jobs[unit % len(jobs)].name
        at = base + timedelta(milliseconds=unit)
        if unit % 5 == 4:
            events.append(JobHeartbeat(id=f"hb-{unit}-s", job=job, kind=HeartbeatKind.START, at=at))
            events.append(
                JobHeartbeat(
                    id=f"hb-{unit}-e", job=job, kind=HeartbeatKind.SUCCESS, at=at + timedelta(seconds=1)
                )
            )
            heartbeats += 2
        else:
            scheduled = at.replace(microsecond=0)
            fields: dict[str, Any] = {
                "run_id": f"run-{unit}",
                "trigger_id": f"{trigger_id(job, scheduled)}#{unit}",
                "job": job,
                "pool": POOL,
                "worker": "bench-worker",
                "scheduled_at": scheduled,
                "started_at": at,
            }
            events.append(RunStarted(**fields))
            events.append(
                RunFinished(
                    **fields,
                    finished_at=at + timedelta(seconds=1),
                    duration_seconds=1.0,
                    status=RunStatus.SUCCEEDED,
                    exit_code=0,
                )
            )
        runs += 1
        unit += 1
    return EventSet(events, runs, heartbeats)


async def publish_events(publisher: Publisher, events: Sequence[Event], together: int) -> None:
    """Publish ``events`` as a worker does (signed, confirmed), ``together`` at a time: the
    publisher sends the events of one key it has ready as one ``event.batch`` (so ``together``
    is about how many events a message carries; 1: one message per event, in order)."""
    for first in range(0, len(events), together):
        await asyncio.gather(*(publisher.event(e) for e in events[first : first + together]))


# --- 1. ingestion through the real monitor ----------------------------------------------------


async def stored_counts(store: Store) -> tuple[int, int]:
    async with store.session() as session:
        runs = await session.scalar(select(func.count()).select_from(RunRow))
        heartbeats = await session.scalar(select(func.count()).select_from(HeartbeatRow))
    return int(runs or 0), int(heartbeats or 0)


async def last_ones_recorded(store: Store, run_id: str, heartbeat_id: str) -> bool:
    """Whether the run ``run_id`` has finished and the heartbeat ``heartbeat_id`` is stored."""
    async with store.session() as session:
        finished = await session.scalar(select(RunRow.finished_at).where(RunRow.run_id == run_id))
        beat = await session.scalar(select(HeartbeatRow.id).where(HeartbeatRow.id == heartbeat_id))
    return finished is not None and beat is not None


async def start_monitor(settings: Settings) -> tuple[asyncio.Task[None], float]:
    """The real monitor as a task; returns it and the instant (perf_counter) it began consuming."""
    options = ServiceOptions(name="bench-monitor")
    task = asyncio.create_task(monitor.service.serve(settings, options), name="monitor")
    ready = asyncio.create_task(options.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if ready not in done:
        ready.cancel()
        if task in done:
            task.result()
        task.cancel()
        raise RuntimeError("the monitor did not start consuming in 60 s")
    return task, time.perf_counter()


def _monitor_process(settings: Settings, name: str, ready: Any, stop: Any) -> None:
    """A monitor in a process of its own (``--monitors``): ``ready`` is set once it consumes;
    it stops when ``stop`` is set."""

    async def main() -> None:
        options = ServiceOptions(name=name)
        # As `cronfleet monitor` runs it (``run_services``: its heap frozen once ready).
        task = asyncio.create_task(run_services(settings, [("monitor", options)]), name=name)
        await options.ready.wait()
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        await stop_task(task)

    asyncio.run(main())


class MonitorProcesses:
    """``count`` monitors, each in a process of its own, consuming the same queue."""

    def __init__(self, settings: Settings, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._ready = [context.Event() for _ in range(count)]
        self._processes = [
            context.Process(target=_monitor_process, args=(settings, f"bench-monitor-{i}", ready, self._stop))
            for i, ready in enumerate(self._ready)
        ]

    async def start(self) -> float:
        """Start them; the instant (perf_counter) the first began consuming."""
        for process in self._processes:
            process.start()
        while not any(ready.is_set() for ready in self._ready):
            if not any(process.is_alive() for process in self._processes):
                raise RuntimeError("no monitor process started")
            await asyncio.sleep(0.005)
        return time.perf_counter()

    def stop(self) -> None:
        self._stop.set()
        for process in self._processes:
            process.join(30)
            if process.is_alive():
                process.kill()


async def stop_task(task: asyncio.Task[Any]) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return
    except Exception as exc:
        print(f"!! {task.get_name()} died: {exc!r}", file=sys.stderr, flush=True)


@dataclass
class Ingestion:
    store: str
    events: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.events / self.seconds


async def ingestion(
    settings: Settings, place: StorePlace, n: int, jobs: int, stall: float, together: int, monitors: int = 1
) -> Ingestion:
    """Pre-publish about ``n`` events, then time the real monitor draining them into the store
    (``monitors`` > 1: that many monitor processes, timed from the first one consuming)."""
    store = await Store.open(place.url, place.schema)
    connection = await connect(settings.amqp_url, "bench-publisher", wait=False)
    try:
        specs = bench_jobs(jobs)
        await apply_jobs(store, specs, utcnow())
        made = make_events(specs, n, utcnow() - timedelta(hours=1))
        publisher = await Publisher.open(connection, Topology(settings.namespace), settings.keyring())
        await publish_events(publisher, made.events, together)
        # The bench's own events, held to the end, out of every full collection of this process
        # (where a monitor of ``--monitors 1`` and the bare loop run): a monitor holds no such list.
        freeze_startup_heap()
        if DRAIN_PROFILER is not None:
            DRAIN_PROFILER.enable()
        processes = MonitorProcesses(settings, monitors) if monitors > 1 else None
        if processes is not None:
            started = await processes.start()
        else:
            task, started = await start_monitor(settings)
        try:
            # A point lookup of the last run and heartbeat (the monitor records in delivery
            # order), not a count of a growing table every few milliseconds in the monitor's own
            # process; the counts are checked once both are there.
            last_run = next(e.run_id for e in reversed(made.events) if isinstance(e, RunFinished))
            last_beat = next(e.id for e in reversed(made.events) if isinstance(e, JobHeartbeat))
            moved, seen = time.perf_counter(), -1
            while True:
                now = time.perf_counter()
                if await last_ones_recorded(store, last_run, last_beat):
                    counts = await stored_counts(store)
                    if counts >= (made.runs, made.heartbeats):
                        finished = now
                        break
                elif now - moved > stall:
                    counts = await stored_counts(store)
                    if counts[0] + counts[1] == seen:
                        raise RuntimeError(f"stalled at {counts} of {(made.runs, made.heartbeats)}")
                    moved, seen = now, counts[0] + counts[1]
                await asyncio.sleep(POLL_SECONDS)
        finally:
            if DRAIN_PROFILER is not None:
                DRAIN_PROFILER.disable()
            if processes is not None:
                processes.stop()
            else:
                await stop_task(task)
        label = place.label if monitors == 1 else f"{place.label}, {monitors} monitor processes"
        return Ingestion(label, len(made.events), finished - started)
    finally:
        await connection.close()
        await store.close()


# --- 2. the bare loop -------------------------------------------------------------------------


async def bare_loop(settings: Settings, queue_name: str, events: Sequence[Event]) -> float:
    """Pre-publish the same bodies and signed headers to a quorum queue with the monitor queue's
    arguments; return the seconds a bare consume -> ack loop (monitor's prefetch) takes."""
    keyring = settings.keyring()
    producer = await aio_pika.connect_robust(
        settings.amqp_url, client_properties={"connection_name": "bare-p"}
    )
    consumer = await aio_pika.connect_robust(
        settings.amqp_url, client_properties={"connection_name": "bare-c"}
    )
    try:
        arguments = Topology(settings.namespace)._consumed()
        publish_channel = await producer.channel(publisher_confirms=True)
        await publish_channel.declare_queue(queue_name, durable=True, arguments=arguments)
        exchange = publish_channel.default_exchange

        def message(event: Event) -> aio_pika.Message:
            body = event.to_bytes()
            job = event.job if isinstance(event, JobHeartbeat) else None
            headers = keyring.signer(signing_role(event), job).sign(
                settings.namespace, event_routing_key(event), body
            )
            return aio_pika.Message(
                body,
                headers=dict(headers),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                timestamp=datetime.now(UTC),
            )

        for first in range(0, len(events), PUBLISH_BATCH):
            await asyncio.gather(
                *(
                    exchange.publish(message(e), routing_key=queue_name)
                    for e in events[first : first + PUBLISH_BATCH]
                )
            )
        channel = await consumer.channel()
        await channel.set_qos(prefetch_count=monitor.service.PREFETCH)
        queue = await channel.declare_queue(queue_name, durable=True, arguments=arguments)
        received = 0
        started = time.perf_counter()
        async with queue.iterator() as deliveries:
            async for delivery in deliveries:
                await delivery.ack()
                received += 1
                if received >= len(events):
                    break
        finished = time.perf_counter()
        await channel.queue_delete(queue_name)
        return finished - started
    finally:
        await producer.close()
        await consumer.close()


# --- 3. deadlines -----------------------------------------------------------------------------


def _receive(port_out: Any, received: Any, results: Any, stop: Any) -> None:
    """The webhook receiver's process: answer 204 to every POST, keep (job, to_state) -> the
    Unix time its first alert arrived, count the ``down`` alerts of the bench's jobs in
    ``received``; on ``stop``, send what arrived through ``results``. It does not verify the
    signatures (the tests do): its work here only has to stay off the monitor's process."""
    arrived: dict[tuple[str, str], float] = {}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                now = time.time()
                data = orjson.loads(body)["data"]
                for alert in data.get("alerts", [data]):  # a group, or one alert
                    key = (str(alert["job"]), str(alert["to_state"]))
                    if key not in arrived:
                        arrived[key] = now
                        # Counted: the bench's jobs turning down (not the fleet's own alarms).
                        if key[1] == "down" and key[0].startswith("dl-"):
                            with received.get_lock():
                                received.value += 1
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the monitor hung up, or this throwaway process is ending
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=1024)
        port_out.put(server.sockets[0].getsockname()[1])
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, stop.wait)
        server.close()
        results.send(arrived)

    asyncio.run(main())


class Receiver:
    """A webhook receiver in a process of its own (see ``_receive``)."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self._port: Any = context.Queue()
        self.received: Any = context.Value("i", 0)
        self._results, child = context.Pipe(duplex=False)
        self._stop = context.Event()
        self._process = context.Process(
            target=_receive, args=(self._port, self.received, child, self._stop), daemon=True
        )
        self.port = 0

    def start(self) -> None:
        self._process.start()
        self.port = int(self._port.get(timeout=60))

    def stop(self) -> dict[tuple[str, str], float]:
        """Stop the receiver; (job, to_state) -> when its first alert arrived (Unix time)."""
        self._stop.set()
        arrived: dict[tuple[str, str], float] = self._results.recv()
        self._process.join(10)
        return arrived


def channels_file(path: Path, port: int, concurrency: int | None = None, group: int = 1) -> Path:
    """A channels file routing every alert to the bench receiver's webhook (delivering
    ``concurrency`` messages at once, if given, of up to ``group`` alerts each)."""
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    path.write_text(
        "[channels.bench-hook]\n"
        'type = "webhook"\n'
        f'url = "http://127.0.0.1:{port}/alerts"\n'
        f'secret = "{secret}"\n'
        f"group = {group}\n"
        "\n[routes]\n"
        'default = ["bench-hook"]\n'
        + ("" if concurrency is None else f"\n[delivery]\nconcurrency = {concurrency}\n")
    )
    return path


class FlipTimes(logging.Handler):
    """Keeps, for each ``late -> down`` flip the monitor logs, the job, the flip's instant and
    when the line was written (after its transaction committed); passes every other record on."""

    def __init__(self, forward: logging.Handler | None) -> None:
        super().__init__()
        self.down: dict[str, tuple[datetime, float]] = {}
        self.forward = forward

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "job %s: %s -> %s at %s (%s)" and isinstance(record.args, tuple):
            job, _from, to, at, _reason = record.args
            if str(to) == "down":
                self.down.setdefault(str(job), (datetime.fromisoformat(str(at)), record.created))
            return
        if self.forward is not None and record.levelno >= logging.WARNING:
            self.forward.handle(record)


@dataclass
class DeadlineLag:
    store: str
    jobs: int
    grace: float
    spread: int
    lags: list[float]
    flips_stored: int
    setup_seconds: float
    delivered: list[float] | None = None  # grace end -> alert arrived, per job (webhook only)
    attempts_stored: int = 0
    # The process's CPU (the monitor's, in this process) from the first grace end to the end.
    cpu_seconds: float = math.nan


def herd_jobs(count: int, due: datetime, grace: float, spread: int = 0) -> list[JobSpec]:
    """``count`` jobs due once an hour: all at ``due``'s minute and second, or with ``spread``,
    job i at ``due + i % spread`` seconds (as many jobs due each second of ``spread`` seconds)."""
    jobs = []
    for i in range(count):
        at = due + timedelta(seconds=i % spread) if spread else due
        jobs.append(
            JobSpec(
                name=f"dl-{i:05d}",
                schedule=f"{at.second} {at.minute} * * * *",
                grace_seconds=grace,
                action=ShellAction(argv=["true"]),
                pool=POOL,
            )
        )
    return jobs


async def deadlines(
    settings: Settings,
    place: StorePlace,
    count: int,
    grace: float,
    lead: float,
    spread: int,
    receiver: Receiver | None,
) -> DeadlineLag:
    """Apply ``count`` jobs due ``lead`` seconds from now (or spread over the ``spread`` seconds
    from then), start the monitor, and time each job's ``down`` flip from its grace end, and, with
    a ``receiver`` (its webhook in ``settings``' channels file), the arrival of its alert."""
    store = await Store.open(place.url, place.schema)
    logger = logging.getLogger("cronfleet.monitor")
    root = logging.getLogger().handlers
    catcher = FlipTimes(root[0] if root else None)
    already = 0 if receiver is None else receiver.received.value
    try:
        began = time.perf_counter()
        due = (utcnow() + timedelta(seconds=lead)).replace(microsecond=0)
        specs = herd_jobs(count, due, grace, spread)
        names = {spec.name for spec in specs}
        await apply_jobs(store, specs, utcnow())
        logger.addHandler(catcher)
        logger.propagate = False
        task, _started = await start_monitor(settings)
        setup = time.perf_counter() - began

        def finished() -> bool:
            flipped = sum(1 for job in catcher.down if job in names)
            arrived = count if receiver is None else receiver.received.value - already
            return flipped >= count and arrived >= count

        first_grace_end = (due + timedelta(seconds=grace)).timestamp()
        cpu_from: float | None = None
        try:
            limit = time.monotonic() + lead + spread + grace + 120
            while not finished() and time.monotonic() < limit:
                if cpu_from is None and time.time() >= first_grace_end:
                    cpu_from = time.process_time()
                await asyncio.sleep(0.05 if cpu_from is None else 0.2)
            cpu = math.nan if cpu_from is None else time.process_time() - cpu_from
        finally:
            await stop_task(task)
        async with store.session() as session:
            stored = await session.scalar(
                select(func.count()).select_from(FlipRow).where(FlipRow.to_state == "down")
            )
            attempts = await session.scalar(select(func.count()).select_from(AlertAttemptRow))
        grace_ends = {
            spec.name: due + timedelta(seconds=(i % spread if spread else 0) + grace)
            for i, spec in enumerate(specs)
        }
        down = {job: times for job, times in catcher.down.items() if job in names}
        lags = [written - grace_ends[job].timestamp() for job, (_at, written) in down.items()]
        if any(at != grace_ends[job] for job, (at, _written) in down.items()):
            print("!! a down flip at another instant than its grace end", file=sys.stderr)
        result = DeadlineLag(place.label, count, grace, spread, lags, int(stored or 0), setup)
        result.attempts_stored = int(attempts or 0)
        result.cpu_seconds = cpu
        if receiver is not None:
            arrived = receiver.stop()
            result.delivered = [
                when - grace_ends[job].timestamp()
                for (job, to_state), when in arrived.items()
                if to_state == "down" and job in names
            ]
        return result
    finally:
        logger.removeHandler(catcher)
        logger.propagate = True
        await store.close()


# --- the run ----------------------------------------------------------------------------------


async def cleanup(amqp_url: str, namespaces: Sequence[str], queues: Sequence[str]) -> None:
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


async def run(args: argparse.Namespace) -> int:
    run_id = uuid.uuid4().hex[:8]
    keys = ",".join(f"{role}:bench-{role}:{secrets.token_hex(16)}" for role in ("trigger", "event", "ping"))
    print(
        f"cronfleet monitor bench: {machine()}, batch limit {monitor.service.BATCH_LIMIT}, "
        f"prefetch {monitor.service.PREFETCH}",
        flush=True,
    )
    namespaces: list[str] = []
    bare_queues: list[str] = []
    ingested: list[tuple[Ingestion, float]] = []
    lags: list[DeadlineLag] = []
    with tempfile.TemporaryDirectory(prefix="cronfleet-bench-") as tmp:
        try:
            for repeat in range(args.repeat if args.events else 0):
                for place in places(args, Path(tmp), f"{run_id}_i{repeat}"):
                    namespace = f"bench-{run_id}-{place.label}-{repeat}"
                    namespaces.append(namespace)
                    settings = Settings(
                        amqp_url=args.amqp_url,
                        database_url=place.url,
                        database_schema=place.schema,
                        keys=keys,
                        namespace=namespace,
                    )
                    await place.create()
                    try:
                        print(
                            f"[1] {place.label}: {args.events} events over {args.jobs} jobs, "
                            f"{args.together} a message ...",
                            flush=True,
                        )
                        result = await ingestion(
                            settings, place, args.events, args.jobs, args.stall, args.together, args.monitors
                        )
                    finally:
                        await place.drop()
                    queue = f"{namespace}.bare"
                    bare_queues.append(queue)
                    specs = bench_jobs(args.jobs)
                    events = make_events(specs, args.events, utcnow() - timedelta(hours=1)).events
                    print(f"[2] bare aio-pika loop, {len(events)} messages ...", flush=True)
                    freeze_startup_heap()  # as for the monitor: the bench's lists out of its walks
                    bare = await bare_loop(settings, queue, events)
                    bare_rate = len(events) / bare
                    ingested.append((result, bare_rate))
                    print(
                        f"    monitor {result.per_second:.0f} events/s ({result.seconds:.2f} s); "
                        f"bare {bare_rate:.0f} msgs/s; ratio {result.per_second / bare_rate:.1%}",
                        flush=True,
                    )
            if args.deadline_jobs:
                for place in places(args, Path(tmp), f"{run_id}_d"):
                    namespace = f"bench-{run_id}-{place.label}-d"
                    namespaces.append(namespace)
                    receiver = None
                    channels = None
                    if args.channel == "webhook":
                        receiver = Receiver()
                        receiver.start()
                        channels = channels_file(
                            Path(tmp) / f"channels-{place.label}.toml",
                            receiver.port,
                            args.alert_concurrency,
                            args.group,
                        )
                    settings = Settings(
                        amqp_url=args.amqp_url,
                        database_url=place.url,
                        database_schema=place.schema,
                        keys=keys,
                        namespace=namespace,
                        jobs_reload_seconds=args.reload,
                        channels_file=channels,
                    )
                    await place.create()
                    try:
                        print(
                            f"[3] {place.label}: {args.deadline_jobs} jobs due "
                            f"{f'over {args.spread} s' if args.spread else 'at once'}, "
                            f"grace {args.grace:g} s, alerts on the {args.channel} channel "
                            f"(group {args.group}) ...",
                            flush=True,
                        )
                        lag = await deadlines(
                            settings, place, args.deadline_jobs, args.grace, args.lead, args.spread, receiver
                        )
                    finally:
                        await place.drop()
                    lags.append(lag)
                    print(
                        f"    {len(lag.lags)}/{lag.jobs} down flips logged ({lag.flips_stored} stored); "
                        f"lag p50 {percentile(lag.lags, 50) * 1000:.0f} ms, "
                        f"p99 {percentile(lag.lags, 99) * 1000:.0f} ms, "
                        f"max {max(lag.lags, default=math.nan) * 1000:.0f} ms "
                        f"(setup {lag.setup_seconds:.1f} s)",
                        flush=True,
                    )
                    if lag.delivered is not None:
                        print(
                            f"    {len(lag.delivered)} down alerts delivered ({lag.attempts_stored} attempts "
                            f"stored); lag p50 {percentile(lag.delivered, 50) * 1000:.0f} ms, "
                            f"p99 {percentile(lag.delivered, 99) * 1000:.0f} ms, "
                            f"max {max(lag.delivered, default=math.nan) * 1000:.0f} ms",
                            flush=True,
                        )
        finally:
            await cleanup(args.amqp_url, namespaces, bare_queues)
    print()
    print(f"{'measure':<62} {'value':>12}")
    print("-" * 75)
    for result, bare_rate in ingested:
        label = f"monitor events/s, {result.store} (N={result.events}, {args.together} a message)"
        print(f"{label:<62} {result.per_second:>12.0f}")
        print(f"{'  bare aio-pika consume+ack msgs/s, same run':<62} {bare_rate:>12.0f}")
        print(f"{'  ratio monitor / bare':<62} {result.per_second / bare_rate:>11.1%}")
    for lag in lags:
        when = f"over {lag.spread} s" if lag.spread else "at once"
        label = f"deadline lag, {lag.store}, {lag.jobs} jobs due {when}"
        print(f"{label + ': p50':<62} {percentile(lag.lags, 50) * 1000:>9.0f} ms")
        label = "  p99 (grace end -> down flip logged after commit)"
        print(f"{label:<62} {percentile(lag.lags, 99) * 1000:>9.0f} ms")
        print(f"{'  max':<62} {max(lag.lags, default=math.nan) * 1000:>9.0f} ms")
        counts = f"{len(lag.lags)}/{lag.flips_stored}/{lag.jobs}"
        print(f"{'  down flips logged / stored / jobs':<62} {counts:>12}")
        if lag.delivered is not None:
            label = "  grace end -> alert delivered (webhook): first"
            print(f"{label:<62} {min(lag.delivered, default=math.nan) * 1000:>9.0f} ms")
            for p in (50, 95, 99):
                label = f"  grace end -> alert delivered (webhook): p{p}"
                print(f"{label:<62} {percentile(lag.delivered, p) * 1000:>9.0f} ms")
            print(f"{'  max':<62} {max(lag.delivered, default=math.nan) * 1000:>9.0f} ms")
            counts = f"{len(lag.delivered)}/{lag.attempts_stored}"
            print(f"{'  down alerts delivered / attempts stored (all alerts)':<62} {counts:>12}")
        label = "  monitor CPU, first grace end -> last alert, per job"
        print(f"{label:<62} {lag.cpu_seconds * 1000 / lag.jobs:>9.2f} ms")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--events", type=int, default=20000, help="events per ingestion run (0: none)")
    parser.add_argument("--jobs", type=int, default=1000, help="jobs the events are spread over")
    parser.add_argument("--repeat", type=int, default=1, help="ingestion runs per store")
    parser.add_argument("--deadline-jobs", type=int, default=10000, help="jobs due at once (0: none)")
    parser.add_argument("--grace", type=float, default=2.0, help="their grace, seconds")
    parser.add_argument("--lead", type=float, default=40.0, help="seconds from start to their due time")
    parser.add_argument(
        "--spread", type=int, default=0, help="spread their due times over this many seconds (< 60)"
    )
    parser.add_argument("--reload", type=float, default=2.0, help="the monitor's jobs_reload_seconds")
    parser.add_argument(
        "--channel",
        default="webhook",
        choices=["webhook", "log"],
        help="where the deadline run's alerts go: a local webhook receiver (timed), or the log",
    )
    parser.add_argument(
        "--alert-concurrency", type=int, help="the webhook's [delivery] concurrency (default: the monitor's)"
    )
    parser.add_argument(
        "--group",
        type=int,
        default=1,
        help="the webhook's group: alerts per POST (default 1: each alone, the webhook's default)",
    )
    parser.add_argument(
        "--together",
        type=int,
        default=100,
        help="events published together, so about how many an event.batch carries (1: one message each)",
    )
    parser.add_argument(
        "--monitors",
        type=int,
        default=1,
        help="monitor processes draining the ingestion queue together (1: one, in the bench's process)",
    )
    parser.add_argument("--stall", type=float, default=60.0, help="give up when nothing moves this long")
    parser.add_argument(
        "--stores", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"]
    )
    parser.add_argument(
        "--amqp-url", default=os.environ.get("CRONFLEET_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("CRONFLEET_TEST_DATABASE_URL", "postgresql://127.0.0.1:5432/test"),
    )
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--profile", help="write a cProfile of the whole run to this file")
    parser.add_argument(
        "--profile-drain", help="write a cProfile of the monitor draining events (only) to this file"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.profile_drain:
        global DRAIN_PROFILER
        DRAIN_PROFILER = cProfile.Profile()
        try:
            return asyncio.run(run(args))
        finally:
            DRAIN_PROFILER.dump_stats(args.profile_drain)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            return asyncio.run(run(args))
        finally:
            profiler.disable()
            profiler.dump_stats(args.profile)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
