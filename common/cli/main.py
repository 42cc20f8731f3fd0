"""Parsing the command line, running the chosen command, and turning failures into one line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from importlib import metadata
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError

from common.cli import admin, alerts, api_keys, broker, database, doctor, fleet, flips, ping_keys
from common.errors import CronfleetError, JobFileError
from common.settings import Settings

Handler = Callable[[Settings, argparse.Namespace], Awaitable[int]]


def build_parser() -> argparse.ArgumentParser:
    """Every ``cronfleet`` command and its options."""
    parser = argparse.ArgumentParser(
        prog="cronfleet",
        description="Distributed cron over RabbitMQ. Settings come from CRONFLEET_* variables.",
    )
    parser.add_argument(
        "--log-level", help="DEBUG, INFO, WARNING or ERROR (default: INFO for processes, else WARNING)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    run = command("run", fleet.run_all, "scheduler, worker and monitor in one process (one host)")
    run.add_argument("--jobs", type=Path, help="apply this jobs file first")
    _worker_options(run)
    _http_option(run)
    command("scheduler", fleet.run_scheduler, "run a scheduler")
    _worker_options(command("worker", fleet.run_worker, "run a worker"))
    _http_option(command("monitor", fleet.run_monitor, "run a monitor"))

    apply = command("apply", admin.apply, "validate a TOML jobs file and make the store match it")
    apply.add_argument("file", type=Path)
    apply.add_argument("--dry-run", action="store_true", help="print the changes, make none")
    pruning = apply.add_mutually_exclusive_group()
    pruning.add_argument("--keep", action="store_true", help="keep jobs that are not in the file")
    pruning.add_argument(
        "--prune", action="store_true", help="remove jobs that are not in the file (the default), even all"
    )
    apply.add_argument(
        "--allow-empty",
        action="store_true",
        help="apply a file with no jobs (removing every job unless --keep)",
    )
    _json(command("jobs", admin.jobs, "list the jobs"))
    trigger = command("trigger", admin.trigger, "run a job now")
    trigger.add_argument("name")
    runs = _json(command("runs", admin.runs, "list recent runs, newest first"))
    runs.add_argument("name", nargs="?")
    runs.add_argument("--limit", type=int, default=20)
    _json(command("status", admin.status, "each job's health, as the monitor stored it"))
    flip_list = _json(command("flips", flips.flips, "list changes of jobs' health states, newest first"))
    flip_list.add_argument("name", nargs="?")
    flip_list.add_argument("--limit", type=int, default=20)
    alert_list = _json(
        command(
            "alerts",
            alerts.alerts,
            "list alert attempts, newest first; `alerts test CHANNEL` sends a test alert",
        )
    )
    alert_list.add_argument("words", nargs="*", metavar="JOB | test CHANNEL")
    alert_list.add_argument("--limit", type=int, default=20)
    ping = command("ping", admin.ping, "publish a signed heartbeat for a job")
    ping.add_argument("name")
    kind = ping.add_mutually_exclusive_group()
    kind.add_argument("--start", action="store_true", help="the job has started")
    kind.add_argument("--fail", action="store_true", help="the job has failed")
    ping.add_argument("--exit-code", type=int, help="the job's exit code (non-zero means failed)")
    ping.add_argument("--message", help="a short note kept with the run")
    ping.add_argument("--rid", help="links a --start to its finish: send the same value with both")
    keys = commands.add_parser(
        "keys",
        help="signing keys (`keys new`), API keys (`keys api`), ping URL keys (`keys ping-url`)",
        description="signing keys for CRONFLEET_KEYS, keys of the monitor's API and of its ping URLs",
    )
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="KIND")
    signing = keys_commands.add_parser(
        "new",
        help="print a new signing key entry",
        description="print a new signing key entry for CRONFLEET_KEYS",
    )
    signing.set_defaults(handler=admin.keys)
    signing.add_argument(
        "--role",
        required=True,
        choices=["trigger", "event", "ping"],
        help="trigger (schedulers, `cronfleet trigger`), event (workers, monitors) or ping (job heartbeats)",
    )
    signing.add_argument("--id", help="the new key's id (default: random)")
    signing.add_argument(
        "--ed25519",
        action="store_true",
        help="a trigger key pair: the private key signs (schedulers), the public one verifies (workers)",
    )
    signing.add_argument("--jobs", help="a ping key for these jobs only, comma separated")
    api_keys.add_parser(keys_commands)
    _ping_url_commands(keys_commands)
    command("schema", admin.schema, "print the JSON Schema of every wire message")
    doctor.add_parser_options(command("doctor", doctor.doctor, "check the broker, the store and the keys"))
    broker.add_parser(commands)

    db = commands.add_parser("db", help="the store's schema and history", description="the store's schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    for name, handler, text in (
        ("upgrade", database.upgrade, "migrate the store to this cronfleet's schema"),
        ("current", database.current, "show the store's schema revision"),
        (
            "purge",
            database.purge_history,
            "delete old finished runs, heartbeats, fires, alert attempts and routine flips",
        ),
        ("grant-worker", database.grant_worker, "PostgreSQL: the rights a worker's role needs"),
    ):
        sub = db_commands.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=handler)
        if name == "purge":
            sub.add_argument("--older-than", required=True, help="an age such as 30d, 12h or 2w")
        if name == "grant-worker":
            sub.add_argument("role", help="the PostgreSQL role the workers log in as")
            sub.add_argument("--apply", action="store_true", help="run the GRANTs instead of printing them")
    return parser


def installed_version() -> str:
    """cronfleet's version as its installed package metadata says (``unknown`` when run from a
    source tree that was never installed)."""
    try:
        return metadata.version("cronfleet")
    except metadata.PackageNotFoundError:
        return "unknown"


def _ping_url_commands(keys_commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    text = "the keys of the monitor's ping URLs (/ping/KEY): they may only ping their jobs"
    ping_url = keys_commands.add_parser("ping-url", help=text, description=text)
    actions = ping_url.add_subparsers(dest="ping_url_command", required=True, metavar="ACTION")
    new = actions.add_parser(
        "new", help="make a ping key; prints it once", description="make a ping key; prints it once"
    )
    new.set_defaults(handler=ping_keys.new)
    new.add_argument("--jobs", required=True, help="the jobs it may ping, comma separated")
    new.add_argument("--name", help="its name (default: the jobs joined by +)")
    new.add_argument("--url", metavar="BASE", help="the monitor's HTTP address, for the printed URLs")
    listing = actions.add_parser("list", help="list ping keys (never the keys themselves)")
    listing.set_defaults(handler=ping_keys.list_keys)
    _json(listing)
    revoke = actions.add_parser("revoke", help="revoke a ping key: its pings get 404 from now on")
    revoke.set_defaults(handler=ping_keys.revoke)
    revoke.add_argument("key", metavar="NAME-or-ID")


def _http_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve the monitor's HTTP interface (ping URLs, API, dashboard, /metrics) here",
    )


def _worker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pool", default="default", help="the pool to consume (default: default)")
    parser.add_argument("--concurrency", type=int, default=4, help="runs at once (default: 4)")
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        metavar="MODULE",
        help="import MODULE first: the functions it registers (worker.functions.job_function) "
        "are what python actions may call (repeatable; the current directory is importable)",
    )


def _json(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 failure, 2 usage or a jobs file that
    cannot be applied, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    _configure_logging(args)
    try:
        settings = Settings()
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in error["loc"])
        print(f"cronfleet: bad setting CRONFLEET_{field.upper()}: {error['msg']}", file=sys.stderr)
        return 1
    except CronfleetError as exc:  # a CRONFLEET_*_FILE that cannot be read
        print(f"cronfleet: {exc}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_until_signal(args.handler(settings, args)))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # every failure ends as one line; --debug shows the traceback
        if args.debug:
            raise
        print(f"cronfleet: {_one_line(exc)}", file=sys.stderr)
        return 2 if isinstance(_cronfleet_error(exc), JobFileError) else 1


PROCESS_COMMANDS = ("run", "scheduler", "worker", "monitor")


def _configure_logging(args: argparse.Namespace) -> None:
    level = (args.log_level or ("INFO" if args.command in PROCESS_COMMANDS else "WARNING")).upper()
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr
    )
    # The format names no thread, process or task: a record need not look them up (half the
    # cost of the line a worker writes per run).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # type: ignore[attr-defined,unused-ignore]  # Python 3.12 on
    if level != "DEBUG":
        # cronfleet reports connection trouble itself, in one line; the libraries' own reports
        # repeat it with tracebacks.
        logging.getLogger("aiormq").setLevel(logging.CRITICAL)
        logging.getLogger("aio_pika").setLevel(logging.CRITICAL)


async def _until_signal(work: Awaitable[int]) -> int:
    """Run ``work``; SIGTERM or SIGINT cancels it cleanly and the command exits 0, and a second one
    asks every task still stopping again (a worker's drain then kills its jobs). Only in the main
    thread, the one signals reach: elsewhere (the tests run ``main`` in a thread) no handler is
    installed and this process's handlers stay as they are."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    stopped = False
    signals = (signal.SIGTERM, signal.SIGINT) if threading.current_thread() is threading.main_thread() else ()

    def stop() -> None:
        nonlocal stopped
        if stopped:
            # Asked again (a second SIGTERM, Ctrl-C twice): every task still stopping is asked
            # again, since a task group passes only the first request on to its tasks; a worker
            # waiting for its running jobs then kills them.
            for stopping in asyncio.all_tasks(loop):
                if stopping.cancelling():
                    stopping.cancel()
            return
        stopped = True
        task.cancel()

    for sig in signals:
        loop.add_signal_handler(sig, stop)
    try:
        return await task
    except asyncio.CancelledError:
        if stopped:
            return 0
        raise
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def _one_line(exc: BaseException) -> str:
    """A CronfleetError's own message, else the first real cause of an unexpected failure."""
    found = _cronfleet_error(exc)
    if found is not None:
        return str(found)
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, OperationalError | InterfaceError):
        # The database refused or was not there (down, locked by another writer for longer than
        # the busy timeout): not a bug of this command, and the driver's first line says why.
        said = str(exc.orig if exc.orig is not None else exc).strip()
        reason = said.splitlines()[0] if said else type(exc).__name__
        return f"the store is unavailable: {reason} (try the command again once it answers)"
    return f"unexpected error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)"


def _cronfleet_error(exc: BaseException) -> CronfleetError | None:
    if isinstance(exc, CronfleetError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _cronfleet_error(inner)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())
