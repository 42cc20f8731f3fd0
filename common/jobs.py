"""A job as its owner defines it, validated once, and the TOML jobs file that holds many.

The file is a table of jobs keyed by name::

    [jobs.backup]
    schedule = "0 3 * * *"
    action = { type = "shell", argv = ["/usr/local/bin/backup"] }

A bad file raises JobFileError, one line naming the file, the line, the job and the field::

    jobs.toml:12: job 'backup', field timeout_seconds: Input should be a valid number
    jobs.toml:3:8: not valid TOML: Expected ']' at the end of a table declaration (at line 3, column 8)

Values are strict: no string is read as a number or a boolean (a TOML integer is a good float).
Every value is bounded (``common.bounds``): durations are finite, timeouts at most 7 days, grace
and expiry at most a year; integers fit in 64 bits; strings carry no NUL; arguments, environment,
headers and URLs are what the kernel and HTTP accept. So a job that applies can never stop a
process that reads it back, plans it or runs it.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import tomllib
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from common.actions import Action
from common.bounds import (
    INT64_MAX,
    INT64_MIN,
    MAX_JOBS_FILE_BYTES,
    ExpirySeconds,
    GraceSeconds,
    JobContext,
    PlainText,
    TimeoutSeconds,
)
from common.cron import next_fire as cron_next_fire
from common.cron import parse_schedule, parse_timezone
from common.durations import parse_duration
from common.errors import JobFileError
from common.intervals import next_interval_fire, parse_interval
from common.jitter import jitter_offset
from common.messages import (
    JOB_NAME_PATTERN,
    MAX_ATTEMPTS,
    MAX_RETRY_DELAY_SECONDS,
    JobName,
    OnLost,
    Overlap,
    PoolName,
    RetryPolicy,
    Trigger,
    trigger_id,
)

# More failures in a row than this is not a threshold anyone means.
MAX_FAILURE_THRESHOLD = 1000
# Bounds of the scheduling policies (docs/scheduling.md).
MAX_JITTER_SECONDS = 86400
MAX_CATCHUP_SECONDS = 7 * 86400
DEFAULT_CATCHUP_SECONDS = 3600


class JobSpec(BaseModel):
    """One job: when it fires, what it runs, where, and how long it may take."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: JobName
    # --- When it fires: a cron ``schedule`` or an interval ``every``, exactly one of the two
    # (``every`` first: the check of ``schedule`` sees it). See docs/scheduling.md.
    every: str | None = None
    schedule: str | None = Field(default=None, validate_default=True)
    timezone: str = "UTC"
    action: Action | None = None
    pool: PoolName = "default"
    timeout_seconds: TimeoutSeconds = 300.0
    expires_after_seconds: ExpirySeconds = 300.0
    grace_seconds: GraceSeconds = 60.0
    enabled: bool = True
    description: PlainText = ""
    # How many failed runs in a row make the job ``failing`` (and alert); 1: the first failure.
    failure_threshold: Annotated[int, Field(ge=1, le=MAX_FAILURE_THRESHOLD)] = 1
    # Free-form values handed to every run (a python function's context, a shell job's
    # CRONFLEET_CONTEXT), as cron-manager passes its ``context`` JSON.
    context: JobContext | None = None
    # A failed (or timed-out) run is tried again this many times, each retry its own run with its
    # attempt number, after ``retry_backoff`` doubled at each retry, at most ``retry_max_delay``.
    retries: Annotated[int, Field(ge=0, le=MAX_ATTEMPTS - 1)] = 0
    retry_backoff: str = "10s"
    retry_max_delay: str = "5m"
    # A run whose worker died: tried again as a new attempt (``retry``) or not (``fail``); unset,
    # its trigger runs again as a redelivery of the same attempt.
    on_lost: Literal["retry", "fail"] | None = None
    # Overlap policy (fields kept together): what a fire does while a run of the job is in
    # flight on any worker: ``allow`` (run anyway; the default), ``skip`` (record a ``skipped``
    # run naming the run in flight) or ``queue`` (wait for it). ``exclusive = true`` is the
    # older name of ``queue``, ``false`` of ``allow`` (with ``overlap`` set too, they must
    # agree). Under ``skip`` and ``queue`` a run holds the job's lease, which outlives a dead
    # worker by ``exclusive_ttl`` (default: the claim lease, ``CRONFLEET_CLAIM_LEASE_SECONDS``).
    # None: not set, i.e. ``allow`` unless ``exclusive``; kept apart from ``allow`` so that a
    # stored job's fingerprint stays the same.
    overlap: Literal["allow", "skip", "queue"] | None = None
    exclusive: bool = False
    exclusive_ttl: str | None = None
    # --- Scheduling policies (docs/scheduling.md): a fire goes out at its instant plus a stable
    # offset in [0, jitter); after downtime, the fires missed are skipped, fired once, or all
    # fired (those within ``catchup``, at most ``MAX_CATCHUP_FIRES``).
    jitter: str | None = None
    misfire: Literal["skip", "once", "all"] = "once"
    catchup: str | None = None

    @field_validator("exclusive")
    @classmethod
    def _exclusive_agrees_with_overlap(cls, value: bool, info: ValidationInfo) -> bool:
        # Runs only for an ``exclusive`` the job sets (``overlap`` is declared, so read, first).
        overlap = info.data.get("overlap")
        if overlap is not None and overlap != (Overlap.QUEUE if value else Overlap.ALLOW):
            raise ValueError(
                f'exclusive = {str(value).lower()} contradicts overlap = "{overlap}" '
                '(exclusive = true is the older name of overlap = "queue"; keep overlap)'
            )
        return value

    @field_validator("retry_backoff", "retry_max_delay", "exclusive_ttl")
    @classmethod
    def _valid_duration(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        seconds = parse_duration(value).total_seconds()
        if seconds > MAX_RETRY_DELAY_SECONDS:
            raise ValueError(f"{value!r} is longer than a day (at most 24h)")
        if info.field_name == "retry_max_delay" and "retry_backoff" in info.data:
            backoff = parse_duration(info.data["retry_backoff"]).total_seconds()
            if seconds < backoff:
                raise ValueError(f"{value!r} is shorter than retry_backoff ({info.data['retry_backoff']!r})")
        return value

    @field_validator("schedule")
    @classmethod
    def _valid_schedule(cls, value: str | None, info: ValidationInfo) -> str | None:
        if "every" not in info.data:
            return value  # ``every`` is invalid: that is the problem to report
        if value is None and info.data["every"] is None:
            # Reported as a missing field, so that a misspelt ``schedule`` gets its "did you mean".
            raise PydanticCustomError("missing", "a job needs a schedule (cron) or every (an interval)")
        if value is not None and info.data["every"] is not None:
            raise ValueError("give a schedule (cron) or every (an interval), not both")
        return None if value is None else parse_schedule(value).text

    @field_validator("every")
    @classmethod
    def _valid_every(cls, value: str | None) -> str | None:
        if value is not None:
            parse_interval(value)
        return value

    @field_validator("jitter")
    @classmethod
    def _valid_jitter(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        seconds = parse_duration(value).total_seconds()
        if seconds > MAX_JITTER_SECONDS:
            raise ValueError(f"{value!r} is longer than a day (at most 24h)")
        every = info.data.get("every")
        if every is not None and seconds > parse_interval(every):
            raise ValueError(f"{value!r} is longer than the interval (every = {every!r})")
        return value

    @field_validator("catchup")
    @classmethod
    def _valid_catchup(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if parse_duration(value).total_seconds() > MAX_CATCHUP_SECONDS:
            raise ValueError(f"{value!r} is longer than a week (at most 7d)")
        if info.data.get("misfire") == "skip":
            raise ValueError("catchup has no meaning with misfire = 'skip'")
        return value

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, value: str) -> str:
        parse_timezone(value)
        return value

    def trigger_at(
        self,
        scheduled_at: datetime,
        published_at: datetime,
        *,
        manual: bool = False,
        expires_from: datetime | None = None,
    ) -> Trigger:
        """The trigger of this job's fire at ``scheduled_at``. It expires ``expires_after_seconds``
        after the fire was meant to go out (its instant plus its jitter offset), or after
        ``expires_from`` (a fire caught up after downtime goes out late on purpose). Raises
        ValueError without an action."""
        if self.action is None:
            raise ValueError(f"job {self.name!r} has no action: it only receives heartbeats")
        if expires_from is None:
            expires_from = scheduled_at if manual else self.publish_at(scheduled_at)
        return Trigger(
            id=trigger_id(self.name, scheduled_at),
            job=self.name,
            pool=self.pool,
            scheduled_at=scheduled_at,
            published_at=published_at,
            expires_at=expires_from + timedelta(seconds=self.expires_after_seconds),
            timeout_seconds=self.timeout_seconds,
            action=self.action,
            manual=manual,
            context=self.context,
            retry=self.retry_policy(),
            # ``queue`` goes as ``exclusive``, which workers from before ``overlap`` also run.
            overlap=Overlap.SKIP if self.overlap_policy() is Overlap.SKIP else None,
            exclusive=self.overlap_policy() is Overlap.QUEUE,
            exclusive_ttl_seconds=self.exclusive_ttl_seconds(),
        )

    def retry_policy(self) -> RetryPolicy | None:
        """What the job's triggers say about retries; None when the job sets none of it."""
        if self.retries == 0 and self.on_lost is None:
            return None
        return RetryPolicy(
            retries=self.retries,
            backoff_seconds=parse_duration(self.retry_backoff).total_seconds(),
            max_delay_seconds=parse_duration(self.retry_max_delay).total_seconds(),
            on_lost=None if self.on_lost is None else OnLost(self.on_lost),
        )

    def overlap_policy(self) -> Overlap:
        """What a fire of this job does while another run of it is in flight."""
        if self.overlap is not None:
            return Overlap(self.overlap)
        return Overlap.QUEUE if self.exclusive else Overlap.ALLOW

    def exclusive_ttl_seconds(self) -> float | None:
        """The lease of the job's runs in seconds under ``skip`` or ``queue``; None for the
        worker's claim lease (or when runs may overlap)."""
        if self.overlap_policy() is Overlap.ALLOW or self.exclusive_ttl is None:
            return None
        return parse_duration(self.exclusive_ttl).total_seconds()

    def next_fire(self, after: datetime) -> datetime:
        """The job's first scheduled instant strictly after ``after`` (aware), in UTC, from its
        cron schedule or its interval. Raises ValueError when there is none."""
        if self.every is not None:
            return next_interval_fire(parse_interval(self.every), after)
        if self.schedule is None:  # never: validation requires one of the two
            raise ValueError(f"job {self.name!r} has neither a schedule nor an interval")
        return cron_next_fire(self.schedule, self.zone(), after)

    def schedule_text(self) -> str:
        """When the job fires, as its owner wrote it: the cron schedule, or ``every 45s``."""
        return f"every {self.every}" if self.every is not None else str(self.schedule)

    def jitter_seconds(self) -> float:
        """The job's jitter window in seconds (0 without jitter)."""
        return 0.0 if self.jitter is None else parse_duration(self.jitter).total_seconds()

    def publish_at(self, scheduled_at: datetime) -> datetime:
        """When the fire scheduled at ``scheduled_at`` goes out: that instant plus the job's stable
        jitter offset (``common.jitter``); the instant itself without jitter."""
        if self.jitter is None:
            return scheduled_at
        return scheduled_at + jitter_offset(self.name, scheduled_at, self.jitter_seconds())

    def catchup_seconds(self) -> float | None:
        """How far back fires missed during downtime are caught up: the job's ``catchup``; for
        ``misfire = "all"`` without one, ``DEFAULT_CATCHUP_SECONDS``; None for no limit."""
        if self.catchup is not None:
            return parse_duration(self.catchup).total_seconds()
        return DEFAULT_CATCHUP_SECONDS if self.misfire == "all" else None

    def zone(self) -> ZoneInfo:
        """The job's time zone."""
        return parse_timezone(self.timezone)

    def canonical_json(self) -> bytes:
        """The spec as stable JSON bytes: equal specs give equal bytes. A field added after specs
        were first stored is left out at its default, so a stored job's fingerprint stays the
        same when cronfleet learns a new field."""
        data = self.model_dump(mode="json", exclude=set(_UNLESS_SET & self._at_default()))
        return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)

    def _at_default(self) -> set[str]:
        return {name for name in _UNLESS_SET if getattr(self, name) == JobSpec.model_fields[name].default}

    def fingerprint(self) -> str:
        """A short hash of ``canonical_json``, to tell a changed job from an unchanged one."""
        return fingerprint_of(self.canonical_json())


def fingerprint_of(canonical: bytes) -> str:
    """The fingerprint of a spec whose ``canonical_json`` is ``canonical`` (``JobSpec.fingerprint``)."""
    return hashlib.sha256(canonical).hexdigest()[:16]


# Fields left out of ``canonical_json`` (and so of the fingerprint) at their default.
_UNLESS_SET = frozenset(
    {
        "failure_threshold",
        "retries",
        "retry_backoff",
        "retry_max_delay",
        "on_lost",
        "overlap",
        "exclusive",
        "exclusive_ttl",
        "context",
        "schedule",
        "every",
        "jitter",
        "misfire",
        "catchup",
    }
)


def load_jobs_file(path: Path) -> list[JobSpec]:
    """Read and validate every job of a TOML jobs file; all of them or none.

    Raises JobFileError, one line: ``FILE:LINE: job 'NAME', field FIELD: reason``, or
    ``FILE:LINE:COL: reason`` where the text itself is at fault (not UTF-8, not TOML).
    """
    source = str(path)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_JOBS_FILE_BYTES + 1)
    except OSError as exc:
        raise JobFileError(_one_line(f"{source}: cannot read: {exc.strerror or exc}")) from exc
    if len(data) > MAX_JOBS_FILE_BYTES:
        line = data[:MAX_JOBS_FILE_BYTES].count(b"\n") + 1
        raise JobFileError(
            _one_line(f"{source}:{line}: the file is larger than {MAX_JOBS_FILE_BYTES // 2**20} MiB")
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise JobFileError(
            _one_line(f"{source}:{line}:{column}: not UTF-8 text (byte 0x{data[exc.start]:02x})")
        ) from exc
    return parse_jobs(text, source)


def parse_jobs(text: str, source: str = "<jobs>") -> list[JobSpec]:
    """Validate the jobs of a TOML document. See ``load_jobs_file``. An empty document (or one of
    comments only) has no jobs: deciding whether that may be applied is the caller's business."""
    try:
        return _parse_jobs(text, source)
    except JobFileError as exc:
        raise JobFileError(_one_line(str(exc))) from exc.__cause__


def _parse_jobs(text: str, source: str) -> list[JobSpec]:
    document = _read_toml(text, source)
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
        if not re.fullmatch(JOB_NAME_PATTERN, name):
            raise JobFileError(
                f"{source}:{_line_of(text, ['jobs', name])}: job {name!r}, field name: "
                "use letters, digits, '-' and '_' (at most 64, starting with a letter or digit)"
            )
        if "name" in table:
            raise JobFileError(
                f"{source}:{_line_of(text, ['jobs', name, 'name'])}: job {name!r}, field name: "
                "the name is the table key, [jobs.NAME]; remove the 'name' field"
            )
        huge = _integer_beyond_64_bits(table)
        if huge is not None:
            raise JobFileError(
                f"{source}:{_line_of(text, ['jobs', name, *huge])}: job {name!r}, field {'.'.join(huge)}: "
                "integer out of range (TOML integers are 64-bit)"
            )
        try:
            # Strict: a string is never read as a number or a boolean (an integer is a good float).
            specs.append(JobSpec.model_validate({"name": name, **table}, strict=True))
        except ValidationError as exc:
            raise JobFileError(_describe(exc, text, source, name)) from exc
    return specs


def _read_toml(text: str, source: str) -> dict[str, Any]:
    """The TOML document, or JobFileError naming where it stops being TOML."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line, column = _position(str(exc), text)
        raise JobFileError(f"{source}:{line}:{column}: not valid TOML: {exc}") from exc
    except RecursionError as exc:
        raise JobFileError(f"{source}:{_deepest_line(text)}: values nested too deeply") from exc
    except ValueError as exc:
        # Python refuses to read an integer of more than 4300 digits (tomllib lets that through).
        digits = re.search(r"[0-9_]{4300,}", text)
        if digits is None:
            raise JobFileError(f"{source}:1: not valid TOML: {exc}") from exc
        line = text.count("\n", 0, digits.start()) + 1
        raise JobFileError(f"{source}:{line}: integer out of range (TOML integers are 64-bit)") from exc


def _position(message: str, text: str) -> tuple[int, int]:
    """The line and column tomllib names in ``message`` (Python 3.11 has no attributes for them)."""
    found = re.search(r"\(at line (\d+), column (\d+)\)$", message)
    if found:
        return int(found.group(1)), int(found.group(2))
    lines = text.split("\n")  # "at end of document"
    return len(lines), len(lines[-1]) + 1


def _deepest_line(text: str) -> int:
    """The first line where arrays and inline tables nest deepest (strings and comments skipped)."""
    depth, deepest, line, best = 0, 0, 1, 1
    quote: str | None = None
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\n":
            line += 1
        if quote is not None:
            if char == "\\" and quote[0] == '"':
                index += 1
                line += text.startswith("\n", index)
            elif text.startswith(quote, index):
                index += len(quote) - 1
                quote = None
        elif char == "#":
            newline = text.find("\n", index)
            index = (len(text) if newline < 0 else newline) - 1
        elif char in "\"'":
            quote = char * 3 if text.startswith(char * 3, index) else char
            index += len(quote) - 1
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest, best = depth, line
        elif char in "]}":
            depth = max(0, depth - 1)
        index += 1
    return best


def _integer_beyond_64_bits(table: dict[str, Any]) -> list[str] | None:
    """The key path of the first integer in ``table`` that does not fit in 64 bits, if any."""
    stack: list[tuple[list[str], Any]] = [([], table)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
            return path
        if isinstance(value, dict):
            stack.extend(([*path, str(k)], v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend(([*path, str(i)], v) for i, v in reversed(list(enumerate(value))))
    return None


def _one_line(message: str) -> str:
    """``message`` with any character that could break a line or a terminal escaped, shortened."""
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    return escaped if len(escaped) <= _MAX_MESSAGE else escaped[: _MAX_MESSAGE - 3] + "..."


_MAX_MESSAGE = 1000


class InvalidJob(ValueError):
    """A job given as a mapping (``validate_job``) that is refused: the field at fault (dotted,
    ``None`` for the whole) and why, in one line."""

    def __init__(self, field: str | None, detail: str) -> None:
        super().__init__(f"field {field or '?'}: {detail}")
        self.field = field
        self.detail = _one_line(detail)


def validate_job(data: Any) -> JobSpec:
    """A job from a JSON-like mapping of the jobs-file fields plus ``name``, validated exactly as
    ``apply`` validates a job of the file (strict values, the same bounds). Raises InvalidJob."""
    if not isinstance(data, dict):
        raise InvalidJob(None, "a job is an object of its fields")
    name = data.get("name")
    if not isinstance(name, str) or not re.fullmatch(JOB_NAME_PATTERN, name):
        raise InvalidJob(
            "name", "use letters, digits, '-' and '_' (at most 64, starting with a letter or digit)"
        )
    huge = _integer_beyond_64_bits(data)
    if huge is not None:
        raise InvalidJob(".".join(huge), "integer out of range (64-bit integers only)")
    try:
        return JobSpec.model_validate(data, strict=True)
    except ValidationError as exc:
        path, message = _first_problem(exc)
        raise InvalidJob(".".join(path) or None, message) from exc
    except RecursionError as exc:
        raise InvalidJob(None, "values nested too deeply") from exc


def _first_problem(exc: ValidationError) -> tuple[list[str], str]:
    """The field path and the reason of the error to report first (an unknown field before the
    "missing" one it usually causes), with how many more problems there are."""
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
    elif error["type"] == "missing" and message == "Field required":
        message = "required field is missing"
    more = len(errors) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return path, message + suffix


def _describe(exc: ValidationError, text: str, source: str, job: str) -> str:
    path, message = _first_problem(exc)
    line = _line_of(text, ["jobs", job, *path])
    return f"{source}:{line}: job {job!r}, field {'.'.join(path) or '?'}: {message}"


def _field_path(loc: tuple[int | str, ...]) -> list[str]:
    # A discriminated union puts the chosen variant ("shell") in the path, and a bad dict key
    # adds "[key]": neither is a key of the file.
    return [str(part) or '""' for part in loc if part not in ("shell", "http", "[key]")]


def _line_of(text: str, path: Sequence[str]) -> int:
    """The line that defines the deepest part of the dotted key ``path`` (1-based).

    TOML parsers give no positions for values, so this follows table headers and keys
    (dotted keys and inline tables included) and keeps the line that matches most of ``path``.
    """
    table: list[str] = []
    best_line, best_depth = 1, 0
    for number, line in enumerate(text.split("\n"), start=1):
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


# Possessive quantifiers keep these linear: a long line of spaces (in a multi-line string) must
# not cost quadratic time.
_HEADER = re.compile(r"^\s*+\[\[?+([^\]]*+)\]")
_KEY = re.compile(r"""^\s*+([A-Za-z0-9_\-."' \t]++)=""")


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
