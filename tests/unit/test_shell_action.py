"""Shell actions: exit codes, output tails, timeouts, and no secrets handed to jobs."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from common.actions import ShellAction
from common.messages import RunStatus
from worker.actions import RunContext
from worker.actions.shell import Launcher, ShellExecutor, find_setpriv

RUN = RunContext(
    run_id="run-1",
    trigger_id="job@2026-11-27T04:00:00Z",
    job="job",
    scheduled_at=datetime(2026, 11, 27, 4, tzinfo=UTC),
    attempt=2,
    context={"days": 30, "tables": ["a", "b"], "note": "x y"},
)


async def test_a_job_never_sees_cronfleets_own_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRONFLEET_KEYS", "k1:the-fleet-signing-secret-0123")
    monkeypatch.setenv("CRONFLEET_AMQP_URL", "amqp://user:broker-password@host/")
    monkeypatch.setenv("OTHER_SETTING", "kept")
    result = await ShellExecutor().run(ShellAction(argv=["env"], env={"JOB_VAR": "given"}), 10, RUN)
    assert result.status is RunStatus.SUCCEEDED
    output = result.output_tail or ""
    assert "the-fleet-signing-secret" not in output and "broker-password" not in output
    assert "OTHER_SETTING=kept" in output and "JOB_VAR=given" in output


async def test_exit_codes_and_output_tails() -> None:
    executor = ShellExecutor()
    failed = await executor.run(ShellAction(argv=["sh", "-c", "echo out; echo err >&2; exit 4"]), 10, RUN)
    assert (failed.status, failed.exit_code, failed.output_tail) == (RunStatus.FAILED, 4, "out\nerr\n")
    allowed = ShellAction(argv=["sh", "-c", "exit 4"], success_exit_codes=[0, 4])
    assert (await executor.run(allowed, 10, RUN)).status is RunStatus.SUCCEEDED
    long = await executor.run(ShellAction(argv=["sh", "-c", "yes x | head -c 100000"]), 10, RUN)
    assert long.output_tail is not None and len(long.output_tail) == 4096


async def test_a_missing_program_is_a_failed_run_not_a_crash() -> None:
    result = await ShellExecutor().run(ShellAction(argv=["/no/such/program"]), 10, RUN)
    assert result.status is RunStatus.FAILED and "cannot start" in (result.error or "")


async def test_a_job_past_its_timeout_is_killed_with_its_children() -> None:
    result = await ShellExecutor().run(ShellAction(argv=["sh", "-c", "sleep 30 & sleep 30"]), 0.3, RUN)
    assert result.status is RunStatus.TIMED_OUT


async def test_the_run_and_its_context_reach_the_job_as_variables_the_job_cannot_override() -> None:
    action = ShellAction(argv=["env"], env={"CRONFLEET_RUN_ID": "spoofed", "JOB_VAR": "given"})
    result = await ShellExecutor().run(action, 10, RUN)
    variables = dict(line.split("=", 1) for line in (result.output_tail or "").splitlines() if "=" in line)
    assert variables["CRONFLEET_RUN_ID"] == "run-1"
    assert variables["CRONFLEET_TRIGGER_ID"] == "job@2026-11-27T04:00:00Z"
    assert variables["CRONFLEET_JOB"] == "job"
    assert variables["CRONFLEET_SCHEDULED_AT"] == "2026-11-27T04:00:00Z"
    assert variables["CRONFLEET_ATTEMPT"] == "2"
    assert orjson.loads(variables["CRONFLEET_CONTEXT"]) == {"days": 30, "tables": ["a", "b"], "note": "x y"}
    assert variables["JOB_VAR"] == "given"


LAUNCHERS = pytest.mark.parametrize("launcher", ["setpriv", "fork"])


@LAUNCHERS
async def test_both_launchers_run_a_job_alike(launcher: Launcher, tmp_path: Path) -> None:
    executor = ShellExecutor(launcher=launcher)
    action = ShellAction(argv=["sh", "-c", 'echo "$0 $1 $(pwd)"; exit 3', "zero", "one"], cwd=str(tmp_path))
    result = await executor.run(action, 10, RUN)
    assert (result.status, result.exit_code) == (RunStatus.FAILED, 3)
    assert result.output_tail == f"zero one {tmp_path}\n"  # the job's own argv, in its cwd
    for missing in ("/no/such/program", "no-such-program-anywhere", "./here"):
        result = await executor.run(ShellAction(argv=[missing]), 10, RUN)
        assert result.status is RunStatus.FAILED and f"cannot start {missing!r}" in (result.error or "")
    (tmp_path / "here").write_text("not a program")  # found, but cannot be executed
    result = await executor.run(ShellAction(argv=["./here"], cwd=str(tmp_path)), 10, RUN)
    assert result.status is RunStatus.FAILED and "cannot start './here'" in (result.error or ""), result


@LAUNCHERS
def test_a_job_dies_with_its_worker_even_when_the_worker_is_killed(
    launcher: Launcher, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    # A stand-in worker: runs one long job, then is killed with SIGKILL (no clean-up of its own).
    script = f"""
import asyncio
from tests.unit.test_shell_action import RUN
from common.actions import ShellAction
from worker.actions.shell import Launcher, ShellExecutor, find_setpriv
action = ShellAction(argv=["sh", "-c", "echo $$ > {pid_file}; exec sleep 60"])
asyncio.run(ShellExecutor(launcher={launcher!r}).run(action, 120, RUN))
"""
    worker = subprocess.Popen([sys.executable, "-c", script])
    try:
        job = int(_eventually(lambda: pid_file.exists() and pid_file.read_text().strip()))
        worker.kill()
        worker.wait(10)
        assert _eventually(lambda: _gone(job)), f"job {job} outlived its worker"
    finally:
        worker.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(job, signal.SIGKILL)


def _gone(pid: int) -> bool:
    """Whether ``pid`` has ended (gone, or a zombie nobody reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _eventually(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
    return result


@pytest.mark.skipif(os.geteuid() != 0, reason="running a job as another account needs root")
@LAUNCHERS
async def test_run_as_gives_the_job_exactly_the_accounts_user_group_and_groups(launcher: Launcher) -> None:
    nobody = pwd.getpwnam("nobody")
    daemon = grp.getgrnam("daemon").gr_gid
    probe = ["sh", "-c", "id -u; id -g; id -G"]
    for run_as, gid in (("nobody", nobody.pw_gid), ("nobody:daemon", daemon)):
        action = ShellAction(argv=probe, run_as=run_as)
        result = await ShellExecutor(launcher=launcher).run(action, 10, RUN)
        uid_line, gid_line, groups_line = (result.output_tail or "").splitlines()
        assert (int(uid_line), int(gid_line)) == (nobody.pw_uid, gid), run_as
        assert {int(g) for g in groups_line.split()} == {*os.getgrouplist("nobody", gid)}, run_as


@pytest.mark.skipif(
    os.geteuid() != 0 or find_setpriv() is None, reason="needs root to become another account"
)
@LAUNCHERS
def test_a_worker_that_is_not_root_runs_a_job_whose_run_as_names_itself(launcher: Launcher) -> None:
    script = f"""
import asyncio
from tests.unit.test_shell_action import RUN
from common.actions import ShellAction
from worker.actions.shell import ShellExecutor
action = ShellAction(argv=["id", "-un"], run_as="nobody")
result = asyncio.run(ShellExecutor(launcher={launcher!r}).run(action, 10, RUN))
print(result.status.value, result.output_tail.strip(), result.error)
"""
    root = Path(__file__).resolve().parents[2]
    as_nobody = [
        "setpriv",
        "--reuid",
        "nobody",
        "--regid",
        str(pwd.getpwnam("nobody").pw_gid),
        "--clear-groups",
    ]
    # "nobody" must reach this checkout and its virtualenv: a clone under a private directory
    # (a fresh CI clone in mktemp's 0700 directory) cannot be run by another account at all.
    reach = subprocess.run(
        [*as_nobody, "--", sys.executable, "-c", "import tests.unit.test_shell_action, worker.actions.shell"],
        capture_output=True,
        text=True,
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(root)},
        timeout=60,
        check=False,
    )
    if reach.returncode != 0:
        pytest.skip(f"nobody cannot run this checkout's Python: {reach.stderr.strip().splitlines()[-1:]}")
    done = subprocess.run(
        [*as_nobody, "--", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(root)},
        timeout=60,
        check=False,
    )
    assert done.stdout.split() == ["succeeded", "nobody", "None"], done.stderr[-2000:]
