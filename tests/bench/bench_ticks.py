"""Deadline ticks alone: what one herd of jobs falling due costs the monitor's store path.

Not a test (pytest does not collect ``bench_*.py``). Run it from the repository root::

    .venv/bin/python tests/bench/bench_ticks.py --jobs 10000

No broker, no alerts, no timers: ``--jobs`` jobs all due at the same instant are applied to a
throwaway SQLite file and to a private schema of the PostgreSQL at ``--postgres-url`` (dropped at
the end), their health records are created, then ``monitor.deadlines.tick`` ticks them ``late`` at
their due instant and ``down`` at their grace end, in batches of ``--batch`` (the monitor's
``TICK_BATCH``), one transaction each, as the monitor does. It prints the wall time of each tick
and where it went (read the specs, load and lock the records, the machine, write records and
flips). To compare two versions, run it with ``PYTHONPATH`` pointing at a checkout of the other.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import text

from common.actions import ShellAction
from common.catalog import apply_jobs
from common.clock import utcnow
from common.jobs import JobSpec
from common.settings import normalise_database_url
from common.store import Store
from monitor import health_store
from monitor.deadlines import TICK_BATCH
from monitor.health import Tick
from monitor.health_store import Advanced, HealthBatch


def herd(count: int, due: datetime, grace: float, prefix: str = "tick") -> list[JobSpec]:
    """``count`` jobs due once an hour, all at ``due``'s minute and second, named ``prefix-N``."""
    return [
        JobSpec(
            name=f"{prefix}-{i:06d}",
            schedule=f"{due.second} {due.minute} * * * *",
            grace_seconds=grace,
            action=ShellAction(argv=["true"]),
        )
        for i in range(count)
    ]


async def timed_tick(store: Store, jobs: Sequence[str], now: datetime, phases: dict[str, float]) -> Advanced:
    """``monitor.deadlines.tick``, step by step, adding each step's wall time to ``phases``."""
    started = time.perf_counter()
    async with store.session() as session, session.begin():
        specs = await health_store.read_specs(session, jobs)
        read = time.perf_counter()
        removed = [job for job in jobs if job not in specs]
        if removed:
            await health_store.forget(session, removed)
        batch = HealthBatch(session, now)
        await batch.load(jobs, specs)
        loaded = time.perf_counter()
        for job in jobs:
            batch.advance(job, Tick())
        advanced_at = time.perf_counter()
        advanced = await batch.save()
        saved = time.perf_counter()
    finished = time.perf_counter()
    for name, seconds in (
        ("specs", read - started),
        ("load", loaded - read),
        ("machine", advanced_at - loaded),
        ("save", saved - advanced_at),
        ("commit", finished - saved),
    ):
        phases[name] += seconds
    return advanced


async def one_store(label: str, url: str, schema: str | None, count: int, batch: int) -> None:
    if schema is not None:
        await drop(url, schema)
    store = await Store.open(url, schema, upgrade=True)
    try:
        now = utcnow().replace(microsecond=0)
        due = now + timedelta(seconds=5)
        grace = 2.0
        names = [spec.name for spec in herd(count, due, grace)]
        await apply_jobs(store, herd(count, due, grace), now)
        for at in (now, due, due + timedelta(seconds=grace)):
            phases: dict[str, float] = defaultdict(float)
            flips = 0
            started = time.perf_counter()
            for first in range(0, count, batch):
                flips += len((await timed_tick(store, names[first : first + batch], at, phases)).flips)
            seconds = time.perf_counter() - started
            what = "create" if at == now else "late" if at == due else "down"
            steps = ", ".join(f"{name} {value:.3f}" for name, value in phases.items())
            print(f"{label:<10} {what:<6} {seconds:6.3f} s  {flips:>6} flips  ({steps})", flush=True)
    finally:
        await store.close()
        if schema is not None:
            await drop(url, schema)


async def drop(url: str, schema: str) -> None:
    store = await Store.connect(url)
    try:
        async with store.engine.begin() as connection:
            await connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        await store.close()


async def run(args: argparse.Namespace) -> None:
    print(f"{args.jobs} jobs due at once, ticked in batches of {args.batch}", flush=True)
    with tempfile.TemporaryDirectory(prefix="cronfleet-ticks-") as tmp:
        for repeat in range(args.repeat):
            if "sqlite" in args.stores:
                url = f"sqlite+aiosqlite:///{Path(tmp) / f'ticks-{repeat}.db'}"
                await one_store("sqlite", url, None, args.jobs, args.batch)
            if "postgresql" in args.stores:
                url = normalise_database_url(args.postgres_url)
                await one_store("postgresql", url, f"bench_ticks_{os.getpid()}", args.jobs, args.batch)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=10000, help="jobs due at the same instant")
    parser.add_argument("--batch", type=int, default=TICK_BATCH, help="jobs ticked per transaction")
    parser.add_argument("--repeat", type=int, default=1, help="runs per store")
    parser.add_argument(
        "--stores", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"]
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("CRONFLEET_TEST_DATABASE_URL", "postgresql://127.0.0.1:5432/test"),
    )
    asyncio.run(run(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
