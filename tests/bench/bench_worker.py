"""Worker benchmark: runs per second of real worker processes, next to Celery and a bare loop.

Not a test (pytest does not collect ``bench_*.py``). Run it from the repository root::

    .venv/bin/python tests/bench/bench_worker.py --runs 3000 --kinds python http shell --processes 1 2

For each action kind and number of worker processes it pre-publishes ``--runs`` signed triggers
(the scheduler's path: ``Publisher.trigger_body``, confirmed) to a fresh namespace's pool, then
starts that many real ``cronfleet worker --concurrency C --import tests.bench.bench_worker``
processes (under cProfile with ``BENCH_WORKER_PROFILE=PATH``: ``PATH.<n>`` per process) on a
throwaway SQLite store (or ``--postgres-url``'s private schema with ``--store
postgresql``). Each run is whole: the signature check, the trigger claim in the store,
``run.started`` and ``run.finished`` confirmed by the broker, the ack. The rate is counted from
the first ``run.finished`` to the last, as a bare consumer bound to the events exchange sees them
(worker start-up is not counted), and so is the CPU the worker processes spent per run, their own
and with the jobs they ran (on a busy host the CPU per run is the steadier figure), the CPU the
broker (every ``beam.smp`` on the host) spent per run, and how busy the host's cores were over
the span: a second worker process can only add what the first left of the two cores.

The kinds: ``python`` calls a registered no-op function declared non-blocking (called on the
worker's loop), ``python-thread`` the same no-op as a plain sync function (called in a
thread); ``http`` POSTs a small JSON body, signed the Standard Webhooks way with the job's secret,
to a local endpoint that answers JSON with a ``requestId`` (``tests/bench/http_sink.py``:
``--sink-processes`` asyncio processes sharing one port with ``SO_REUSEPORT``, so that the bench
measures the worker, not the sink; ``--sink threading`` is the ``ThreadingHTTPServer`` used
before); ``shell`` runs ``true``. The CPU the sink spent per run is printed too.

``--cpu-limit SHARE`` puts each worker process (and each bare-loop process) in a cgroup of its
own limited to SHARE of one core (root, the ``cpu`` controller): on two cores shared with the
broker and the store, one unlimited worker already keeps most of the host busy, so a second
cannot double anything; limited, each process has a slower core of its own and the broker the
rest, and the ratio of two to one says whether the processes wait for each other.

``--profile DIR`` runs each worker under ``py-spy record`` (raw collapsed stacks in ``DIR``; the
worker is left dumpable for it, which a real worker is not); ``BENCH_WORKER_PROFILE=PATH`` runs
each under cProfile instead (``PATH.<n>``, written when it exits).

Beside it, in the same run: **Celery** (``-P solo``, one process, a no-op task, no result
backend: what Celery does with no events and no confirms) and **taskiq** (taskiq-aio-pika, one
worker process, 64 tasks at once, a no-op async task, its quorum queue, no result backend), each
drained from a pre-filled queue and timed until the queue is empty (the last task delivered); and
**a bare aio-pika loop** doing per message what a worker does on the wire and nothing else:
consume, publish two confirmed messages of an event's size, ack; in as many processes of their
own as the workers (``--processes``), with their CPU per message.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aio_pika
import orjson
from sqlalchemy import text

# The repository, so that tests.bench imports when this file runs as a script.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common.actions import HttpAction, PythonAction, ShellAction
from common.clock import utcnow
from common.connection import connect
from common.jobs import JobSpec
from common.publisher import Publisher
from common.settings import Settings, normalise_database_url
from common.store import Store
from common.topology import Topology
from tests.bench.machine import machine
from worker.actions import RunContext
from worker.functions import job_function

POOL = "default"
PUBLISH_BATCH = 500
ROOT = Path(__file__).resolve().parents[2]
THIS_FILE = Path(__file__).resolve()


@job_function(blocking=False)
def noop(run: RunContext) -> None:
    """The python kind's action: nothing (declared non-blocking: called on the worker's loop)."""


@job_function
def noop_in_thread(run: RunContext) -> None:
    """The python-thread kind's action: nothing, called in a thread like any sync function."""


# --- cronfleet's workers ----------------------------------------------------------------------


# The http kind's job: a signed POST of a small JSON body (issue 17's shape of a call).
HTTP_SECRET = "whsec_" + base64.b64encode(b"the bench's webhook key, 32 bytes").decode()
HTTP_BODY = '{"event": "tick", "source": "cronfleet-bench"}'


def action_of(kind: str, http_url: str) -> ShellAction | HttpAction | PythonAction:
    if kind == "python":
        return PythonAction(function="tests.bench.bench_worker:noop")
    if kind == "python-thread":
        return PythonAction(function="tests.bench.bench_worker:noop_in_thread")
    if kind == "http":
        return HttpAction(
            url=http_url,  # type: ignore[arg-type]
            method="POST",
            body=HTTP_BODY,
            headers={"Content-Type": "application/json"},
            webhook_secret=HTTP_SECRET,
            expect_status=[200],
        )
    return ShellAction(argv=["true"])


async def publish_triggers(settings: Settings, action: Any, n: int) -> None:
    """Publish ``n`` triggers of one job with ``action``, each its own fire, confirmed."""
    connection = await connect(settings.amqp_url, "bench-publisher", wait=False)
    try:
        topology = Topology(settings.namespace)
        publisher = await Publisher.open(connection, topology, settings.keyring())
        await topology.declare_pool(publisher.channel, POOL)
        job = JobSpec(
            name="bench", schedule="* * * * *", action=action, pool=POOL, expires_after_seconds=3600
        )
        base = utcnow()
        triggers = [job.trigger_at(base + timedelta(microseconds=i), base) for i in range(n)]
        for first in range(0, n, PUBLISH_BATCH):
            await asyncio.gather(
                *(
                    publisher.trigger_body(t.to_bytes(), POOL, t.id)
                    for t in triggers[first : first + PUBLISH_BATCH]
                )
            )
    finally:
        await connection.close()


class FinishedCounter:
    """A bare consumer of ``run.finished`` events: when the first and the n-th arrived."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.times: list[float] = []
        self.done = asyncio.Event()
        self.first = asyncio.Event()
        self.failed = 0

    async def open(self, n: int) -> None:
        self.connection = await aio_pika.connect_robust(self.settings.amqp_url)
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=1000)
        queue = await channel.declare_queue(exclusive=True)
        events = Topology(self.settings.namespace).events_exchange
        await queue.bind(events, routing_key="run.finished.#")
        # A busy worker sends its events in batches (docs/protocol.md 9.8).
        await queue.bind(events, routing_key="event.batch.*")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            now = time.perf_counter()
            body = orjson.loads(message.body)
            for event in body["events"] if body["type"] == "event.batch" else [body]:
                if event["type"] != "run.finished":
                    continue
                self.times.append(now)
                if event["status"] != "succeeded":
                    self.failed += 1
            self.first.set()
            await message.ack()
            if len(self.times) >= n:
                self.done.set()

        await queue.consume(on_message)

    async def close(self) -> None:
        await self.connection.close()


# ``cronfleet`` with the worker left dumpable, so that py-spy may read its memory.
DUMPABLE_CRONFLEET = (
    "import sys, worker.hardening as h; h.protect_secrets = lambda: False; "
    "from common.cli.main import main; sys.exit(main(sys.argv[1:]))"
)


class CpuLimits:
    """A cgroup per process, each limited to ``share`` of one core (``--cpu-limit``): with the
    broker and the store on the same two cores, a second worker process can only add what the
    first leaves of them; limited, each process has a slower core of its own and the broker the
    rest, as on a host with more cores. Needs root and the ``cpu`` controller (cgroup v1 or v2).
    """

    PERIOD_US = 100_000

    def __init__(self, share: float, label: str) -> None:
        v2 = Path("/sys/fs/cgroup")
        controllers = v2 / "cgroup.controllers"
        if controllers.exists() and "cpu" in controllers.read_text().split():
            self.root, self.v2 = v2, True
        else:
            self.root, self.v2 = Path("/sys/fs/cgroup/cpu"), False
        self.share = share
        self.label = f"cronfleet-bench-{label}-{uuid.uuid4().hex[:6]}"
        self.groups: list[Path] = []

    def wrap(self, command: Sequence[str]) -> list[str]:
        """``command`` run in a new cgroup of its own (whatever it starts stays in it)."""
        group = self.root / f"{self.label}-{len(self.groups)}"
        group.mkdir()
        quota = int(self.share * self.PERIOD_US)
        if self.v2:
            (group / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
        else:
            (group / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        self.groups.append(group)
        enter = f'echo $$ > {group / "cgroup.procs"} && exec "$@"'
        return ["sh", "-c", enter, "sh", *command]

    def close(self) -> None:
        """Remove the cgroups (their processes have exited)."""
        for group in self.groups:
            for _ in range(50):
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def start_workers(
    settings: Settings,
    processes: int,
    concurrency: int,
    profile: str | None = None,
    label: str = "",
    limits: CpuLimits | None = None,
) -> list[subprocess.Popen[bytes]]:
    """``processes`` real ``cronfleet worker`` processes on ``settings``; their output is dropped
    (appended to the file ``BENCH_WORKER_LOG`` names, when set). With ``profile`` (a directory),
    each runs under ``py-spy record``, its samples in ``DIR/<label>-<n>.txt``."""
    environment = {
        **os.environ,
        "CRONFLEET_AMQP_URL": settings.amqp_url,
        "CRONFLEET_KEYS": settings.keys,
        "CRONFLEET_NAMESPACE": settings.namespace,
        "CRONFLEET_DATABASE_URL": settings.database_url,
        "CRONFLEET_ALLOW_COMMANDS": "true",
    }
    if settings.database_schema:
        environment["CRONFLEET_DATABASE_SCHEMA"] = settings.database_schema
    arguments = ["worker", "--concurrency", str(concurrency), "--import", "tests.bench.bench_worker"]
    log = os.environ.get("BENCH_WORKER_LOG")
    output: Any = subprocess.DEVNULL if log is None else open(log, "ab")  # noqa: SIM115
    cronfleet = str(Path(sys.executable).parent / "cronfleet")
    commands = [[cronfleet, *arguments]] * processes
    cprofile = os.environ.get("BENCH_WORKER_PROFILE")
    if cprofile is not None:
        # cProfile of each worker, written when it exits (start-up included): PATH.<n>.
        commands = [
            [sys.executable, "-m", "cProfile", "-o", f"{cprofile}.{n}", cronfleet, *arguments]
            for n in range(processes)
        ]
    if profile is not None:
        Path(profile).mkdir(parents=True, exist_ok=True)
        spy = str(Path(sys.executable).parent / "py-spy")
        commands = [
            [
                *(spy, "record", "--format", "raw", "--rate", "200"),
                # BENCH_PYSPY_FLAGS: more py-spy flags, e.g. "--gil" (only the thread holding
                # the GIL: where the CPU goes, without the threads waiting for it).
                *os.environ.get("BENCH_PYSPY_FLAGS", "").split(),
                *("--output", f"{profile}/{label}-{n}.txt"),
                *("--", sys.executable, "-c", DUMPABLE_CRONFLEET, *arguments),
            ]
            for n in range(processes)
        ]
    if limits is not None:
        commands = [limits.wrap(command) for command in commands]
    return [
        subprocess.Popen(command, env=environment, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=output)
        for command in commands
    ]


def stop(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM ``processes``, wait up to 30 s for each, kill those still there."""
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


@dataclass
class Rate:
    label: str
    runs: int
    seconds: float
    note: str = ""
    # CPU the worker processes spent per run (their own; with the jobs they waited for), in ms.
    cpu_ms: float | None = None
    cpu_with_jobs_ms: float | None = None
    # CPU the http sink's processes spent per run, in ms (http runs only).
    sink_cpu_ms: float | None = None
    # CPU the broker (every ``beam.smp`` on this host) spent per run, in ms.
    broker_cpu_ms: float | None = None
    # How busy the host's cores were over the timed span, in % of all of them.
    host_busy: float | None = None

    @property
    def per_second(self) -> float:
        return (self.runs - 1) / self.seconds if self.seconds > 0 else float("nan")


def cpu_seconds(pids: Sequence[int]) -> tuple[float, float]:
    """The CPU time of processes ``pids`` so far: their own, and with their waited-for children
    (``/proc/<pid>/stat``: utime, stime, cutime, cstime). Less noisy than a rate on a busy host."""
    own = children = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone since: what it spent is not counted
            continue
        own += int(fields[11]) + int(fields[12])
        children += int(fields[13]) + int(fields[14])
    tick = os.sysconf("SC_CLK_TCK")
    return own / tick, (own + children) / tick


def host_ticks() -> tuple[int, int]:
    """The host's CPU ticks so far (``/proc/stat``): busy, and in all."""
    fields = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    return sum(fields) - idle, sum(fields)


def busy_since(before: tuple[int, int]) -> float:
    """The % of the host's cores busy since ``before`` (``host_ticks``)."""
    busy, total = host_ticks()
    return 100 * (busy - before[0]) / max(total - before[1], 1)


def broker_pids() -> list[int]:
    """The RabbitMQ nodes running on this host (``beam.smp``): the broker shares the cores, and
    its CPU per run says how much of the second core it takes. A short-lived ``beam.smp`` (a
    ``rabbitmqctl``) is left out: only those that have run for a minute count."""
    found = []
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if stat.read_text().strip() != "beam.smp":
                continue
            started = int((stat.parent / "stat").read_text().rsplit(")", 1)[1].split()[19]) / tick
            if uptime - started > 60:
                found.append(int(stat.parent.name))
    return found


def process_tree(pids: Sequence[int]) -> list[int]:
    """``pids`` and their children (a worker under py-spy is py-spy's child)."""
    found = list(pids)
    for pid in pids:
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            found += process_tree([int(child) for child in children])
    return found


async def cronfleet_rate(args: argparse.Namespace, kind: str, processes: int, sink: Sink) -> Rate:
    namespace = f"benchw-{uuid.uuid4().hex[:8]}"
    keys = ",".join(f"{role}:b-{role}:{secrets.token_hex(16)}" for role in ("trigger", "event", "ping"))
    with tempfile.TemporaryDirectory(prefix="cronfleet-benchw-") as tmp:
        schema = None
        url = f"sqlite+aiosqlite:///{Path(tmp) / 'store.db'}"
        if args.store == "postgresql":
            url, schema = normalise_database_url(args.postgres_url), f"benchw_{namespace[-8:]}"
        settings = Settings(
            amqp_url=args.amqp_url, database_url=url, database_schema=schema, keys=keys, namespace=namespace
        )
        await (await Store.open(url, schema, upgrade=True)).close()
        counter = FinishedCounter(settings)
        workers: list[subprocess.Popen[bytes]] = []
        limits = None if args.cpu_limit is None else CpuLimits(args.cpu_limit, f"{kind}-{processes}p")
        try:
            # Declares the topology, then fills the pool; the counter listens before any worker.
            await publish_triggers(settings, action_of(kind, sink.url), args.runs)
            await counter.open(args.runs)
            label = f"{kind}-{processes}p"
            workers = start_workers(settings, processes, args.concurrency, args.profile, label, limits)
            pids = [worker.pid for worker in workers]
            # CPU is counted from the first run's end (start-up left out) to the last's.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(counter.first.wait(), timeout=args.timeout)
            if args.profile is not None:  # the workers are py-spy's children: count those
                pids = [pid for pid in process_tree(pids) if pid not in pids]
            first_runs, (first_own, first_all) = len(counter.times), cpu_seconds(pids)
            first_sink = cpu_seconds(sink.pids)[0]
            brokers = broker_pids()
            first_broker, first_ticks = cpu_seconds(brokers)[0], host_ticks()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(counter.done.wait(), timeout=args.timeout)
            host_busy = busy_since(first_ticks)
            own, everything = cpu_seconds(pids)
            sink_cpu = cpu_seconds(sink.pids)[0] - first_sink
            broker_cpu = cpu_seconds(brokers)[0] - first_broker
            times = counter.times
            note = (
                "" if len(times) >= args.runs else f"only {len(times)} of {args.runs} in {args.timeout:g} s"
            )
            if counter.failed:
                note += f" {counter.failed} not succeeded"
            counted = max(len(times) - first_runs, 1)
            return Rate(
                f"cronfleet {kind}, {processes} process(es)",
                len(times),
                times[-1] - times[0],
                note.strip(),
                cpu_ms=1000 * (own - first_own) / counted,
                cpu_with_jobs_ms=1000 * (everything - first_all) / counted,
                sink_cpu_ms=1000 * sink_cpu / counted if kind == "http" else None,
                broker_cpu_ms=1000 * broker_cpu / counted,
                host_busy=host_busy,
            )
        finally:
            # Under py-spy, the workers (its children) are stopped: py-spy then writes and ends.
            for pid in process_tree([worker.pid for worker in workers]) if args.profile else []:
                if pid not in (worker.pid for worker in workers):
                    os.kill(pid, signal.SIGTERM)
            if args.profile:
                for worker in workers:
                    try:
                        worker.wait(30)
                    except subprocess.TimeoutExpired:
                        worker.kill()
            else:
                stop(workers)
            if counter.times or hasattr(counter, "connection"):
                await counter.close()
            if limits is not None:
                limits.close()
            await cleanup(settings, schema)


async def cleanup(settings: Settings, schema: str | None) -> None:
    connection = await aio_pika.connect_robust(settings.amqp_url)
    try:
        channel = await connection.channel()
        await Topology(settings.namespace).delete(channel, [POOL])
    finally:
        await connection.close()
    if schema is not None:
        store = await Store.connect(settings.database_url)
        try:
            async with store.engine.begin() as connection_:
                await connection_.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        finally:
            await store.close()


@dataclass
class Sink:
    """The local endpoint of the http runs: its processes and its URL."""

    processes: list[subprocess.Popen[bytes]]
    url: str

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(10)


def start_sink(kind: str, processes: int) -> Sink:
    """``tests/bench/http_sink.py`` in ``processes`` processes of their own (one for
    ``threading``), all on one port, answering once it accepts connections."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "tests.bench.http_sink", "--port", str(port), "--kind", kind]
    count = 1 if kind == "threading" else processes
    sink = Sink(
        [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL) for _ in range(count)],
        f"http://127.0.0.1:{port}/hook",
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or any(p.poll() is not None for p in sink.processes):
                sink.stop()
                raise RuntimeError("the http sink did not start") from None
            time.sleep(0.05)
    time.sleep(0.3)  # the other processes bind their sockets
    return sink


# --- references ---------------------------------------------------------------------------------


async def bare_rate(args: argparse.Namespace, processes: int) -> Rate:
    """consume -> two confirmed publishes (an event's size) -> ack, at the worker's prefetch, in
    ``processes`` processes of their own (``--bare-consumer``), timed as the worker is: from the
    first second publish to arrive to the last, with their CPU over that span."""
    queue_name = f"benchw-bare-{uuid.uuid4().hex[:8]}"
    body = b"x" * 300
    producer = await aio_pika.connect_robust(args.amqp_url)
    consumers: list[subprocess.Popen[bytes]] = []
    limits = None if args.cpu_limit is None else CpuLimits(args.cpu_limit, f"bare-{processes}p")
    try:
        channel = await producer.channel(publisher_confirms=True)
        await channel.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
        for first in range(0, args.runs, PUBLISH_BATCH):
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(
                        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=queue_name,
                    )
                    for _ in range(first, min(args.runs, first + PUBLISH_BATCH))
                )
            )
        listening = await producer.channel()
        await listening.set_qos(prefetch_count=1000)
        sink = await listening.declare_queue(exclusive=True)
        times: list[float] = []
        done, first_seen = asyncio.Event(), asyncio.Event()

        async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            if message.body.startswith(b"2"):  # the second of a delivery's two publishes
                times.append(time.perf_counter())
                first_seen.set()
                if len(times) >= args.runs:
                    done.set()
            await message.ack()

        await sink.consume(on_event)
        command = [sys.executable, str(THIS_FILE), "--amqp-url", args.amqp_url]
        command += ["--concurrency", str(args.concurrency), "--bare-consumer", queue_name, sink.name]
        commands = [command if limits is None else limits.wrap(command) for _ in range(processes)]
        consumers = [subprocess.Popen(each, cwd=ROOT) for each in commands]  # noqa: ASYNC220
        pids = [consumer.pid for consumer in consumers]
        await asyncio.wait_for(first_seen.wait(), timeout=args.timeout)
        brokers = broker_pids()
        first_runs, (first_own, _) = len(times), cpu_seconds(pids)
        first_broker, first_ticks = cpu_seconds(brokers)[0], host_ticks()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout=args.timeout)
        host_busy = busy_since(first_ticks)
        own, _ = cpu_seconds(pids)
        counted = max(len(times) - first_runs, 1)
        note = "" if len(times) >= args.runs else f"only {len(times)} of {args.runs}"
        return Rate(
            f"bare aio-pika loop, {processes} process(es)",
            len(times),
            times[-1] - times[0],
            note,
            cpu_ms=1000 * (own - first_own) / counted,
            broker_cpu_ms=1000 * (cpu_seconds(brokers)[0] - first_broker) / counted,
            host_busy=host_busy,
        )
    finally:
        stop(consumers)
        if limits is not None:
            limits.close()
        with contextlib.suppress(Exception):
            await (await producer.channel()).queue_delete(queue_name)
        await producer.close()


async def bare_consumer(args: argparse.Namespace, queue_name: str, sink: str) -> None:
    """The bare loop of one process, until SIGTERM: per delivery, two confirmed publishes to
    ``sink`` (an event's size; the second starts with ``2``), then the ack."""
    connection = await aio_pika.connect_robust(args.amqp_url)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        work = await connection.channel()
        await work.set_qos(prefetch_count=args.concurrency)
        events = await connection.channel(publisher_confirms=True)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            for marker in (b"1", b"2"):
                await events.default_exchange.publish(aio_pika.Message(marker + b"y" * 419), routing_key=sink)
            await message.ack()

        queue = await work.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
        await queue.consume(on_message)
        await stop.wait()
    finally:
        await connection.close()


CELERY_APP = "tests.bench.bench_worker_celery"
TASKIQ_APP = "tests.bench.bench_worker_taskiq"


async def celery_rate(args: argparse.Namespace) -> Rate:
    """Celery 5 ``-P solo``, a no-op task, drained from a pre-filled queue (no result backend)."""
    queue = f"benchw-celery-{uuid.uuid4().hex[:8]}"
    worker = [
        str(Path(sys.executable).parent / "celery"),
        *("-A", CELERY_APP, "worker", "-P", "solo", "-Q", queue),
        *("--without-heartbeat", "--without-gossip", "--without-mingle", "-l", "WARNING"),
    ]
    label = "Celery solo, no-op task"
    return await drained_rate(args, label, CELERY_APP, {"BENCH_CELERY_QUEUE": queue}, queue, worker)


async def taskiq_rate(args: argparse.Namespace) -> Rate:
    """taskiq (taskiq-aio-pika, one worker process, ``--concurrency`` tasks at once, as many
    prefetched), a no-op async task, drained from a pre-filled quorum queue (no result backend)."""
    queue = f"benchw-taskiq-{uuid.uuid4().hex[:8]}"
    at_once = str(args.concurrency)
    worker = [
        str(Path(sys.executable).parent / "taskiq"),
        *("worker", f"{TASKIQ_APP}:broker", "--workers", "1", "--max-async-tasks", at_once),
        *("--no-configure-logging", "--log-level", "WARNING"),
    ]
    label = f"taskiq, 1 worker process, {at_once} at once, no-op async task"
    extra = [f"{queue}.dead_letter", f"{queue}.delay"]
    environment = {"BENCH_TASKIQ_QUEUE": queue, "BENCH_TASKIQ_QOS": at_once}
    return await drained_rate(args, label, TASKIQ_APP, environment, queue, worker, extra)


async def drained_rate(
    args: argparse.Namespace,
    label: str,
    module: str,
    environment: dict[str, str],
    queue: str,
    worker: list[str],
    extra_queues: Sequence[str] = (),
) -> Rate:
    """A reference worker (``worker``, a command) draining ``--runs`` no-op tasks that
    ``module.fill`` put in ``queue`` beforehand: from the first task taken to the queue empty
    (the last delivered, so acked early: no events, no confirms, no store)."""
    if shutil.which(worker[0]) is None:
        return Rate(label, 0, 0.0, f"{Path(worker[0]).name} is not installed: pip install -e '.[bench]'")
    environment = {**os.environ, "BENCH_AMQP_URL": args.amqp_url, **environment}
    fill = subprocess.run(  # noqa: ASYNC221 (before anything is timed)
        [sys.executable, "-c", f"from {module} import fill; fill({args.runs})"],
        env=environment,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if fill.returncode != 0:
        return Rate(label, 0, 0.0, f"could not fill the queue: {fill.stderr[-300:]}")
    process = subprocess.Popen(  # noqa: ASYNC220
        worker, env=environment, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    connection = await aio_pika.connect_robust(args.amqp_url)
    try:
        first = last = None
        deadline = time.perf_counter() + args.timeout
        while time.perf_counter() < deadline:
            channel = await connection.channel()
            waiting = (await channel.declare_queue(queue, passive=True)).declaration_result.message_count or 0
            await channel.close()
            now = time.perf_counter()
            if first is None and waiting < args.runs:
                first = now
            if waiting == 0:
                last = now
                break
            await asyncio.sleep(0.02)
        if first is None or last is None:
            return Rate(label, 0, 0.0, "did not drain")
        return Rate(f"{label} (drained, acked early)", args.runs, last - first)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        channel = await connection.channel()
        for name in (queue, *extra_queues):
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
        await connection.close()


# --- the run ------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> int:
    print(
        f"cronfleet worker bench: {machine()}, store {args.store}, concurrency {args.concurrency}, "
        f"{args.runs} runs each",
        flush=True,
    )
    rates: list[Rate] = []
    sink = start_sink(args.sink, args.sink_processes)
    try:
        for kind in args.kinds:
            for processes in args.processes:
                print(f"[cronfleet] {kind}, {processes} worker process(es) ...", flush=True)
                rates.append(await cronfleet_rate(args, kind, processes, sink))
                print(f"    {rates[-1].per_second:.0f} runs/s {rates[-1].note}", flush=True)
        if not args.no_references:
            for processes in args.processes:
                print(f"[reference] bare aio-pika, {processes} process(es) ...", flush=True)
                rates.append(await bare_rate(args, processes))
            print("[reference] Celery ...", flush=True)
            rates.append(await celery_rate(args))
            print("[reference] taskiq ...", flush=True)
            rates.append(await taskiq_rate(args))
    finally:
        sink.stop()
    print()
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; sink {args.sink}")
    print(
        f"{'measure':<56} {'runs/s':>8} {'cpu ms/run':>11} {'+ jobs':>8} {'broker':>7} "
        f"{'host %':>7} {'sink':>6}"
    )
    print("-" * 109)
    for rate in rates:
        cpu = "" if rate.cpu_ms is None else f"{rate.cpu_ms:>11.2f} {rate.cpu_with_jobs_ms or 0:>8.2f}"
        broker = (
            "" if rate.broker_cpu_ms is None else f"{rate.broker_cpu_ms:>7.2f} {rate.host_busy or 0:>7.0f}"
        )
        sink_cpu = "" if rate.sink_cpu_ms is None else f" {rate.sink_cpu_ms:>6.2f}"
        note = f"  ({rate.note})" if rate.note else ""
        print(f"{rate.label:<56} {rate.per_second:>8.0f} {cpu:>20} {broker:>15}{sink_cpu}{note}")
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=["python", "http", "shell"],
        choices=["python", "python-thread", "http", "shell"],
    )
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--concurrency", type=int, default=64, help="each worker's --concurrency")
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up on a measure after this long")
    parser.add_argument("--no-references", action="store_true")
    parser.add_argument("--bare-consumer", nargs=2, metavar=("QUEUE", "SINK"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--sink", choices=["asyncio", "threading"], default="asyncio", help="the http runs' endpoint"
    )
    parser.add_argument("--sink-processes", type=int, default=2, help="asyncio sink processes on one port")
    parser.add_argument("--profile", metavar="DIR", help="run each worker under py-spy, samples in DIR")
    parser.add_argument(
        "--cpu-limit",
        type=float,
        metavar="SHARE",
        help="limit each worker (and bare loop) process to SHARE of one core, in a cgroup of its own",
    )
    parser.add_argument(
        "--amqp-url", default=os.environ.get("CRONFLEET_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("CRONFLEET_TEST_DATABASE_URL", "postgresql://127.0.0.1:5432/test"),
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.bare_consumer:
        asyncio.run(bare_consumer(args, *args.bare_consumer))
        return 0
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
