"""Delivering alerts in the background: one queue and a few tasks per channel, retries with
backoff, and every attempt reported.

``Dispatcher.submit`` returns at once: it routes the alert and puts it on the queue of each of its
channels. Each channel has ``RetryPolicy.concurrency`` delivery tasks; each takes every alert
waiting, up to the channel's ``group``, and sends them in one message (a herd of jobs turning
``down`` together is a few messages, not one round trip after another). The alerts of one job go
one after another, in the order submitted (so a recovery never overtakes the alarm it ends, and
never shares its message). A message is tried up to ``RetryPolicy.attempts`` times; each of its
alerts gets its own attempt, with the message's outcome. A channel that fails or hangs delays
only its own alerts, never another channel's, never the caller. Every attempt, delivered or not,
reaches ``on_attempt`` (through one reporting task, in order), so the monitor can store it; given
``on_attempts`` instead, the reporting task hands over every attempt waiting at that moment (at
most ``REPORT_BATCH``) in one call, so a herd's attempts are stored in a few transactions, not
one each. A failing callback is logged and delivery goes on.

    async with Dispatcher(channels, config.routes, config.delivery, on_attempt) as dispatcher:
        dispatcher.submit(alert)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType

from common.clock import Clock, utcnow
from common.errors import NotFound
from monitor.channels.base import Alert, Channel, DeliveryFailed
from monitor.channels.policy import RetryPolicy, Routes, retry_delay, route

log = logging.getLogger("cronfleet.alerts")


@dataclass(frozen=True)
class Attempt:
    """One try at delivering ``alert`` to ``channel``, as the monitor stores it.

    ``number``: 1 for the first try, 2 for the first retry...; 0 when the alert was never tried
    (the channel's queue was full, the channel does not exist, or the dispatcher stopped first).
    ``at``: when the attempt began. ``error``: why it failed (one line, no secret), None when
    ``delivered``. ``final``: no more attempts follow for this alert on this channel.
    ``retry_at``: when the next attempt is due, when one follows.
    """

    alert: Alert
    channel: str
    number: int
    at: datetime
    delivered: bool
    error: str | None
    final: bool
    retry_at: datetime | None = None


AttemptCallback = Callable[[Attempt], Awaitable[None]]
AttemptsCallback = Callable[[list[Attempt]], Awaitable[None]]

# Attempts handed to ``on_attempts`` in one call, at most.
REPORT_BATCH = 500


class Dispatcher:
    """Routes alerts to ``channels`` and delivers them in the background (see the module)."""

    def __init__(
        self,
        channels: Mapping[str, Channel],
        routes: Routes,
        policy: RetryPolicy,
        on_attempt: AttemptCallback | None = None,
        *,
        on_attempts: AttemptsCallback | None = None,
        attempt_timeout: float = 60.0,
        clock: Clock = utcnow,
    ) -> None:
        if (on_attempt is None) == (on_attempts is None):
            raise TypeError("give on_attempt or on_attempts, not both")
        self._channels = dict(channels)
        self._routes = routes
        self._policy = policy
        self._on_attempt = on_attempt
        self._on_attempts = on_attempts
        self._attempt_timeout = attempt_timeout
        self._clock = clock
        self._queues: dict[str, asyncio.Queue[Alert]] = {name: asyncio.Queue() for name in self._channels}
        # The alerts each of a channel's delivery tasks is trying (one message), by task.
        self._current: dict[str, list[list[Alert]]] = {
            name: [[] for _ in range(policy.concurrency)] for name in self._channels
        }
        # Per channel, the jobs with an alert being tried, each with its alerts taken from the
        # queue since: the task trying the job's alert tries them next, in order.
        self._jobs: dict[str, dict[str, deque[Alert]]] = {name: {} for name in self._channels}
        self._reports: asyncio.Queue[Attempt] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._reporter: asyncio.Task[None] | None = None
        self._closing = False

    async def __aenter__(self) -> Dispatcher:
        self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.close()

    def start(self) -> None:
        """Start ``concurrency`` delivery tasks per channel and the reporting task (owned:
        ``close`` ends them)."""
        if self._reporter is not None:
            return
        self._reporter = asyncio.create_task(self._report_loop(), name="alerts-report")
        for name, channel in self._channels.items():
            for slot in range(self._policy.concurrency):
                task = asyncio.create_task(
                    self._deliver_loop(name, channel, slot), name=f"alerts-{name}-{slot}"
                )
                self._workers.append(task)

    def submit(self, alert: Alert, channels: Iterable[str] | None = None) -> tuple[str, ...]:
        """Queue ``alert`` for each channel of its job's route (or of ``channels``) and return
        their names at once, never waiting. A channel that cannot take it (unknown, queue full,
        dispatcher closing) gets an attempt numbered 0 reported as not sent instead."""
        names = route(self._routes, alert.job) if channels is None else tuple(dict.fromkeys(channels))
        queued = []
        for name in names:
            queue = self._queues.get(name)
            if queue is None:
                self._refuse(alert, name, f"no channel called {name!r}")
            elif self._closing:
                self._refuse(alert, name, "not sent: the monitor is stopping")
            elif (waiting := self._waiting(name)) >= self._policy.queue_limit:
                self._refuse(alert, name, f"not sent: {waiting} alerts already wait for this channel")
            else:
                queue.put_nowait(alert)
                queued.append(name)
        return tuple(queued)

    def backlog(self) -> dict[str, int]:
        """How many alerts each channel has still to deliver (those being tried included)."""
        return {
            name: self._waiting(name) + sum(len(alerts) for alerts in self._current[name])
            for name in self._queues
        }

    def _waiting(self, name: str) -> int:
        """Alerts not yet tried on channel ``name``: queued, or behind an earlier one of their job."""
        return self._queues[name].qsize() + sum(len(later) for later in self._jobs[name].values())

    async def idle(self) -> None:
        """Wait until every submitted alert is delivered or given up, and every attempt reported."""
        for queue in self._queues.values():
            await queue.join()
        await self._reports.join()

    async def close(self, grace: float = 5.0) -> list[tuple[Alert, str]]:
        """Stop taking alerts, give the queued ones ``grace`` seconds, then stop every task.

        Returns the (alert, channel) pairs left undelivered, each also reported as an attempt
        numbered 0 with ``final`` set.
        """
        self._closing = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                for queue in self._queues.values():
                    await queue.join()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        left: list[tuple[Alert, str]] = []
        for name, queue in self._queues.items():
            for current in self._current[name]:
                for alert in current:
                    left.append((alert, name))
                    queue.task_done()
                current.clear()
            for later in self._jobs[name].values():
                for alert in later:
                    left.append((alert, name))
                    queue.task_done()
            self._jobs[name].clear()
            while not queue.empty():
                left.append((queue.get_nowait(), name))
                queue.task_done()
        for alert, name in left:
            self._refuse(alert, name, "not sent: the monitor stopped before delivering it")
        if left:
            log.warning("alerts: %d alert(s) left undelivered at shutdown", len(left))
        if self._reporter is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._reports.join()
            self._reporter.cancel()
            await asyncio.gather(self._reporter, return_exceptions=True)
            self._reporter = None
        return left

    def _refuse(self, alert: Alert, name: str, reason: str) -> None:
        log.warning("alerts: %s for job %s on channel %s", reason, alert.job, name)
        self._reports.put_nowait(
            Attempt(alert, name, 0, self._clock(), delivered=False, error=reason, final=True)
        )

    async def _deliver_loop(self, name: str, channel: Channel, slot: int) -> None:
        queue, current = self._queues[name], self._current[name][slot]
        limit = max(1, channel.group)
        group: list[Alert] = []
        while True:
            if not group:
                self._take(name, await queue.get(), group)
            while len(group) < limit and not queue.empty():
                self._take(name, queue.get_nowait(), group)
            if not group:
                continue  # each alert taken joined its job's, in another task
            # Cancelled mid-delivery, the group stays current: ``close`` reports it undelivered.
            current[:] = group
            await self._deliver(name, channel, group)
            current.clear()
            group = self._next_of_jobs(name, group)

    def _take(self, name: str, alert: Alert, group: list[Alert]) -> None:
        """Add ``alert`` to ``group``, unless an alert of its job is being tried (in this group
        or another task's): then it waits behind it, and the task trying that one takes it next."""
        jobs = self._jobs[name]
        later = jobs.get(alert.job)
        if later is not None:
            later.append(alert)
        else:
            jobs[alert.job] = deque()
            group.append(alert)

    def _next_of_jobs(self, name: str, done: list[Alert]) -> list[Alert]:
        """After ``done`` was tried: mark each of them done and return the next alert of each of
        their jobs that has one (the jobs without one are let go of)."""
        queue, jobs = self._queues[name], self._jobs[name]
        following = []
        for alert in done:
            queue.task_done()
            later = jobs[alert.job]
            if later:
                following.append(later.popleft())
            else:
                del jobs[alert.job]
        return following

    async def _deliver(self, name: str, channel: Channel, alerts: list[Alert], first: int = 1) -> None:
        """Try ``alerts`` on ``channel`` in one message, from attempt number ``first``, until
        delivered, refused for good, or out of attempts; each attempt is reported once per alert.
        A group refused for good is split: each of its alerts is tried alone with the attempts
        left, so one alert the receiver cannot take never sinks the others."""
        for number in range(first, self._policy.attempts + 1):
            started = self._clock()
            retryable, retry_after = True, None
            try:
                async with asyncio.timeout(self._attempt_timeout):
                    await channel.send(alerts)
            except DeliveryFailed as exc:
                error, retryable, retry_after = exc.reason, exc.retryable, exc.retry_after
            except TimeoutError:
                error = f"no answer within {self._attempt_timeout:g}s"
            except Exception as exc:  # a bug in a channel must not end its task
                error = f"unexpected {type(exc).__name__} in the {channel.type} channel"
                log.error("alerts: channel %s: %s", name, error)
            else:
                for alert in alerts:
                    self._reports.put_nowait(
                        Attempt(alert, name, number, started, delivered=True, error=None, final=True)
                    )
                return
            last = number == self._policy.attempts
            if not retryable and len(alerts) > 1 and not last:
                await self._split(name, channel, alerts, number, started, error)
                return
            final = not retryable or last
            delay = None if final else retry_delay(self._policy, number, retry_after)
            retry_at = None if delay is None else self._clock() + timedelta(seconds=delay)
            for alert in alerts:
                failed = Attempt(alert, name, number, started, False, error, final, retry_at)
                self._reports.put_nowait(failed)
            log.warning(
                "alerts: %s, channel %s, attempt %d failed: %s%s",
                _jobs_of(alerts),
                name,
                number,
                error,
                "" if delay is None else f"; next try in {delay:g}s",
            )
            if delay is None:
                return
            await asyncio.sleep(delay)

    async def _split(
        self, name: str, channel: Channel, alerts: list[Alert], number: int, started: datetime, error: str
    ) -> None:
        """Report attempt ``number`` of a group refused for good as not final, then try each of
        its alerts alone, side by side, from the next attempt number (they are of different
        jobs: one job's alerts never share a group)."""
        now = self._clock()
        for alert in alerts:
            self._reports.put_nowait(Attempt(alert, name, number, started, False, error, False, now))
        log.warning(
            "alerts: %s, channel %s, attempt %d refused: %s; each alert is tried alone",
            _jobs_of(alerts),
            name,
            number,
            error,
        )

        async def alone(alert: Alert) -> None:
            await self._deliver(name, channel, [alert], number + 1)
            for current in self._current[name]:  # tried: not left undelivered if we stop now
                if alert in current:
                    current.remove(alert)

        await asyncio.gather(*(alone(alert) for alert in alerts))

    async def _report_loop(self) -> None:
        while True:
            attempts = [await self._reports.get()]
            if self._on_attempts is not None:
                while len(attempts) < REPORT_BATCH and not self._reports.empty():
                    attempts.append(self._reports.get_nowait())
            try:
                if self._on_attempts is not None:
                    await self._on_attempts(attempts)
                elif self._on_attempt is not None:
                    await self._on_attempt(attempts[0])
            except Exception as exc:  # the store may be down: delivery goes on regardless
                first = attempts[0]
                log.error(
                    "alerts: could not record %s of job %s on %s (%s: %s)",
                    f"attempt {first.number}"
                    if len(attempts) == 1
                    else f"{len(attempts)} attempts, the first",
                    first.alert.job,
                    first.channel,
                    type(exc).__name__,
                    exc,
                )
            finally:
                for _attempt in attempts:
                    self._reports.task_done()


async def send_test(
    channels: Mapping[str, Channel], name: str, *, fleet: str, flip_id: str, clock: Clock = utcnow
) -> Attempt:
    """Send one test alert (``Alert.for_test``) to channel ``name`` now, once, without retrying,
    and return the attempt (delivered, or the error): what ``cronfleet alerts test NAME`` shows and
    stores. Raises NotFound when there is no such channel."""
    channel = channels.get(name)
    if channel is None:
        raise NotFound(f"no channel called {name!r} (channels: {', '.join(sorted(channels))})")
    started = clock()
    alert = Alert.for_test(name, fleet=fleet, at=started, flip_id=flip_id)
    try:
        await channel.send([alert])
    except DeliveryFailed as exc:
        return Attempt(alert, name, 1, started, delivered=False, error=exc.reason, final=True)
    return Attempt(alert, name, 1, started, delivered=True, error=None, final=True)


def _jobs_of(alerts: Sequence[Alert], shown: int = 3) -> str:
    """``job backup`` for one alert; ``5 alerts (jobs a, b, c...)`` for a group."""
    if len(alerts) == 1:
        return f"job {alerts[0].job}"
    jobs = [alert.job for alert in alerts[:shown]]
    return f"{len(alerts)} alerts (jobs {', '.join(jobs)}{'...' if len(alerts) > shown else ''})"
