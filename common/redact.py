"""Masking secrets before anything is shown: a field or header whose name says it holds a secret,
and the password or secret-named query parameters of a URL. Pure, and never raises.

What counts as secret by name: the HTTP headers that carry credentials (``Authorization``,
``Proxy-Authorization``, ``Cookie``, ``Set-Cookie``, ``X-Api-Key``...) and any name containing
``token``, ``secret``, ``password``, ``passwd``, ``key``, ``credential``, ``signature``, ``auth``
or ``session`` (case and ``-``/``_`` ignored). A masked value keeps its key, so a reader sees that
something is set, never what.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"

_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"})
_SECRET_WORDS = re.compile(r"token|secret|passw(?:or)?d|key|credential|signature|auth|session", re.I)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_secret_name(name: str) -> bool:
    """Whether a field, header, variable or query parameter called ``name`` holds a secret."""
    return name.lower() in _SECRET_HEADERS or _SECRET_WORDS.search(name) is not None


def redact(value: Any) -> Any:
    """A copy of ``value`` (JSON-like: mappings, lists, scalars) with every secret masked: the
    value of a mapping key that ``is_secret_name`` (whatever it holds), and inside every string
    that is a URL, its password and secret-named query parameters. Other values are unchanged."""
    if isinstance(value, Mapping):
        return {
            key: MASK if isinstance(key, str) and is_secret_name(key) else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return redact_url(value)
    return value


def redact_url(text: str) -> str:
    """``text`` with its password and secret-named query values masked when it is a URL;
    any other text unchanged."""
    if not _URL.match(text):
        return text
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError:  # not a URL after all (a bad port, a bad IPv6 literal)
        return text
    netloc = parts.netloc
    if password is not None:
        user, _, host = netloc.rpartition("@")
        name = user.partition(":")[0]
        netloc = f"{name}:{MASK}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(is_secret_name(name) for name, _ in pairs):
            query = urlencode([(n, MASK if is_secret_name(n) else v) for n, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return text
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
