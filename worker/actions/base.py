"""What every executor returns, and the bounded tail of output it keeps."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import orjson
from pydantic import JsonValue

from common.actions import AnyAction
from common.messages import OUTPUT_TAIL_LIMIT, RunStatus, Trigger, format_instant


@dataclass(frozen=True)
class ActionResult:
    """How an action ended."""

    status: RunStatus
    exit_code: int | None = None
    http_status: int | None = None
    output_tail: str | None = None
    error: str | None = None
    # A python action's return value (JSON); an http endpoint's own id for the request.
    result: Any = None
    endpoint_request_id: str | None = None


@dataclass(frozen=True)
class RunContext:
    """What a run knows about itself, handed to what it executes: a python function gets it as
    its argument, a shell job as ``CRONFLEET_*`` environment variables (``environment``), an
    http endpoint the run id as its request id."""

    run_id: str
    trigger_id: str
    job: str
    scheduled_at: datetime
    attempt: int = 1
    manual: bool = False
    # The job's ``context`` table from the jobs file.
    context: Mapping[str, JsonValue] = field(default_factory=dict)

    @classmethod
    def of(cls, trigger: Trigger, run_id: str) -> RunContext:
        """The context of run ``run_id`` of ``trigger``."""
        return cls(
            run_id=run_id,
            trigger_id=trigger.id,
            job=trigger.job,
            scheduled_at=trigger.scheduled_at,
            attempt=getattr(trigger, "attempt", 1),
            manual=trigger.manual,
            context=dict(trigger.context or {}),
        )

    def environment(self) -> dict[str, str]:
        """The run's context as environment variables (``CRONFLEET_CONTEXT`` is its JSON)."""
        return {
            "CRONFLEET_RUN_ID": self.run_id,
            "CRONFLEET_TRIGGER_ID": self.trigger_id,
            "CRONFLEET_JOB": self.job,
            "CRONFLEET_SCHEDULED_AT": format_instant(self.scheduled_at),
            "CRONFLEET_ATTEMPT": str(self.attempt),
            "CRONFLEET_CONTEXT": orjson.dumps(dict(self.context)).decode(),
        }


class Executor(Protocol):
    """Runs one kind of action to its end within ``timeout`` seconds, without blocking the loop.

    Never raises for an action that fails: failure is a result. ``context`` says which run this
    is; an executor hands what it needs of it to what it runs (``RunContext``).
    """

    async def run(self, action: AnyAction, timeout: float, context: RunContext) -> ActionResult: ...


class OutputTail:
    """The last ``limit`` bytes of a stream, whatever its length."""

    def __init__(self, limit: int = OUTPUT_TAIL_LIMIT) -> None:
        self._limit = limit
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> None:
        """Append ``chunk``, forgetting what falls out of the window."""
        self._buffer += chunk
        if len(self._buffer) > self._limit:
            del self._buffer[: len(self._buffer) - self._limit]

    def text(self) -> str | None:
        """The tail as text (invalid UTF-8 and NUL replaced by U+FFFD: the wire carries neither),
        or None when nothing was written."""
        if not self._buffer:
            return None
        # Cut to whole characters so the text never exceeds the limit once decoded.
        text = bytes(self._buffer).decode("utf-8", errors="replace")[-self._limit :]
        return text.replace("\x00", "\ufffd")
