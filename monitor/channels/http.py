"""One JSON POST to a receiver, shared by the webhook, Slack and Discord channels: a 2xx delivers,
anything else raises DeliveryFailed saying whether trying again may help. A reason never quotes
the URL (a Slack or Discord webhook URL is itself the secret), only its host."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

import httpx

from monitor.channels.base import DeliveryFailed, one_line

# Worth trying again: the receiver timed out, is rate limiting us, or failed on its side.
RETRYABLE_STATUS = frozenset({408, 425, 429}) | frozenset(range(500, 600))
_SNIPPET = 200


async def post_json(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    *,
    timeout: float,
    headers: Mapping[str, str] | None = None,
) -> httpx.Response:
    """POST ``body`` (JSON) to ``url`` within ``timeout`` seconds and return the 2xx response.

    Raises DeliveryFailed: retryable for a network error, a timeout, 408, 425, 429 and 5xx (with
    the receiver's ``Retry-After`` seconds, if any); not retryable for any other status (a wrong
    URL, a refused payload, a redirect: cronfleet does not follow redirects with a signed body).
    """
    host = urlsplit(url).hostname or "?"
    sent = {"content-type": "application/json", "user-agent": "cronfleet-alerts/1", **(headers or {})}
    try:
        response = await client.post(url, content=body, headers=sent, timeout=timeout, follow_redirects=False)
    except httpx.TimeoutException as exc:
        raise DeliveryFailed(f"{host}: no answer within {timeout:g}s ({type(exc).__name__})") from None
    except httpx.HTTPError as exc:
        raise DeliveryFailed(f"{host}: {type(exc).__name__}: {_scrub(str(exc), url)}") from None
    if 200 <= response.status_code < 300:
        return response
    snippet = _scrub(one_line(response.text, _SNIPPET), url)
    reason = f"{host}: HTTP {response.status_code}" + (f": {snippet}" if snippet.strip() else "")
    if response.is_redirect:
        reason += " (a redirect: configure the final URL)"
    raise DeliveryFailed(
        reason,
        retryable=response.status_code in RETRYABLE_STATUS,
        retry_after=retry_after_seconds(response.headers.get("retry-after")),
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


def _scrub(text: str, url: str) -> str:
    """``text`` without ``url`` or its path and query (where webhook tokens live)."""
    parts = urlsplit(url)
    tail = parts.path + (f"?{parts.query}" if parts.query else "")
    text = text.replace(url, f"{parts.scheme}://{parts.hostname}/...")
    if len(tail) > 1:
        text = text.replace(tail, "/...")
    return one_line(text)
