"""Commands that run processes: ``run`` (all three), ``scheduler``, ``worker``, ``monitor``."""

from __future__ import annotations

import argparse
import asyncio
import logging

from common.catalog import apply_jobs
from common.clock import utcnow
from common.collector import freeze_startup_heap
from common.errors import ConfigError, JobFileError
from common.jobs import load_jobs_file
from common.services import ServiceOptions, load_service, parse_listen_address
from common.settings import Settings
from common.store import Store

log = logging.getLogger("cronfleet")


async def run_services(settings: Settings, services: list[tuple[str, ServiceOptions]]) -> int:
    """Run the named services side by side until cancelled or one of them fails. Once every one
    is ready, what they built to start is left out of the garbage collector's walks
    (``common.collector.freeze_startup_heap``)."""
    settings.keyring()  # fail fast, in one line, before anything starts
    async with asyncio.TaskGroup() as tasks:
        for name, options in services:
            tasks.create_task(load_service(name)(settings, options), name=name)
        await asyncio.gather(*(options.ready.wait() for _name, options in services))
        freeze_startup_heap()
    return 0


def _worker(args: argparse.Namespace) -> ServiceOptions:
    return ServiceOptions(pool=args.pool, concurrency=args.concurrency, imports=tuple(args.imports or ()))


def _monitor(args: argparse.Namespace) -> ServiceOptions:
    if args.http is None:
        return ServiceOptions()
    try:
        return ServiceOptions(http=parse_listen_address(args.http))
    except ValueError as exc:
        raise ConfigError(f"--http: {exc}") from exc


async def run_all(settings: Settings, args: argparse.Namespace) -> int:
    """``cronfleet run``: apply ``--jobs`` if given, then the three processes in this one."""
    specs = load_jobs_file(args.jobs) if args.jobs is not None else None
    if specs == []:
        raise JobFileError(f"{args.jobs}:1: the file defines no jobs; `run --jobs` would remove every job")
    # One host, one command: `run` brings the store to this code's schema by itself.
    store = await Store.open(settings.database_url, settings.database_schema, upgrade=True)
    try:
        diff = None if specs is None else await apply_jobs(store, specs, utcnow())
    finally:
        await store.close()
    if diff is not None:
        log.info(
            "applied %s: %d added, %d changed, %d removed, %d unchanged",
            args.jobs,
            len(diff.added),
            len(diff.changed),
            len(diff.removed),
            len(diff.unchanged),
        )
    log.info("runs and health: `cronfleet runs` and `cronfleet status` in another shell")
    return await run_services(
        settings,
        [("monitor", _monitor(args)), ("worker", _worker(args)), ("scheduler", ServiceOptions())],
    )


async def run_scheduler(settings: Settings, args: argparse.Namespace) -> int:
    """``cronfleet scheduler``."""
    return await run_services(settings, [("scheduler", ServiceOptions())])


async def run_worker(settings: Settings, args: argparse.Namespace) -> int:
    """``cronfleet worker [--pool P] [--concurrency N] [--import MODULE]...``."""
    return await run_services(settings, [("worker", _worker(args))])


async def run_monitor(settings: Settings, args: argparse.Namespace) -> int:
    """``cronfleet monitor [--http HOST:PORT]``."""
    return await run_services(settings, [("monitor", _monitor(args))])
