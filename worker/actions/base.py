"""What every executor returns, and the bounded tail of output it keeps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from common.actions import HttpAction, ShellAction
from common.messages import OUTPUT_TAIL_LIMIT, RunStatus


@dataclass(frozen=True)
class ActionResult:
    """How an action ended."""

    status: RunStatus
    exit_code: int | None = None
    http_status: int | None = None
    output_tail: str | None = None
    error: str | None = None


class Executor(Protocol):
    """Runs one kind of action to its end within ``timeout`` seconds, without blocking the loop.

    Never raises for an action that fails: failure is a result. ``run_id`` is the run's id, which
    an executor may hand to what it runs so that its logs can name the run (HTTP: ``X-Request-Id``).
    """

    async def run(
        self, action: ShellAction | HttpAction, timeout: float, *, run_id: str | None = None
    ) -> ActionResult: ...


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
