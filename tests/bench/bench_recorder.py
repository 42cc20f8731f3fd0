"""The monitor's recorder alone: ``monitor.recorder.record_batch`` called directly, no broker.

``bench_monitor.py`` times the whole monitor against a bare consume+ack loop; this one times only
what a batch of events costs in the store and the health machine, which is steadier from run to
run, to compare two commits of the recorder (run it in a worktree of each, alternately):

    .venv/bin/python tests/bench/bench_recorder.py --events 20000 --rounds 3
    .venv/bin/python tests/bench/bench_recorder.py --store postgresql

Each round records the events of ``bench_monitor.make_events`` (runs and heartbeat pairs over
1,000 jobs) into a new store, 500 to a transaction as the monitor batches them, and prints events
per second and microseconds an event (wall, and CPU of the whole process).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common.catalog import apply_jobs
from common.clock import utcnow
from common.settings import normalise_database_url
from common.store import Store
from monitor.recorder import record_batch
from tests.bench.bench_monitor import bench_jobs, make_events

BATCH = 500


async def one_round(url: str, schema: str | None, events: int, jobs: int) -> tuple[float, float]:
    """Record ``events`` into a new store at ``url``: (wall seconds, process CPU seconds)."""
    store = await Store.open(url, schema, upgrade=True)
    try:
        specs = bench_jobs(jobs)
        await apply_jobs(store, specs, utcnow())
        batch = make_events(specs, events, datetime.now(UTC)).events
        started, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(batch), BATCH):
            async with store.session() as session, session.begin():
                await record_batch(session, batch[i : i + BATCH], datetime.now(UTC))
        return time.perf_counter() - started, time.process_time() - cpu
    finally:
        if schema is not None:
            async with store.engine.begin() as connection:
                await connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await store.close()


async def run(args: argparse.Namespace) -> None:
    print(f"recorder bench: {args.events} events over {args.jobs} jobs, {BATCH} a batch, {args.store}")
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            if args.store == "sqlite":
                url, schema = f"sqlite+aiosqlite:///{tmp}/recorder.db", None
            else:
                url, schema = normalise_database_url(args.postgres_url), f"bench_rec_{uuid.uuid4().hex[:8]}"
            wall, cpu = await one_round(url, schema, args.events, args.jobs)
        print(
            f"  {args.events / wall:8,.0f} events/s   {1e6 * wall / args.events:5.0f} us an event"
            f"   {1e6 * cpu / args.events:5.0f} us of CPU an event"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--postgres-url", default="postgresql://127.0.0.1:5432/test")
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
