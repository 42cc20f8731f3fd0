"""The timer heap: which jobs fall due when. Pure and synchronous; time is always an argument."""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from common.cron import next_fire
from common.jobs import JobSpec

log = logging.getLogger("cronfleet.scheduler")

_JUST_BEFORE = timedelta(microseconds=1)


@dataclass(frozen=True)
class DueFire:
    """``job`` falls due at ``scheduled_at``."""

    job: JobSpec
    scheduled_at: datetime


@dataclass
class Planner:
    """Next fire times of the jobs it plans, kept in a heap (one entry per job).

    Only enabled jobs with an action are planned: heartbeat-only jobs are watched by the monitor.
    A job changed by ``sync`` is re-planned from ``now``; stale heap entries (their plan number
    is no longer the job's) are dropped lazily.
    """

    _jobs: dict[str, JobSpec] = field(default_factory=dict)
    _fingerprints: dict[str, str] = field(default_factory=dict)
    _plans: dict[str, int] = field(default_factory=dict)
    _pending: dict[str, datetime] = field(default_factory=dict)
    _heap: list[tuple[datetime, str, int]] = field(default_factory=list)
    _numbers: itertools.count[int] = field(default_factory=itertools.count)

    def __len__(self) -> int:
        return len(self._jobs)

    def sync(self, specs: Iterable[JobSpec], now: datetime) -> None:
        """Plan exactly the enabled, runnable jobs of ``specs``; new ones from ``now``.

        A changed job is re-planned from its pending fire if that is already due, so that an
        edit made as a job falls due does not drop the fire.
        """
        wanted = {spec.name: spec for spec in specs if spec.enabled and spec.action is not None}
        for name in set(self._jobs) - set(wanted):
            del self._jobs[name], self._fingerprints[name], self._plans[name], self._pending[name]
        for name, spec in wanted.items():
            fingerprint = spec.fingerprint()
            if self._fingerprints.get(name) == fingerprint:
                continue
            pending = self._pending.get(name)
            self._jobs[name] = spec
            self._fingerprints[name] = fingerprint
            self._plans[name] = next(self._numbers)
            self._push(spec, min(now, pending - _JUST_BEFORE) if pending is not None else now)
        if len(self._heap) > 2 * len(self._jobs) + 64:
            self._heap = [entry for entry in self._heap if self._is_current(entry)]
            heapq.heapify(self._heap)

    def next_wakeup(self) -> datetime | None:
        """The earliest planned fire, or None when nothing is planned."""
        while self._heap and not self._is_current(self._heap[0]):
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: datetime) -> list[DueFire]:
        """Every fire due at or before ``now``, each job re-planned after its fire.

        A fire already older than its job's expiry is not returned (its trigger would be refused):
        the job is re-planned from ``now`` and the skip is logged.
        """
        due: list[DueFire] = []
        while self._heap and self._heap[0][0] <= now:
            entry = heapq.heappop(self._heap)
            if not self._is_current(entry):
                continue
            when, name, _plan = entry
            spec = self._jobs[name]
            if (now - when).total_seconds() >= spec.expires_after_seconds:
                log.warning("job %s: fire at %s skipped, the scheduler was too late", name, when)
                self._push(spec, now)
                continue
            due.append(DueFire(spec, when))
            self._push(spec, when)
        return due

    def _push(self, spec: JobSpec, after: datetime) -> None:
        when = next_fire(spec.schedule, spec.zone(), after)
        self._pending[spec.name] = when
        heapq.heappush(self._heap, (when, spec.name, self._plans[spec.name]))

    def _is_current(self, entry: tuple[datetime, str, int]) -> bool:
        return self._plans.get(entry[1]) == entry[2]
