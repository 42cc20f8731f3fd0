"""Action executors, one module each, behind a registry keyed by the action's ``type``."""

from worker.actions.base import ActionResult, Executor, OutputTail, RunContext
from worker.actions.registry import executors

__all__ = ["ActionResult", "Executor", "OutputTail", "RunContext", "executors"]
