"""Celery beat as a reference for the scheduler benchmarks (issue 16): the same job set as a
``beat_schedule``, a real ``celery beat`` process publishing to the real RabbitMQ, and what the
benches measure of it. Used by ``bench_scheduler.py`` and ``bench_e2e.py``; not collected by pytest.

As a Celery app (``celery -A tests.bench.ref_celery_beat beat``) it reads from the environment:
``BENCH_CELERY_JOBS`` (a JSON file of ``[name, expression, zone]``, as ``bench_scheduler`` writes)
or ``BENCH_CELERY_EVERY_SECOND`` (N entries on ``schedule(1.0)``), ``BENCH_CELERY_QUEUE`` (the
private queue and exchange it publishes to) and ``BENCH_CELERY_RECORD`` (a file where the beat
writes, at exit, each task id it sent with the entry's ``last_run_at``).

What Celery's crontab cannot express, and how each job is mapped:

- **Seconds.** Celery's crontab has no seconds field (minute resolution): a 6-field expression
  loses its seconds field and fires at second 0 of the same minutes (the same number of fires).
  The every-second rows use ``schedule(1.0)`` interval entries, which count from the entry's
  previous send, not from a grid of whole seconds.
- **A time zone per entry.** Plain ``crontab`` takes its zone from the app (``timezone``); since
  Celery 5.5 it converts ``nowfun``'s time into that zone too, so ``nowfun`` no longer gives an
  entry a zone of its own. ``ZonedCrontab`` below is a crontab whose zone is its own, as
  django-celery-beat's ``TzAwareCrontab`` does: the way Celery users get per-entry zones.
- **Month names** (``jan``) are not parsed by Celery's crontab (weekday names are): they are
  written as numbers. Day-of-month and day-of-week are AND in Celery, OR in cron; no generated
  expression restricts both.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from celery import Celery  # type: ignore[import-not-found, import-untyped, unused-ignore]
from celery.beat import PersistentScheduler  # type: ignore[import-not-found, import-untyped, unused-ignore]
from celery.schedules import crontab, schedule  # type: ignore[import-not-found, import-untyped, unused-ignore]
from kombu import Exchange, Queue  # type: ignore[attr-defined, import-not-found, import-untyped, unused-ignore]

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.bench.ref_celery_beat"
TASK = "bench.noop"
QUEUE_ARGUMENTS = {"x-queue-type": "quorum"}  # as cronfleet's trigger queues
# The line TimedScheduler writes (beat redirects stderr into its log, with a prefix).
PLANNED = re.compile(r"planned \d+ entries at (?P<at>[\d.]+): made at (?P<made>[\d.]+)")
MONTHS = {m: str(i) for i, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun"), 1)}
MONTHS |= {m: str(i) for i, m in enumerate(("jul", "aug", "sep", "oct", "nov", "dec"), 7)}


class ZonedCrontab(crontab):  # type: ignore[misc]
    """A Celery crontab evaluated in its own time zone instead of the app's."""

    def __init__(self, *fields: Any, zone: str = "UTC", **kwargs: Any) -> None:
        super().__init__(*fields, **kwargs)
        self.zone = zone
        self.__dict__["tz"] = ZoneInfo(zone)  # shadows crontab's cached ``tz`` (the app's zone)

    def __reduce__(self) -> tuple[Any, ...]:
        cls, fields, kwargs = super().__reduce__()
        return cls, fields, {**kwargs, "zone": self.zone}

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        zone = state.pop("zone", "UTC")
        super().__setstate__(state)
        self.zone = zone
        self.__dict__["tz"] = ZoneInfo(zone)

    def __eq__(self, other: object) -> bool:
        return bool(super().__eq__(other)) and getattr(other, "zone", None) == self.zone

    __hash__ = None  # type: ignore[assignment]


def celery_crontab(expression: str, zone: str) -> ZonedCrontab:
    """The Celery crontab of a 5- or 6-field cron ``expression`` in ``zone`` (seconds dropped,
    month names as numbers: see the module's docstring)."""
    fields = expression.split()
    if len(fields) == 6:
        fields = fields[1:]
    minute, hour, day, month, dow = fields
    month = ",".join(MONTHS.get(part, part) for part in month.split(","))
    return ZonedCrontab(minute, hour, dow, day, month, zone=zone)


def beat_schedule(environ: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The ``beat_schedule`` the environment asks for (empty when it asks for none)."""
    if path := environ.get("BENCH_CELERY_JOBS"):
        jobs = json.loads(Path(path).read_text())
        return {name: {"task": TASK, "schedule": celery_crontab(text, zone)} for name, text, zone in jobs}
    every = int(environ.get("BENCH_CELERY_EVERY_SECOND", "0"))
    return {f"bench-{i:04d}": {"task": TASK, "schedule": schedule(1.0)} for i in range(every)}


def _queue(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name, queue_arguments=QUEUE_ARGUMENTS)  # type: ignore[no-untyped-call, unused-ignore]


QUEUE_NAME = os.environ.get("BENCH_CELERY_QUEUE", "bench-beat")
app = Celery("bench-beat", broker=os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"))
app.conf.update(
    timezone="UTC",
    enable_utc=True,
    task_queues=[_queue(QUEUE_NAME)],
    task_default_queue=QUEUE_NAME,
    task_ignore_result=True,
    result_expires=None,  # no ``celery.backend_cleanup`` entry: the schedule is the job set alone
    beat_schedule=beat_schedule(os.environ),
)


class TimedScheduler(PersistentScheduler):  # type: ignore[misc]
    """Celery's default scheduler (entries in a shelve file), plus two observations: a line on
    stderr when the first tick has computed every entry's next run, and, at exit, the id and
    ``last_run_at`` of every task it sent (kept in a list meanwhile)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._made = time.time()  # "beat: Starting..." is logged just before this
        self._planned = False
        self._sent: list[tuple[str, float]] = []
        super().__init__(*args, **kwargs)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if self._planned:
            return float(super().tick(*args, **kwargs))
        began = time.time()
        interval = float(super().tick(*args, **kwargs))
        self._planned = True
        now = time.time()
        print(
            f"planned {len(self._heap)} entries at {now:.6f}: made at {self._made:.6f}, "
            f"first tick {now - began:.3f} s",
            file=sys.stderr,
            flush=True,
        )
        return interval

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        last_run_at = entry.last_run_at.timestamp()
        result = super().apply_async(entry, producer, advance, **kwargs)
        self._sent.append((result.id, last_run_at))
        return result

    def close(self) -> None:
        if path := os.environ.get("BENCH_CELERY_RECORD"):
            Path(path).write_text(json.dumps(self._sent))
        super().close()


# --- the parent's side --------------------------------------------------------------------------


def spawn(environ: Mapping[str, str], directory: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start ``celery beat`` (its default log level, WARNING) with this module's app, its schedule
    file and record in ``directory``, its output in ``log``."""
    env = {**os.environ, **environ, "BENCH_CELERY_RECORD": str(directory / "sent.json")}
    argv = [str(Path(sys.executable).with_name("celery")), "-A", APP, "beat"]
    argv += ["-s", str(directory / "beat-schedule"), "-S", f"{APP}:TimedScheduler"]
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=out, env=env, cwd=ROOT)


def environ(amqp_url: str, queue: str, **more: str) -> dict[str, str]:
    return {"BENCH_AMQP_URL": amqp_url, "BENCH_CELERY_QUEUE": queue, **more}


def planned_line(log: Path) -> tuple[float, float] | None:
    """From beat's log: (when the first tick ended, seconds from the scheduler's construction,
    right after "beat: Starting...", to then), or None before that line."""
    found = PLANNED.search(log.read_text(errors="replace"))
    return None if found is None else (float(found["at"]), float(found["at"]) - float(found["made"]))


async def until_planned(proc: subprocess.Popen[bytes], log: Path) -> tuple[float, float]:
    """Wait for the beat's first tick to end: ``planned_line``'s figures. Raises SystemExit
    with the end of its log if the beat ends first."""
    while (planned := planned_line(log)) is None:
        if proc.poll() is not None:
            raise SystemExit(f"celery beat ended before planning:\n{log.read_text()[-3000:]}")  # noqa: ASYNC240 (it ended)
        await asyncio.sleep(0.05)
    return planned


def stop(proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """SIGTERM the beat (it syncs its shelve and writes its record) and wait for it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def sent(directory: Path) -> list[tuple[str, float]]:
    """What the stopped beat recorded: (task id, entry's ``last_run_at`` as a timestamp)."""
    return [(task_id, at) for task_id, at in json.loads((directory / "sent.json").read_text())]


@dataclass
class Arrivals:
    """A consumer of the beat's queue that only records when each message arrived (no ack work:
    auto-ack), by Celery task id (the ``id`` header)."""

    amqp_url: str
    queue: str
    at: dict[str, float] = field(default_factory=dict)
    _connection: Any = None
    _queue: Any = None
    _tag: str = ""

    async def __aenter__(self) -> Arrivals:
        import aio_pika

        self._connection = await aio_pika.connect_robust(self.amqp_url)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=1000)
        exchange = await channel.declare_exchange(self.queue, aio_pika.ExchangeType.DIRECT, durable=True)
        queue = await channel.declare_queue(self.queue, durable=True, arguments=QUEUE_ARGUMENTS)
        await queue.bind(exchange, self.queue)
        await queue.purge()

        def arrived(message: Any) -> None:
            self.at[str(message.headers.get("id"))] = time.time()

        self._queue, self._tag = queue, await queue.consume(arrived, no_ack=True)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self._queue.cancel(self._tag)
        channel = await self._connection.channel()
        await channel.queue_delete(self.queue)
        await channel.exchange_delete(self.queue)
        await self._connection.close()

    async def wait_for(self, count: int, timeout: float) -> bool:
        """Whether ``count`` messages arrived within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while len(self.at) < count:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True


def minute_after(moment: float) -> float:
    """The first whole minute strictly after the timestamp ``moment``."""
    return (int(moment) // 60 + 1) * 60.0


async def burst(amqp_url: str, jobs: int, directory: Path, timeout: float = 60) -> dict[str, Any]:
    """``jobs`` entries on ``crontab()`` (every minute, second 0): from the first minute after the
    beat planned them to the last of that minute's messages arriving at a consumer. A burst not
    done within ``timeout`` counts what arrived by then."""
    queue = f"bench-beat-{directory.name}"
    async with Arrivals(amqp_url, queue) as arrivals:
        jobs_file = directory / "burst.json"
        jobs_file.write_text(json.dumps([[f"burst-{i:06d}", "0 * * * * *", "UTC"] for i in range(jobs)]))
        log = directory / "burst.log"
        proc = spawn(environ(amqp_url, queue, BENCH_CELERY_JOBS=str(jobs_file)), directory, log)
        try:
            planned = await until_planned(proc, log)
            finished = await arrivals.wait_for(jobs, minute_after(planned[0]) - time.time() + timeout)
            waited = time.time()
        finally:
            await asyncio.to_thread(stop, proc)
    due = {task_id: minute_after(at) for task_id, at in sent(directory)}
    first = min(due.values())
    times = [arrivals.at[task_id] for task_id, at in due.items() if at == first and task_id in arrivals.at]
    return {
        "burst_last_s": max(times) - first if finished else float("nan"),
        "burst_arrived": len(times),
        "burst_by_s": (max(times) if finished else waited) - first,
    }


async def sustained(amqp_url: str, jobs: int, seconds: float, directory: Path) -> dict[str, Any]:
    """``jobs`` entries on ``schedule(1.0)`` for ``seconds`` from the beat's first planned tick:
    each message's lag from its due instant (the entry's previous send + 1 s, Celery's own
    schedule) to its arrival at a consumer, the sends against ``jobs`` a whole second (the grid a
    cron job every second keeps), and the beat's CPU time over the window."""
    import psutil  # type: ignore[import-untyped, unused-ignore]

    queue = f"bench-beat-{directory.name}"
    async with Arrivals(amqp_url, queue) as arrivals:
        log = directory / "sustained.log"
        proc = spawn(environ(amqp_url, queue, BENCH_CELERY_EVERY_SECOND=str(jobs)), directory, log)
        try:
            planned = await until_planned(proc, log)
            began = planned[0]
            watched = psutil.Process(proc.pid)
            cpu = watched.cpu_times()
            await asyncio.sleep(seconds)
            ended = time.time()
            after = watched.cpu_times()
        finally:
            await asyncio.to_thread(stop, proc)
        await asyncio.sleep(1.0)  # what was sent before the stop arrives
    lags, late = [], 0
    for task_id, last_run_at in sent(directory):
        due = last_run_at + 1.0
        if not began < due <= ended:
            continue
        arrived = arrivals.at.get(task_id)
        if arrived is None:
            late += 1
        lags.append((arrived if arrived is not None else ended) - due)
    return {
        "jobs": jobs,
        "seconds": ended - began,
        "sent_due": len(lags),
        "grid_due": jobs * int(ended - began),
        "lag": lags,
        "never_arrived": late,
        "cpu_s": after.user + after.system - cpu.user - cpu.system,
    }


def next_fire(expression: str, zone: str, after: datetime) -> datetime:
    """Celery's next fire of ``expression`` in ``zone`` strictly after ``after`` (aware), in UTC:
    used to check the mapping against cronfleet's evaluator on a sample."""
    entry = celery_crontab(expression, zone)
    entry.app = app
    start, delta, _now = entry.remaining_delta(after.astimezone(UTC))
    return (start + delta).astimezone(UTC) if delta else after + timedelta(minutes=1)
