"""Settings, read once from the environment (``CRONFLEET_*``) and passed down explicitly."""

from __future__ import annotations

import functools
import logging
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from common.durations import parse_duration
from common.errors import ConfigError
from common.signing import Keyring

log = logging.getLogger("cronfleet.keys")


def normalise_database_url(url: str) -> str:
    """Return ``url`` with an async driver: plain ``sqlite://`` and ``postgresql://`` are accepted."""
    for plain, driver in (
        ("sqlite://", "sqlite+aiosqlite://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    return url


def amqp_urls(value: str) -> list[str]:
    """The broker URLs of ``CRONFLEET_AMQP_URL``: one URL, or the nodes of a cluster separated by
    commas (``amqp://u:p@node1/,amqp://u:p@node2/``). A comma splits only where an ``amqp://``
    or ``amqps://`` URL follows it, so a password may hold one. Raises ConfigError for an empty
    entry or one that is not an AMQP URL."""
    urls = split_urls(value)
    for url in urls:
        if not _AMQP_URL.match(url) or url.endswith(","):
            raise ConfigError(
                f"CRONFLEET_AMQP_URL: {url.split('@')[-1]!r} is not an amqp:// or amqps:// URL "
                "(the nodes of a cluster are separated by single commas)"
            )
    return urls


def split_urls(value: str) -> list[str]:
    """``value`` split where an ``amqp://`` or ``amqps://`` URL follows a comma, each stripped
    (``amqp_urls`` without its checks)."""
    return [url.strip() for url in _URL_SEPARATOR.split(value.strip())]


_URL_SEPARATOR = re.compile(r",\s*(?=amqps?://)", re.IGNORECASE)
_AMQP_URL = re.compile(r"amqps?://[^\s]", re.IGNORECASE)

SETTINGS_PREFIX = "CRONFLEET_"
# Settings that may hold a password, also read from a file named by ``CRONFLEET_<NAME>_FILE``
# (Docker and Kubernetes secrets, systemd credentials), as the keys are by CRONFLEET_KEYS_FILE.
FILE_SETTINGS = ("amqp_url", "database_url")


class _SettingsFromFiles(PydanticBaseSettingsSource):
    """``CRONFLEET_AMQP_URL_FILE=/run/secrets/amqp_url``: the setting is that file's content,
    surrounding white space removed. The variable itself, when set, wins over its file."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # everything is done in __call__

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in FILE_SETTINGS:
            variable = f"{SETTINGS_PREFIX}{name.upper()}_FILE"
            path = os.environ.get(variable)
            if not path:
                continue
            try:
                values[name] = Path(path).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"cannot read {variable} {path}: {exc.strerror}") from exc
        return values


class Settings(BaseSettings):
    """Everything a cronfleet process needs to know about its surroundings."""

    model_config = SettingsConfigDict(env_prefix=SETTINGS_PREFIX, extra="ignore", frozen=True)

    # One broker URL, or the nodes of a cluster separated by commas (``amqp_urls``): each
    # (re)connection goes to the next node of the list.
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    database_url: str = "sqlite+aiosqlite:///cronfleet.db"
    database_schema: str | None = Field(default=None, pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    keys: str = Field(default="", repr=False)
    keys_file: Path | None = None
    namespace: str = Field(default="cronfleet", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    jobs_reload_seconds: float = Field(default=2.0, gt=0)
    drain_seconds: float = Field(default=25.0, ge=0)
    # Whether a worker sends the run events and heartbeats it has ready together, as one
    # ``event.batch`` (docs/protocol.md 9.8). Off: one message per event, for a monitor or broker
    # rights not yet upgraded (docs/operations.md, "Upgrading to event batches").
    event_batches: bool = True
    # How long a worker's claim on a trigger outlives its last renewal (renewed every third of
    # it while the job runs): the time a trigger left by a dead worker waits before another
    # worker runs it again. Clocks across hosts must agree to well within it.
    claim_lease_seconds: float = Field(default=30.0, ge=1, le=3600)
    # A trigger whose timeout_seconds is longer than this is acked as soon as its run.started is
    # confirmed, not when the run ends, so that RabbitMQ's consumer_timeout (30 min by default)
    # cannot take it back mid-run; its claim keeps the trigger, and its liveness is the claim's
    # lease (docs/operations.md, "Long runs"). Keep it below the broker's consumer_timeout.
    early_ack_seconds: float = Field(default=900.0, ge=0, le=7 * 24 * 3600)
    # Fleet health (docs/monitoring.md, "Fleet health"): a scheduler or worker silent for this
    # many heartbeat intervals is gone, and triggers may wait this long in a pool without a
    # consumer before the pool is down. The monitor looks at the fleet every heartbeat interval.
    fleet_missed_heartbeats: float = Field(default=3.0, ge=1.5, le=1000)
    # The dead-letter alarm ends once the queue has not grown for this long (or is emptied).
    fleet_dead_letters_quiet_seconds: float = Field(default=300.0, gt=0)
    # A worker that went down holding runs stays listed (and `cronfleet status` fails) this long.
    fleet_forget_seconds: float = Field(default=3600.0, gt=0)
    # When set (e.g. "30d"), the monitor purges finished runs, heartbeats and expired fires
    # older than this, every ``retention_check_seconds``.
    retention: str | None = None
    retention_check_seconds: float = Field(default=3600.0, gt=0, le=7 * 24 * 3600)
    # The monitor's alert channels and routes (docs/alerts.md); none: every alert goes to the log.
    channels_file: Path | None = None
    # The monitor tells every alert channel when it has not reached its store for this long
    # (and again when it is back): nothing is recorded meanwhile, so nobody else could tell.
    store_outage_alert_seconds: float = Field(default=30.0, gt=0, le=3600)
    # The programs a worker's shell actions may run (worker/allow.py); unset: none.
    allow_commands: str | None = None

    @field_validator("amqp_url")
    @classmethod
    def _amqp_urls(cls, value: str) -> str:
        try:
            amqp_urls(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The environment first, then the ``*_FILE`` variants of FILE_SETTINGS. Raises
        ConfigError when such a file cannot be read."""
        return (
            init_settings,
            env_settings,
            _SettingsFromFiles(settings_cls),
            dotenv_settings,
            file_secret_settings,
        )

    @field_validator("retention")
    @classmethod
    def _a_duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    def retention_age(self) -> timedelta | None:
        """How old history may grow before the monitor purges it, or None to keep it all."""
        return None if self.retention is None else parse_duration(self.retention)

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        return normalise_database_url(value)

    def keyring(self, *, warn_legacy: bool = True) -> Keyring:
        """The signing keys: from ``CRONFLEET_KEYS``, else from ``CRONFLEET_KEYS_FILE``.

        Keys without a role (the old ``id:secret`` form) are logged as a warning, once per
        process, unless ``warn_legacy`` is False. Raises ConfigError when neither setting gives
        at least one well-formed key.
        """
        text = self.keys
        if not text and self.keys_file is not None:
            try:
                text = self.keys_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(
                    f"cannot read CRONFLEET_KEYS_FILE {self.keys_file}: {exc.strerror}"
                ) from exc
        if not text.strip():
            raise ConfigError(
                "no signing key: set CRONFLEET_KEYS=role:id:secret,... "
                "(make them with `cronfleet keys new --role ROLE`) or CRONFLEET_KEYS_FILE"
            )
        keyring = Keyring.parse(text)
        if keyring.legacy and warn_legacy:
            _warn_legacy(tuple(key.id for key in keyring.legacy))
        return keyring


@functools.cache
def _warn_legacy(key_ids: tuple[str, ...]) -> None:
    """Say once per process that these keys have no role (each later call is a no-op)."""
    one = len(key_ids) == 1
    log.warning(
        "signing key %s %s no role, so %s every message, triggers included: give %s a role by "
        "writing `trigger:ID:SECRET`, `event:ID:SECRET` or `ping:ID:SECRET` instead (new keys "
        "from `cronfleet keys new --role ROLE`; docs/operations.md, 'Keys')",
        ", ".join(map(repr, key_ids)),
        "has" if one else "have",
        "it signs and verifies" if one else "they sign and verify",
        "it" if one else "each",
    )
