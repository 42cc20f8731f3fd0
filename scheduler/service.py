"""The scheduler process: wires the planner to the store (jobs, fires) and to the broker."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy.exc import SQLAlchemyError

from common import fires
from common.catalog import load_jobs, planned_pools, read_job_changes, record_next_fires
from common.clock import Clock, utcnow
from common.connection import CONNECT_ERRORS, connect
from common.consuming import consume_forever, settle
from common.envelope import Accepted, open_envelope
from common.errors import BrokerUnavailable
from common.framing import FramedMessage
from common.messages import CONTROL_ADAPTER, SchedulerHeartbeat, Trigger, trigger_id
from common.publisher import Publisher
from common.retry import OutageLog
from common.services import ServiceOptions, dead_local_instances, local_prefix
from common.settings import Settings
from common.signing import Role
from common.store import STORE_OUTAGES, Store
from common.topology import Topology
from scheduler.misfire import Misfire
from scheduler.missed import log_misfires, record_misfires
from scheduler.planner import DueFire, Planner

log = logging.getLogger("cronfleet.scheduler")

OUTAGES = (*STORE_OUTAGES, BrokerUnavailable, *CONNECT_ERRORS)
# Fires are prepared this long before their instant: the job's spec read, its trigger built, its
# fire claimed in the store (as of its instant, so that no scheduler takes it for pending before
# then). At the instant only the publish is left, so a second's burst goes out in milliseconds.
FIRE_AHEAD = timedelta(seconds=2)
# At most this many fire names in one log line (the count is always there).
_LOGGED_FIRES = 5
_OUTAGE_PAUSE = 1.0
# A pending sweep does not start this close to a prepared instant, for at most this many rounds.
_SWEEP_CLEARANCE = 0.2
_SWEEPS_YIELDED = 3
_LONG_AGO = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class ReadyFire:
    """A fire claimed ahead of its instant ``at``, waiting to be published: ``job`` planned under
    ``plan`` when it was prepared."""

    at: datetime
    fire: fires.PendingFire
    job: str
    plan: int
    framed: FramedMessage


class Scheduler:
    """One scheduler: reloads jobs, prepares (claims) each fire ``FIRE_AHEAD`` before its
    instant, and publishes it at its instant."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        publisher: Publisher,
        name: str,
        clock: Clock = utcnow,
    ) -> None:
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.name = name
        self.clock = clock
        self.planner = Planner()
        self.topology = Topology(settings.namespace)
        self._pools: set[str] = set()
        # The jobs version this scheduler has read up to (None: nothing read yet).
        self._version: int | None = None
        self._reloaded_at: datetime | None = None
        # Triggers whose fire could not be claimed yet (the store was unavailable).
        self._unclaimed: list[Trigger] = []
        # Fires claimed ahead of their instant, by instant; and their trigger ids.
        self._ready: list[tuple[datetime, int, ReadyFire]] = []
        self._ready_ids: set[str] = set()
        self._ready_numbers = itertools.count()
        # Held while publishing: the outbox sweep must never see this scheduler's in-flight fires
        # as pending, or it would publish them a second time.
        self._publishing = asyncio.Lock()
        # Set by a ``jobs.changed`` control message: reload now, not at the next poll.
        self._changed = asyncio.Event()
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self.publisher_keyring = settings.keyring(warn_legacy=False)

    async def reload(self) -> None:
        """Read the jobs changed or removed since the version last read (at start: every planned
        job's name and next fire, no spec); declare any new pool's queue."""
        changes = await read_job_changes(self.store, self._version)
        now = self.clock()
        if self.planner.started_at is None:
            # Fires due well before this scheduler started were missed; later ones are late.
            self.planner.started_at = now
        for name in changes.unplanned:
            self.planner.drop(name)
        # A stored fire long past was missed while no scheduler ran: planned as it is, the
        # planner hands its job's backlog to the job's misfire policy when it falls due.
        for name, when, version in changes.planned:
            self.planner.plan(name, when, version)
        if changes.planned or changes.unplanned:
            await self._withdraw_changed()
        if changes.planned or changes.unplanned or self._version is None:
            # Jobs stored before next fires were: their first is computed from their spec now.
            await self._learn_specs(now, fire_due=False)
            for pool in await planned_pools(self.store) - self._pools:
                await self.topology.declare_pool(self.publisher.channel, pool)
                self._pools.add(pool)
        self._version = changes.version
        self._reloaded_at = now

    async def _learn_specs(self, now: datetime, *, fire_due: bool = True) -> None:
        """Read the specs the planner needs (jobs due by ``now``, and jobs without a first fire),
        in bounded chunks."""
        wanted = self.planner.wanted_specs(now) if fire_due else self.planner.wanted_specs(_LONG_AGO)
        if wanted:
            self.planner.learn(await load_jobs(self.store, wanted), now, wanted)

    async def plan_forever(self) -> None:
        """Fire due jobs as they fall due; reload the jobs every ``jobs_reload_seconds``.

        An unavailable store or broker is logged and retried; it never stops the loop.
        """
        reload_every = self.settings.jobs_reload_seconds
        outage = OutageLog(log, "scheduler waiting for the store or the broker")
        while True:
            now = self.clock()
            try:
                # Fire first: a reload may re-plan a job, and what is due now must go out first.
                await self.fire_due(now)
                if self._reloaded_at is None or (now - self._reloaded_at).total_seconds() >= reload_every:
                    await self.reload()
                    await self.fire_due(self.clock())
                outage.ended()
            except OUTAGES as exc:
                outage.failed(exc)
                self._reloaded_at = self.clock()
                # What is due stays due: wait a moment rather than spin on it.
                await asyncio.sleep(_OUTAGE_PAUSE)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self._seconds_to_next_work(reload_every))
            if self._changed.is_set():
                self._changed.clear()
                self._reloaded_at = None  # reload at once: polling is only the fallback

    def jobs_changed(self, message: AbstractIncomingMessage) -> None:
        """Take a control message (``jobs.changed``): verified, it wakes the planning loop to
        reload now; refused, it is dead-lettered with its reason (``listen_for_changes``)."""
        self._inbox.put_nowait(message)

    async def listen_for_changes(self) -> None:
        """Handle the control messages ``consume_forever`` hands over, one at a time, forever."""
        while True:
            message = await self._inbox.get()
            opened = open_envelope(
                message.body,
                message.headers or {},
                self.publisher_keyring,
                CONTROL_ADAPTER,
                self.clock(),
                namespace=self.settings.namespace,
                routing_key=message.routing_key or "",
            )
            if isinstance(opened, Accepted):
                log.info("jobs changed (%s); reloading now", opened.message.by)
                self._changed.set()
                await settle(message)
                continue
            log.warning("refused control message: %s (%s)", opened.reason.value, opened.detail)
            try:
                await self.publisher.dead_letter(message, opened, self.name)
            except BrokerUnavailable as exc:
                log.warning("could not dead-letter a refused control message (%s); dropped", exc)
            except Exception:
                # No message may stop the scheduler: a copy that fails for another reason is
                # logged, and the message settled all the same (it carries no authority).
                log.exception("could not dead-letter a refused control message; dropped")
            await settle(message)

    def _seconds_to_next_work(self, reload_every: float) -> float:
        """Until the next fire, the next reload, or a retry of unclaimed fires, whichever is first."""
        now = self.clock()
        moments = [(self._reloaded_at or now) + timedelta(seconds=reload_every)]
        wakeup = self.planner.next_wakeup()
        if wakeup is not None:
            moments.append(wakeup - FIRE_AHEAD)
        if self._ready:
            moments.append(self._ready[0][0])
        if self._unclaimed:
            moments.append(now + timedelta(seconds=1))
        return max(0.0, (min(moments) - now).total_seconds())

    async def fire_due(self, now: datetime) -> int:
        """Publish the prepared fires whose instant has come by ``now``, then prepare those due
        within ``FIRE_AHEAD`` of it (publishing at once any already due); returns how many this
        scheduler published.

        Fires that cannot be claimed because the store is unavailable are kept and claimed on a
        later call, until their triggers expire (an expired one is logged as lost).
        """
        published = await self.publish_ready(now)
        await self.prepare(now + FIRE_AHEAD, now)
        return published + await self.publish_ready(now)

    async def prepare(self, until: datetime, now: datetime) -> int:
        """Claim every fire that goes out by ``until`` and keep the ones won for
        ``publish_ready``; returns how many were won. Each fire is claimed as of when it goes
        out: its instant plus its jitter offset, or ``now`` for a fire caught up after downtime
        (``fires.claim``)."""
        await self._learn_specs(until)
        due = self.planner.pop_due(until)
        await self._record_misfires(self.planner.take_misfires(), now)
        # When each is meant to go out (jitter, catch-up): its claim counts from then, and its
        # fire lag; a fire retried after the store failed counts from its instant.
        goes_at = [now if f.caught_up else f.job.publish_at(f.scheduled_at) for f in due]
        fresh = [self._trigger(f, max(now, at)) for f, at in zip(due, goes_at, strict=True)]
        due_at = {trigger.id: at for trigger, at in zip(fresh, goes_at, strict=True)}
        triggers = [*self._unclaimed, *fresh]
        self._unclaimed = []
        if not triggers:
            return 0
        try:
            won = await fires.claim(self.store, triggers, self.name, now, due_at)
        except (SQLAlchemyError, *STORE_OUTAGES):
            for trigger in triggers:
                if trigger.expires_at > now:
                    self._unclaimed.append(trigger)
                else:
                    log.error("fire %s expired before the store could record it", trigger.id)
            raise
        plans = {f.job.name: f.plan for f in due}
        # A trigger says when it is published: the moment its fire goes out.
        instants = {t.id: t.published_at for t in triggers}
        # Signed and framed now, so that at its instant only the write is left.
        framed = self.publisher.frame_triggers(
            [(fire.body.encode(), fire.pool, fire.trigger_id, instants[fire.trigger_id]) for fire in won]
        )
        for fire, frames in zip(won, framed, strict=True):
            job = fire.trigger_id.rpartition("@")[0]
            ready = ReadyFire(instants[fire.trigger_id], fire, job, plans.get(job, -1), frames)
            heapq.heappush(self._ready, (ready.at, next(self._ready_numbers), ready))
            self._ready_ids.add(fire.trigger_id)
        await self._record_next_fires(due, {fire.trigger_id for fire in won})
        log.debug(
            "prepared fires due by %s: %d claimed here of %d", until.isoformat(), len(won), len(triggers)
        )
        return len(won)

    async def publish_ready(self, now: datetime) -> int:
        """Publish the prepared fires whose instant has come by ``now`` (their confirms pipelined,
        each marked published at its own confirm); returns how many were. One the broker did not
        confirm stays pending in the store, for ``publish_pending_forever``."""
        if not self._ready or self._ready[0][0] > now:
            return 0
        async with self._publishing:
            going: list[ReadyFire] = []
            while self._ready and self._ready[0][0] <= now:
                going.append(heapq.heappop(self._ready)[2])
            try:
                published = await fires.publish(
                    self.store,
                    self.publisher,
                    [r.fire for r in going],
                    self.name,
                    framed={r.fire.trigger_id: r.framed for r in going},
                )
            finally:
                self._ready_ids.difference_update(r.fire.trigger_id for r in going)
        names = [r.fire.trigger_id for r in going]
        log.info(
            "fired %d: %s%s",
            len(names),
            ", ".join(names[:_LOGGED_FIRES]),
            ", ..." if len(names) > _LOGGED_FIRES else "",
        )
        if published < len(going):
            log.warning("%d fire(s) not confirmed by the broker yet: retried", len(going) - published)
        return published

    def _instant_within(self, seconds: float) -> bool:
        """Whether prepared fires go out within ``seconds`` from now."""
        return bool(self._ready) and (self._ready[0][0] - self.clock()).total_seconds() < seconds

    def next_fire_at(self) -> datetime | None:
        """The instant of this scheduler's next fire (prepared or planned), None without any."""
        moments = [self._ready[0][0]] if self._ready else []
        wakeup = self.planner.next_wakeup()
        if wakeup is not None:
            moments.append(wakeup)
        return min(moments, default=None)

    async def _withdraw_changed(self) -> None:
        """Withdraw the prepared fires of jobs re-planned, paused or removed since they were
        prepared: a fire goes out as its job is at its instant, never as it was a second before."""
        stale = [entry for entry in self._ready if self.planner.plan_of(entry[2].job) != entry[2].plan]
        if not stale:
            return
        ids = [entry[2].fire.trigger_id for entry in stale]
        withdrawn = await fires.withdraw(self.store, ids, self.name)
        gone = set(ids)
        self._ready = [entry for entry in self._ready if entry[2].fire.trigger_id not in gone]
        heapq.heapify(self._ready)
        self._ready_ids -= gone
        log.info("withdrew %d prepared fire(s) of jobs that changed: %s", withdrawn, ", ".join(ids[:5]))

    @staticmethod
    def _trigger(fire: DueFire, published_at: datetime) -> Trigger:
        """The trigger of ``fire``; a fire caught up after downtime expires counting from now."""
        return fire.job.trigger_at(
            fire.scheduled_at, published_at, expires_from=published_at if fire.caught_up else None
        )

    async def _record_misfires(self, misfires: list[Misfire], now: datetime) -> None:
        """Log and store the backlogs the misfire policy settled, and the next fire of their jobs
        (a job whose backlog sent nothing is not re-settled at the next start). The fires go out
        whatever happens here: a store that fails is logged with the counts."""
        if not misfires:
            return
        log_misfires(misfires)
        try:
            await record_misfires(self.store, misfires, self.name, now)
        except (SQLAlchemyError, *STORE_OUTAGES) as exc:
            log.error("missed fires of %d job(s) not recorded (%s): see the line above", len(misfires), exc)
        plans = {m.job: self.planner.plan_of(m.job) for m in misfires}
        fired = [
            (m.job, plan, m.next_at)
            for m in misfires
            if m.next_at is not None and (plan := plans[m.job]) is not None and plan >= 0
        ]
        if fired:
            try:
                await record_next_fires(self.store, fired)
            except (SQLAlchemyError, *STORE_OUTAGES) as exc:
                log.warning("next fires of %d job(s) not stored (%s)", len(fired), exc)

    async def _record_next_fires(self, due: list[DueFire], won: set[str]) -> None:
        """Store the next fire of each job whose fire this scheduler won, so that a scheduler
        (re)starting plans it without reading its spec. Only an optimisation: a failure is logged."""
        fired = [
            (f.job.name, f.plan, f.next_at)
            for f in due
            if f.next_at is not None and f.plan >= 0 and trigger_id(f.job.name, f.scheduled_at) in won
        ]
        if not fired:
            return
        try:
            await record_next_fires(self.store, fired)
        except (SQLAlchemyError, *STORE_OUTAGES) as exc:
            log.warning("next fires of %d job(s) not stored (%s): computed again at start", len(fired), exc)

    async def adopt_dead_claims(self) -> None:
        """Make the pending fires of this host's earlier scheduler processes (gone: killed,
        crashed, restarted) this one's own, so that they go out now rather than once their
        claims are stale (``fires.STALE_CLAIM_SECONDS``)."""
        now = self.clock()
        claimers = await fires.pending_claimers(self.store, local_prefix("scheduler"), now)
        dead = dead_local_instances("scheduler", claimers)
        adopted = await fires.adopt_claims(self.store, self.name, dead, now)
        if adopted:
            log.warning(
                "took over %d unpublished fire(s) of %s, which stopped before publishing them",
                adopted,
                ", ".join(dead),
            )

    async def publish_pending_forever(self, every: float = fires.PENDING_EVERY_SECONDS) -> None:
        """Keep publishing fires the broker has not confirmed yet (after an outage or a crash).

        A sweep holds the publishing lock while it reads the store: one about to collide with a
        prepared instant waits for the next round (at most ``_SWEEPS_YIELDED`` rounds in a row,
        so that fires prepared all the time never keep the pending ones waiting)."""
        yielded = 0
        while True:
            if yielded < _SWEEPS_YIELDED and self._instant_within(_SWEEP_CLEARANCE):
                yielded += 1
                await asyncio.sleep(every)
                continue
            yielded = 0
            try:
                async with self._publishing:
                    published = await fires.publish_pending(
                        self.store, self.publisher, self.name, self.clock(), skip=self._ready_ids
                    )
            except OUTAGES as exc:
                log.debug("pending fires not published yet: %s", exc)
            else:
                if published:
                    log.warning("published %d trigger(s) that had been waiting for the broker", published)
            await asyncio.sleep(every)

    async def heartbeat_forever(self) -> None:
        """Say this scheduler is alive, every ``heartbeat_seconds``."""
        while True:
            beat = SchedulerHeartbeat(
                scheduler=self.name,
                at=self.clock(),
                jobs=len(self.planner),
                next_fire_at=self.next_fire_at(),
            )
            with contextlib.suppress(BrokerUnavailable):
                await self.publisher.event(beat)
            await asyncio.sleep(self.settings.heartbeat_seconds)


async def serve(settings: Settings, options: ServiceOptions) -> None:
    """Run a scheduler until cancelled. Waits out an unreachable broker; fails on bad settings."""
    keyring = settings.keyring()
    # Triggers under the trigger key, its own heartbeats under the event key.
    keyring.require([Role.TRIGGER, Role.EVENT], who="a scheduler")
    name = options.instance("scheduler")
    store = await Store.open(settings.database_url, settings.database_schema)
    try:
        connection = await connect(settings.amqp_url, name, wait=True)
        try:
            publisher = await Publisher.open(connection, Topology(settings.namespace), keyring)
            scheduler = Scheduler(settings, store, publisher, name)
            await scheduler.reload()
            await scheduler.adopt_dead_claims()
            log.info("scheduler %s planning %d job(s)", name, len(scheduler.planner))
            topology = Topology(settings.namespace)
            control = uuid.uuid4().hex[:12]
            async with asyncio.TaskGroup() as tasks:
                # Ready once it listens for jobs.changed: a change made after that is seen at once.
                tasks.create_task(
                    consume_forever(
                        connection,
                        lambda channel: topology.declare_control(channel, control),
                        16,
                        scheduler.jobs_changed,
                        options.ready,
                    )
                )
                tasks.create_task(scheduler.listen_for_changes())
                tasks.create_task(scheduler.plan_forever())
                tasks.create_task(scheduler.publish_pending_forever())
                tasks.create_task(scheduler.heartbeat_forever())
        finally:
            await connection.close()
    finally:
        await store.close()
