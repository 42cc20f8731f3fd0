"""Action type -> executor. Adding an action kind is adding a module and a line here."""

from __future__ import annotations

import aiohttp

from worker.actions.base import Executor
from worker.actions.http import HttpExecutor
from worker.actions.python import PythonExecutor
from worker.actions.shell import ShellExecutor
from worker.allow import CommandAllowList


def executors(session: aiohttp.ClientSession, commands: CommandAllowList) -> dict[str, Executor]:
    """One executor per action type; HTTP ones share ``session``; shell ones run only the
    programs ``commands`` allows."""
    return {"shell": ShellExecutor(commands), "http": HttpExecutor(session), "python": PythonExecutor()}
