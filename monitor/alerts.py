"""The monitor's alerts: each flip people must be told about (``needs_alert``) is delivered once
on every channel of its job's route, even across monitor restarts; every attempt is stored.

The flips table is the outbox. A flip that needs an alert is stored ``pending`` in the same
transaction as the flip, held by the monitor that stored it for ``ALERT_LEASE``. That monitor
hands it to its dispatcher as soon as the transaction commits (``note``, which never waits, so
alerting never delays event recording) and renews its hold while it tries. Each attempt is
stored in ``alert_attempts`` (``on_attempts``: the attempts that finished meanwhile share one
transaction); once every channel of the route has a final attempt (delivered, or given up after
the retry policy's attempts), the flip is ``done``.

A pending alert whose hold ran out (its monitor stopped or died mid-retry) is claimed by another
monitor, or by the same one restarted, with one atomic UPDATE (two monitors never claim the same
flip), and delivered on the channels that have no final attempt yet. A monitor that stops cleanly
lets go of its holds at once, so a restart resumes without waiting. Delivery is at least once: an
attempt that was delivered but could not be stored is sent again; receivers drop duplicates by
the alert's id (the same on every attempt and channel).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import Table, literal_column, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from common.cancel import stop_if_cancelled
from common.cli.alerts import attempt_fields
from common.clock import Clock, utcnow
from common.http_client import open_session
from common.settings import Settings
from common.store import STORE_OUTAGES, AlertAttemptRow, FlipRow, Store, bulk
from common.store.chunks import IN_LIST_CHUNK, chunks
from monitor.channels import (
    Alert,
    Attempt,
    Channel,
    ChannelsConfig,
    Dispatcher,
    build_channels,
    load_channels,
    send_test,
)
from monitor.channels.policy import route
from monitor.health import Flip, State
from monitor.health_store import ALERT_LEASE, Advanced, whole

log = logging.getLogger("cronfleet.alerts")

_FLIPS = cast(Table, FlipRow.__table__)
_ATTEMPTS = cast(Table, AlertAttemptRow.__table__)
# Pending alerts claimed per transaction.
CLAIM_BATCH = 100
# How long a stopping monitor gives the alerts it holds before it lets go of them.
CLOSE_GRACE_SECONDS = 2.0
# Attempts of announced alerts (no flip: the store's own outage) kept while they cannot be stored.
UNSTORED_LIMIT = 1000


def alert_id(fleet: str, flip_id: int) -> str:
    """The id receivers see for the alert of flip ``flip_id``: ``<fleet>/flip-<id>``, unique
    across fleets, the same on every attempt and channel."""
    return f"{fleet}/flip-{flip_id}"


def flip_of(alert: str) -> int | None:
    """The flip id in an ``alert_id``; None for another id (a test alert's)."""
    _fleet, found, tail = alert.rpartition("/flip-")
    return int(tail) if found and tail.isdigit() else None


def attempt_row(attempt: Attempt) -> AlertAttemptRow:
    """The stored form of ``attempt``."""
    return AlertAttemptRow(**_attempt_values(attempt))


def _attempt_values(attempt: Attempt) -> dict[str, Any]:
    alert = attempt.alert
    return {
        "flip_id": flip_of(alert.flip_id),
        "alert_id": alert.flip_id,
        "kind": alert.kind,
        "job": alert.job,
        "channel": attempt.channel,
        "attempt": attempt.number,
        "at": attempt.at,
        "delivered": attempt.delivered,
        "error": attempt.error,
        "final": attempt.final,
        "retry_at": attempt.retry_at,
    }


class Alerting:
    """The alerts of one monitor: ``note`` after each committed transaction, ``keep_forever``
    in the background, ``close`` when the monitor stops (see the module)."""

    def __init__(
        self,
        store: Store,
        config: ChannelsConfig,
        channels: Mapping[str, Channel],
        fleet: str,
        *,
        lease: timedelta = ALERT_LEASE,
        clock: Clock = utcnow,
    ) -> None:
        self.store = store
        self.routes = config.routes
        self.fleet = fleet
        self.lease = lease
        self.clock = clock
        self.channels = tuple(channels)
        self.dispatcher = Dispatcher(
            channels, config.routes, config.delivery, on_attempts=self.on_attempts, clock=clock
        )
        # Attempts of announced alerts not stored yet (the store was down): stored at a later turn.
        self._unstored: deque[dict[str, Any]] = deque(maxlen=UNSTORED_LIMIT)
        # Flips this monitor holds, and the channels of each still without a final attempt.
        self._open: dict[int, set[str]] = {}
        # Flips with a channel that was not tried (attempt 0): let go of, not done, once settled.
        self._untried: set[int] = set()
        # Flips whose route has no channel: done at the next turn of ``keep_forever``.
        self._silent: set[int] = set()
        self._wake = asyncio.Event()

    def start(self) -> None:
        """Start delivering (the dispatcher's tasks)."""
        self.dispatcher.start()

    def note(self, advanced: Advanced) -> None:
        """Hand the alerts of a committed transaction's flips to the dispatcher; never waits and
        never raises (an alert it could not hand over stays pending, for a later claim)."""
        for item in advanced.flips:
            if item.alert and item.id is not None:
                try:
                    self._submit(item.id, self._alert(item.job, item.id, item.flip), None)
                except Exception:
                    log.exception("alerts: cannot submit the alert of flip %d (job %s)", item.id, item.job)

    def announce(self, alert: Alert) -> None:
        """Deliver ``alert``, which no stored flip backs (the monitor's own store is down), to
        every channel whatever the routes say; its attempts are stored once the store answers.
        Never waits, never raises."""
        if not self.channels:
            log.error("alerts: no channel to tell: %s", alert.title())
            return
        try:
            self.dispatcher.submit(alert, self.channels)
        except Exception:
            log.exception("alerts: cannot submit %s", alert.title())

    def _alert(self, job: str, flip_id: int, flip: Flip) -> Alert:
        return Alert.from_flip(flip, job=job, flip_id=alert_id(self.fleet, flip_id), fleet=self.fleet)

    def _submit(self, flip_id: int, alert: Alert, channels: tuple[str, ...] | None) -> None:
        names = route(self.routes, alert.job) if channels is None else channels
        if not names:
            self._silent.add(flip_id)
            self._wake.set()
            return
        self._open[flip_id] = set(names)
        self.dispatcher.submit(alert, names)

    async def on_attempt(self, attempt: Attempt) -> None:
        """``on_attempts`` of ``attempt`` alone."""
        await self.on_attempts([attempt])

    async def on_attempts(self, attempts: Sequence[Attempt]) -> None:
        """Store ``attempts`` in one transaction; each flip with a final attempt on every channel
        is then done (or, if a channel was not tried at all, let go of for a later claim)."""
        if not attempts:
            return
        done: list[int] = []
        let_go: list[int] = []
        for attempt in attempts:
            flip_id = flip_of(attempt.alert.flip_id)
            channels = None if flip_id is None else self._open.get(flip_id)
            if flip_id is None or channels is None or not attempt.final:
                continue
            channels.discard(attempt.channel)
            if attempt.number == 0:
                self._untried.add(flip_id)
            if not channels:
                del self._open[flip_id]
                (let_go if flip_id in self._untried else done).append(flip_id)
                self._untried.discard(flip_id)
        await self._store_attempts([_attempt_values(attempt) for attempt in attempts], done, let_go)

    async def _store_attempts(
        self, rows: list[dict[str, Any]], done: Sequence[int] = (), let_go: Sequence[int] = ()
    ) -> None:
        """Store ``rows`` (and the announced alerts' attempts held back) and settle the flips.
        On a store outage the announced alerts' attempts are held back for a later call (a
        flip's are not: its alert is delivered again from the flip, still pending)."""
        held = list(self._unstored)
        self._unstored.clear()
        rows = [*held, *rows]
        try:
            await self._write_attempts(rows, done, let_go)
        except STORE_OUTAGES:
            self._unstored.extend(row for row in rows if row["flip_id"] is None)
            raise

    async def _write_attempts(
        self, rows: list[dict[str, Any]], done: Sequence[int], let_go: Sequence[int]
    ) -> None:
        if not rows and not done and not let_go:
            return
        async with self.store.session() as session, session.begin():
            await bulk.insert_rows(session, _ATTEMPTS, rows)
            if done:
                await self._settle(session, done, done=True)
            if let_go:
                await self._settle(session, let_go, done=False)

    async def _settle(self, session: AsyncSession, flips: Collection[int], *, done: bool) -> None:
        """Mark ``flips``' alerts done, or let go of them (pending, claimable at once)."""
        values: dict[str, Any] = (
            {"alert": "done", "alert_lease_until": None} if done else {"alert_lease_until": self.clock()}
        )
        for some in chunks(sorted(flips), IN_LIST_CHUNK):
            await session.execute(
                update(_FLIPS).where(_FLIPS.c.id.in_(some), _FLIPS.c.alert == "pending").values(values)
            )

    async def keep_forever(self) -> None:
        """Claim the pending alerts nobody holds (at once, then every third of the lease), renew
        the holds of the alerts this monitor is delivering, and mark silent ones done; forever.
        An unavailable store is logged and retried."""
        period = self.lease.total_seconds() / 3
        while True:
            stop_if_cancelled()
            try:
                await whole(self._renew())
                if self._unstored:
                    await whole(self._store_attempts([]))
                claimed = await whole(self._claim())
                if claimed:
                    log.info("alerts: resumed %d pending alert(s) nobody held", claimed)
                if claimed >= CLAIM_BATCH:
                    continue  # there may be more (but one let go of again waits for the next turn)
            except Exception as exc:
                stop_if_cancelled()
                if isinstance(exc, STORE_OUTAGES):
                    log.warning("alerts: the store is unavailable (%s); retrying", exc)
                else:
                    log.exception("alerts: unexpected error while keeping pending alerts; retrying")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), period)

    async def _renew(self) -> None:
        silent, self._silent = self._silent, set()
        holding = [flip_id for flip_id in self._open if flip_id not in silent]
        if not silent and not holding:
            return
        until = self.clock() + self.lease
        try:
            async with self.store.session() as session, session.begin():
                if silent:
                    await self._settle(session, silent, done=True)
                for some in chunks(sorted(holding), IN_LIST_CHUNK):
                    await session.execute(
                        update(_FLIPS)
                        .where(_FLIPS.c.id.in_(some), _FLIPS.c.alert == "pending")
                        .values(alert_lease_until=until)
                    )
        except BaseException:
            self._silent |= silent
            raise

    async def _claim(self) -> int:
        """Claim up to ``CLAIM_BATCH`` pending alerts whose hold ran out and submit what is left
        of each; returns how many were claimed."""
        now = self.clock()
        # The literal, not a parameter: only then may SQLite read the partial index of pending
        # alerts (ix_flips_alert_pending) instead of every flip.
        expired = (_FLIPS.c.alert == literal_column("'pending'")) & (_FLIPS.c.alert_lease_until < now)
        oldest = select(_FLIPS.c.id).where(expired).order_by(_FLIPS.c.alert_lease_until).limit(CLAIM_BATCH)
        claim = (
            update(_FLIPS)
            .where(_FLIPS.c.id.in_(oldest.scalar_subquery()), expired)
            .values(alert_lease_until=now + self.lease)
            .returning(*(_FLIPS.c[name] for name in _FLIP_FIELDS))
        )
        submit: list[tuple[int, Alert, tuple[str, ...]]] = []
        async with self.store.session() as session, session.begin():
            rows = list(await session.execute(claim))
            ids = [row.id for row in rows]
            finished = await _finished_channels(session, ids)
            done = []
            for row in rows:
                if row.id in self._open:
                    continue  # still being delivered here (a renewal failed meanwhile)
                left = tuple(c for c in route(self.routes, row.job) if c not in finished.get(row.id, set()))
                if left:
                    submit.append((row.id, self._alert(row.job, row.id, _flip(row)), left))
                else:
                    done.append(row.id)
            if done:
                await self._settle(session, done, done=True)
        for flip_id, alert, left in submit:
            self._submit(flip_id, alert, left)
        return len(rows)

    async def close(self, grace: float = CLOSE_GRACE_SECONDS) -> None:
        """Give the alerts in flight ``grace`` seconds, stop delivering, store what was left
        undelivered (as attempts numbered 0) and let go of every alert still held, so another
        monitor (or this one restarted) delivers it. Bounded: it ends within a few ``grace``."""
        await self.dispatcher.close(grace)
        holding = set(self._open) | self._silent
        self._open.clear()
        if not holding:
            return
        try:
            async with asyncio.timeout(grace):
                async with self.store.session() as session, session.begin():
                    await self._settle(session, holding, done=False)
        except Exception as exc:  # the holds then run out by themselves
            log.warning("alerts: could not let go of %d pending alert(s) (%s)", len(holding), exc)


async def send_test_alert(settings: Settings, channel: str) -> dict[str, Any]:
    """``cronfleet alerts test CHANNEL``: send one test alert to ``channel`` of the monitor's
    channels file (``CRONFLEET_CHANNELS_FILE`` and the environment), once, store the attempt and
    return it as ``cronfleet alerts`` shows it. Raises ConfigError for a bad channels file and
    NotFound for an unknown channel, each in one line."""
    config = load_channels(settings.channels_file, os.environ)
    async with open_session(1, user_agent="cronfleet-alerts/1") as http:
        attempt = await send_test(
            build_channels(config, http),
            channel,
            fleet=settings.namespace,
            flip_id=f"{settings.namespace}/test-{uuid.uuid4().hex[:16]}",
        )
    row = attempt_row(attempt)
    store = await Store.open(settings.database_url, settings.database_schema)
    try:
        async with store.session() as session, session.begin():
            session.add(row)
    finally:
        await store.close()
    return attempt_fields(row)


_FLIP_FIELDS = ("id", "job", "at", "from_state", "to_state", "reason", "recovered_from")


def _flip(row: Any) -> Flip:
    return Flip(
        at=row.at,
        from_state=State(row.from_state),
        to_state=State(row.to_state),
        reason=row.reason,
        recovered_from=None if row.recovered_from is None else State(row.recovered_from),
    )


async def _finished_channels(session: AsyncSession, flips: list[int]) -> dict[int, set[str]]:
    """The channels with a final attempt (tried: numbered 1 or more) for each of ``flips``."""
    found: dict[int, set[str]] = {}
    for some in chunks(sorted(flips), IN_LIST_CHUNK):
        query = select(AlertAttemptRow.flip_id, AlertAttemptRow.channel).where(
            AlertAttemptRow.flip_id.in_(some), AlertAttemptRow.final, AlertAttemptRow.attempt > 0
        )
        for flip_id, channel in await session.execute(query):
            if flip_id is not None:
                found.setdefault(flip_id, set()).add(channel)
    return found
