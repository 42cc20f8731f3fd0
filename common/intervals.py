"""Interval schedules (``every = "45s"``): fires at whole multiples of the interval since the Unix
epoch, so that every scheduler, before and after any restart, computes the same instants (and so
the same trigger ids ``job@instant``). Pure; no clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from common.durations import parse_duration

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Shorter intervals are refused: one trigger, one claim and one run record per fire; a job
# wanting more is a loop, not a schedule.
MIN_INTERVAL_SECONDS = 1
# A fire at least once a year (durations are written in at most 6 digits of a unit anyway).
MAX_INTERVAL_SECONDS = 366 * 86400
_MICRO = timedelta(microseconds=1)


def parse_interval(text: str) -> int:
    """The interval ``text`` (``"45s"``, ``"15m"``, ``"2h"``) in whole seconds. Raises ValueError
    for anything but a duration of 1 second to 366 days."""
    seconds = int(parse_duration(text).total_seconds())
    if not MIN_INTERVAL_SECONDS <= seconds <= MAX_INTERVAL_SECONDS:
        raise ValueError(
            f"{text!r} is not an interval cronfleet runs: use {MIN_INTERVAL_SECONDS}s to "
            f"{MAX_INTERVAL_SECONDS // 86400}d"
        )
    return seconds


def next_interval_fire(every_seconds: int, after: datetime) -> datetime:
    """The first instant ``k * every_seconds`` after the Unix epoch strictly after ``after``
    (aware), in UTC. Strictly later than ``after`` always, so a loop over fires advances."""
    if after.tzinfo is None:
        raise ValueError("next_interval_fire needs an aware datetime")
    if every_seconds < MIN_INTERVAL_SECONDS:
        raise ValueError(f"an interval is at least {MIN_INTERVAL_SECONDS}s")
    # In whole microseconds: no float rounding can put two schedulers a microsecond apart.
    elapsed = (after - EPOCH) // _MICRO
    step = every_seconds * 1_000_000
    return EPOCH + timedelta(microseconds=(elapsed // step + 1) * step)
