"""Shell actions: exit codes, output tails, timeouts, and no secrets handed to jobs."""

from __future__ import annotations

import pytest

from common.actions import ShellAction
from common.messages import RunStatus
from worker.actions.shell import ShellExecutor


async def test_a_job_never_sees_cronfleets_own_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRONFLEET_KEYS", "k1:the-fleet-signing-secret-0123")
    monkeypatch.setenv("CRONFLEET_AMQP_URL", "amqp://user:broker-password@host/")
    monkeypatch.setenv("OTHER_SETTING", "kept")
    result = await ShellExecutor().run(ShellAction(argv=["env"], env={"JOB_VAR": "given"}), timeout=10)
    assert result.status is RunStatus.SUCCEEDED
    output = result.output_tail or ""
    assert "the-fleet-signing-secret" not in output and "broker-password" not in output
    assert "OTHER_SETTING=kept" in output and "JOB_VAR=given" in output


async def test_exit_codes_and_output_tails() -> None:
    executor = ShellExecutor()
    failed = await executor.run(ShellAction(argv=["sh", "-c", "echo out; echo err >&2; exit 4"]), timeout=10)
    assert (failed.status, failed.exit_code, failed.output_tail) == (RunStatus.FAILED, 4, "out\nerr\n")
    allowed = ShellAction(argv=["sh", "-c", "exit 4"], success_exit_codes=[0, 4])
    assert (await executor.run(allowed, timeout=10)).status is RunStatus.SUCCEEDED
    long = await executor.run(ShellAction(argv=["sh", "-c", "yes x | head -c 100000"]), timeout=10)
    assert long.output_tail is not None and len(long.output_tail) == 4096


async def test_a_missing_program_is_a_failed_run_not_a_crash() -> None:
    result = await ShellExecutor().run(ShellAction(argv=["/no/such/program"]), timeout=10)
    assert result.status is RunStatus.FAILED and "cannot start" in (result.error or "")


async def test_a_job_past_its_timeout_is_killed_with_its_children() -> None:
    result = await ShellExecutor().run(ShellAction(argv=["sh", "-c", "sleep 30 & sleep 30"]), timeout=0.3)
    assert result.status is RunStatus.TIMED_OUT
