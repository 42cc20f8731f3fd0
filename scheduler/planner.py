"""The timer heap: which jobs fall due when. Pure and synchronous; time is always an argument.

Two ways to feed it. ``sync`` hands it every spec (small fleets, tests). ``plan`` hands it only a
job's name, its next fire instant and a plan number (the scheduler passes the job's version in
the store): nothing is parsed until the job falls due, when ``wanted_specs`` names the specs it
needs and ``learn`` gives them. Heap entries are small tuples ``(instant to go out, name, plan
number, scheduled instant)``: the two instants differ by a jittered job's offset (``JobSpec.jitter``),
applied once the spec is known. A fire reached too late is settled by the job's misfire policy
(``scheduler.misfire``).
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from common.jobs import JobSpec
from scheduler.misfire import START_TOLERANCE, Misfire, missed_before, settle_backlog

log = logging.getLogger("cronfleet.scheduler")

_JUST_BEFORE = timedelta(microseconds=1)
# A job planned by name keeps its parsed spec after a fire only when it fires again within this
# long: the specs held stay few, and a job firing rarely is read again when it falls due.
SPEC_HORIZON = timedelta(minutes=5)
_Entry = tuple[datetime, str, int, datetime]


@dataclass(frozen=True)
class DueFire:
    """``job`` falls due at ``scheduled_at``; planned under ``plan``; its next fire is ``next_at``
    (None when it has none). ``caught_up``: a fire missed during downtime that its misfire policy
    sends now."""

    job: JobSpec
    scheduled_at: datetime
    plan: int = 0
    next_at: datetime | None = None
    caught_up: bool = False


@dataclass
class Planner:
    """Next fire times of the jobs it plans, kept in a heap (one entry per job).

    Only enabled jobs with an action are planned: heartbeat-only jobs are watched by the monitor.
    A job changed by ``sync`` is re-planned from ``now``; one changed through ``plan`` from the
    instant given. Stale heap entries (their plan number is no longer the job's) are dropped
    lazily.
    """

    _jobs: dict[str, JobSpec] = field(default_factory=dict)
    _fingerprints: dict[str, str] = field(default_factory=dict)
    _plans: dict[str, int] = field(default_factory=dict)
    _pending: dict[str, datetime] = field(default_factory=dict)
    # Jobs planned by name without a fire instant yet: their first is computed from their spec.
    _unscheduled: set[str] = field(default_factory=set)
    _heap: list[_Entry] = field(default_factory=list)
    _numbers: itertools.count[int] = field(default_factory=itertools.count)
    # Backlogs settled by ``pop_due`` since the last ``take_misfires``.
    _misfires: list[Misfire] = field(default_factory=list)
    # When the scheduler started planning (``misfire.missed_before``); None: long ago.
    started_at: datetime | None = None

    def __len__(self) -> int:
        return len(self._plans)

    @property
    def specs_held(self) -> int:
        """How many parsed specs the planner holds (jobs planned by name hold none until due)."""
        return len(self._jobs)

    def sync(self, specs: Iterable[JobSpec], now: datetime) -> None:
        """Plan exactly the enabled, runnable jobs of ``specs``; new ones from ``now``.

        A changed job is re-planned from its pending fire if that is already due, so that an
        edit made as a job falls due does not drop the fire.
        """
        wanted = {spec.name: spec for spec in specs if spec.enabled and spec.action is not None}
        for name in set(self._plans) - set(wanted):
            self.drop(name)
        for name, spec in wanted.items():
            fingerprint = spec.fingerprint()
            if self._fingerprints.get(name) == fingerprint:
                continue
            pending = self._pending.get(name)
            self._jobs[name] = spec
            self._fingerprints[name] = fingerprint
            self._plans[name] = -1 - next(self._numbers)  # never a store version (those are >= 0)
            self._push(spec, min(now, pending - _JUST_BEFORE) if pending is not None else now)
        self._compact()

    def plan(self, name: str, when: datetime | None, plan: int) -> None:
        """Plan job ``name`` for ``when`` under plan number ``plan`` (its version), replacing any
        plan it had and forgetting its spec. ``when`` None: its first fire is computed from its
        spec, from the ``now`` of the ``learn`` that gives it."""
        if self._plans.get(name) == plan:
            return
        self._plans[name] = plan
        self._jobs.pop(name, None)
        self._fingerprints.pop(name, None)
        self._pending.pop(name, None)
        if when is None:
            self._unscheduled.add(name)
        else:
            self._unscheduled.discard(name)
            heapq.heappush(self._heap, (when, name, plan, when))
        self._compact()

    def drop(self, name: str) -> None:
        """Stop planning job ``name`` (removed, disabled, or unreadable)."""
        self._plans.pop(name, None)
        self._jobs.pop(name, None)
        self._fingerprints.pop(name, None)
        self._pending.pop(name, None)
        self._unscheduled.discard(name)

    def wanted_specs(self, now: datetime) -> list[str]:
        """The jobs whose spec the planner needs before ``pop_due(now)``: those due by ``now`` and
        those without a first fire yet, that it does not hold."""
        wanted = set(self._unscheduled)
        due: list[_Entry] = []
        while self._heap and self._heap[0][0] <= now:
            entry = heapq.heappop(self._heap)
            if self._is_current(entry):
                due.append(entry)
                if entry[1] not in self._jobs:
                    wanted.add(entry[1])
        for entry in due:
            heapq.heappush(self._heap, entry)
        return sorted(wanted)

    def learn(self, specs: Iterable[JobSpec], now: datetime, asked: Collection[str] = ()) -> None:
        """Take the specs of jobs planned by name. A job among ``asked`` whose spec is not in
        ``specs`` (removed meanwhile, or unreadable), or that is not runnable, stops being planned
        until it changes again. A job without a first fire gets one, from ``now``."""
        given: set[str] = set()
        for spec in specs:
            given.add(spec.name)
            if spec.name not in self._plans:
                continue
            if not (spec.enabled and spec.action is not None):
                self.drop(spec.name)
                continue
            self._jobs[spec.name] = spec
            if spec.name in self._unscheduled:
                self._unscheduled.discard(spec.name)
                self._push(spec, now)
        for name in set(asked) - given:
            if name in self._plans:
                log.error("job %s: its spec could not be read; it is not planned until it changes", name)
                self.drop(name)

    def next_wakeup(self) -> datetime | None:
        """The earliest planned fire, or None when nothing is planned."""
        while self._heap and not self._is_current(self._heap[0]):
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: datetime) -> list[DueFire]:
        """Every fire due to go out at or before ``now``, each job re-planned after its fire.

        A jittered fire whose offset puts it after ``now`` waits for it. A missed fire (due to
        go out at or before ``misfire.missed_before``) settles the missed part of the job's backlog by
        its misfire policy: what it sends comes back ``caught_up``, the settlement itself from
        ``take_misfires``; the job's later fires, due by ``now`` or not, follow as usual. A due
        job whose spec the planner does not hold (see ``wanted_specs``) stays due.
        """
        due: list[DueFire] = []
        waiting: list[_Entry] = []
        while self._heap and self._heap[0][0] <= now:
            entry = heapq.heappop(self._heap)
            if not self._is_current(entry):
                continue
            _at, name, plan, when = entry
            spec = self._jobs.get(name)
            if spec is None:
                waiting.append(entry)
                continue
            publish_at = spec.publish_at(when)
            if publish_at > now:
                waiting.append((publish_at, name, plan, when))
                continue
            if self._is_missed(spec, publish_at, now):
                cutoff = missed_before(spec, self.started_at, now)
                misfire = settle_backlog(spec, when, cutoff, now)
                self._misfires.append(misfire)
                next_at = self._push(spec, min(cutoff, now))
                due.extend(DueFire(spec, at, plan, next_at, caught_up=True) for at in misfire.fire)
                continue
            due.append(DueFire(spec, when, plan, self._push(spec, when)))
        for entry in waiting:
            heapq.heappush(self._heap, entry)
        return due

    def plan_of(self, name: str) -> int | None:
        """The plan number job ``name`` is planned under (its store version), or None."""
        return self._plans.get(name)

    def _is_missed(self, spec: JobSpec, publish_at: datetime, now: datetime) -> bool:
        """``publish_at <= misfire.missed_before(...)``, cheaply: it runs for every fire."""
        if (now - publish_at).total_seconds() >= spec.expires_after_seconds:
            return True
        return self.started_at is not None and publish_at <= self.started_at - START_TOLERANCE

    def take_misfires(self) -> list[Misfire]:
        """The backlogs ``pop_due`` settled since the last call (each once)."""
        taken, self._misfires = self._misfires, []
        return taken

    def _push(self, spec: JobSpec, after: datetime) -> datetime | None:
        try:
            when = spec.next_fire(after)
        except ValueError as exc:
            log.error("job %s: no fire after %s (%s); it is not planned", spec.name, after.isoformat(), exc)
            self.drop(spec.name)
            return None
        plan = self._plans[spec.name]
        if spec.name in self._fingerprints:
            self._pending[spec.name] = when
        elif when - after > SPEC_HORIZON:
            self._jobs.pop(spec.name, None)
        heapq.heappush(self._heap, (spec.publish_at(when), spec.name, plan, when))
        return when

    def _compact(self) -> None:
        if len(self._heap) > 2 * len(self._plans) + 64:
            self._heap = [entry for entry in self._heap if self._is_current(entry)]
            heapq.heapify(self._heap)

    def _is_current(self, entry: _Entry) -> bool:
        return self._plans.get(entry[1]) == entry[2]
