"""Alert channels: where a job's flips are told (webhook, Slack, Discord, email, the log), which
job goes where, and delivery in the background with retries. ``docs/alerts.md`` explains them.

The monitor's face of this package::

    config = load_channels(path, os.environ)              # ConfigError, one line
    channels = build_channels(config, session)  # an aiohttp.ClientSession (common.http_client)
    async with Dispatcher(channels, config.routes, config.delivery, on_attempt) as dispatcher:
        if needs_alert(flip):
            dispatcher.submit(Alert.from_flip(flip, job=..., flip_id=..., fleet=...))
"""

from monitor.channels.base import Alert, Channel, DeliveryFailed
from monitor.channels.config import ChannelsConfig, load_channels, parse_channels
from monitor.channels.dispatch import Attempt, AttemptCallback, Dispatcher, send_test
from monitor.channels.policy import RetryPolicy, Routes, needs_alert, retry_delay, retry_schedule, route
from monitor.channels.registry import build_channels

__all__ = [
    "Alert",
    "Attempt",
    "AttemptCallback",
    "Channel",
    "ChannelsConfig",
    "DeliveryFailed",
    "Dispatcher",
    "RetryPolicy",
    "Routes",
    "build_channels",
    "load_channels",
    "needs_alert",
    "parse_channels",
    "retry_delay",
    "retry_schedule",
    "route",
    "send_test",
]
