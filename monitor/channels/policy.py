"""Where an alert goes and how often a failed delivery is tried again: pure decisions, no I/O.

``route`` picks a job's channels (its own route, else the default one); ``needs_alert`` says which
flips are told at all (an alarm, or the recovery from one); ``retry_delay`` is the exponential
backoff between attempts, stretched to what a receiver asked for (``Retry-After``) and capped.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from common.messages import JOB_NAME_PATTERN
from monitor.health import Flip

# Channel names follow job names: they appear in files, environment variable names and logs.
ChannelName = Annotated[str, StringConstraints(pattern=JOB_NAME_PATTERN)]
LOG_CHANNEL = "log"


class Routes(BaseModel):
    """Which channels hear about which job: ``jobs[NAME]`` for that job (an empty list silences
    it), ``default`` for every other job. The default route is the log alone."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: list[ChannelName] = Field(default_factory=lambda: [LOG_CHANNEL], max_length=100)
    jobs: dict[Annotated[str, StringConstraints(pattern=JOB_NAME_PATTERN)], list[ChannelName]] = Field(
        default_factory=dict
    )


class RetryPolicy(BaseModel):
    """How a failed delivery is tried again: at most ``attempts`` tries in all, waiting
    ``first_delay_seconds`` after the first failure and twice as long after each next one, never
    more than ``max_delay_seconds``. ``queue_limit``: how many alerts may wait for one channel
    before new ones are refused (reported as not sent) rather than held without bound; the
    default holds a herd of 10,000 jobs turning ``down`` at once, twice over. ``concurrency``:
    how many alerts one channel delivers at once (one job's alerts always one after another)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    attempts: int = Field(default=6, ge=1, le=100)
    first_delay_seconds: float = Field(default=5.0, gt=0, le=86_400)
    max_delay_seconds: float = Field(default=600.0, gt=0, le=86_400)
    queue_limit: int = Field(default=20_000, ge=1, le=1_000_000)
    concurrency: int = Field(default=8, ge=1, le=256)


def route(routes: Routes, job: str) -> tuple[str, ...]:
    """The names of the channels an alert about ``job`` goes to, each once, in route order."""
    chosen = routes.jobs.get(job, routes.default)
    return tuple(dict.fromkeys(chosen))


def needs_alert(flip: Flip) -> bool:
    """Whether people are told about ``flip``: it enters an alarm state (down, failing, stuck) or
    ends one (a recovery). Other flips (late, running, paused...) are only recorded."""
    return flip.alarm or flip.recovered_from is not None


def retry_delay(policy: RetryPolicy, failed_attempt: int, retry_after: float | None = None) -> float:
    """Seconds to wait after attempt number ``failed_attempt`` (1 for the first) failed before the
    next one: ``first * 2**(failed_attempt - 1)``, at least ``retry_after`` when the receiver gave
    one, and never more than ``max_delay_seconds``."""
    if failed_attempt < 1:
        raise ValueError("attempts are numbered from 1")
    exponent = min(failed_attempt - 1, 64)  # 2**64 times any allowed delay is past every cap
    delay = policy.first_delay_seconds * 2.0**exponent
    if retry_after is not None and retry_after > delay:
        delay = retry_after
    return min(delay, policy.max_delay_seconds)


def retry_schedule(policy: RetryPolicy) -> list[float]:
    """The waits between one alert's attempts when every attempt fails and no receiver asks for
    more time: ``attempts - 1`` delays."""
    return [retry_delay(policy, attempt) for attempt in range(1, policy.attempts)]
