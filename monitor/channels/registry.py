"""Channel type -> the class that sends. Adding a kind of channel is adding a module, its
settings in ``config.py`` and a line here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from common.clock import Clock, utcnow
from common.webhooks import webhook_key
from monitor.channels.base import Channel
from monitor.channels.config import (
    ChannelsConfig,
    DiscordSettings,
    EmailSettings,
    LogSettings,
    SlackSettings,
    WebhookSettings,
)
from monitor.channels.discord import DiscordChannel
from monitor.channels.email import EmailChannel, SmtpServer
from monitor.channels.log import LogChannel
from monitor.channels.slack import SlackChannel
from monitor.channels.webhook import WebhookChannel


def _webhook(name: str, s: WebhookSettings, session: aiohttp.ClientSession, clock: Clock) -> Channel:
    return WebhookChannel(
        name,
        s.url.get_secret_value(),
        webhook_key(s.secret.get_secret_value()),
        session,
        headers={k: v.get_secret_value() for k, v in s.headers.items()},
        timeout=s.timeout_seconds,
        group=s.group,
        clock=clock,
    )


def _slack(name: str, s: SlackSettings, session: aiohttp.ClientSession, clock: Clock) -> Channel:
    return SlackChannel(name, s.url.get_secret_value(), session, timeout=s.timeout_seconds, group=s.group)


def _discord(name: str, s: DiscordSettings, session: aiohttp.ClientSession, clock: Clock) -> Channel:
    return DiscordChannel(name, s.url.get_secret_value(), session, timeout=s.timeout_seconds, group=s.group)


def _email(name: str, s: EmailSettings, session: aiohttp.ClientSession, clock: Clock) -> Channel:
    server = SmtpServer(
        host=s.host,
        port=s.port,
        security=s.security,
        username=None if s.username is None else s.username.get_secret_value(),
        password=None if s.password is None else s.password.get_secret_value(),
        ca_file=None if s.ca_file is None else Path(s.ca_file),
        timeout=s.timeout_seconds,
    )
    return EmailChannel(name, server, s.sender, tuple(s.to), group=s.group)


def _log(name: str, s: LogSettings, session: aiohttp.ClientSession, clock: Clock) -> Channel:
    return LogChannel(name, level=s.level, group=s.group)


BUILDERS: dict[str, Callable[[str, Any, aiohttp.ClientSession, Clock], Channel]] = {
    "webhook": _webhook,
    "slack": _slack,
    "discord": _discord,
    "email": _email,
    "log": _log,
}


def build_channels(
    config: ChannelsConfig, client: aiohttp.ClientSession, *, clock: Clock = utcnow
) -> dict[str, Channel]:
    """One sender per configured channel, by name; the HTTP ones share ``client`` (a session
    of ``common.http_client``)."""
    return {name: BUILDERS[s.type](name, s, client, clock) for name, s in config.channels.items()}
