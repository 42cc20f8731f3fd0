"""Send one HTTP request; the run succeeds when the status is one the job expects.

The run's id goes along as ``X-Request-Id``. A job with a ``webhook_secret`` has every request
signed as Standard Webhooks define it (https://www.standardwebhooks.com/): ``webhook-id`` (the run
id, the same on every retry of that run), ``webhook-timestamp`` (Unix seconds) and
``webhook-signature`` (``v1,`` + base64 HMAC-SHA256 of ``id.timestamp.body`` under the secret;
``common.webhooks``). An endpoint that answers JSON with a ``requestId`` has it stored on the run.
Requests go out on the worker's one aiohttp session (``common.http_client``); no redirect is
followed.
"""

from __future__ import annotations

import asyncio
import base64
from datetime import datetime

import aiohttp
import orjson

from common.actions import AnyAction, HttpAction
from common.clock import utcnow
from common.http_client import error_name
from common.messages import IDENTIFIER_LENGTH, RunStatus
from common.webhooks import SECRET_PREFIX, signed_headers
from worker.actions.base import ActionResult, OutputTail, RunContext

# The header that carries the run's id to the endpoint.
REQUEST_ID_HEADER = "X-Request-Id"
# The key of an endpoint's JSON answer that names its own handling of the request.
ANSWER_REQUEST_ID = "requestId"
WEBHOOK_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


def webhook_headers(secret: str, message_id: str, at: datetime, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers of a request carrying ``body``, signed with
    ``secret`` (``whsec_...``, as the jobs file accepts it) at ``at`` (whole seconds)."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    return signed_headers(key, message_id, int(at.timestamp()), body)


def answered_request_id(content_type: str | None, body: bytes) -> str | None:
    """The endpoint's ``requestId`` in a JSON answer (a string or number, as text within an
    identifier's bounds), or None."""
    if not body or "json" not in (content_type or ""):
        return None
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    value = answer.get(ANSWER_REQUEST_ID) if isinstance(answer, dict) else None
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value)
    if not text or len(text) > IDENTIFIER_LENGTH or not text.isprintable():
        return None
    return text


class HttpExecutor:
    """Runs ``http`` actions on a shared session (connections kept alive across runs)."""

    # A JSON answer is read whole (to find its requestId) up to this size; the run keeps only
    # the tail of any answer.
    ANSWER_LIMIT = 64 * 1024

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def run(self, action: AnyAction, timeout: float, context: RunContext) -> ActionResult:
        """Send the request; time out after ``timeout`` seconds in all (connect, send, read). The
        run's id goes along as ``X-Request-Id`` (unless the job sets that header itself), so the
        endpoint's own logs can be matched with the run."""
        assert isinstance(action, HttpAction)
        tail = OutputTail()
        head = bytearray()
        headers = dict(action.headers)
        if not any(name.lower() == REQUEST_ID_HEADER.lower() for name in headers):
            headers[REQUEST_ID_HEADER] = context.run_id
        body = action.body.encode() if action.body is not None else b""
        if action.webhook_secret is not None:
            headers.update(webhook_headers(action.webhook_secret, context.run_id, utcnow(), body))
        try:
            async with (
                asyncio.timeout(timeout),
                self._session.request(
                    action.method,
                    str(action.url),
                    headers=headers,
                    data=body if action.body is not None else None,
                    allow_redirects=False,
                ) as response,
            ):
                async for chunk in response.content.iter_any():
                    tail.feed(chunk)
                    if len(head) <= self.ANSWER_LIMIT:
                        head += chunk
        except TimeoutError:
            return ActionResult(RunStatus.TIMED_OUT, error=f"no complete response within {timeout:g}s")
        except (aiohttp.ClientError, ValueError, UnicodeError) as exc:
            # ValueError and UnicodeError: a header the client cannot send (a line break, a
            # character outside Latin-1 or UTF-8), a URL it refuses.
            return ActionResult(
                RunStatus.FAILED, error=f"{error_name(exc)}: {exc or 'connection failed'}"[:1000]
            )
        code = response.status
        request_id = None
        if len(head) <= self.ANSWER_LIMIT:
            request_id = answered_request_id(response.headers.get("content-type"), bytes(head))
        if code in action.expect_status:
            return ActionResult(
                RunStatus.SUCCEEDED, http_status=code, output_tail=tail.text(), endpoint_request_id=request_id
            )
        expected = ", ".join(str(s) for s in action.expect_status)
        return ActionResult(
            RunStatus.FAILED,
            http_status=code,
            output_tail=tail.text(),
            error=f"HTTP {code}, expected {expected}",
            endpoint_request_id=request_id,
        )
