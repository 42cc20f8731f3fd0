"""What a job does when it fires: the action specs carried inside a job and inside its trigger.

Workers hold the executors (``worker/actions/``); this module only describes them. Every value is
bounded (``common.bounds``) so that an action that validates can always be carried in a trigger
and handed to the kernel or the HTTP client: no NUL in a string, environment names a shell can
name, arguments within the kernel's limits, header names and values HTTP allows.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    UrlConstraints,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from common.bounds import (
    ENV_NAME_PATTERN,
    HTTP_HEADER_NAME_PATTERN,
    MAX_ACTION_JSON_BYTES,
    MAX_ARGUMENT_BYTES,
    MAX_ARGV_ITEMS,
    MAX_CODES,
    MAX_COMMAND_BYTES,
    MAX_HTTP_HEADER_BYTES,
    MAX_PATH_BYTES,
    MAX_URL_LENGTH,
    CleanText,
    ExitCode,
    HttpStatus,
    size_within,
    utf8_size,
)

# A POSIX account name, optionally with a group: what ``run_as`` takes.
RUN_AS_PATTERN = r"^[a-z_][a-z0-9_.-]{0,31}(?::[a-z_][a-z0-9_.-]{0,31})?$"
HTTP_METHODS = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# The client sets these from the body itself; a job's own value would make the request invalid.
RESERVED_HEADERS = frozenset({"content-length", "transfer-encoding"})
# Visible ASCII, with spaces or tabs only between visible characters (what h11 sends).
_HEADER_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?)?")


def _type_required(schema: dict[str, Any]) -> None:
    schema["required"] = sorted({"type", *schema.get("required", [])})


def _env_name(name: str) -> str:
    if not re.fullmatch(ENV_NAME_PATTERN, name):
        raise ValueError(
            f"{name!r} is not an environment variable name (letters, digits and '_', "
            "not starting with a digit)"
        )
    return name


def _header_name(name: str) -> str:
    if not re.fullmatch(HTTP_HEADER_NAME_PATTERN, name):
        raise ValueError(f"{name!r} is not an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)")
    if name.lower() in RESERVED_HEADERS:
        raise ValueError(f"{name!r} is set by the request itself; remove it")
    return name


def _header_value(value: str) -> str:
    if not _HEADER_VALUE.fullmatch(value):
        raise ValueError(
            "an HTTP header value is printable ASCII, without CR, LF, NUL or other control "
            "characters and without leading or trailing spaces"
        )
    return value


Argument = Annotated[
    CleanText, Field(min_length=1), size_within(MAX_ARGUMENT_BYTES, "an argument (the kernel's limit)")
]
Directory = Annotated[CleanText, Field(min_length=1), size_within(MAX_PATH_BYTES, "a path")]
EnvName = Annotated[
    str, AfterValidator(_env_name), WithJsonSchema({"type": "string", "pattern": ENV_NAME_PATTERN})
]
EnvValue = Annotated[CleanText, size_within(MAX_ARGUMENT_BYTES, "a value")]
HeaderName = Annotated[
    str,
    AfterValidator(_header_name),
    WithJsonSchema({"type": "string", "pattern": HTTP_HEADER_NAME_PATTERN}),
]
HeaderValue = Annotated[str, AfterValidator(_header_value)]
Body = Annotated[CleanText, size_within(MAX_ACTION_JSON_BYTES, "a body")]


class _Action(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_type_required)

    @model_validator(mode="after")
    def _fits_in_a_trigger(self) -> _Action:
        size = len(orjson.dumps(self.model_dump(mode="json")))
        if size > MAX_ACTION_JSON_BYTES:
            raise ValueError(
                f"the action is {size} bytes as JSON; it must fit in a trigger message "
                f"(at most {MAX_ACTION_JSON_BYTES} bytes)"
            )
        return self


class ShellAction(_Action):
    """Run a program with these arguments (no shell unless ``argv`` asks for one)."""

    type: Literal["shell"] = "shell"
    argv: list[Argument] = Field(min_length=1, max_length=MAX_ARGV_ITEMS)
    cwd: Directory | None = None
    env: dict[EnvName, EnvValue] = Field(default_factory=dict)
    success_exit_codes: list[ExitCode] = Field(
        default_factory=lambda: [0], min_length=1, max_length=MAX_CODES
    )
    # Run the program as this account (``user`` or ``user:group``): the worker must be root.
    run_as: Annotated[str, Field(pattern=RUN_AS_PATTERN)] | None = None

    @field_validator("env")
    @classmethod
    def _variables_fit(cls, env: dict[str, str]) -> dict[str, str]:
        for name, value in env.items():
            size = utf8_size(name) + 1 + utf8_size(value)
            if size > MAX_ARGUMENT_BYTES:
                raise ValueError(f"{name}=... is {size} bytes; the kernel takes at most {MAX_ARGUMENT_BYTES}")
        return env

    @model_validator(mode="after")
    def _command_fits(self) -> ShellAction:
        # What execve copies: each argument and each NAME=value with its terminating NUL.
        size = sum(utf8_size(a) + 1 for a in self.argv)
        size += sum(utf8_size(k) + utf8_size(v) + 2 for k, v in self.env.items())
        if size > MAX_COMMAND_BYTES:
            raise ValueError(f"the command (argv and env) is {size} bytes; at most {MAX_COMMAND_BYTES} bytes")
        return self


# A Standard Webhooks secret: ``whsec_`` and the key in base64 (at least 24 bytes of key).
WEBHOOK_SECRET_PATTERN = r"^whsec_[A-Za-z0-9+/]{32,}={0,2}$"
# ``module.path:function``: what ``cronfleet worker --import`` registers (``worker.functions``).
PYTHON_FUNCTION_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"


def _webhook_secret(secret: str) -> str:
    if not re.fullmatch(WEBHOOK_SECRET_PATTERN, secret):
        raise ValueError(
            "a webhook secret is 'whsec_' followed by at least 24 random bytes in base64 "
            '(make one with: python -c "import secrets, base64; '
            "print('whsec_' + base64.b64encode(secrets.token_bytes(32)).decode())\")"
        )
    try:
        base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"the webhook secret is not valid base64 ({exc})") from exc
    return secret


class HttpAction(_Action):
    """Send one HTTP request; the run succeeds when the response status is expected.

    With ``webhook_secret`` every request is signed as Standard Webhooks define it
    (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``; ``docs/actions.md``)."""

    type: Literal["http"] = "http"
    url: Annotated[HttpUrl, UrlConstraints(max_length=MAX_URL_LENGTH)]
    method: HTTP_METHODS = "GET"
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    body: Body | None = None
    expect_status: list[HttpStatus] = Field(
        default_factory=lambda: [200, 201, 202, 204], min_length=1, max_length=MAX_CODES
    )
    webhook_secret: (
        Annotated[
            str,
            AfterValidator(_webhook_secret),
            WithJsonSchema({"type": "string", "pattern": WEBHOOK_SECRET_PATTERN}),
        ]
        | None
    ) = None

    @field_validator("headers")
    @classmethod
    def _headers_fit(cls, headers: dict[str, str]) -> dict[str, str]:
        size = sum(len(k) + len(v) for k, v in headers.items())
        if size > MAX_HTTP_HEADER_BYTES:
            raise ValueError(f"the headers are {size} bytes; at most {MAX_HTTP_HEADER_BYTES} bytes")
        return headers


class PythonAction(_Action):
    """Call a Python function a worker registered (``module:function``; ``worker.functions``),
    sync in a thread or async, with the run's context; its return value is the run's result."""

    type: Literal["python"] = "python"
    function: Annotated[str, Field(pattern=PYTHON_FUNCTION_PATTERN, max_length=MAX_PATH_BYTES)]


Action = Annotated[ShellAction | HttpAction | PythonAction, Field(discriminator="type")]
# Any one action, as executors take it.
AnyAction = ShellAction | HttpAction | PythonAction
