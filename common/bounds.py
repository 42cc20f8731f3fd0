"""Every bound on what a jobs file or a message may say, in one place.

The jobs file, the wire models and the store all use these, so that a value one of them accepts
can never break another (an instant the store cannot hold, a timeout that overflows a timer, an
argument the kernel refuses).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from pydantic import AfterValidator, AwareDatetime, Field, JsonValue

# Instants: far enough on both sides for any real schedule, well inside what datetime, every
# driver and every timer can hold after adding the longest duration below.
EARLIEST_INSTANT = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_INSTANT = datetime(2200, 1, 1, tzinfo=UTC)

DAY_SECONDS = 24 * 3600
MAX_TIMEOUT_SECONDS = 7 * DAY_SECONDS
MAX_GRACE_SECONDS = 365 * DAY_SECONDS
MAX_EXPIRY_SECONDS = 365 * DAY_SECONDS

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# Linux refuses a single argument or environment string longer than MAX_ARG_STRLEN (32 pages,
# 131,072 bytes with its terminating NUL); all of them together must stay well under ARG_MAX.
MAX_ARGUMENT_BYTES = 131_071
MAX_COMMAND_BYTES = 512 * 1024
MAX_ARGV_ITEMS = 4096

MAX_NAME_LENGTH = 64
MAX_TEXT_LENGTH = 4096  # output tails, errors, heartbeat messages, descriptions
MAX_MESSAGE_BYTES = 1024 * 1024  # a whole message body on the wire
MAX_JOBS_FILE_BYTES = 64 * 1024 * 1024


def _within_range(moment: datetime) -> datetime:
    # Compare before converting: converting 0001-01-01T00:00:00+14:00 to UTC overflows, and an
    # OverflowError is not a validation error (it went through every parser and stopped the monitor).
    if not EARLIEST_INSTANT <= moment < LATEST_INSTANT:
        raise ValueError(
            f"instant must be between {EARLIEST_INSTANT.year} and {LATEST_INSTANT.year}, not {moment.year}"
        )
    return moment.astimezone(UTC)


# Any offset is accepted on the wire; inside, every instant is UTC and within range.
Instant = Annotated[AwareDatetime, AfterValidator(_within_range)]

Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
ExitCode = Annotated[int, Field(ge=-255, le=255)]  # negative: killed by that signal
HttpStatus = Annotated[int, Field(ge=100, le=599)]


def _no_nul(text: str) -> str:
    if "\x00" in text:
        raise ValueError("must not contain a NUL character")
    return text


# Text that reaches a C API or a database (argv, paths, names): never a NUL.
CleanText = Annotated[str, AfterValidator(_no_nul)]
BoundedText = Annotated[str, Field(max_length=MAX_TEXT_LENGTH), AfterValidator(_no_nul)]


# -- the jobs file: schedules, zones and actions ------------------------------------------------

MAX_SCHEDULE_LENGTH = 1024  # a cron expression (lists of every minute and second fit easily)
MAX_TIMEZONE_LENGTH = 64  # IANA names are at most about 32 characters
MAX_PATH_BYTES = 4095  # PATH_MAX, with its terminating NUL
MAX_URL_LENGTH = 2083  # what pydantic's HttpUrl (and old browsers) allow
MAX_CODES = 256  # success exit codes or expected HTTP statuses of one action
MAX_HTTP_HEADER_BYTES = 64 * 1024  # all of an http action's header names and values together
# An action's JSON (its body, argv, env...) travels inside every trigger: with the trigger's other
# fields it must stay within MAX_MESSAGE_BYTES, however much JSON escaping makes it grow.
MAX_ACTION_JSON_BYTES = 768 * 1024

ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"  # POSIX: what a shell can name; never '='
HTTP_HEADER_NAME_PATTERN = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$"  # an RFC 9110 token


# Durations of the jobs file: finite, positive (a grace may be 0) and bounded, so that any instant
# plus any of them is still an instant every process can hold.
TimeoutSeconds = Annotated[float, Field(gt=0, le=MAX_TIMEOUT_SECONDS, allow_inf_nan=False)]
GraceSeconds = Annotated[float, Field(ge=0, le=MAX_GRACE_SECONDS, allow_inf_nan=False)]
ExpirySeconds = Annotated[float, Field(gt=0, le=MAX_EXPIRY_SECONDS, allow_inf_nan=False)]


def utf8_size(text: str) -> int:
    """How many bytes ``text`` takes in UTF-8. Raises ValueError when it holds a lone surrogate,
    which no file, JSON body or C API can carry."""
    try:
        return len(text.encode())
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from exc


def _encodable(text: str) -> str:
    utf8_size(text)
    return text


# Text a person wrote in a jobs file (a description): bounded, no NUL, valid Unicode.
PlainText = Annotated[
    str, Field(max_length=MAX_TEXT_LENGTH), AfterValidator(_no_nul), AfterValidator(_encodable)
]


# A job's free-form ``context`` table (carried in each trigger) and a python action's return value
# (carried in ``run.finished`` and stored on the run): JSON objects and values of bounded size.
MAX_CONTEXT_BYTES = 16 * 1024
MAX_RESULT_BYTES = 16 * 1024


def json_size(value: object) -> int:
    """How many bytes ``value`` takes as compact JSON. Raises ValueError when it is not JSON
    (a NaN, a lone surrogate, an integer beyond 64 bits, a type JSON has no word for)."""
    try:
        return len(orjson.dumps(value))
    except (orjson.JSONEncodeError, TypeError) as exc:
        raise ValueError(f"must be JSON ({exc})") from exc


def size_within(
    limit: int, what: str, size: Callable[[Any], int] = utf8_size, measured: str = ""
) -> AfterValidator:
    """A validator refusing a value whose ``size`` (by default: UTF-8 bytes of a text) is over
    ``limit``, saying ``<what> is N bytes<measured>; at most LIMIT bytes``."""

    def check(value: Any) -> Any:
        found = size(value)
        if found > limit:
            raise ValueError(f"{what} is {found} bytes{measured}; at most {limit} bytes")
        return value

    return AfterValidator(check)


JobContext = Annotated[
    dict[str, JsonValue], size_within(MAX_CONTEXT_BYTES, "the context", json_size, " as JSON")
]
RunResult = Annotated[JsonValue, size_within(MAX_RESULT_BYTES, "the result", json_size, " as JSON")]
