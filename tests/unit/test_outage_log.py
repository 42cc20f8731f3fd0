"""A loop that retries forever says an outage once per new reason and once when it ends: the
monitor's fleet watch and deadline timers logged a warning at every try (one a second or more),
for as long as the store was down."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy.exc import OperationalError

from common.retry import OutageLog

log = logging.getLogger("cronfleet.test-outage")


def _store_error(statement: str) -> OperationalError:
    return OperationalError(statement, {}, ConnectionRefusedError("Connect call failed"))


def test_an_outage_is_said_once_per_reason_and_its_end_once(caplog: pytest.LogCaptureFixture) -> None:
    outage = OutageLog(log, "the fleet watch")
    with caplog.at_level(logging.INFO, logger=log.name):
        outage.ended()  # no outage yet: nothing to say
        for statement in ("SELECT 1", "SELECT pools", "SELECT 1") * 20:
            # The same reason failing on other statements is the same outage.
            outage.failed(_store_error(statement))
        outage.failed(TimeoutError())
        outage.ended()
        outage.ended()
    lines = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert lines == [
        ("WARNING", "the fleet watch: (builtins.ConnectionRefusedError) Connect call failed; retrying"),
        ("WARNING", "the fleet watch: TimeoutError; retrying"),
        ("INFO", "the fleet watch: back after the outage"),
    ]
