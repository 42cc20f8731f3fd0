"""The channels file: where alerts can go, which job's alerts go where, and how hard to try.

A TOML file (``docs/alerts.md`` has a full one)::

    [channels.ops-slack]
    type = "slack"
    url = "https://hooks.slack.com/services/T000/B000/XXXX"

    [channels.ops-email]
    type = "email"
    host = "smtp.example.com"
    username = "cronfleet"
    password = "..."
    sender = "cronfleet@example.com"
    to = ["ops@example.com"]

    [routes]
    default = ["ops-slack"]

    [routes.jobs]
    backup = ["ops-email", "ops-slack"]

    [delivery]
    attempts = 6

Every secret (URLs, webhook secrets, header values, SMTP credentials) is a ``SecretStr``: no
``repr``, ``model_dump`` or error message shows it. The environment overrides any field of a
channel, or defines a whole one: ``CRONFLEET_CHANNEL_<NAME>_<FIELD>`` (``NAME`` upper-cased, ``-``
as ``_``; ``FIELD`` one of ``ENV_FIELDS``, ``TO`` comma-separated), and
``CRONFLEET_ALERTS_DEFAULT_ROUTE=a,b`` replaces the default route. A channel called ``log`` always
exists (the log channel) unless the file defines its own.

A bad file or variable raises ConfigError in one line, as a bad jobs file does::

    channels.toml:7: channel 'ops-slack', field url: an http:// or https:// URL with a host
    environment CRONFLEET_CHANNEL_OPS_EMAIL_PORT: channel 'ops-email', field port: not an integer
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from common.actions import HeaderName
from common.bounds import MAX_URL_LENGTH
from common.errors import ConfigError, JobFileError
from common.jobs import _line_of, _one_line, _read_toml
from common.messages import JOB_NAME_PATTERN
from common.webhooks import ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, webhook_key
from monitor.channels.log import Level
from monitor.channels.policy import LOG_CHANNEL, ChannelName, RetryPolicy, Routes

ENV_PREFIX = "CRONFLEET_CHANNEL_"
DEFAULT_ROUTE_VARIABLE = "CRONFLEET_ALERTS_DEFAULT_ROUTE"
MAX_FILE_BYTES = 1 << 20
_HEADER_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?)?")
_EMAIL = r"[^@\s<>,;:\"()\[\]\\]{1,64}@[A-Za-z0-9.-]{1,253}"
_HOST = r"[A-Za-z0-9.:\[\]-]{1,253}"


def _http_url(value: SecretStr) -> SecretStr:
    text = value.get_secret_value()
    if len(text) > MAX_URL_LENGTH:
        raise ValueError(f"the URL is {len(text)} characters; at most {MAX_URL_LENGTH}")
    if any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError("a URL has no spaces or control characters")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 (a bad port raises here)
    except ValueError:
        raise ValueError("not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("an http:// or https:// URL with a host")
    return value


def _webhook_secret(value: SecretStr) -> SecretStr:
    webhook_key(value.get_secret_value())
    return value


def _header_value(value: SecretStr) -> SecretStr:
    if not _HEADER_VALUE.fullmatch(value.get_secret_value()):
        raise ValueError("an HTTP header value is printable ASCII without leading or trailing spaces")
    return value


SecretUrl = Annotated[SecretStr, AfterValidator(_http_url)]
WebhookSecret = Annotated[SecretStr, AfterValidator(_webhook_secret)]
HeaderValue = Annotated[SecretStr, AfterValidator(_header_value)]


def _matches(pattern: str, what: str) -> AfterValidator:
    def check(text: str) -> str:
        if not re.fullmatch(pattern, text):
            raise ValueError(f"not {what}")
        return text

    return AfterValidator(check)


EmailAddress = Annotated[str, _matches(_EMAIL, "an email address (name@example.com)")]
HostName = Annotated[str, _matches(_HOST, "a host name or IP address")]
Timeout = Annotated[float, Field(gt=0, le=300)]


class _Channel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_seconds: Timeout = 10.0


def _url_target(url: SecretStr) -> str:
    parts = urlsplit(url.get_secret_value())
    return f"{parts.scheme}://{parts.hostname}/..."


class WebhookSettings(_Channel):
    """POST the alert as JSON to ``url``, signed with ``secret`` (``whsec_<base64>``)."""

    type: Literal["webhook"]
    url: SecretUrl
    secret: WebhookSecret
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict, max_length=50)
    # Alerts per POST; above 1, every POST is a group (``cronfleet.alerts``), even of one.
    group: int = Field(default=1, ge=1, le=1000)

    @field_validator("headers")
    @classmethod
    def _own_headers(cls, headers: dict[str, SecretStr]) -> dict[str, SecretStr]:
        taken = {ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER, "content-type"}
        for name in headers:
            if name.lower() in taken:
                raise ValueError(f"header {name!r} is set by cronfleet itself; remove it")
        return headers

    def target(self) -> str:
        """Where it sends, without the secret parts."""
        return _url_target(self.url)


class SlackSettings(_Channel):
    """A Slack incoming webhook (the URL is the secret)."""

    type: Literal["slack"]
    url: SecretUrl
    group: int = Field(default=20, ge=1, le=45)  # alerts per message

    def target(self) -> str:
        """Where it sends, without the secret parts."""
        return _url_target(self.url)


class DiscordSettings(_Channel):
    """A Discord channel webhook (the URL is the secret)."""

    type: Literal["discord"]
    url: SecretUrl
    group: int = Field(default=10, ge=1, le=10)  # alerts per message (one embed each)

    def target(self) -> str:
        """Where it sends, without the secret parts."""
        return _url_target(self.url)


class EmailSettings(_Channel):
    """Mail through an SMTP server, with STARTTLS (587) or TLS (465), and AUTH when a username
    is set. ``ca_file``: the authorities to trust instead of the system's (a private relay)."""

    type: Literal["email"]
    host: HostName
    port: int = Field(default=587, ge=1, le=65535)
    security: Literal["starttls", "tls"] = "starttls"
    username: SecretStr | None = None
    password: SecretStr | None = None
    sender: EmailAddress
    to: list[EmailAddress] = Field(min_length=1, max_length=100)
    ca_file: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = None
    timeout_seconds: Timeout = 30.0
    group: int = Field(default=50, ge=1, le=500)  # alerts per message

    @model_validator(mode="after")
    def _both_credentials(self) -> EmailSettings:
        if (self.username is None) != (self.password is None):
            raise ValueError("set both username and password, or neither")
        return self

    def target(self) -> str:
        """Where it sends (server and recipients; never the credentials)."""
        return f"smtp {self.host}:{self.port} ({self.security}) to {', '.join(self.to)}"


class LogSettings(_Channel):
    """One line per alert in the monitor's log."""

    type: Literal["log"]
    level: Level = "warning"
    group: int = Field(default=100, ge=1, le=1000)  # alerts taken at once (one line each)

    def target(self) -> str:
        """Where it writes."""
        return "the cronfleet.alerts logger"


ChannelSettings = Annotated[
    WebhookSettings | SlackSettings | DiscordSettings | EmailSettings | LogSettings,
    Field(discriminator="type"),
]
CHANNEL_TYPES = ("webhook", "slack", "discord", "email", "log")
_CHANNEL = TypeAdapter[ChannelSettings](ChannelSettings)

# The fields the environment may set, and how its text becomes a value.
ENV_FIELDS: dict[str, Callable[[str], Any]] = {
    "type": str,
    "url": str,
    "secret": str,
    "host": str,
    "port": int,
    "security": str,
    "username": str,
    "password": str,
    "sender": str,
    "to": lambda text: [part.strip() for part in text.split(",") if part.strip()],
    "ca_file": str,
    "timeout_seconds": float,
    "level": str,
    "group": int,
}


class ChannelsConfig(BaseModel):
    """Every channel by name, the routes (each name in them is a channel) and the retry policy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: dict[ChannelName, ChannelSettings]
    routes: Routes = Field(default_factory=Routes)
    delivery: RetryPolicy = Field(default_factory=RetryPolicy)

    def describe(self) -> list[dict[str, str]]:
        """One row per channel (name, type, target), safe to print: no secret in it."""
        return [
            {"name": name, "type": settings.type, "target": settings.target()}
            for name, settings in sorted(self.channels.items())
        ]


def load_channels(path: Path | None, environ: Mapping[str, str]) -> ChannelsConfig:
    """The channels of the file at ``path`` (None: no file) with the environment's overrides.

    Raises ConfigError, one line: ``FILE:LINE: channel 'NAME', field FIELD: reason``,
    ``environment VARIABLE: ...`` or ``FILE:LINE:COL: reason`` for text that is not TOML.
    """
    if path is None:
        return parse_channels("", "<no channels file>", environ)
    source = str(path)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(_one_line(f"{source}: cannot read: {exc.strerror or exc}")) from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{source}: the file is larger than {MAX_FILE_BYTES >> 20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{source}:{line}: not UTF-8 text") from None
    return parse_channels(text, source, environ)


def parse_channels(
    text: str, source: str = "<channels>", environ: Mapping[str, str] | None = None
) -> ChannelsConfig:
    """Validate a channels document and the environment's overrides. See ``load_channels``."""
    try:
        return _parse(text, source, environ or {})
    except ConfigError as exc:
        raise ConfigError(_one_line(str(exc))) from None


def _parse(text: str, source: str, environ: Mapping[str, str]) -> ChannelsConfig:
    try:
        document = _read_toml(text, source)
    except JobFileError as exc:
        raise ConfigError(str(exc)) from None
    unknown = sorted(set(document) - {"channels", "routes", "delivery"})
    if unknown:
        raise ConfigError(
            f"{source}:{_line_of(text, [unknown[0]])}: unknown top-level key {unknown[0]!r}; "
            "use [channels.NAME], [routes] and [delivery]"
        )
    tables = _table(document, "channels", text, source)
    channels: dict[str, dict[str, Any]] = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(
                f"{source}:{_line_of(text, ['channels', name])}: channel {name!r} must be a table"
            )
        if not re.fullmatch(JOB_NAME_PATTERN, name):
            raise ConfigError(
                f"{source}:{_line_of(text, ['channels', name])}: channel {name!r}: use letters, digits, "
                "'-' and '_' (at most 64, starting with a letter or digit)"
            )
        channels[name] = dict(table)
    from_env = _apply_environment(channels, environ, source)
    settings: dict[str, Any] = {}
    for name, table in channels.items():
        try:
            settings[name] = _CHANNEL.validate_python(table, strict=True)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, name, text, source, from_env)) from None
    settings.setdefault(LOG_CHANNEL, LogSettings(type="log"))
    routes = _routes(document, text, source, environ)
    _check_routes(routes, settings, text, source, environ)
    delivery = _table(document, "delivery", text, source)
    try:
        policy = RetryPolicy.model_validate(delivery, strict=True)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        path = _field_path(error["loc"])
        raise ConfigError(
            f"{source}:{_line_of(text, ['delivery', *path])}: delivery, field {'.'.join(path) or '?'}: "
            f"{_message(error)}"
        ) from None
    return ChannelsConfig(channels=settings, routes=routes, delivery=policy)


def _table(document: dict[str, Any], key: str, text: str, source: str) -> dict[str, Any]:
    value = document.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{source}:{_line_of(text, [key])}: {key!r} must be a table")
    return value


def env_key(name: str) -> str:
    """How channel ``name`` is spelt in environment variable names: ``ops-slack`` -> ``OPS_SLACK``."""
    return name.upper().replace("-", "_")


def _apply_environment(
    channels: dict[str, dict[str, Any]], environ: Mapping[str, str], source: str
) -> dict[tuple[str, str], str]:
    """Set the fields the environment gives over the file's; return which variable set which
    (channel, field). A variable naming no channel of the file defines one when it has a TYPE."""
    by_key: dict[str, list[str]] = {}
    for name in channels:
        by_key.setdefault(env_key(name), []).append(name)
    found: dict[str, dict[str, tuple[str, str]]] = {}
    for variable in sorted(environ):
        upper = variable.upper()
        if not upper.startswith(ENV_PREFIX):
            continue
        rest = upper[len(ENV_PREFIX) :]
        field = next(
            (f for f in sorted(ENV_FIELDS, key=len, reverse=True) if rest.endswith("_" + f.upper())), None
        )
        if field is None or len(rest) == len(field) + 1:
            raise ConfigError(
                f"environment {variable}: not CRONFLEET_CHANNEL_<NAME>_<FIELD> with FIELD one of "
                f"{', '.join(f.upper() for f in ENV_FIELDS)}"
            )
        found.setdefault(rest[: -len(field) - 1], {})[field] = (variable, environ[variable])
    origin: dict[tuple[str, str], str] = {}
    for key, fields in found.items():
        names = by_key.get(key, [])
        if len(names) > 1:
            variable = next(iter(fields.values()))[0]
            raise ConfigError(
                f"environment {variable}: channels {' and '.join(map(repr, names))} are both "
                f"{key} in variable names; rename one"
            )
        if names:
            name = names[0]
        elif "type" in fields:
            name = key.lower()
            if not re.fullmatch(JOB_NAME_PATTERN, name):
                raise ConfigError(f"environment {fields['type'][0]}: {name!r} is not a channel name")
            channels[name] = {}
        else:
            variable = next(iter(fields.values()))[0]
            raise ConfigError(
                f"environment {variable}: no channel {key.lower()!r} in {source}; "
                f"set {ENV_PREFIX}{key}_TYPE to define it in the environment"
            )
        for field, (variable, raw) in fields.items():
            try:
                channels[name][field] = ENV_FIELDS[field](raw)
            except ValueError:
                kind = "an integer" if field == "port" else "a number"
                raise ConfigError(
                    f"environment {variable}: channel {name!r}, field {field}: not {kind}"
                ) from None
            origin[(name, field)] = variable
    return origin


def _describe(
    exc: ValidationError, name: str, text: str, source: str, from_env: Mapping[tuple[str, str], str]
) -> str:
    errors = exc.errors(include_url=False)
    errors.sort(key=lambda e: e["type"] != "extra_forbidden")
    error = errors[0]
    path = _field_path(error["loc"])
    if error["type"] in ("union_tag_not_found", "union_tag_invalid"):
        path = ["type"]
    message = _message(error)
    variable = from_env.get((name, path[0])) if path else None
    where = f"environment {variable}" if variable else f"{source}:{_line_of(text, ['channels', name, *path])}"
    more = len(errors) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    field = f", field {'.'.join(path)}" if path else ""
    return f"{where}: channel {name!r}{field}: {message}{suffix}"


def _message(error: Any) -> str:
    """The reason of one pydantic error, never quoting the value (it may be a secret)."""
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    if kind in ("union_tag_not_found", "union_tag_invalid"):
        return f"type must be one of {', '.join(CHANNEL_TYPES)}"
    return str(error["msg"]).removeprefix("Value error, ")


def _field_path(loc: tuple[int | str, ...]) -> list[str]:
    # A discriminated union puts the chosen variant ("slack") first in the path, and a bad
    # dict key adds "[key]": neither is a key of the file.
    parts = list(loc)
    if parts and parts[0] in CHANNEL_TYPES:
        parts = parts[1:]
    return [str(part) for part in parts if part != "[key]"]


def _routes(document: dict[str, Any], text: str, source: str, environ: Mapping[str, str]) -> Routes:
    table = dict(_table(document, "routes", text, source))
    override = next((environ[v] for v in environ if v.upper() == DEFAULT_ROUTE_VARIABLE), None)
    if override is not None:
        table["default"] = [part.strip() for part in override.split(",") if part.strip()]
    try:
        return Routes.model_validate(table, strict=True)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        path = [str(part) for part in error["loc"] if part != "[key]"]
        where = (
            f"environment {DEFAULT_ROUTE_VARIABLE}"
            if override is not None and path[:1] == ["default"]
            else f"{source}:{_line_of(text, ['routes', *path])}"
        )
        reason = _message(error)
        if error["type"] == "string_pattern_mismatch":
            reason = "a channel name: letters, digits, '-' and '_'"
        raise ConfigError(f"{where}: routes.{'.'.join(path) or '?'}: {reason}") from None


def _check_routes(
    routes: Routes, channels: Mapping[str, Any], text: str, source: str, environ: Mapping[str, str]
) -> None:
    known = ", ".join(sorted(channels))
    overridden = any(v.upper() == DEFAULT_ROUTE_VARIABLE for v in environ)
    checks: list[tuple[list[str], list[str]]] = [(["default"], routes.default)]
    checks += [(["jobs", job], names) for job, names in routes.jobs.items()]
    for path, names in checks:
        for name in names:
            if name not in channels:
                where = (
                    f"environment {DEFAULT_ROUTE_VARIABLE}"
                    if overridden and path == ["default"]
                    else f"{source}:{_line_of(text, ['routes', *path])}"
                )
                raise ConfigError(
                    f"{where}: routes.{'.'.join(path)}: no channel {name!r} (channels: {known})"
                )
