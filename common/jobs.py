"""A job as its owner defines it, validated once, and the TOML jobs file that holds many.

The file is a table of jobs keyed by name::

    [jobs.backup]
    schedule = "0 3 * * *"
    action = { type = "shell", argv = ["/usr/local/bin/backup"] }

A bad file raises JobFileError naming the file, the line, the job and the field.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.actions import Action
from common.cron import parse_schedule, parse_timezone
from common.errors import JobFileError
from common.messages import JOB_NAME_PATTERN, JobName, PoolName, Trigger, trigger_id


class JobSpec(BaseModel):
    """One job: when it fires, what it runs, where, and how long it may take."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: JobName
    schedule: str
    timezone: str = "UTC"
    action: Action | None = None
    pool: PoolName = "default"
    timeout_seconds: float = Field(default=300.0, gt=0, le=7 * 24 * 3600)
    expires_after_seconds: float = Field(default=300.0, gt=0)
    grace_seconds: float = Field(default=60.0, ge=0)
    enabled: bool = True
    description: str = ""

    @field_validator("schedule")
    @classmethod
    def _valid_schedule(cls, value: str) -> str:
        return parse_schedule(value).text

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, value: str) -> str:
        parse_timezone(value)
        return value

    def trigger_at(self, scheduled_at: datetime, published_at: datetime, *, manual: bool = False) -> Trigger:
        """The trigger of this job's fire at ``scheduled_at``. Raises ValueError without an action."""
        if self.action is None:
            raise ValueError(f"job {self.name!r} has no action: it only receives heartbeats")
        return Trigger(
            id=trigger_id(self.name, scheduled_at),
            job=self.name,
            pool=self.pool,
            scheduled_at=scheduled_at,
            published_at=published_at,
            expires_at=scheduled_at + timedelta(seconds=self.expires_after_seconds),
            timeout_seconds=self.timeout_seconds,
            action=self.action,
            manual=manual,
        )

    def zone(self) -> ZoneInfo:
        """The job's time zone."""
        return parse_timezone(self.timezone)

    def canonical_json(self) -> bytes:
        """The spec as stable JSON bytes: equal specs give equal bytes."""
        return orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)

    def fingerprint(self) -> str:
        """A short hash of ``canonical_json``, to tell a changed job from an unchanged one."""
        return hashlib.sha256(self.canonical_json()).hexdigest()[:16]


def load_jobs_file(path: Path) -> list[JobSpec]:
    """Read and validate every job of a TOML jobs file; all of them or none.

    Raises JobFileError with ``FILE:LINE: job NAME, field FIELD: reason``.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise JobFileError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse_jobs(text, str(path))


def parse_jobs(text: str, source: str = "<jobs>") -> list[JobSpec]:
    """Validate the jobs of a TOML document. See ``load_jobs_file``."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JobFileError(f"{source}: not valid TOML: {exc}") from exc
    unknown = sorted(set(document) - {"jobs"})
    if unknown:
        line = _line_of(text, [unknown[0]])
        raise JobFileError(f"{source}:{line}: unknown top-level key {unknown[0]!r}; jobs go in [jobs.NAME]")
    tables = document.get("jobs", {})
    if not isinstance(tables, dict):
        raise JobFileError(f"{source}:{_line_of(text, ['jobs'])}: 'jobs' must be a table of jobs")
    specs: list[JobSpec] = []
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise JobFileError(f"{source}:{_line_of(text, ['jobs', name])}: job {name!r} must be a table")
        if not re.match(JOB_NAME_PATTERN, name):
            raise JobFileError(
                f"{source}:{_line_of(text, ['jobs', name])}: job {name!r}, field name: "
                "use letters, digits, '-' and '_' (at most 64, starting with a letter or digit)"
            )
        if "name" in table:
            raise JobFileError(
                f"{source}:{_line_of(text, ['jobs', name, 'name'])}: job {name!r}, field name: "
                "the name is the table key, [jobs.NAME]; remove the 'name' field"
            )
        try:
            specs.append(JobSpec.model_validate({"name": name, **table}))
        except ValidationError as exc:
            raise JobFileError(_describe(exc, text, source, name)) from exc
    return specs


def _describe(exc: ValidationError, text: str, source: str, job: str) -> str:
    error = exc.errors(include_url=False)[0]
    # A discriminated union adds the chosen variant ("shell") to the path; it is not a key.
    path = [str(part) for part in error["loc"] if not (isinstance(part, str) and part in ("shell", "http"))]
    field = ".".join(path) or "?"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    elif error["type"] == "missing":
        message = "required field is missing"
    line = _line_of(text, ["jobs", job, *path])
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{source}:{line}: job {job!r}, field {field}: {message}{suffix}"


def _line_of(text: str, path: Sequence[str]) -> int:
    """Best-effort line of a dotted TOML key: the deepest part of ``path`` that can be found.

    TOML parsers give no positions for values, so this follows table headers and keys in order.
    """
    lines = text.splitlines()
    best = 1
    start = 0
    for depth in range(1, len(path) + 1):
        found = _find_key(lines, path[:depth], start)
        if found is None:
            break
        best = start = found
    return best + 1 if lines else 1


def _find_key(lines: list[str], path: Sequence[str], start: int) -> int | None:
    header = re.compile(r"^\s*\[+\s*" + r"\s*\.\s*".join(_key_pattern(p) for p in path) + r"\s*\]+")
    leaf = re.compile(r"(^|[\s{,])" + _key_pattern(path[-1]) + r"\s*=")
    dotted = re.compile(r"^\s*" + r"\s*\.\s*".join(_key_pattern(p) for p in path[-2:]) + r"\s*=")
    for index in range(start, len(lines)):
        line = lines[index]
        if header.search(line) or dotted.search(line):
            return index
        if index > start and leaf.search(line) and not line.lstrip().startswith("["):
            return index
        if index == start and index > 0 and leaf.search(line):
            return index
    return None


def _key_pattern(key: str) -> str:
    escaped = re.escape(key)
    return rf"(?:{escaped}|\"{escaped}\"|'{escaped}')"


def spec_from_json(data: str | bytes) -> JobSpec:
    """A stored spec back as a JobSpec (the store keeps ``canonical_json``)."""
    raw: Any = orjson.loads(data)
    return JobSpec.model_validate(raw)
