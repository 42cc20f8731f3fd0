"""The HTTP client of cronfleet's outgoing calls (the worker's ``http`` actions, the monitor's
webhook, Slack and Discord channels): one long-lived aiohttp session per process, bounded.

Why aiohttp: httpx cost 0.5 to 0.65 ms of CPU per request here, and more with requests waiting
for its pool (``docs/benchmarks.md``, "An aiohttp client"). The session keeps no cookies (calls of
unrelated jobs must not share them), adds no ``Content-Type`` the caller did not set, and reads
the proxy variables (``HTTPS_PROXY``, ``NO_PROXY``...) only when one is set: aiohttp reads them,
and ``~/.netrc``, at every request when it may.
"""

from __future__ import annotations

import urllib.request

import aiohttp

# Reported under these names whatever the client library calls them.
_ERROR_NAMES: tuple[tuple[type[BaseException], str], ...] = (
    (aiohttp.ClientConnectorError, "ConnectError"),
    (aiohttp.ServerDisconnectedError, "ServerDisconnected"),
    (aiohttp.ClientPayloadError, "ReadError"),
    (aiohttp.ClientResponseError, "ProtocolError"),
    (aiohttp.InvalidURL, "InvalidURL"),
)


def open_session(limit: int, *, user_agent: str = "cronfleet/1") -> aiohttp.ClientSession:
    """A session of at most ``limit`` connections in all (kept alive between requests), with no
    default timeout (each caller bounds its own request) and no cookie jar. Close it (``async
    with``) before the event loop ends. Call it from a coroutine: the session binds to the
    running loop."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, limit_per_host=0),
        headers={"User-Agent": user_agent},
        skip_auto_headers=("Content-Type",),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None),
        trust_env=bool(urllib.request.getproxies()),
    )


def error_name(exc: BaseException) -> str:
    """A stable name for what went wrong with a request (``ConnectError``, ``ReadError``...),
    the class name when none fits."""
    for kind, name in _ERROR_NAMES:
        if isinstance(exc, kind):
            return name
    return type(exc).__name__
