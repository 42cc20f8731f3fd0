"""worker.actions.python: where a registered sync function is called."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from common.actions import PythonAction
from common.messages import RunStatus
from worker.actions.base import RunContext
from worker.actions.python import PythonExecutor
from worker.functions import job_function, runs_on_loop


@job_function(name="tests.unit.test_python_action:threaded")
def threaded(run: RunContext) -> str:
    return threading.current_thread().name


@job_function(name="tests.unit.test_python_action:on_loop", blocking=False)
def on_loop(run: RunContext) -> str:
    return threading.current_thread().name


CONTEXT = RunContext(run_id="r", trigger_id="t", job="j", scheduled_at=datetime(2026, 1, 1, tzinfo=UTC))


async def called_in(function: str) -> str:
    result = await PythonExecutor().run(PythonAction(function=function), 5.0, CONTEXT)
    assert result.status is RunStatus.SUCCEEDED, result
    return str(result.result)


async def test_a_sync_function_runs_in_a_thread_unless_it_said_it_does_not_block() -> None:
    loop_thread = threading.current_thread().name
    assert await called_in("tests.unit.test_python_action:threaded") != loop_thread
    assert await called_in("tests.unit.test_python_action:on_loop") == loop_thread
    assert runs_on_loop("tests.unit.test_python_action:on_loop")
    assert not runs_on_loop("tests.unit.test_python_action:threaded")
