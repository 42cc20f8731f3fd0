"""Send one HTTP request; the run succeeds when the status is one the job expects."""

from __future__ import annotations

import asyncio

import httpx

from common.actions import HttpAction, ShellAction
from common.messages import RunStatus
from worker.actions.base import ActionResult, OutputTail

# The header that carries the run's id to the endpoint.
REQUEST_ID_HEADER = "X-Request-Id"


class HttpExecutor:
    """Runs ``http`` actions on a shared client (connection pooling across runs)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def run(
        self, action: ShellAction | HttpAction, timeout: float, *, run_id: str | None = None
    ) -> ActionResult:
        """Send the request; time out after ``timeout`` seconds in all (connect, send, read). The
        run's id goes along as ``X-Request-Id`` (unless the job sets that header itself), so the
        endpoint's own logs can be matched with the run (the API's ``request_id``)."""
        assert isinstance(action, HttpAction)
        tail = OutputTail()
        headers = dict(action.headers)
        if run_id is not None and not any(name.lower() == REQUEST_ID_HEADER.lower() for name in headers):
            headers[REQUEST_ID_HEADER] = run_id
        try:
            async with (
                asyncio.timeout(timeout),
                self._client.stream(
                    action.method,
                    str(action.url),
                    headers=headers,
                    content=action.body.encode() if action.body is not None else None,
                    timeout=timeout,
                ) as response,
            ):
                async for chunk in response.aiter_bytes():
                    tail.feed(chunk)
        except (TimeoutError, httpx.TimeoutException):
            return ActionResult(RunStatus.TIMED_OUT, error=f"no complete response within {timeout:g}s")
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
            # InvalidURL and encoding errors (a header h11 cannot send) are not HTTPErrors.
            return ActionResult(
                RunStatus.FAILED, error=f"{type(exc).__name__}: {exc or 'connection failed'}"[:1000]
            )
        code = response.status_code
        if code in action.expect_status:
            return ActionResult(RunStatus.SUCCEEDED, http_status=code, output_tail=tail.text())
        expected = ", ".join(str(s) for s in action.expect_status)
        return ActionResult(
            RunStatus.FAILED,
            http_status=code,
            output_tail=tail.text(),
            error=f"HTTP {code}, expected {expected}",
        )
