"""Action type -> executor. Adding an action kind is adding a module and a line here."""

from __future__ import annotations

import httpx

from worker.actions.base import Executor
from worker.actions.http import HttpExecutor
from worker.actions.python import PythonExecutor
from worker.actions.shell import ShellExecutor


def executors(client: httpx.AsyncClient) -> dict[str, Executor]:
    """One executor per action type; HTTP ones share ``client``."""
    return {"shell": ShellExecutor(), "http": HttpExecutor(client), "python": PythonExecutor()}
