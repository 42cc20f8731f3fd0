"""A job as its owner defines it, validated once, and the TOML jobs file that holds many.

The file is a table of jobs keyed by name::

    [jobs.backup]
    schedule = "0 3 * * *"
    action = { type = "shell", argv = ["/usr/local/bin/backup"] }

A bad file raises JobFileError naming the file, the line, the job and the field.
"""

from __future__ import annotations

import difflib
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
    errors = exc.errors(include_url=False)
    # An unknown field is usually the cause of a "missing" one (a typo): report it first.
    errors.sort(key=lambda e: e["type"] != "extra_forbidden")
    error = errors[0]
    path = _field_path(error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        missing = [_field_path(e["loc"])[-1] for e in errors if e["type"] == "missing"]
        guess = difflib.get_close_matches(path[-1], missing, n=1)
        message = "unknown field" + (f" (did you mean {guess[0]!r}?)" if guess else "")
    elif error["type"] == "missing":
        message = "required field is missing"
    line = _line_of(text, ["jobs", job, *path])
    more = len(errors) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{source}:{line}: job {job!r}, field {'.'.join(path) or '?'}: {message}{suffix}"


def _field_path(loc: tuple[int | str, ...]) -> list[str]:
    # A discriminated union puts the chosen variant ("shell") in the path; it is not a key.
    return [str(part) for part in loc if part not in ("shell", "http")]


def _line_of(text: str, path: Sequence[str]) -> int:
    """The line that defines the deepest part of the dotted key ``path`` (1-based).

    TOML parsers give no positions for values, so this follows table headers and keys
    (dotted keys and inline tables included) and keeps the line that matches most of ``path``.
    """
    table: list[str] = []
    best_line, best_depth = 1, 0
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            table = _split_key(header.group(1))
            here = table
        else:
            key = _KEY.match(line)
            if key is None:
                continue
            here = [*table, *_split_key(key.group(1))]
        depth = _common_prefix(here, path)
        if depth == len(here):
            # An inline table: later parts of the path may sit on this same line.
            for part in path[depth:]:
                if not re.search(r"[{,]\s*" + _key_pattern(part) + r"\s*=", line):
                    break
                depth += 1
        if depth > best_depth:
            best_line, best_depth = number, depth
    return best_line


_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?")
_KEY = re.compile(r"""^\s*([A-Za-z0-9_\-."' ]+?)\s*=""")


def _split_key(key: str) -> list[str]:
    return [part.strip().strip("\"'") for part in key.split(".")]


def _common_prefix(left: Sequence[str], right: Sequence[str]) -> int:
    depth = 0
    for a, b in zip(left, right, strict=False):
        if a != b:
            break
        depth += 1
    return depth


def _key_pattern(key: str) -> str:
    escaped = re.escape(key)
    return rf"(?:{escaped}|\"{escaped}\"|'{escaped}')"


def spec_from_json(data: str | bytes) -> JobSpec:
    """A stored spec back as a JobSpec (the store keeps ``canonical_json``)."""
    raw: Any = orjson.loads(data)
    return JobSpec.model_validate(raw)
