"""The store watch's decisions: a short outage is only logged, a long one is told once, and its
end is told only when its start was."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from monitor.channels import Alert
from monitor.store_watch import STORE_ALERT_JOB, StoreWatch


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def watch() -> tuple[StoreWatch, list[Alert], Clock]:
    told: list[Alert] = []
    clock = Clock()
    # No store is touched: only the decisions made on each outcome are tested here.
    watching = StoreWatch(
        None,  # type: ignore[arg-type]
        told.append,
        name="monitor-1",
        fleet="prod",
        alert_after=30,
        every=5,
        clock=clock,
    )
    return watching, told, clock


def test_an_outage_shorter_than_the_threshold_is_not_told() -> None:
    watching, told, clock = watch()
    for _ in range(5):
        watching.unreachable(OSError("connection refused"))
        clock.advance(5)
    watching.reachable()
    assert told == []
    assert watching.outage is None


def test_a_long_outage_is_told_once_and_its_end_once() -> None:
    watching, told, clock = watch()
    for _ in range(20):
        watching.unreachable(OSError("connection refused"))
        clock.advance(5)
    assert [alert.kind for alert in told] == ["alarm"]
    alarm = told[0]
    assert alarm.job == STORE_ALERT_JOB and alarm.to_state == "down" and alarm.fleet == "prod"
    assert "connection refused" in alarm.reason and "monitor-1" in alarm.reason
    watching.reachable()
    watching.reachable()
    assert [alert.kind for alert in told] == ["alarm", "recovery"]
    assert told[1].flip_id != alarm.flip_id


def test_each_outage_has_alerts_of_its_own() -> None:
    watching, told, clock = watch()
    for _ in range(2):
        for _ in range(8):
            watching.unreachable(TimeoutError())
            clock.advance(5)
        watching.reachable()
        clock.advance(60)
    assert [alert.kind for alert in told] == ["alarm", "recovery"] * 2
    assert len({alert.flip_id for alert in told}) == 4
    assert "TimeoutError" in told[0].reason
