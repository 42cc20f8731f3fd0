"""Run a program: argv, timeout (the whole process group is killed), exit code, output tail.

A job must die with its worker (``PR_SET_PDEATHSIG``), even one killed by SIGKILL, so that a run
whose trigger is redelivered elsewhere is not also finished by an orphan. Setting that in the
child through ``preexec_fn`` makes CPython fork the whole worker for every job (about 100 spawns
a second from a worker's ~100 MB), and so does asking it to change the user (``run_as``). So on
Linux the job is started through util-linux's ``setpriv``, which sets the parent-death signal
(and, for ``run_as``, the user, group and groups, before that signal) and then executes the job
in its place: CPython then starts it with ``vfork`` (about 5 times as many spawns a second). The
job keeps its own argv, its ``$PPID`` is the worker. Where ``setpriv`` is missing the worker
forks, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import grp
import logging
import os
import pwd
import shutil
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from common.actions import AnyAction, ShellAction
from common.messages import RunStatus
from common.settings import SETTINGS_PREFIX
from worker.actions.base import ActionResult, OutputTail, RunContext
from worker.allow import CommandAllowList

log = logging.getLogger("cronfleet.worker")

KILL_GRACE_SECONDS = 5.0
# How setpriv says that it could not execute the job (exit code 127 or 126).
_EXEC_FAILED = "setpriv: failed to execute "
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_the_worker() -> None:
    """In the child, before exec: be killed if the worker dies (even by SIGKILL), so that a
    run whose trigger is redelivered to another worker is not also finished by an orphan."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def job_environment(worker: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """The environment a job runs with: the worker's, minus cronfleet's own settings (signing
    keys, broker and database URLs with their passwords), plus the job's ``env``."""
    inherited = {k: v for k, v in worker.items() if not k.startswith(SETTINGS_PREFIX)}
    return {**inherited, **extra}


@dataclass(frozen=True)
class Account:
    """Who a job runs as (``run_as``): ids for the kernel, names for the job's environment."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    user: str
    home: str


def account(run_as: str) -> Account:
    """The account ``run_as`` (``user`` or ``user:group``) names; ValueError saying why not."""
    user, _, group = run_as.partition(":")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ValueError(f"run_as {run_as!r}: no user {user!r} on this worker's host") from None
    gid = entry.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"run_as {run_as!r}: no group {group!r} on this worker's host") from None
    groups = tuple(os.getgrouplist(user, gid))
    return Account(entry.pw_uid, gid, groups, user, entry.pw_dir)


# How a job is started: through ``setpriv`` (vfork, then exec), or by forking the worker and
# setting the parent-death signal (and the user) in the child; ``auto``: ``setpriv`` where found.
Launcher = Literal["auto", "setpriv", "fork"]


def find_setpriv() -> str | None:
    """The path of util-linux's ``setpriv`` on a Linux host, or None."""
    return shutil.which("setpriv", path=os.defpath + ":/usr/sbin:/sbin") if sys.platform == "linux" else None


def setpriv_argv(setpriv: str, argv: Sequence[str], target: Account | None) -> list[str]:
    """``argv`` started through ``setpriv``: the job dies with the worker (SIGKILL), and runs as
    ``target`` (uid, gid and exactly its groups) when given."""
    identity: list[str] = []
    if target is not None:
        groups = ["--groups", ",".join(map(str, target.groups))] if target.groups else ["--clear-groups"]
        identity = ["--reuid", str(target.uid), "--regid", str(target.gid), *groups]
    return [setpriv, *identity, "--pdeathsig", "KILL", "--", *argv]


class ShellExecutor:
    """Runs ``shell`` actions as child processes in their own process group, only programs the
    worker's allow list names (``worker.allow``), as another account when ``run_as`` says so;
    each dies with the worker. Jobs inherit the worker's environment as it was when the
    executor was made (``job_environment``), read once: never ``os.environ`` as some other
    thread of the process may be changing it."""

    def __init__(self, allowed: CommandAllowList | None = None, *, launcher: Launcher = "auto") -> None:
        self.allowed = allowed if allowed is not None else CommandAllowList(("*",))
        self.inherited = job_environment(os.environ.copy(), {})
        self.setpriv = None if launcher == "fork" else find_setpriv()
        if launcher == "setpriv" and self.setpriv is None:
            raise ValueError("setpriv (util-linux) is not installed on this host")
        if launcher == "auto" and self.setpriv is None and sys.platform == "linux":
            log.warning("setpriv (util-linux) not found: each shell job forks the whole worker (slower)")

    def refusal(self, action: AnyAction) -> str | None:
        """Why this worker will not run ``action``: a program its allow list does not name, or a
        ``run_as`` it cannot take (no such account, or a worker that is not root)."""
        if not isinstance(action, ShellAction):
            return None
        refused = self.allowed.refusal(action.argv[0])
        if refused is not None or action.run_as is None:
            return refused
        try:
            target = account(action.run_as)
        except ValueError as exc:
            return str(exc)
        if os.geteuid() != 0 and (target.uid, target.gid) != (os.geteuid(), os.getegid()):
            return f"run_as {action.run_as!r}: this worker is not root, so it runs jobs only as itself"
        return None

    async def run(self, action: AnyAction, timeout: float, context: RunContext) -> ActionResult:
        """Run ``action.argv``; succeeded when the exit code is one of ``success_exit_codes``.
        The run's context reaches it as ``CRONFLEET_*`` variables (``RunContext.environment``),
        which the job's own ``env`` cannot override."""
        assert isinstance(action, ShellAction)
        refused = self.refusal(action)
        if refused is not None:
            return ActionResult(RunStatus.FAILED, error=f"not_allowed: {refused}")
        variables = {**action.env, **context.environment()}
        target = None
        if action.run_as is not None:
            account_ = account(action.run_as)
            variables.update(HOME=account_.home, USER=account_.user, LOGNAME=account_.user)
            # Not root, the worker runs only ``run_as`` naming itself (``refusal``): it changes
            # nothing, and could not set the groups anyway.
            target = account_ if os.geteuid() == 0 else None
        environment = {**self.inherited, **variables}
        argv: Sequence[str] = action.argv
        spawn: dict[str, Any] = {}
        if self.setpriv is not None:
            argv = setpriv_argv(self.setpriv, action.argv, target)
        else:
            spawn["preexec_fn"] = _die_with_the_worker
            if target is not None:
                spawn.update(user=target.uid, group=target.gid, extra_groups=list(target.groups))
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=action.cwd,
                env=environment,
                start_new_session=True,
                **spawn,
            )
        except OSError as exc:
            return ActionResult(
                RunStatus.FAILED, error=f"cannot start {action.argv[0]!r}: {exc.strerror or exc}"
            )
        except (ValueError, TypeError) as exc:
            # What the kernel could never be handed (a NUL in an argument, '=' in an environment
            # name): the jobs file refuses it, but a trigger from elsewhere may still carry it.
            return ActionResult(RunStatus.FAILED, error=f"cannot start {action.argv[0]!r}: {exc}")
        tail = OutputTail()
        try:
            async with asyncio.timeout(timeout):
                await _pump(process, tail)
                code = await process.wait()
        except TimeoutError:
            await _terminate(process)
            return ActionResult(
                RunStatus.TIMED_OUT,
                exit_code=process.returncode,
                output_tail=tail.text(),
                error=f"timed out after {timeout:g}s; the process group was killed",
            )
        except BaseException:
            await _terminate(process)
            raise
        status = RunStatus.SUCCEEDED if code in action.success_exit_codes else RunStatus.FAILED
        error = None if status is RunStatus.SUCCEEDED else f"exit code {code}"
        output = tail.text()
        if self.setpriv is not None and code in (126, 127) and output and output.startswith(_EXEC_FAILED):
            # setpriv could not execute the program (no such file, not executable, not by
            # ``run_as``'s user): what exec said, as a program that could not start.
            error = f"cannot start {action.argv[0]!r}: {output.splitlines()[0].rpartition(': ')[2]}"
        return ActionResult(status, exit_code=code, output_tail=output, error=error)


async def _pump(process: asyncio.subprocess.Process, tail: OutputTail) -> None:
    assert process.stdout is not None
    while chunk := await process.stdout.read(65536):
        tail.feed(chunk)


async def _terminate(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the process group, then SIGKILL it if it has not gone within the grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_SECONDS), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), wait)
            return
        except TimeoutError:
            continue
