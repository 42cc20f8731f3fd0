"""The JSON API under ``/api/``: every route takes an API key (``monitor.http.auth``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from common.api_keys import ApiKey
from monitor.http.auth import reader

router = APIRouter(prefix="/api")


class KeyInfo(BaseModel):
    """Which key a request came with."""

    name: str
    read_only: bool


@router.get("/key", response_model=KeyInfo)
async def whoami(key: Annotated[ApiKey, Depends(reader)]) -> KeyInfo:
    """The name and access of the API key the request carries."""
    return KeyInfo(name=key.name, read_only=key.read_only)
