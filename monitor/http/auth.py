"""API keys at the door: every ``/api/`` route takes one in the ``X-API-Key`` header.

A missing, malformed, unknown, wrong or revoked key gets ``401 {"error": "unauthorized"}``
(never which of these); a read-only key on a route that changes something gets
``403 {"error": "read_only"}``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, HTTPException

from common.api_keys import ApiKey, verify_api_key
from monitor.http.context import HttpContext, context_of

API_KEY_HEADER = "X-API-Key"


class ApiError(HTTPException):
    """An error answered as ``{"error": CODE}`` with its status."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(status_code=status, detail=code)


async def reader(
    context: Annotated[HttpContext, Depends(context_of)],
    x_api_key: Annotated[str | None, Header(alias=API_KEY_HEADER)] = None,
) -> ApiKey:
    """The caller's live API key, read-only or not; 401 otherwise."""
    key = await verify_api_key(context.store, x_api_key, context.clock())
    if key is None:
        raise ApiError(401, "unauthorized")
    return key


async def writer(key: Annotated[ApiKey, Depends(reader)]) -> ApiKey:
    """The caller's live API key when it may change things; 401 or 403 otherwise."""
    if key.read_only:
        raise ApiError(403, "read_only")
    return key
