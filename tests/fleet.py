"""Running real cronfleet processes inside a test, and waiting for what they should bring about."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from common.cli.main import main
from common.connection import connect
from common.services import ServiceOptions, load_service
from common.settings import SETTINGS_PREFIX, Settings
from common.topology import Topology


class Fleet:
    """Real scheduler, worker and monitor processes, run as tasks of the test's event loop."""

    def __init__(self, settings: Settings, *, declare_pools: bool = True) -> None:
        self.settings = settings
        self.tasks: list[asyncio.Task[None]] = []
        self.declare_pools = declare_pools

    async def start(self, *names: str, **options: Any) -> None:
        """Start each named process and wait until it is consuming (20 s at most).

        A worker consumes its pool's queue but does not create it (a scheduler does, for the
        pools of its jobs): unless ``declare_pools`` is off, it is declared first, as a
        scheduler would, so that the worker is ready at once."""
        for name in names:
            service_options = ServiceOptions(name=f"{name}-{len(self.tasks)}", **options)
            if name == "worker" and self.declare_pools:
                await declare_pool(self.settings, service_options.pool)
            task = asyncio.create_task(
                load_service(name)(self.settings, service_options), name=service_options.name
            )
            self.tasks.append(task)
            ready = asyncio.create_task(service_options.ready.wait())
            done, _ = await asyncio.wait({task, ready}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                ready.cancel()
                task.result()  # raises what stopped the process
            if ready not in done:
                ready.cancel()
                raise TimeoutError(f"{name} did not become ready within 20s")

    async def stop(self) -> None:
        """Cancel every process and wait for each to finish; fail, printing where every task of
        the loop waits, when one has not finished within STOP_SECONDS (a service that does not
        stop when asked is a bug, and a silent wait would hold the suite until its timeout)."""
        for task in self.tasks:
            task.cancel()
        tasks, self.tasks = self.tasks, []
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=STOP_SECONDS)
        if pending:
            print_task_stacks(f"{len(pending)} service(s) did not stop within {STOP_SECONDS:g}s")
            raise AssertionError(
                f"{', '.join(task.get_name() for task in pending)} did not stop within "
                f"{STOP_SECONDS:g}s of being cancelled (every task's stack is printed above)"
            )
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                task.result()


STOP_SECONDS = 60.0
"""How long a cancelled service may take to stop: its drain (drain_seconds) and closing."""


def print_task_stacks(why: str) -> None:
    """Print, to stderr, ``why`` and where each unfinished task of the running loop waits."""
    print(f"\n=== {why}: the loop's tasks ===", file=sys.stderr)
    for task in asyncio.all_tasks():
        print(f"--- {task!r}", file=sys.stderr)
        task.print_stack(file=sys.stderr)


LEFTOVER_SECONDS = 60.0
"""How long a task the test left running may take to end once cancelled."""


async def end_leftover_tasks(timeout: float = LEFTOVER_SECONDS) -> None:
    """Cancel every task of the running loop but the caller's and wait for them to end; fail,
    printing where each waits, when one has not ended within ``timeout``. The loop's own closing
    does the same with no bound: a task that ignores its cancellation held a test's teardown
    until the suite's timeout (300 s) with no word of where it waited."""
    leftover = asyncio.all_tasks() - {asyncio.current_task()}
    for task in leftover:
        task.cancel()
    if not leftover:
        return
    _, pending = await asyncio.wait(leftover, timeout=timeout)
    if pending:
        print_task_stacks(
            f"{len(pending)} task(s) left by the test did not end within {timeout:g}s of being cancelled"
        )
        raise AssertionError(
            f"{', '.join(task.get_name() for task in pending)} did not end within {timeout:g}s of "
            "being cancelled (every task's stack is printed above)"
        )


async def declare_pool(settings: Settings, pool: str) -> None:
    """Declare ``pool``'s queue (and the shared topology) as a scheduler does (on the first node
    of ``amqp_url`` that answers)."""
    connection = await connect(settings.amqp_url, "test-declare-pool", wait=False)
    async with connection:
        await Topology(settings.namespace).declare_pool(await connection.channel(), pool)


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 20.0, every: float = 0.1) -> Any:
    """Wait until ``check()`` returns something truthy, and return it; fail after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {result!r})")
        await asyncio.sleep(every)


COMMAND_TIMEOUT = 60.0


def cronfleet(
    settings: Settings, *args: str, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``cronfleet ARGS`` with the test fleet's settings, as ``cronfleet`` would in a child
    process, but in this one (a child process costs a second of imports): the command line's
    ``main`` sees the fleet's CRONFLEET_* variables with ``env`` over them and no other
    CRONFLEET_* variable, and what it prints is captured. The test blocks meanwhile, as it did
    waiting for a child; raises subprocess.TimeoutExpired when the command has not ended within
    COMMAND_TIMEOUT seconds. An async test whose loop runs services calls ``run_cronfleet``
    instead."""
    variables = {
        "CRONFLEET_AMQP_URL": settings.amqp_url,
        "CRONFLEET_DATABASE_URL": settings.database_url,
        "CRONFLEET_KEYS": settings.keys,
        "CRONFLEET_NAMESPACE": settings.namespace,
    }
    if settings.database_schema:
        variables["CRONFLEET_DATABASE_SCHEMA"] = settings.database_schema
    if settings.allow_commands is not None:
        variables["CRONFLEET_ALLOW_COMMANDS"] = settings.allow_commands
    argv = ["cronfleet", *args]
    stdout, stderr = io.StringIO(), io.StringIO()
    ended: list[int] = []
    # In a thread of its own: main runs its own event loop (asyncio.run), which cannot start in
    # a thread whose loop is running, as an async test's is; and off the main thread main
    # leaves this process's signal handlers alone.
    command = threading.Thread(target=lambda: ended.append(_exit_status(args)), name=" ".join(argv))
    command.daemon = True  # a command that hangs must not keep pytest from exiting
    with (
        _cronfleet_environment({**variables, **env}),
        contextlib.chdir(cwd or os.getcwd()),
        contextlib.redirect_stdout(_ThreadStream(sys.stdout, stdout, command)),
        contextlib.redirect_stderr(_ThreadStream(sys.stderr, stderr, command)),
        _logging_as_in_a_new_process(),
    ):
        command.start()
        command.join(COMMAND_TIMEOUT)
    if not ended:
        raise subprocess.TimeoutExpired(argv, COMMAND_TIMEOUT, stdout.getvalue(), stderr.getvalue())
    return subprocess.CompletedProcess(argv, ended[0], stdout.getvalue(), stderr.getvalue())


async def run_cronfleet(
    settings: Settings, *args: str, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """``cronfleet(settings, *args)`` while this event loop goes on: the services a test runs in
    it keep working. Blocked, a service caught inside a SQLite write transaction would hold the
    lock the command waits for, and the command would fail after the busy timeout with
    "database is locked"."""
    return await asyncio.to_thread(cronfleet, settings, *args, cwd=cwd, **env)


class _ThreadStream(io.TextIOBase):
    """sys.stdout or sys.stderr while a command runs: what the command's thread writes is
    captured, what any other thread writes (the services of the test's loop) goes where it went
    before, so a service's log line never shows up in the command's output."""

    def __init__(self, before: Any, captured: io.StringIO, command: threading.Thread) -> None:
        self._before, self._captured, self._command = before, captured, command

    def write(self, text: str) -> int:
        """Write ``text`` to the capture when the command's thread writes it, else as before."""
        if threading.current_thread() is self._command:
            return self._captured.write(text)
        return int(self._before.write(text) or 0)

    def flush(self) -> None:
        """Flush the stream written to last by the calling thread."""
        if threading.current_thread() is not self._command:
            self._before.flush()

    def isatty(self) -> bool:
        """Never a terminal: the command's output is captured."""
        return False


def _exit_status(args: tuple[str, ...]) -> int:
    """What ``cronfleet ARGS`` exits with: main's status, argparse's SystemExit, or 1 (and the
    traceback) for an exception that escapes main, as Python itself would."""
    try:
        return main(list(args))
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        return 1


@contextlib.contextmanager
def _cronfleet_environment(variables: dict[str, str]) -> Iterator[None]:
    """os.environ with ``variables`` as its only CRONFLEET_* variables, put back as it was after."""
    saved = dict(os.environ)
    for name in saved:
        if name.startswith(SETTINGS_PREFIX) and name not in variables:
            del os.environ[name]
    os.environ.update(variables)
    try:
        yield
    finally:
        for name in set(os.environ) - set(saved):
            del os.environ[name]
        os.environ.update(saved)


@contextlib.contextmanager
def _logging_as_in_a_new_process() -> Iterator[None]:
    """No root handler, so that main's logging.basicConfig writes to the captured stderr as it
    would in its own process; the root logger and the loggers main quiets are put back after."""
    root = logging.getLogger()
    quieted = [logging.getLogger(name) for name in ("aiormq", "aio_pika")]
    handlers, level, levels = root.handlers[:], root.level, [logger.level for logger in quieted]
    root.handlers.clear()
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for logger, saved in zip(quieted, levels, strict=True):
            logger.setLevel(saved)


def scheduler_process(settings: Settings, log: Path | None = None) -> subprocess.Popen[bytes]:
    """``cronfleet scheduler`` as a process of its own on the fleet's settings (a test may kill
    it); its output goes to ``log`` (appended), or is dropped."""
    return _service_process(settings, ["scheduler"], None, None, log)


def monitor_process(settings: Settings, log: Path | None = None) -> subprocess.Popen[bytes]:
    """``cronfleet monitor`` (no HTTP) as a process of its own on the fleet's settings (a test
    may kill it); its output goes to ``log`` (appended), or is dropped."""
    return _service_process(settings, ["monitor"], None, None, log)


def log_tails(logs: Iterable[Path], lines: int = 40) -> str:
    """The last ``lines`` lines of each log in ``logs`` that exists, headed by its name: what a
    failing test shows of the processes it started."""
    parts = []
    for log in logs:
        if log.exists():
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(parts)


def log_lines_about(logs: Iterable[Path], needles: Iterable[str], limit: int = 80) -> str:
    """Every line of the logs in ``logs`` that names one of ``needles`` (trigger ids, run ids),
    at most ``limit``, each headed by its log's name: the story a failing test tells of the
    fires it lost."""
    wanted = [needle for needle in needles if needle]
    found: list[str] = []
    for log in logs:
        if not log.exists():
            continue
        for line in log.read_text(errors="replace").splitlines():
            if any(needle in line for needle in wanted):
                found.append(f"{log.name}: {line}")
    shown = found[:limit]
    more = f"\n... and {len(found) - limit} more" if len(found) > limit else ""
    return "\n".join(shown) + more


async def stop_processes(processes: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process, then wait for each (30 s at most, then SIGKILL)."""
    processes = list(processes)
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            process.kill()


def worker_process(
    settings: Settings,
    *args: str,
    cwd: Path | None = None,
    user: str | None = None,
    log: Path | None = None,
) -> subprocess.Popen[bytes]:
    """``cronfleet worker --concurrency 1 ARGS`` as a process of its own on the fleet's settings
    (a test may kill it), in ``cwd``, as ``user`` when given (the test must be root); its output
    goes to ``log`` (appended), or is dropped."""
    return _service_process(settings, ["worker", "--concurrency", "1", *args], cwd, user, log)


def service_environment(settings: Settings) -> dict[str, str]:
    """This process's environment with the fleet's settings as CRONFLEET_* variables: what a
    cronfleet process of its own needs to join the fleet."""
    environment = {
        **os.environ,
        "CRONFLEET_AMQP_URL": settings.amqp_url,
        "CRONFLEET_KEYS": settings.keys,
        "CRONFLEET_NAMESPACE": settings.namespace,
        "CRONFLEET_DATABASE_URL": settings.database_url,
        "CRONFLEET_CLAIM_LEASE_SECONDS": str(settings.claim_lease_seconds),
        # The monitor judges a worker gone by its own heartbeat interval: they must agree.
        "CRONFLEET_HEARTBEAT_SECONDS": str(settings.heartbeat_seconds),
        "CRONFLEET_JOBS_RELOAD_SECONDS": str(settings.jobs_reload_seconds),
        "CRONFLEET_ALLOW_COMMANDS": settings.allow_commands or "",
    }
    if settings.database_schema:
        environment["CRONFLEET_DATABASE_SCHEMA"] = settings.database_schema
    return environment


def _service_process(
    settings: Settings, args: list[str], cwd: Path | None, user: str | None, log: Path | None
) -> subprocess.Popen[bytes]:
    with contextlib.ExitStack() as files:
        output: Any = subprocess.DEVNULL
        if log is not None:
            output = files.enter_context(log.open("ab"))  # the child keeps its own descriptor
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "cronfleet"), *args],
            env=service_environment(settings),
            cwd=cwd,
            user=user,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
