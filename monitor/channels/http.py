"""One JSON POST to a receiver, shared by the webhook, Slack and Discord channels: a 2xx delivers,
anything else raises DeliveryFailed saying whether trying again may help. A reason never quotes
the URL (a Slack or Discord webhook URL is itself the secret), only its host."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from urllib.parse import urlsplit

import aiohttp

from common.http_client import error_name
from monitor.channels.base import DeliveryFailed, one_line

# Worth trying again: the receiver timed out, is rate limiting us, or failed on its side.
RETRYABLE_STATUS = frozenset({408, 425, 429}) | frozenset(range(500, 600))
_SNIPPET = 200
# At most this much of an answer is read (a refusal's reason is its start); the connection is
# reused only when the answer ended within it.
ANSWER_LIMIT = 16 * 1024


async def post_json(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    *,
    timeout: float,
    headers: Mapping[str, str] | None = None,
) -> None:
    """POST ``body`` (JSON) to ``url`` and return once a 2xx answer was read, all within
    ``timeout`` seconds (connect, send, answer).

    Raises DeliveryFailed: retryable for a network error, a timeout, 408, 425, 429 and 5xx (with
    the receiver's ``Retry-After`` seconds, if any); not retryable for any other status (a wrong
    URL, a refused payload, a redirect: cronfleet does not follow redirects with a signed body).
    """
    host = urlsplit(url).hostname or "?"
    sent = {"content-type": "application/json", "user-agent": "cronfleet-alerts/1", **(headers or {})}
    try:
        async with (
            asyncio.timeout(timeout),
            session.post(url, data=body, headers=sent, allow_redirects=False) as response,
        ):
            answer = await response.content.read(ANSWER_LIMIT)
            status, charset = response.status, response.charset or "utf-8"
            retry_after = response.headers.get("retry-after")
            redirect = 300 <= status < 400 and "location" in response.headers
    except TimeoutError:
        raise DeliveryFailed(f"{host}: no answer within {timeout:g}s (TimeoutError)") from None
    except (aiohttp.ClientError, ValueError) as exc:
        raise DeliveryFailed(f"{host}: {error_name(exc)}: {_scrub(str(exc), url)}") from None
    if 200 <= status < 300:
        return
    snippet = _scrub(one_line(_text(answer, charset), _SNIPPET), url)
    reason = f"{host}: HTTP {status}" + (f": {snippet}" if snippet.strip() else "")
    if redirect:
        reason += " (a redirect: configure the final URL)"
    raise DeliveryFailed(
        reason, retryable=status in RETRYABLE_STATUS, retry_after=retry_after_seconds(retry_after)
    )


def retry_after_seconds(value: str | None) -> float | None:
    """The seconds of a ``Retry-After: N`` header (or Discord's ``N.NNN``); None for none, a date
    or anything unreadable."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if 0 <= seconds < 86_400 * 365 else None


def _text(answer: bytes, charset: str) -> str:
    """``answer`` decoded as its ``charset`` says (UTF-8 when that is unknown)."""
    try:
        return answer.decode(charset, errors="replace")
    except LookupError:
        return answer.decode("utf-8", errors="replace")


def _scrub(text: str, url: str) -> str:
    """``text`` without ``url`` or its path and query (where webhook tokens live)."""
    parts = urlsplit(url)
    tail = parts.path + (f"?{parts.query}" if parts.query else "")
    text = text.replace(url, f"{parts.scheme}://{parts.hostname}/...")
    if len(tail) > 1:
        text = text.replace(tail, "/...")
    return one_line(text)
