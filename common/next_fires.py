"""``JobSpec.next_fire`` for many jobs sharing schedules, without croniter most of the time.

For each (schedule, zone) it remembers the last interval it computed: the first fire strictly
after ``a`` is ``f``, so for every ``t`` with ``a <= t < f`` it is ``f`` too (no fire lies in
between). Jobs finishing one after the other, and the health machine advancing them, mostly ask
inside the interval of the previous question and need no cron evaluation at all.
"""

from __future__ import annotations

from datetime import datetime

from common.jobs import JobSpec


class NextFires:
    """The first fire of a spec strictly after an instant, remembering one interval per
    (schedule, zone). Answers exactly as ``JobSpec.next_fire``, whatever the order of the
    questions."""

    LIMIT = 65536

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], tuple[datetime, datetime]] = {}

    def after(self, spec: JobSpec, after: datetime) -> datetime:
        """The first fire of ``spec`` strictly after ``after`` (``JobSpec.next_fire``)."""
        key = (spec.schedule_text(), spec.timezone)
        known = self._last.get(key)
        if known is not None and known[0] <= after < known[1]:
            return known[1]
        fire = spec.next_fire(after)
        if len(self._last) >= self.LIMIT:
            self._last.clear()
        self._last[key] = (after, fire)
        return fire


# The one the monitor's recorder and its health machine share.
next_fires = NextFires()
