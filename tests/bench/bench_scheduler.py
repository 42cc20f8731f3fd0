"""Scheduler at scale: 100k jobs with diverse expressions and time zones, side by side with
APScheduler 3.11 in the same run.

Not a test (pytest does not collect ``bench_*.py``). Run it from the repository root::

    .venv/bin/pip install 'apscheduler<4' psutil      # the reference and the meter, bench only
    .venv/bin/python tests/bench/bench_scheduler.py --jobs 100000

It generates ``--jobs`` jobs (seeded: the same set every run): nine kinds of cron expressions
(fixed times, minute and hour steps, weekday names and ranges, days of month, month names, lists
and ranges, and 6-field expressions with seconds in {0, 20, 40}) over twenty time zones, Lord
Howe and Kathmandu included. No job fires in seconds 6-16 of any minute: that is the idle window.
``--references apscheduler,celery`` (the default) picks the references run beside cronfleet;
``--burst-only`` skips everything but the burst phase.

For each store (``--stores sqlite,postgresql``; PostgreSQL in a private schema of
``--postgres-url``, dropped at the end), cronfleet:

1. **apply**: ``apply_jobs`` of every job into an empty store (specs built beforehand, their
   parse time reported apart), then a re-apply with one job changed.
2. **start to planning**: a real ``cronfleet scheduler`` process is spawned; the clock runs from
   the spawn (imports included) to its ``planning N job(s)`` log line.
3. **RSS** of that process two seconds later (psutil), and its **idle CPU**: user + system time
   over the 10 s window from second 6 to second 16 of a minute, as a share of one core.
4. **pick-up**: one job is re-applied to fire every second; the time from the end of that apply
   to its first fire in the store (the scheduler reloads every ``jobs_reload_seconds``, 2 s).

5. **burst** (``--burst``, 10,000 by default; a store of its own): that many jobs due at second 0
   of every minute; from that instant to the last of their fires confirmed by the broker (the
   ``published_at`` the outbox stored), with a real scheduler process (logging at INFO, its
   default: a line per fire).

``--rows-only 1000000``: a million job rows written straight into PostgreSQL with their next
fire (nothing applied), and one scheduler's start in the bench's own process.

APScheduler 3.11 (``BackgroundScheduler``, memory job store, a no-op function) gets the same jobs
in a child process: start to planning is from the spawn to the moment ``start()`` returned with
every job's next run time computed; RSS and idle CPU are measured the same way. It persists
nothing and sends nothing. Note: APScheduler's day-of-month/weekday rule is AND where cron's is
OR; no generated expression restricts both, so both schedulers fire the same instants.

Celery beat 5 (``ref_celery_beat.py``: a real ``celery beat`` process, its default persistent
scheduler, publishing to a private quorum queue on the same RabbitMQ) gets the same jobs as
crontab entries, each in its own zone, seconds fields dropped (see that module for the mapping):
start to planning is from the spawn to the end of its first tick, which computes every entry's
next run; RSS and idle CPU as above; the burst is ``--burst`` entries on ``crontab()`` (every
minute), from the minute to the last message's arrival at a consumer that only records arrivals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

ZONES = [
    "UTC",
    "Europe/Berlin",
    "Europe/London",
    "Europe/Paris",
    "Europe/Moscow",
    "America/New_York",
    "America/Chicago",
    "America/Denver",
    "America/Los_Angeles",
    "America/Sao_Paulo",
    "America/St_Johns",
    "Asia/Tokyo",
    "Asia/Shanghai",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Asia/Tehran",
    "Australia/Sydney",
    "Australia/Lord_Howe",
    "Pacific/Auckland",
    "Africa/Cairo",
]
DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
KEYS = ",".join(
    [
        "trigger:t1:bench-trigger-secret-one-0123456789",
        "event:e1:bench-event-secret-one-0123456789",
        "ping:p1:bench-ping-secret-one-0123456789",
    ]
)
IDLE_FROM, IDLE_SECONDS = 6, 10


def expression(rng: random.Random) -> str:
    """One random cron expression of nine kinds; never fires in seconds 1-19 of a minute."""
    m, h = rng.randrange(60), rng.randrange(24)
    match rng.randrange(9):
        case 0:
            return f"{m} {h} * * *"
        case 1:
            return f"{rng.randrange(30)}-59/{rng.randrange(2, 31)} * * * *"
        case 2:
            return f"{m} */{rng.randrange(2, 13)} * * *"
        case 3:
            first = rng.randrange(6)
            days = rng.choice([DAYS[first], f"{DAYS[first]}-{DAYS[rng.randrange(first + 1, 7)]}", "sat,sun"])
            return f"{m} {h} * * {days}"
        case 4:
            return f"{m} {h} {rng.randrange(1, 29)} * *"
        case 5:
            low = rng.randrange(23)
            return f"{m},{(m + 30) % 60} {low}-{rng.randrange(low + 1, 24)} * * *"
        case 6:
            return f"{m} {h} {rng.randrange(1, 29)} {rng.choice(MONTHS)} *"
        case 7:
            return f"{rng.choice((0, 20, 40))} {m} {h} * * *"
        case _:
            return f"{rng.choice((0, 20, 40))} {rng.randrange(30)}-59/{rng.randrange(2, 31)} * * * *"


def generate(jobs: int, seed: int) -> list[tuple[str, str, str]]:
    """``jobs`` (name, expression, zone) triples, the same for the same seed."""
    rng = random.Random(seed)
    return [(f"job-{i:06d}", expression(rng), rng.choice(ZONES)) for i in range(jobs)]


# --- APScheduler, in a child process ---------------------------------------------------------


def _noop() -> None:
    return None


def apscheduler_child(path: str) -> None:
    """Plan every job of ``path`` in APScheduler 3 and wait; prints ``planning N`` once started."""
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.cron import CronTrigger

    jobs = json.loads(Path(path).read_text())
    scheduler = BackgroundScheduler(timezone="UTC")
    for name, text, zone in jobs:
        fields = text.split()
        if len(fields) == 6:
            second, minute, hour, day, month, dow = fields
            trigger = CronTrigger(
                second=second, minute=minute, hour=hour, day=day, month=month, day_of_week=dow, timezone=zone
            )
        else:
            trigger = CronTrigger.from_crontab(text, timezone=zone)
        scheduler.add_job(_noop, trigger, id=name, name=name, misfire_grace_time=300)
    scheduler.start()
    print(f"planning {len(scheduler.get_jobs())}", flush=True)
    time.sleep(3600)


# --- the parent --------------------------------------------------------------------------------


@dataclass
class Process:
    """A spawned scheduler: its start-to-planning time, RSS and idle CPU."""

    start_seconds: float
    rss_mb: float
    idle_cpu: float


def _wait_for_line(path: Path, needle: str, started: float, proc: subprocess.Popen[bytes]) -> float:
    while True:
        if needle in path.read_text(errors="replace"):
            return time.perf_counter() - started
        if proc.poll() is not None:
            raise SystemExit(f"the process ended before planning:\n{path.read_text()[-3000:]}")
        if time.perf_counter() - started > 600:
            raise SystemExit("no planning line within 600 s")
        time.sleep(0.01)


def _measure(proc: subprocess.Popen[bytes], log: Path, needle: str, started: float) -> Process:
    import psutil

    start = _wait_for_line(log, needle, started, proc)
    watched = psutil.Process(proc.pid)
    time.sleep(2)
    rss = watched.memory_info().rss / 2**20
    # The idle window: seconds 6 to 16 of a minute, when no generated job fires.
    now = datetime.now(UTC)
    wait = (IDLE_FROM - now.second - now.microsecond / 1e6) % 60
    time.sleep(wait)
    before, wall = watched.cpu_times(), time.perf_counter()
    time.sleep(IDLE_SECONDS)
    after, wall = watched.cpu_times(), time.perf_counter() - wall
    cpu = max(0.0, (after.user + after.system - before.user - before.system) / wall)
    return Process(start, rss, cpu)


def _spawn(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], Path]:
    """Start ``argv`` with its output in a new log file; the process and the file."""
    log = Path(tempfile.mkstemp(suffix=".log")[1])
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=out, env=env), log


def run_apscheduler(jobs_file: Path) -> Process:
    """Spawn the APScheduler child and measure it."""
    started = time.perf_counter()
    proc, log = _spawn([sys.executable, __file__, "--apscheduler-child", str(jobs_file)], dict(os.environ))
    try:
        return _measure(proc, log, "planning", started)
    finally:
        proc.terminate()
        proc.wait()


async def run_celery_beat(jobs_file: Path, amqp_url: str, burst: int, *, start: bool) -> dict[str, Any]:
    """A real ``celery beat`` on the same jobs (``ref_celery_beat.py``), measured as the others:
    spawn to its first tick having computed every entry, RSS, idle CPU; then the burst."""
    from tests.bench import ref_celery_beat as beat

    # Each beat's schedule file (tens of MB at 100k entries), log and record go with its directory.
    result: dict[str, Any] = {}
    if start:
        with tempfile.TemporaryDirectory(prefix="beat-") as directory:
            result = await _celery_beat_start(jobs_file, amqp_url, Path(directory))
    if burst:
        with tempfile.TemporaryDirectory(prefix="beat-") as directory:
            result |= await beat.burst(amqp_url, burst, Path(directory))
    return result


async def _celery_beat_start(jobs_file: Path, amqp_url: str, directory: Path) -> dict[str, Any]:
    from tests.bench import ref_celery_beat as beat

    queue = f"bench-beat-{directory.name}"
    async with beat.Arrivals(amqp_url, queue) as arrivals:
        log = directory / "start.log"
        started = time.perf_counter()
        proc = beat.spawn(beat.environ(amqp_url, queue, BENCH_CELERY_JOBS=str(jobs_file)), directory, log)
        try:
            measured = await asyncio.to_thread(_measure, proc, log, "planned ", started)
            planned = beat.planned_line(log)
            sent = len(arrivals.at)
        finally:
            proc.kill()  # nothing to read from it: not the minutes of syncing 100k entries to its shelve
            await asyncio.to_thread(proc.wait)
    assert planned is not None
    result = {
        "start_s": measured.start_seconds,
        "starting_s": planned[1],
        "rss_mb": measured.rss_mb,
        "idle_cpu": measured.idle_cpu,
        "sent": sent,
    }
    print(f"celery beat: {result}", flush=True)
    return result


async def _tell_schedulers(amqp_url: str, namespace: str) -> bool:
    """Publish ``jobs.changed`` as ``cronfleet apply`` does; whether it went out."""
    from common.connection import connect
    from common.publisher import Publisher
    from common.settings import Settings
    from common.topology import Topology

    connection = await connect(amqp_url, "bench-apply", wait=False)
    try:
        publisher = await Publisher.open(connection, Topology(namespace), Settings(keys=KEYS).keyring())
        return await publisher.tell_jobs_changed("bench_scheduler") is None
    finally:
        await connection.close()


async def run_cronfleet(
    store_kind: str, postgres_url: str, jobs: list[tuple[str, str, str]]
) -> dict[str, Any]:
    """Apply the jobs to a fresh store, spawn a real scheduler on it and measure both."""
    import aio_pika
    from sqlalchemy import func, select, text

    from common.actions import ShellAction
    from common.catalog import apply_jobs
    from common.clock import utcnow
    from common.jobs import JobSpec
    from common.settings import normalise_database_url
    from common.store import FireRow, Store
    from common.topology import Topology

    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    amqp_url = os.environ.get("CRONFLEET_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    schema = None
    if store_kind == "sqlite":
        url = f"sqlite+aiosqlite:///{tempfile.mkdtemp()}/cronfleet.db"
    else:
        url, schema = normalise_database_url(postgres_url), f"bench_{uuid.uuid4().hex[:8]}"
    store = await Store.open(url, schema, upgrade=True)
    result: dict[str, Any] = {"store": store_kind}
    proc: subprocess.Popen[bytes] | None = None
    try:
        action = ShellAction(argv=["true"])
        t = time.perf_counter()
        specs = [JobSpec(name=n, schedule=s, timezone=z, action=action) for n, s, z in jobs]
        result["parse_s"] = time.perf_counter() - t
        t = time.perf_counter()
        await apply_jobs(store, specs, utcnow())
        result["apply_s"] = time.perf_counter() - t
        specs[1] = specs[1].model_copy(update={"description": "changed"})
        t = time.perf_counter()
        diff = await apply_jobs(store, specs, utcnow())
        result["reapply_s"] = time.perf_counter() - t
        assert diff.changed == [specs[1].name], diff.changed

        env = {k: v for k, v in os.environ.items() if not k.startswith("CRONFLEET_")}
        env |= {
            "CRONFLEET_DATABASE_URL": url,
            "CRONFLEET_KEYS": KEYS,
            "CRONFLEET_NAMESPACE": namespace,
            "CRONFLEET_AMQP_URL": amqp_url,
        }
        if schema:
            env["CRONFLEET_DATABASE_SCHEMA"] = schema
        started = time.perf_counter()
        proc, log = _spawn([str(Path(sys.executable).with_name("cronfleet")), "scheduler"], env)
        measured = _measure(proc, log, "planning", started)
        result |= {
            "start_s": measured.start_seconds,
            "rss_mb": measured.rss_mb,
            "idle_cpu": measured.idle_cpu,
        }

        # Pick-up: one job changed to fire every second; until its first fire is in the store.
        specs[0] = specs[0].model_copy(update={"schedule": "* * * * * *", "timezone": "UTC"})
        t = time.perf_counter()
        await apply_jobs(store, specs, utcnow())
        applied = time.perf_counter()
        result["reapply_running_s"] = applied - t
        # As ``cronfleet apply`` does: tell the running schedulers (jobs.changed), so that the
        # change is read now rather than at the next poll.
        told = await _tell_schedulers(amqp_url, namespace)
        result["told"] = told
        query = select(func.count()).select_from(FireRow).where(FireRow.job == specs[0].name)
        while True:
            async with store.session() as session:
                if await session.scalar(query):
                    break
            if time.perf_counter() - applied > 60:
                raise SystemExit("the changed job never fired")
            await asyncio.sleep(0.05)
        result["pickup_s"] = time.perf_counter() - applied
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        if schema:
            async with store.engine.begin() as connection:
                await connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await store.close()
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            await Topology(namespace).delete(await connection.channel(), pools=["default"])
    return result


async def run_burst(store_kind: str, postgres_url: str, jobs: int) -> dict[str, Any]:
    """``jobs`` jobs due at the same second (second 0 of every minute): from that instant to the
    last of their fires confirmed by the broker (its ``published_at``), with a real scheduler."""
    import aio_pika
    from sqlalchemy import func, select, text

    from common.actions import ShellAction
    from common.catalog import apply_jobs
    from common.clock import utcnow
    from common.jobs import JobSpec
    from common.settings import normalise_database_url
    from common.store import FireRow, Store
    from common.topology import Topology

    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    amqp_url = os.environ.get("CRONFLEET_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    schema = None
    if store_kind == "sqlite":
        url = f"sqlite+aiosqlite:///{tempfile.mkdtemp()}/cronfleet.db"
    else:
        url, schema = normalise_database_url(postgres_url), f"bench_{uuid.uuid4().hex[:8]}"
    store = await Store.open(url, schema, upgrade=True)
    proc: subprocess.Popen[bytes] | None = None
    try:
        action = ShellAction(argv=["true"])
        specs = [JobSpec(name=f"burst-{i:06d}", schedule="0 * * * * *", action=action) for i in range(jobs)]
        await apply_jobs(store, specs, utcnow())
        env = {k: v for k, v in os.environ.items() if not k.startswith("CRONFLEET_")}
        env |= {
            "CRONFLEET_DATABASE_URL": url,
            "CRONFLEET_KEYS": KEYS,
            "CRONFLEET_NAMESPACE": namespace,
            "CRONFLEET_AMQP_URL": amqp_url,
        }
        if schema:
            env["CRONFLEET_DATABASE_SCHEMA"] = schema
        started = time.perf_counter()
        proc, log = _spawn([str(Path(sys.executable).with_name("cronfleet")), "scheduler"], env)
        _wait_for_line(log, "planning", started, proc)
        now = utcnow()
        due = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
        if (due - now).total_seconds() < 3:  # planned in time for this one? take the next
            due += timedelta(minutes=1)
        published = select(func.count(), func.max(FireRow.published_at)).where(
            FireRow.scheduled_at == due, FireRow.published_at.is_not(None)
        )
        while True:
            await asyncio.sleep(0.2)
            async with store.session() as session:
                count, last = (await session.execute(published)).one()
            if count >= jobs:
                break
            if utcnow() > due + timedelta(seconds=120):
                raise SystemExit(f"only {count} of {jobs} burst fires published within 120 s")
        return {"store": store_kind, "burst_last_s": (last - due).total_seconds()}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        if schema:
            async with store.engine.begin() as connection:
                await connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await store.close()
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            await Topology(namespace).delete(await connection.channel(), pools=["default"])


async def run_rows_only(postgres_url: str, jobs: int) -> None:
    """``jobs`` job rows written straight into a PostgreSQL schema with their next fire (no spec
    parsed, nothing applied: applying a million jobs is bounded by the cron evaluator), then one
    scheduler's start (``reload``) in this process: its time, this process's RSS, an idle reload."""
    import aio_pika
    import psutil
    from sqlalchemy import text

    from common.publisher import Publisher
    from common.settings import Settings, normalise_database_url
    from common.store import Store
    from common.topology import Topology
    from scheduler.service import Scheduler

    namespace, schema = f"bench-{uuid.uuid4().hex[:8]}", f"bench_{uuid.uuid4().hex[:8]}"
    url = normalise_database_url(postgres_url)
    settings = Settings(database_url=url, database_schema=schema, keys=KEYS, namespace=namespace)
    store = await Store.open(url, schema, upgrade=True)
    try:
        async with store.engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO jobs (name, spec, fingerprint, pool, enabled, created_at, updated_at, "
                    "planned, next_fire_at, version) SELECT 'job-' || lpad(i::text, 7, '0'), '{}', 'f', "
                    "'default', true, now(), now(), true, (now() at time zone 'utc') + interval '1 hour' "
                    "+ (i % 86400) * interval '1 second', 1 FROM generate_series(1, :jobs) AS i"
                ),
                {"jobs": jobs},
            )
            await connection.execute(text("UPDATE jobs_version SET version = 1"))
        amqp = await aio_pika.connect_robust(os.environ.get("CRONFLEET_AMQP_URL", settings.amqp_url))
        publisher = await Publisher.open(amqp, Topology(namespace), settings.keyring())
        rss = psutil.Process().memory_info().rss / 2**20
        scheduler = Scheduler(settings, store, publisher, "bench")
        started = time.perf_counter()
        await scheduler.reload()
        start = time.perf_counter() - started
        after = psutil.Process().memory_info().rss / 2**20
        started = time.perf_counter()
        await scheduler.reload()
        idle = time.perf_counter() - started
        print(
            f"{len(scheduler.planner)} jobs (PostgreSQL, rows only): start (reload) {start:.2f} s, "
            f"RSS {rss:.0f} -> {after:.0f} MB, an idle reload {1000 * idle:.1f} ms"
        )
        await Topology(namespace).delete(await amqp.channel(), pools=["default"])
        await amqp.close()
    finally:
        async with store.engine.begin() as connection:
            await connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await store.close()


def main() -> None:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--stores", default="sqlite,postgresql")
    parser.add_argument("--postgres-url", default="postgresql://127.0.0.1:5432/test")
    parser.add_argument("--burst", type=int, default=10_000, help="jobs due in one second (0: skip)")
    parser.add_argument("--rows-only", type=int, metavar="N", help="only: N job rows, one start, PostgreSQL")
    parser.add_argument("--apscheduler-child", metavar="JOBS_FILE")
    parser.add_argument("--burst-only", action="store_true", help="only the burst phase, for every store")
    parser.add_argument(
        "--references",
        default="apscheduler,celery",
        help="which references run beside cronfleet: apscheduler, celery (Celery beat), or none",
    )
    args = parser.parse_args()
    if args.rows_only:
        asyncio.run(run_rows_only(args.postgres_url, args.rows_only))
        return
    if args.apscheduler_child:
        apscheduler_child(args.apscheduler_child)
        return
    import apscheduler

    references = {r for r in args.references.split(",") if r}
    amqp_url = os.environ.get("CRONFLEET_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    jobs = generate(args.jobs, args.seed)
    jobs_file = Path(tempfile.mkstemp(suffix=".json")[1])
    jobs_file.write_text(json.dumps(jobs))
    distinct = len({(s, z) for _, s, z in jobs})
    print(
        f"# {args.jobs} jobs, {len({s for _, s, _ in jobs})} distinct expressions, {distinct} distinct "
        f"(expression, zone); {platform.python_version()}, {os.cpu_count()} cores, "
        f"APScheduler {apscheduler.__version__}",
        flush=True,
    )
    rows = []
    for kind in [s for s in args.stores.split(",") if s]:
        measured = {"store": kind}
        if not args.burst_only:
            measured = asyncio.run(run_cronfleet(kind, args.postgres_url, jobs))
        rows.append(measured)
        if args.burst:
            rows[-1] |= asyncio.run(run_burst(kind, args.postgres_url, args.burst))
        print(rows[-1], flush=True)
    if "apscheduler" in references and not args.burst_only:
        peer = run_apscheduler(jobs_file)
        print(f"apscheduler: {peer}", flush=True)
        rows.append({"store": "APScheduler 3.11", **vars(peer)} | {"start_s": peer.start_seconds})
    if "celery" in references:
        import celery

        beat = asyncio.run(run_celery_beat(jobs_file, amqp_url, args.burst, start=not args.burst_only))
        rows.append({"store": f"Celery beat {celery.__version__}"} | beat)
    print()
    names = [r["store"] if r["store"][0].isupper() else f"cronfleet ({r['store']})" for r in rows]
    print("| figure | " + " | ".join(names) + " |")
    print("| --- | " + " | ".join("---" for _ in rows) + " |")

    def row(label: str, key: str, unit: str, scale: float = 1.0) -> None:
        digits = {"s": 2, "": 0}.get(unit, 1)
        cells = ["—" if key not in r else f"{scale * r[key]:.{digits}f} {unit}".strip() for r in rows]
        print(f"| {label} | {' | '.join(cells)} |")

    row("start to planning (spawn to log line)", "start_s", "s")
    row("  Celery: 'beat: Starting...' to its first tick's end", "starting_s", "s")
    row("RSS after planning", "rss_mb", "MB")
    row("CPU while idle (10 s)", "idle_cpu", "%", 100)
    row("parse specs (not in apply)", "parse_s", "s")
    row("apply into an empty store", "apply_s", "s")
    row("re-apply, one job changed", "reapply_s", "s")
    row("same, scheduler running", "reapply_running_s", "s")
    row("change picked up (apply end to first fire)", "pickup_s", "s")
    if args.burst:
        row(f"{args.burst} jobs due in one second: last confirmed (Celery: arrived)", "burst_last_s", "s")
        row("  Celery: of them arrived within 60 s", "burst_arrived", "")
        row("  Celery: when it stopped waiting", "burst_by_s", "s")


if __name__ == "__main__":
    main()
