"""Retries of a trigger, as pure decisions: which attempt may follow which, how long it waits,
which delay queue holds it, under which key it is claimed.

A retry is the scheduler's signed trigger body again, unchanged (a worker cannot sign triggers),
published with its attempt number in the ``cronfleet-attempt`` header to the delay exchange;
the delay queue it lands in dead-letters it back to the pool after its delay. The header is not
signed: what makes attempt N real is the store, where attempt N-1 of the same trigger must have
ended in a failure that may be retried (``may_follow``). So a forged or repeated header can run
nothing that the fleet did not already owe.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from datetime import datetime, timedelta

from common.messages import MAX_RETRY_DELAY_SECONDS, OnLost, RetryPolicy, RunStatus, Trigger

ATTEMPT_HEADER = "cronfleet-attempt"
DELAY_HEADER = "cronfleet-delay"

# The delays the delay queues hold, in seconds: one queue per step, so the number of queues is
# bounded whatever the jobs ask. A retry waits the longest step not longer than its computed
# delay (so 10 s, 20 s, 40 s, 80 s wait 10 s, 20 s, 30 s, 60 s).
DELAY_STEPS: tuple[int, ...] = (
    1, 2, 3, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 450, 600, 900, 1200, 1800, 2700, 3600,
    5400, 7200, 10800, 14400, 21600, 28800, 43200, 64800, 86400,
)  # fmt: skip
assert DELAY_STEPS[-1] == MAX_RETRY_DELAY_SECONDS

# How a run may end and still be tried again (an expired, skipped or duplicate run is not a failure
# of the job; a lost run is retried only under ``on_lost = "retry"``).
RETRYABLE = frozenset({RunStatus.FAILED, RunStatus.TIMED_OUT})


def backoff_delay(policy: RetryPolicy, attempt: int) -> float:
    """How long attempt ``attempt`` (2 or more) waits after the previous one ended, in seconds:
    ``backoff``, doubled at each further attempt, never more than ``max_delay``."""
    if attempt < 2:
        raise ValueError("only a retry (attempt 2 or more) waits")
    exponent = min(attempt - 2, 64)  # 2**64 times any backoff is past every maximum
    return min(policy.backoff_seconds * 2.0**exponent, policy.max_delay_seconds)


def delay_step(seconds: float) -> int:
    """The delay queue's step for a wait of ``seconds``: the longest step not longer than it (the
    shortest step for less)."""
    index = bisect.bisect_right(DELAY_STEPS, seconds) - 1
    return DELAY_STEPS[max(index, 0)]


def claim_key(trigger_id: str, attempt: int) -> str:
    """The key attempt ``attempt`` of ``trigger_id`` is claimed under: the trigger id itself for
    the first (as before retries existed), ``<id>#<attempt>`` for a retry."""
    return trigger_id if attempt == 1 else f"{trigger_id}#{attempt}"


def exclusive_key(job: str) -> str:
    """The key of ``job``'s lease, held by whichever run of an ``exclusive`` job is in progress
    (a job name holds no ``:``, so no trigger id is ever this)."""
    return f"exclusive:{job}"


def attempt_of(headers: Mapping[str, object]) -> int | None:
    """The attempt number a delivery carries: 1 when it has no ``cronfleet-attempt`` header, None
    when the header is there but is not a whole number from 1 to 1000."""
    value = headers.get(ATTEMPT_HEADER)
    if value is None:
        return 1
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("ascii", "replace")
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 4:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1000:
        return value
    return None


def next_attempt(trigger: Trigger, attempt: int, status: RunStatus) -> int | None:
    """The attempt to publish after attempt ``attempt`` of ``trigger`` ended with ``status``, or
    None when that end is final (a success, a status that is not retried, attempts used up)."""
    if attempt >= trigger.attempts:
        return None
    if status in RETRYABLE:
        return attempt + 1
    if status is RunStatus.LOST and trigger.retry is not None and trigger.retry.on_lost is OnLost.RETRY:
        return attempt + 1
    return None


def may_follow(trigger: Trigger, attempt: int, previous_status: RunStatus | None) -> str | None:
    """None when attempt ``attempt`` of ``trigger`` may run, given how its previous attempt ended
    (``previous_status``, None when the store holds no end for it); else why not, in one line."""
    if attempt > trigger.attempts:
        return f"attempt {attempt} of {trigger.id!r}: the job allows {trigger.attempts} attempt(s)"
    if attempt == 1:
        return None
    if previous_status is None:
        return f"attempt {attempt} of {trigger.id!r}: attempt {attempt - 1} has not ended"
    if next_attempt(trigger, attempt - 1, previous_status) != attempt:
        return (
            f"attempt {attempt} of {trigger.id!r}: attempt {attempt - 1} ended {previous_status.value}, "
            "which is not retried"
        )
    return None


def retry_expires_at(trigger: Trigger, attempt: int, previous_ended_at: datetime) -> datetime:
    """When a retry that was due after ``previous_ended_at`` goes stale: as long after it was due
    as the first attempt was allowed after its scheduled time (``expires_after_seconds``)."""
    policy = trigger.retry or RetryPolicy()
    due = previous_ended_at + timedelta(seconds=delay_step(backoff_delay(policy, attempt)))
    return due + (trigger.expires_at - trigger.scheduled_at)
