"""Call a registered Python function (``worker.functions``): async ones on the worker's loop,
sync ones in a thread (those registered ``blocking=False`` on the loop, without the hand-over);
its return value is the run's result, an exception fails the run with the tail of its traceback.

A sync function still running at its timeout is reported ``timed_out`` but cannot be stopped:
Python has no way to kill a thread. Its thread finishes in the background and what it returns
then is dropped. Give long or blocking work to a ``shell`` action, whose process group is killed.
"""

from __future__ import annotations

import asyncio
import inspect
import traceback

import orjson

from common.actions import AnyAction, PythonAction
from common.bounds import MAX_RESULT_BYTES, json_size
from common.messages import OUTPUT_TAIL_LIMIT, RunStatus
from worker.actions.base import ActionResult, RunContext
from worker.functions import registered, runs_on_loop


class PythonExecutor:
    """Runs ``python`` actions: only functions registered with ``worker.functions.job_function``."""

    def refusal(self, action: AnyAction) -> str | None:
        """Why this worker will not run ``action`` (its function is not registered here), or None."""
        if isinstance(action, PythonAction) and registered(action.function) is None:
            return (
                f"python function {action.function} is not registered on this worker (start it "
                f"with --import {action.function.partition(':')[0]} and decorate the function "
                "with worker.functions.job_function)"
            )
        return None

    async def run(self, action: AnyAction, timeout: float, context: RunContext) -> ActionResult:
        """Call the function with ``context``; succeeded when it returns, failed when it raises,
        timed out after ``timeout`` seconds."""
        assert isinstance(action, PythonAction)
        function = registered(action.function)
        if function is None:
            return ActionResult(RunStatus.FAILED, error=self.refusal(action))
        try:
            async with asyncio.timeout(timeout):
                if inspect.iscoroutinefunction(function):
                    value = await function(context)
                elif runs_on_loop(action.function):
                    value = function(context)
                else:
                    value = await asyncio.to_thread(function, context)
        except TimeoutError:
            sync = (
                "" if inspect.iscoroutinefunction(function) else " (its thread goes on; it cannot be killed)"
            )
            return ActionResult(RunStatus.TIMED_OUT, error=f"{action.function} ran past {timeout:g}s{sync}")
        except Exception as exc:
            trace = "".join(traceback.format_exception(exc))
            return ActionResult(
                RunStatus.FAILED,
                output_tail=trace[-OUTPUT_TAIL_LIMIT:],
                error=f"{type(exc).__name__}: {exc}",
            )
        return _returned(value)


def _returned(value: object) -> ActionResult:
    """A succeeded run with ``value`` as its result; a value that is not JSON or is too large
    is not kept, and the run says why (the function did its work: the run still succeeded)."""
    if value is None:
        return ActionResult(RunStatus.SUCCEEDED)
    try:
        size = json_size(value)
    except ValueError as exc:
        return ActionResult(RunStatus.SUCCEEDED, error=f"the result was not kept: it {exc}")
    if size > MAX_RESULT_BYTES:
        return ActionResult(
            RunStatus.SUCCEEDED,
            error=f"the result was not kept: {size} bytes as JSON, at most {MAX_RESULT_BYTES}",
        )
    # As JSON reads it back (a datetime becomes its ISO text, a tuple a list).
    return ActionResult(RunStatus.SUCCEEDED, result=orjson.loads(orjson.dumps(value)))
