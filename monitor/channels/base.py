"""What every alert channel shares: the alert it is given, the one method it has, and how it fails.

An ``Alert`` is one flip of one job's health (``monitor.health.Flip``) as people are told about it.
Every channel says the same facts (``Alert.facts``) in its own format. A channel delivers up to
its ``group`` alerts in one message (a herd of jobs turning ``down`` together is one Slack
message or one email, not ten thousand), or raises ``DeliveryFailed`` for all of them, with a
reason that is safe to store and show: it never contains a channel's URL, secret or password.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from common.errors import CronfleetError
from common.messages import format_instant
from monitor.health import Flip


class DeliveryFailed(CronfleetError):
    """A channel could not deliver an alert. ``reason`` is one line, free of secrets.

    ``retryable``: whether trying again may help (a timeout, a 5xx, a 429) or not (a 404, a
    refused address). ``retry_after``: the seconds the receiver asked us to wait, if it did.
    """

    def __init__(self, reason: str, *, retryable: bool = True, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass(frozen=True)
class Alert:
    """One flip of ``job``'s health, to be told to people.

    ``flip_id`` identifies the flip (the same on every channel and every attempt: receivers use it
    to drop duplicates). ``fleet``: the namespace the job belongs to. ``recovered_from``: the alarm
    state this flip ends, for a recovery. ``link``: where to see more (the dashboard), if any.
    ``test``: sent by ``cronfleet alerts test``, not by a flip.
    """

    job: str
    from_state: str
    to_state: str
    reason: str
    at: datetime
    flip_id: str
    fleet: str
    recovered_from: str | None = None
    link: str | None = None
    test: bool = False

    def __post_init__(self) -> None:
        if self.at.tzinfo is None or self.at.utcoffset() is None:
            raise ValueError("an alert's instant must carry its time zone")

    @classmethod
    def from_flip(cls, flip: Flip, *, job: str, flip_id: str, fleet: str, link: str | None = None) -> Alert:
        """The alert for ``flip`` of ``job``."""
        return cls(
            job=job,
            from_state=str(flip.from_state),
            to_state=str(flip.to_state),
            reason=flip.reason,
            at=flip.at,
            flip_id=flip_id,
            fleet=fleet,
            recovered_from=None if flip.recovered_from is None else str(flip.recovered_from),
            link=link,
        )

    @classmethod
    def for_test(cls, channel: str, *, fleet: str, at: datetime, flip_id: str) -> Alert:
        """A test alert for ``cronfleet alerts test CHANNEL``: shaped like an alarm (so the
        receiver sees every field), marked ``test`` everywhere it is shown."""
        return cls(
            job="cronfleet-test",
            from_state="up",
            to_state="down",
            reason=f"a test sent with `cronfleet alerts test {channel}`: nothing is wrong",
            at=at,
            flip_id=flip_id,
            fleet=fleet,
            test=True,
        )

    @property
    def kind(self) -> str:
        """``test``, ``recovery`` (the flip ends an alarm) or ``alarm`` (any other flip)."""
        if self.test:
            return "test"
        return "recovery" if self.recovered_from is not None else "alarm"

    def title(self) -> str:
        """One line saying what happened, for a subject or a chat message."""
        return one_line(f"[{self.fleet}] {self.headline()}")

    def headline(self) -> str:
        """What happened, without the fleet: ``backup is DOWN (was late)``; one line."""
        if self.test:
            text = "test alert: if you read this, the channel works"
        elif self.recovered_from is not None:
            text = f"{self.job} recovered: {self.to_state} again after {self.recovered_from}"
        else:
            text = f"{self.job} is {self.to_state.upper()} (was {self.from_state})"
        return one_line(text)

    def facts(self) -> list[tuple[str, str]]:
        """The facts every channel tells, as (label, value) pairs, in this order."""
        facts = [
            ("Job", self.job),
            ("State", f"{self.from_state} -> {self.to_state}"),
            ("Reason", self.reason),
            ("At", format_instant(self.at)),
            ("Fleet", self.fleet),
        ]
        if self.recovered_from is not None:
            facts.append(("Recovered from", self.recovered_from))
        if self.link is not None:
            facts.append(("Link", self.link))
        facts.append(("Flip", self.flip_id))
        return [(label, one_line(value)) for label, value in facts]

    def text(self) -> str:
        """The title and every fact, one per line: a plain-text message."""
        width = max(len(label) for label, _ in self.facts())
        lines = [self.title(), ""] + [f"{label + ':':<{width + 1}} {value}" for label, value in self.facts()]
        return "\n".join(lines) + "\n"

    def payload(self) -> dict[str, Any]:
        """The alert as JSON-ready data (what the webhook channel sends)."""
        return {
            "id": self.flip_id,
            "kind": self.kind,
            "fleet": self.fleet,
            "job": self.job,
            "from_state": self.from_state,
            "to_state": self.to_state,
            "recovered_from": self.recovered_from,
            "reason": self.reason,
            "at": format_instant(self.at),
            "link": self.link,
            "test": self.test,
        }


class Channel(Protocol):
    """Somewhere alerts go. ``name``: its name in the channels file; ``type``: its kind;
    ``group``: the most alerts one message of it carries (1: every alert alone)."""

    @property
    def name(self) -> str: ...

    @property
    def type(self) -> str: ...

    @property
    def group(self) -> int: ...

    async def send(self, alerts: Sequence[Alert]) -> None:
        """Deliver ``alerts`` (one to ``group`` of them) once, in one message, without blocking
        the event loop. Raises DeliveryFailed: then none of them counts as delivered."""
        ...


def group_title(alerts: Sequence[Alert]) -> str:
    """One line saying what a group of alerts is about: the alert's own title for one, else
    ``[fleet] 12 alerts: 10 DOWN, 1 FAILING, 1 recovered`` (counts by state, most first)."""
    if len(alerts) == 1:
        return alerts[0].title()
    counts = Counter(
        "recovered" if a.kind == "recovery" else "test" if a.test else a.to_state.upper() for a in alerts
    )
    parts = ", ".join(f"{n} {what}" for what, n in counts.most_common())
    return one_line(f"[{alerts[0].fleet}] {len(alerts)} alerts: {parts}")


def one_line(text: str, limit: int = 1000) -> str:
    """``text`` with control characters (line breaks included) turned into spaces, shortened."""
    flat = "".join(c if c.isprintable() else " " for c in text)
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
