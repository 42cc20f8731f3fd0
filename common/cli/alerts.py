"""``cronfleet alerts``: the alert attempts the monitor stored, newest first; ``cronfleet alerts
test CHANNEL`` sends one test alert through the monitor's channels.

The channels are the monitor's business (``monitor/channels``) and ``common`` never imports
``monitor``: the test is found through the ``cronfleet.alerts`` entry-point group, as the
processes are (``common/services.py``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from importlib.metadata import entry_points
from typing import Any

from sqlalchemy import select

from common.cli.admin import open_store
from common.cli.output import emit
from common.errors import ConfigError, NotFound
from common.settings import Settings
from common.store import AlertAttemptRow, Store

# What ``alerts test`` runs: sends a test alert to the named channel, stores the attempt, and
# returns it as a row of ``cronfleet alerts`` (``delivered`` says whether it arrived).
TestSender = Callable[[Settings, str], Awaitable[dict[str, Any]]]
COLUMNS = ["at", "job", "channel", "kind", "attempt", "delivered", "final", "error"]


def load_test_sender() -> TestSender:
    """The monitor's ``alerts test``. Raises NotFound when it is not installed."""
    for entry in entry_points(group="cronfleet.alerts"):
        if entry.name == "test":
            sender: TestSender = entry.load()
            return sender
    raise NotFound("the monitor's alert channels are not installed (reinstall cronfleet)")


async def alerts(settings: Settings, args: argparse.Namespace) -> int:
    """``cronfleet alerts [JOB] [--limit N] [--json]`` lists stored attempts, newest first (of
    one job); ``cronfleet alerts test CHANNEL`` sends a test alert and exits 1 if it failed."""
    words: list[str] = args.words
    if len(words) == 2 and words[0] == "test":
        return await _test(settings, words[1], args.json)
    if len(words) > 1:
        raise ConfigError(
            "usage: cronfleet alerts [JOB] [--limit N] [--json] | cronfleet alerts test CHANNEL"
        )
    async with open_store(settings) as store:
        rows = await read_attempts(store, words[0] if words else None, args.limit)
    emit(rows, COLUMNS, args.json)
    return 0


async def read_attempts(store: Store, job: str | None, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` alert attempts (of ``job``), newest first, as ``cronfleet alerts``
    shows them (``attempt_fields``)."""
    query = (
        select(AlertAttemptRow)
        .order_by(AlertAttemptRow.at.desc(), AlertAttemptRow.id.desc())
        .limit(max(1, limit))
    )
    if job:
        query = query.where(AlertAttemptRow.job == job)
    async with store.session() as session:
        found = (await session.execute(query)).scalars().all()
    return [attempt_fields(row) for row in found]


def attempt_fields(row: AlertAttemptRow) -> dict[str, Any]:
    """One stored attempt as ``cronfleet alerts`` shows it."""
    return {
        "at": row.at,
        "job": row.job,
        "channel": row.channel,
        "kind": row.kind,
        "attempt": row.attempt,
        "delivered": row.delivered,
        "final": row.final,
        "error": row.error,
        "retry_at": row.retry_at,
        "flip_id": row.flip_id,
        "alert_id": row.alert_id,
    }


async def _test(settings: Settings, channel: str, as_json: bool) -> int:
    sent = await load_test_sender()(settings, channel)
    if as_json:
        emit([sent], COLUMNS, True)
    elif sent["delivered"]:
        print(f"test alert delivered to channel {channel!r}")
    else:
        print(f"cronfleet: test alert to channel {channel!r} failed: {sent['error']}", file=sys.stderr)
    return 0 if sent["delivered"] else 1
