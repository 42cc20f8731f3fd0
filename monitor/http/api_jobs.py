"""``/api/jobs``: list, show, create, update (PUT a whole spec, PATCH some fields), pause,
resume, trigger now and delete jobs.

A job comes in as the fields of the jobs file plus ``name`` and goes through ``apply``'s own
validation (``common.jobs.validate_job``); a refused field is a 422 naming it. It is stored as
``apply`` stores it (``common.catalog``), so the scheduler and the monitor pick it up at their
next reload. Triggering is ``cronfleet trigger``'s path (``triggerable_job``, ``trigger_now``).
Every spec shown has its secrets masked (``common.redact``), as ``cronfleet jobs --json`` does.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel

from common.api_keys import ApiKey
from common.catalog import find_job, read_jobs, remove_job, save_job
from common.cli.admin import trigger_now, triggerable_job
from common.errors import AlreadyExists, BrokerUnavailable, ConfigError, CronfleetError, NoAction, NotFound
from common.jobs import InvalidJob, JobSpec, validate_job
from common.redact import redact
from monitor.http.api_common import (
    NOT_FOUND,
    READ_ERRORS,
    WRITE_ERRORS,
    ErrorBody,
    JobNameParam,
    invalid,
    json_body,
)
from monitor.http.auth import ApiError, reader, writer
from monitor.http.context import HttpContext, context_of

log = logging.getLogger("cronfleet.monitor.http")

router = APIRouter(prefix="/jobs", tags=["jobs"])

Context = Annotated[HttpContext, Depends(context_of)]
Reader = Annotated[ApiKey, Depends(reader)]
Writer = Annotated[ApiKey, Depends(writer)]


class JobOut(BaseModel):
    """A job as stored, its secrets masked in ``spec`` (the jobs-file fields plus ``name``)."""

    name: str
    schedule: str
    timezone: str
    pool: str
    enabled: bool
    action: str  # shell, http, or heartbeat (no action)
    spec: dict[str, Any]


class JobList(BaseModel):
    """Every job by name, and those stored with a spec this cronfleet refuses, with why."""

    jobs: list[JobOut]
    unreadable: dict[str, str]


class Triggered(BaseModel):
    """A manual fire claimed and handed to the broker: its trigger id (``job@instant``), which
    the run it brings about carries."""

    job: str
    trigger_id: str


def job_out(spec: JobSpec) -> JobOut:
    """``spec`` as the API shows it, secrets masked."""
    return JobOut(
        name=spec.name,
        schedule=spec.schedule_text(),
        timezone=spec.timezone,
        pool=spec.pool,
        enabled=spec.enabled,
        action=spec.action.type if spec.action else "heartbeat",
        spec=redact(spec.model_dump(mode="json")),
    )


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """``schema`` with every ``#/$defs/`` reference replaced by its definition."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline(item, defs) for item in schema]
    return schema


def _body(schema: dict[str, Any], description: str, example: dict[str, Any]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {"application/json": {"schema": schema, "example": example}},
        }
    }


EXAMPLE_JOB: dict[str, Any] = {
    "name": "backup",
    "schedule": "0 3 * * *",
    "timezone": "Europe/Berlin",
    "grace_seconds": 600,
    "action": {"type": "shell", "argv": ["/usr/local/bin/backup", "--quiet"]},
}


_SPEC_SCHEMA: dict[str, Any] = _inline(
    JobSpec.model_json_schema(), JobSpec.model_json_schema().get("$defs", {})
)
_PATCH_SCHEMA: dict[str, Any] = {**_SPEC_SCHEMA, "required": []}
_CREATE = _body(
    _SPEC_SCHEMA, "The job: the jobs-file fields plus its name", {**EXAMPLE_JOB, "name": "report"}
)
_PUT = _body(_SPEC_SCHEMA, "The whole job (name: the path's, or absent)", EXAMPLE_JOB)
_PATCH = _body(
    _PATCH_SCHEMA, "The fields to change; the others keep their stored values", {"timeout_seconds": 900}
)


def _validated(data: Any) -> JobSpec:
    try:
        return validate_job(data)
    except InvalidJob as exc:
        raise invalid("body", exc.field, exc.detail) from exc


async def _stored(context: HttpContext, name: str) -> JobSpec:
    try:
        spec = await find_job(context.store, name)
    except CronfleetError as exc:  # stored with a spec this cronfleet refuses: PUT a new one
        raise ApiError(409, "unreadable") from exc
    if spec is None:
        raise ApiError(404, "not_found")
    return spec


async def _save(context: HttpContext, spec: JobSpec, *, exists: bool) -> JobOut:
    try:
        await save_job(context.store, spec, context.clock(), exists=exists)
    except NotFound as exc:
        raise ApiError(404, "not_found") from exc
    except AlreadyExists as exc:
        raise ApiError(409, "exists") from exc
    await _tell_schedulers(context)
    return job_out(spec)


async def _tell_schedulers(context: HttpContext) -> None:
    """Tell the running schedulers the jobs changed; when the broker cannot be reached, they see
    it at their next poll (logged, never an error of the request: the change is stored)."""
    why = await context.publisher.tell_jobs_changed("the HTTP API")
    if why is not None:
        log.warning(
            "the schedulers were not told a job changed (%s); they will see it at their next poll", why
        )


@router.get("", response_model=JobList, responses=READ_ERRORS)
async def list_jobs(context: Context, key: Reader) -> JobList:
    """Every job, by name."""
    stored = await read_jobs(context.store)
    return JobList(jobs=[job_out(spec) for spec in stored.specs], unreadable=stored.unreadable)


@router.get("/{name}", response_model=JobOut, responses={**READ_ERRORS, **NOT_FOUND})
async def show_job(name: JobNameParam, context: Context, key: Reader) -> JobOut:
    """One job."""
    return job_out(await _stored(context, name))


@router.post(
    "",
    status_code=201,
    response_model=JobOut,
    responses={**WRITE_ERRORS, 409: {"model": ErrorBody, "description": "The job exists"}},
    openapi_extra=_CREATE,
)
async def create_job(request: Request, context: Context, key: Writer) -> JobOut:
    """Add a job, validated as ``apply`` validates the jobs file; 409 if the name is taken."""
    return await _save(context, _validated(await json_body(request)), exists=False)


@router.put("/{name}", response_model=JobOut, responses={**WRITE_ERRORS, **NOT_FOUND}, openapi_extra=_PUT)
async def replace_job(name: JobNameParam, request: Request, context: Context, key: Writer) -> JobOut:
    """Replace a job's whole spec (fields left out take their defaults, as in the jobs file)."""
    data = await json_body(request)
    if isinstance(data, dict) and data.setdefault("name", name) != name:
        raise invalid("body", "name", "a job's name is its path: it cannot change")
    return await _save(context, _validated(data), exists=True)


@router.patch("/{name}", response_model=JobOut, responses={**WRITE_ERRORS, **NOT_FOUND}, openapi_extra=_PATCH)
async def update_job(name: JobNameParam, request: Request, context: Context, key: Writer) -> JobOut:
    """Change some fields of a job; the others keep their stored values."""
    data = await json_body(request)
    if not isinstance(data, dict):
        raise invalid("body", None, "the fields to change are an object")
    if data.get("name", name) != name:
        raise invalid("body", "name", "a job's name is its path: it cannot change")
    current = (await _stored(context, name)).model_dump(mode="json")
    # A job has a schedule or an interval: a PATCH that gives one of them drops the other.
    for given, other in (("schedule", "every"), ("every", "schedule")):
        if data.get(given) is not None and other not in data:
            current[other] = None
    return await _save(context, _validated({**current, **data}), exists=True)


async def _set_enabled(context: HttpContext, name: str, enabled: bool) -> JobOut:
    stored = await _stored(context, name)
    return await _save(context, stored.model_copy(update={"enabled": enabled}), exists=True)


@router.post("/{name}/pause", response_model=JobOut, responses={**WRITE_ERRORS, **NOT_FOUND})
async def pause_job(name: JobNameParam, context: Context, key: Writer) -> JobOut:
    """Disable a job (``enabled = false``): it is not fired until resumed; idempotent."""
    return await _set_enabled(context, name, False)


@router.post("/{name}/resume", response_model=JobOut, responses={**WRITE_ERRORS, **NOT_FOUND})
async def resume_job(name: JobNameParam, context: Context, key: Writer) -> JobOut:
    """Enable a job again (``enabled = true``); idempotent."""
    return await _set_enabled(context, name, True)


@router.post(
    "/{name}/trigger",
    status_code=202,
    response_model=Triggered,
    responses={
        **WRITE_ERRORS,
        **NOT_FOUND,
        409: {"model": ErrorBody, "description": "no_action (a heartbeat-only job) or no_trigger_key"},
        503: {"model": ErrorBody, "description": "The broker did not answer"},
    },
)
async def trigger_job(name: JobNameParam, context: Context, key: Writer) -> Triggered:
    """Fire a job now, as ``cronfleet trigger`` does: its run carries the trigger id returned."""
    try:
        spec = await triggerable_job(context.store, context.keyring, name, "the API's trigger")
        fired = await trigger_now(context.store, context.publisher, spec, "api", context.clock())
    except NotFound as exc:
        raise ApiError(404, "not_found") from exc
    except NoAction as exc:
        raise ApiError(409, "no_action") from exc
    except ConfigError as exc:
        raise ApiError(409, "no_trigger_key") from exc
    except BrokerUnavailable as exc:
        raise ApiError(503, "broker_unavailable") from exc
    return Triggered(job=name, trigger_id=fired)


@router.delete("/{name}", status_code=204, response_class=Response, responses={**WRITE_ERRORS, **NOT_FOUND})
async def delete_job(name: JobNameParam, context: Context, key: Writer) -> Response:
    """Remove a job, as ``apply`` removes one no longer in the file."""
    if not await remove_job(context.store, name):
        raise ApiError(404, "not_found")
    await _tell_schedulers(context)
    return Response(status_code=204)
