"""Shell actions: exit codes, output tails, timeouts, and no secrets handed to jobs."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from common.actions import ShellAction
from common.messages import RunStatus
from worker.actions import RunContext
from worker.actions.shell import ShellExecutor

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
