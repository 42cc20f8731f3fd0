"""Deadlines as timers: the monitor sleeps until the earliest job deadline and ticks the jobs due,
so a missed run turns ``down`` when its grace period ends, not at the next poll.

The timers are a heap of (deadline, job) in memory, rebuilt from the store at start (through the
deadline index, nothing else) and kept up to date with every record the monitor writes. A timer
is a hint: the tick reads the job's stored record (locked) and advances that, so a timer that
another monitor's write made stale costs one read and changes nothing, and two monitors ticking
the same job store its flip once. Every ``jobs_reload_seconds`` the monitor also looks for changed
jobs (``monitor.job_changes``) and arms the deadlines other monitors stored for the next moments,
so a job whose monitor stopped is still ticked.

After a restart the timers start only once the events queued for the monitor are recorded
(``serve`` waits for that): an event carries its own instant, so a run that started at 10:00 must
be recorded before its job is ticked, or it would first be reported ``down``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta

from common.cancel import stop_if_cancelled
from common.clock import Clock, utcnow
from common.collector import collector_paused
from common.retry import OutageLog, until_done
from common.store import STORE_OUTAGES, Store
from monitor import health_store
from monitor.health import Tick
from monitor.health_store import Advanced, HealthBatch, PreparedTick, log_flips, whole
from monitor.job_changes import JobWatch

log = logging.getLogger("cronfleet.monitor")

# Jobs ticked per transaction: many jobs falling due at the same instant share a transaction.
TICK_BATCH = 5000
# A herd: at least this many jobs due at the same instant are ticked ahead (``PreparedTick``),
# from ``PREPARE_LEAD_SECONDS`` before it, while at least ``PREPARE_MARGIN_SECONDS`` are left.
HERD = 500
PREPARE_LEAD_SECONDS = 30.0
PREPARE_MARGIN_SECONDS = 0.2
# Prepared ticks kept at most (a bound, never reached by one herd of a sane fleet).
PREPARED_LIMIT = 200_000


class DeadlineHeap:
    """The earliest known deadline of each job, in order. Arming keeps the earlier of two
    deadlines: an early timer that proves stale only costs a tick that changes nothing, a late
    one would miss a flip."""

    def __init__(self) -> None:
        self._heap: list[tuple[datetime, str]] = []
        self._armed: dict[str, datetime] = {}

    def __len__(self) -> int:
        return len(self._armed)

    def arm(self, job: str, at: datetime) -> bool:
        """Wake for ``job`` at ``at`` (or earlier, if it is armed earlier already). Returns whether
        ``at`` is now the earliest deadline of all."""
        armed = self._armed.get(job)
        if armed is not None and armed <= at:
            return False
        self._armed[job] = at
        heapq.heappush(self._heap, (at, job))
        if len(self._heap) > 2 * len(self._armed) + 1000:
            self._heap = [(when, name) for name, when in self._armed.items()]
            heapq.heapify(self._heap)
        return self.next_at() == at

    def disarm(self, job: str) -> None:
        """Forget ``job``'s timer."""
        self._armed.pop(job, None)

    def armed_at(self, job: str) -> datetime | None:
        """``job``'s deadline, if armed."""
        return self._armed.get(job)

    def next_at(self) -> datetime | None:
        """The earliest armed deadline, or None."""
        while self._heap:
            at, job = self._heap[0]
            if self._armed.get(job) == at:
                return at
            heapq.heappop(self._heap)
        return None

    def earliest(self) -> list[str]:
        """The jobs armed at the earliest deadline (without disarming them)."""
        at = self.next_at()
        found: list[str] = []
        # Entries equal to the smallest one form a subtree at the top of the heap.
        stack = [0] if at is not None else []
        while stack:
            index = stack.pop()
            when, job = self._heap[index]
            if when != at:
                continue
            if self._armed.get(job) == at:
                found.append(job)
            stack.extend(child for child in (2 * index + 1, 2 * index + 2) if child < len(self._heap))
        return found

    def pop_due(self, now: datetime, limit: int) -> list[tuple[str, datetime]]:
        """Disarm and return (job, deadline) for up to ``limit`` jobs due at or before ``now``,
        earliest first."""
        due: list[tuple[str, datetime]] = []
        while len(due) < limit:
            at = self.next_at()
            if at is None or at > now:
                break
            _at, job = heapq.heappop(self._heap)
            del self._armed[job]
            due.append((job, at))
        return due


async def tick(
    store: Store, jobs: Sequence[str], now: datetime, prepared: Mapping[str, PreparedTick] | None = None
) -> Advanced:
    """Apply ``Tick`` at ``now`` to ``jobs`` in one transaction: each stored record is read
    locked, advanced under the job's current spec, and written back with its flips. A job that
    is no longer stored loses its record. A job's tick in ``prepared`` is taken as it is when
    its record and spec are still those it was computed from (``HealthBatch.adopt``): the same
    result, without reading the record or running the machine at the deadline."""
    async with store.session() as session, session.begin():
        specs = await health_store.read_specs(session, jobs)
        removed = [job for job in jobs if job not in specs]
        if removed:
            await health_store.forget(session, removed)
        batch = HealthBatch(session, now)
        taken = await batch.adopt(jobs, prepared, specs) if prepared else set()
        rest = [job for job in jobs if job not in taken]
        await batch.load(rest, specs)
        for job in rest:
            batch.advance(job, Tick())
        return await batch.save()


class Deadlines:
    """The monitor's timers and its watch on the jobs: one loop, started by ``run_forever``."""

    def __init__(
        self,
        store: Store,
        reload_seconds: float,
        clock: Clock = utcnow,
        on_flips: Callable[[Advanced], None] | None = None,
    ) -> None:
        self.store = store
        # Told what each committed tick or job change did (the monitor's alerts), never waiting.
        self.on_flips = on_flips
        self.reload = timedelta(seconds=reload_seconds)
        self.clock = clock
        self.heap = DeadlineHeap()
        self.watch = JobWatch()
        self.ticks = 0
        self._wake = asyncio.Event()
        # Jobs whose record a tick could not move past its deadline (a spec this cronfleet
        # refuses, a job the machine cannot advance): not ticked again until written anew.
        self._parked: set[str] = set()
        # The next herd's ticks, computed ahead (``_prepare_herd``); dropped when a job is written.
        self._prepared: dict[str, PreparedTick] = {}

    def note(self, advanced: Advanced) -> None:
        """Arm the deadlines of records just written (by the recorder, a tick or a job change)."""
        earliest = False
        for job, at in advanced.deadlines.items():
            self._prepared.pop(job, None)  # computed from the record before this write
            if at is not None:
                self._parked.discard(job)
                earliest |= self.heap.arm(job, at)
        if earliest:
            self._wake.set()

    async def run_forever(self, started: Callable[[], Awaitable[None]]) -> None:
        """Once ``started()`` returns, rebuild the timers from the store, then tick each job as
        its deadline passes and look for changed jobs every ``reload_seconds``, forever. An
        unavailable store is logged and retried; it never stops the loop."""
        await started()
        # ``started`` waits on the broker through aio-pika, which can swallow a cancellation:
        # a monitor stopped meanwhile must not start its timers (and then never end).
        stop_if_cancelled()
        await self._rebuild()
        next_look: datetime | None = None
        outage = OutageLog(log, "the monitor's deadline timers, waiting for the store")
        while True:
            stop_if_cancelled()
            now = self.clock()
            try:
                await self._tick_due(now)
                if next_look is None or now >= next_look:
                    await self._look(now)
                    next_look = now + self.reload
                outage.ended()
            except Exception as exc:
                stop_if_cancelled()  # a cancellation a driver turned into an error
                if isinstance(exc, STORE_OUTAGES):
                    outage.failed(exc)
                else:
                    log.exception("unexpected error while ticking deadlines; retrying")
                next_look = now + self.reload
                await asyncio.sleep(self.reload.total_seconds())
                continue
            await self._prepare_herd()
            await self._sleep_until(next_look)

    async def _rebuild(self) -> None:
        async def load() -> list[tuple[str, datetime]]:
            stop_if_cancelled()
            async with self.store.session() as session:
                return await health_store.load_deadlines(session)

        stored = await until_done(load, STORE_OUTAGES, log, "the monitor cannot read the deadlines")
        for job, at in stored:
            self.heap.arm(job, at)
        log.info("monitor timers rebuilt: %d deadline(s)", len(stored))

    async def _tick_due(self, now: datetime) -> None:
        # A herd due at once is ticked batch after batch, each batch's alerts handed over as it
        # commits: a channel sends them grouped, a few messages a batch, while the next is ticked.
        with collector_paused():
            await self._tick_batches(now)

    async def _tick_batches(self, now: datetime) -> None:
        while due := self.heap.pop_due(now, TICK_BATCH):
            jobs = [job for job, _at in due]
            ready = {job: ready for job in jobs if (ready := self._prepared.pop(job, None)) is not None}
            try:
                advanced = await whole(tick(self.store, jobs, now, ready))
            except BaseException:
                for job, at in due:  # ticked again once the store answers
                    self.heap.arm(job, at)
                raise
            self.ticks += len(due)
            self._tell(advanced)  # the alerts first: people wait for them, the log does not
            log_flips(advanced)
            for job, _at in due:
                deadline = advanced.deadlines.get(job)
                if deadline is None:
                    if job not in advanced.deadlines:
                        self._parked.add(job)
                elif deadline <= now:
                    self._parked.add(job)
                else:
                    self.heap.arm(job, deadline)

    async def _prepare_herd(self) -> None:
        """If a herd (``HERD`` jobs or more) is due at the next deadline, within
        ``PREPARE_LEAD_SECONDS``, compute its ticks now, batch after batch while at least
        ``PREPARE_MARGIN_SECONDS`` are left: at the deadline, ``tick`` then only checks and
        writes them. Best effort: a failure leaves the ticks to be computed at the deadline."""
        at = self.heap.next_at()
        if at is None or not self._time_to_prepare(at, PREPARE_LEAD_SECONDS):
            return
        herd = self.heap.earliest()
        if len(herd) < HERD:
            return
        todo = [job for job in herd if (known := self._prepared.get(job)) is None or known.at != at]
        if len(self._prepared) + len(todo) > PREPARED_LIMIT:
            self._prepared.clear()
        for first in range(0, len(todo), TICK_BATCH):
            if not self._time_to_prepare(at, PREPARE_LEAD_SECONDS):
                return
            some = todo[first : first + TICK_BATCH]
            try:
                computed = await whole(self._prepare(some, at))
            except Exception as exc:
                stop_if_cancelled()
                log.debug("ticks not prepared ahead (%s); computed at their deadline", exc)
                return
            # A job written meanwhile (``note``) or no longer due then is not taken.
            for job, prepared in computed.items():
                if self.heap.armed_at(job) == at:
                    self._prepared[job] = prepared

    def _time_to_prepare(self, at: datetime, lead: float) -> bool:
        left = (at - self.clock()).total_seconds()
        return PREPARE_MARGIN_SECONDS <= left <= lead

    async def _prepare(self, jobs: Sequence[str], at: datetime) -> dict[str, PreparedTick]:
        async with self.store.session() as session:
            return await health_store.prepare_ticks(session, jobs, at)

    async def _look(self, now: datetime) -> None:
        advanced, removed = await whole(self.watch.look(self.store, now))
        log_flips(advanced)
        self._tell(advanced)
        for job in removed:
            self.heap.disarm(job)
            self._parked.discard(job)
            self._prepared.pop(job, None)
        self.note(advanced)
        # Deadlines another monitor stored (it may have stopped): armed here too, to be safe.
        async with self.store.session() as session:
            soon = await health_store.load_deadlines(session, until=now + 2 * self.reload)
        for job, at in soon:
            if job not in self._parked:
                self.heap.arm(job, at)

    def _tell(self, advanced: Advanced) -> None:
        if self.on_flips is not None and advanced.flips:
            try:
                self.on_flips(advanced)
            except Exception:  # what listens must never stop the timers
                log.exception("unexpected error handing over %d flip(s)", len(advanced.flips))

    async def _sleep_until(self, next_look: datetime) -> None:
        """Until the earliest deadline or ``next_look``, or until ``note`` arms an earlier one."""
        deadline = self.heap.next_at()
        wake_at = next_look if deadline is None else min(deadline, next_look)
        seconds = (wake_at - self.clock()).total_seconds()
        self._wake.clear()
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
