"""The JSON API under ``/api/``: every route takes an API key (``monitor.http.auth``): reads a
read-only or read-write key, changes a read-write one. Jobs in ``api_jobs``, runs and their logs
in ``api_runs``, metrics, alerts, flips and fleet health in ``api_reports``; docs/api.md."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from common.api_keys import ApiKey
from monitor.http import api_jobs, api_reports, api_runs
from monitor.http.api_common import READ_ERRORS
from monitor.http.auth import reader

router = APIRouter(prefix="/api")


class KeyInfo(BaseModel):
    """Which key a request came with."""

    name: str
    read_only: bool


@router.get("/key", response_model=KeyInfo, responses=READ_ERRORS)
async def whoami(key: Annotated[ApiKey, Depends(reader)]) -> KeyInfo:
    """The name and access of the API key the request carries."""
    return KeyInfo(name=key.name, read_only=key.read_only)


for _module in (api_jobs, api_runs, api_reports):
    router.include_router(_module.router)
