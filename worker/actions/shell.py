"""Run a program: argv, timeout (the whole process group is killed), exit code, output tail."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import grp
import os
import pwd
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.actions import AnyAction, ShellAction
from common.messages import RunStatus
from common.settings import SETTINGS_PREFIX
from worker.actions.base import ActionResult, OutputTail, RunContext
from worker.allow import CommandAllowList

KILL_GRACE_SECONDS = 5.0
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


class ShellExecutor:
    """Runs ``shell`` actions as child processes in their own process group, only programs the
    worker's allow list names (``worker.allow``), as another account when ``run_as`` says so."""

    def __init__(self, allowed: CommandAllowList | None = None) -> None:
        self.allowed = allowed if allowed is not None else CommandAllowList(("*",))

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
        identity: dict[str, Any] = {}
        if action.run_as is not None:
            target = account(action.run_as)
            variables.update(HOME=target.home, USER=target.user, LOGNAME=target.user)
            identity = {"user": target.uid, "group": target.gid, "extra_groups": list(target.groups)}
        try:
            process = await asyncio.create_subprocess_exec(
                *action.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=action.cwd,
                env=job_environment(os.environ, variables),
                start_new_session=True,
                preexec_fn=_die_with_the_worker,
                **identity,
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
        return ActionResult(status, exit_code=code, output_tail=tail.text(), error=error)


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
