"""The wire contract: every message cronfleet puts on RabbitMQ, as strict, frozen, versioned models.

Bodies are UTF-8 JSON written by orjson. ``docs/protocol.md`` publishes their JSON Schemas, which
come from these classes (``cronfleet schema``).
"""

from __future__ import annotations

import enum
import functools
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from common.actions import Action
from common.bounds import (
    EARLIEST_INSTANT,
    LATEST_INSTANT,
    MAX_TEXT_LENGTH,
    MAX_TIMEOUT_SECONDS,
    BoundedText,
    CleanText,
    Instant,
    Int32,
    Int64,
    JobContext,
    RunResult,
)

JOB_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
POOL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
OUTPUT_TAIL_LIMIT = MAX_TEXT_LENGTH
IDENTIFIER_LENGTH = 200
# A job heartbeat's ``rid``: what a ping URL's ``?rid=`` may hold (a UUID fits).
RID_PATTERN = r"^[A-Za-z0-9._~-]{1,64}$"
# No run lasts longer than the span of instants the wire can carry.
MAX_DURATION_SECONDS = (LATEST_INSTANT - EARLIEST_INSTANT).total_seconds()


JobName = Annotated[str, Field(pattern=JOB_NAME_PATTERN)]
PoolName = Annotated[str, Field(pattern=POOL_PATTERN)]
# Ids and process names: stored in columns of 200 characters, never a NUL (PostgreSQL refuses it).
Identifier = Annotated[CleanText, Field(min_length=1, max_length=IDENTIFIER_LENGTH)]
TimeoutSeconds = Annotated[float, Field(gt=0, le=MAX_TIMEOUT_SECONDS, allow_inf_nan=False)]
DurationSeconds = Annotated[float, Field(ge=0, le=MAX_DURATION_SECONDS, allow_inf_nan=False)]
Count = Annotated[Int32, Field(ge=0)]
# What an HTTP client may hand back: three digits (a server may answer 799; it is still recorded).
ResponseStatus = Annotated[int, Field(ge=100, le=999)]


class RunStatus(enum.StrEnum):
    """Where a run is, or how it ended. Every run ends in one of the non-running states."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    EXPIRED = "expired"
    SKIPPED = "skipped"
    LOST = "lost"
    # A repeat of a trigger the fleet had already run (or was running): not executed again.
    DUPLICATE = "duplicate"


class HeartbeatKind(enum.StrEnum):
    """What a job reports about itself from outside: it began, it succeeded, it failed."""

    START = "start"
    SUCCESS = "success"
    FAIL = "fail"


WIRE_FIELDS = frozenset({"v", "type"})


def _wire_fields_required(schema: dict[str, Any]) -> None:
    schema["required"] = sorted(WIRE_FIELDS | set(schema.get("required", [])))


class WireMessage(BaseModel):
    """Common shape: strict, frozen, version 1.

    In Python, ``v`` and ``type`` have defaults; on the wire a body must carry both, as the
    published schemas say (``common.envelope`` checks it).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_wire_fields_required)

    v: Literal[1] = 1

    @field_validator("v", mode="before")
    @classmethod
    def _version_is_an_integer(cls, value: object) -> object:
        if isinstance(value, bool):  # True == 1 in Python, not on the wire
            raise ValueError("v must be the integer 1")
        return value

    # Fields added after version 1 was published, left out of the body at their default, so that
    # a message that does not use them is byte for byte what an older peer writes and accepts.
    _omitted_at_default: ClassVar[frozenset[str]] = frozenset()
    # True on a message whose fields orjson writes as pydantic's JSON mode does (text, numbers,
    # booleans, enums, instants, JSON values; no nested model): its body is written from its
    # values straight, a worker's two events a run without a model_dump each
    # (``tests/unit/test_message_bytes.py`` holds the two ways to the same bytes).
    _flat: ClassVar[bool] = False

    def to_bytes(self) -> bytes:
        """The exact body bytes to sign and publish."""
        omitted = {name for name, default in _defaults(type(self)) if getattr(self, name) == default}
        if self._flat:
            values = {name: value for name, value in self.__dict__.items() if value is not None}
            for name in omitted:
                del values[name]
            return orjson.dumps(values, option=orjson.OPT_UTC_Z)
        return self.model_bytes(omitted)

    def model_bytes(self, omitted: set[str] | None = None) -> bytes:
        """``to_bytes`` through pydantic's JSON mode, whatever the message (``omitted``: the
        fields left out at their default)."""
        if omitted is None:
            omitted = {name for name, default in _defaults(type(self)) if getattr(self, name) == default}
        return orjson.dumps(self.model_dump(mode="json", exclude_none=True, exclude=omitted))


@functools.cache
def _defaults(message: type[WireMessage]) -> tuple[tuple[str, Any], ...]:
    """The fields ``message`` leaves out at their default, with that default."""
    return tuple((name, message.model_fields[name].default) for name in sorted(message._omitted_at_default))


def trigger_id(job: str, scheduled_at: datetime) -> str:
    """The id of the trigger of ``job`` at ``scheduled_at``: ``job@<UTC ISO 8601>``."""
    return f"{job}@{format_instant(scheduled_at)}"


def format_instant(moment: datetime) -> str:
    """An aware instant as ISO 8601 in UTC with a ``Z`` (microseconds only when present)."""
    text = moment.astimezone(UTC).isoformat()
    return text.replace("+00:00", "Z")


# How many attempts of one fire at most (``retries`` + 1).
MAX_ATTEMPTS = 101
# The longest wait before a retry: the delay queues' ladder stops there (``common.retries``).
MAX_RETRY_DELAY_SECONDS = 24 * 3600
Attempt = Annotated[int, Field(ge=1, le=MAX_ATTEMPTS)]
RetryDelaySeconds = Annotated[float, Field(ge=1, le=MAX_RETRY_DELAY_SECONDS, allow_inf_nan=False)]


class OnLost(enum.StrEnum):
    """What becomes of a run whose worker died mid-run (its trigger comes back from the broker)."""

    # Another attempt, with the next attempt number, if the job's attempts are not used up.
    RETRY = "retry"
    # None: the lost run is the fire's end.
    FAIL = "fail"


class RetryPolicy(BaseModel):
    """How a trigger's failed (or lost) runs are tried again; carried, signed, in the trigger."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    retries: Annotated[int, Field(ge=0, le=MAX_ATTEMPTS - 1)] = 0
    backoff_seconds: RetryDelaySeconds = 10.0
    max_delay_seconds: RetryDelaySeconds = 300.0
    # None: a lost run's trigger runs again as a redelivery of the same attempt (as before
    # ``on_lost`` existed).
    on_lost: OnLost | None = None


class Overlap(enum.StrEnum):
    """What a fire of a job does while another run of the job is in flight (on any worker)."""

    # Run anyway: runs of the job may overlap.
    ALLOW = "allow"
    # Do not run: the fire is recorded as a ``skipped`` run naming the run in flight.
    SKIP = "skip"
    # Wait for the run in flight to end (while the trigger has not expired), then run.
    QUEUE = "queue"


class Trigger(WireMessage):
    """Run ``job``'s action now: published by the scheduler (or ``cronfleet trigger``).

    ``retry``, ``overlap``, ``exclusive`` and ``exclusive_ttl_seconds`` are absent unless the job
    sets them. A retry of the trigger is the same signed body again, with its attempt number in
    the ``cronfleet-attempt`` header (see ``common.retries``).
    """

    type: Literal["trigger"] = "trigger"
    id: Identifier
    job: JobName
    pool: PoolName
    scheduled_at: Instant
    published_at: Instant
    expires_at: Instant
    timeout_seconds: TimeoutSeconds
    action: Action
    manual: bool = False
    # The job's free-form ``context`` table, handed to what the run executes (absent: none).
    context: JobContext | None = None
    retry: RetryPolicy | None = None
    # Overlap policy (``policy``): ``overlap`` says it; ``exclusive: true`` is the older way to
    # say ``queue`` (what cronfleet's scheduler still sends for it, so that workers from before
    # ``overlap`` run it). Under ``skip`` and ``queue`` a run holds the job's lease, which
    # outlives a dead worker by ``exclusive_ttl_seconds`` (None: by the worker's claim lease).
    overlap: Overlap | None = None
    exclusive: bool = False
    exclusive_ttl_seconds: TimeoutSeconds | None = None

    _omitted_at_default: ClassVar[frozenset[str]] = frozenset({"exclusive"})

    @model_validator(mode="after")
    def _one_overlap_policy(self) -> Trigger:
        if self.exclusive and self.overlap not in (None, Overlap.QUEUE):
            raise ValueError(f'exclusive: true means overlap "queue", not "{self.overlap}"')
        return self

    @property
    def attempts(self) -> int:
        """How many attempts this trigger may have in all."""
        return 1 + (self.retry.retries if self.retry else 0)

    @property
    def policy(self) -> Overlap:
        """The trigger's overlap policy: ``overlap``, else ``queue`` for ``exclusive``, else allow."""
        if self.overlap is not None:
            return self.overlap
        return Overlap.QUEUE if self.exclusive else Overlap.ALLOW


class RunEvent(WireMessage):
    """What ``run.started`` and ``run.finished`` share: which run of which trigger, where."""

    type: str  # each event narrows it to its own literal; declared here to come first
    run_id: Identifier
    trigger_id: Identifier
    job: JobName
    pool: PoolName
    worker: Identifier
    redelivered: bool = False
    scheduled_at: Instant
    started_at: Instant
    # Which attempt at the trigger this run is (1: the first; more: a retry). Left out at 1.
    attempt: Attempt = 1

    _omitted_at_default: ClassVar[frozenset[str]] = frozenset({"attempt"})
    _flat: ClassVar[bool] = True


class RunStarted(RunEvent):
    """A worker began executing a trigger."""

    type: Literal["run.started"] = "run.started"


class RunFinished(RunEvent):
    """A worker finished (or refused) executing a trigger, and how it went."""

    type: Literal["run.finished"] = "run.finished"
    finished_at: Instant
    duration_seconds: DurationSeconds
    status: RunStatus
    exit_code: Int32 | None = None
    http_status: ResponseStatus | None = None
    output_tail: BoundedText | None = None
    error: BoundedText | None = None
    # What a ``python`` action returned (JSON, bounded).
    result: RunResult | None = None
    # The id the endpoint of an ``http`` action gave its own handling of the request
    # (``requestId`` in its JSON answer), linking its logs to the run.
    endpoint_request_id: Identifier | None = None

    @field_validator("status")
    @classmethod
    def _finished(cls, status: RunStatus) -> RunStatus:
        if status is RunStatus.RUNNING:
            raise ValueError("a finished run cannot be 'running'")
        return status


class JobHeartbeat(WireMessage):
    """A job (or anything acting for it) says it started, succeeded or failed."""

    _flat: ClassVar[bool] = True

    type: Literal["job.heartbeat"] = "job.heartbeat"
    id: Identifier
    job: JobName
    kind: HeartbeatKind = HeartbeatKind.SUCCESS
    exit_code: Int32 | None = None
    at: Instant
    message: BoundedText | None = None
    # Links a ``start`` to its ``success``/``fail``: the same rid, the same run.
    rid: Annotated[str, Field(pattern=RID_PATTERN)] | None = None


class WorkerHeartbeat(WireMessage):
    """A worker is alive, consuming ``pool``."""

    _flat: ClassVar[bool] = True

    type: Literal["worker.heartbeat"] = "worker.heartbeat"
    worker: Identifier
    pool: PoolName
    at: Instant
    concurrency: Annotated[Int32, Field(ge=1)]
    running: Count


class SchedulerHeartbeat(WireMessage):
    """A scheduler is alive and planning ``jobs`` jobs."""

    _flat: ClassVar[bool] = True

    type: Literal["scheduler.heartbeat"] = "scheduler.heartbeat"
    scheduler: Identifier
    at: Instant
    jobs: Annotated[Int64, Field(ge=0)]
    next_fire_at: Instant | None = None


class JobsChanged(WireMessage):
    """The jobs in the store changed (applied, paused, resumed, removed): schedulers read the
    changes now instead of at their next poll. It carries no authority: a scheduler that gets
    one only reads the store, which is where the changes are."""

    type: Literal["jobs.changed"] = "jobs.changed"
    by: Identifier
    at: Instant


JOBS_CHANGED_ROUTING_KEY = "jobs.changed"
CONTROL_ADAPTER: TypeAdapter[JobsChanged] = TypeAdapter(JobsChanged)

Event = Annotated[
    RunStarted | RunFinished | JobHeartbeat | WorkerHeartbeat | SchedulerHeartbeat,
    Field(discriminator="type"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)

# The most events one ``event.batch`` may carry (the monitor records up to this many at once).
MAX_BATCH_EVENTS = 500
EVENT_BATCH_TYPE = "event.batch"

# What a batch may carry: what a worker sends about the runs of one pool, and its heartbeats.
BatchedEvent = Annotated[RunStarted | RunFinished | WorkerHeartbeat, Field(discriminator="type")]
BATCHED_EVENT_TYPES = (RunStarted, RunFinished, WorkerHeartbeat)


class EventBatch(WireMessage):
    """Several events of one worker's pool, signed and sent as one message: each is recorded as
    if it had come alone. A busy worker sends its runs' events this way, so that the broker, and
    the monitor's signature check, see one message instead of hundreds."""

    type: Literal["event.batch"] = "event.batch"
    pool: PoolName
    events: Annotated[list[BatchedEvent], Field(min_length=1, max_length=MAX_BATCH_EVENTS)]

    @model_validator(mode="after")
    def _of_its_pool(self) -> EventBatch:
        for position, event in enumerate(self.events):
            if event.pool != self.pool:
                raise ValueError(
                    f"events.{position} is of pool {event.pool!r}, not of the batch's {self.pool!r}"
                )
        return self


# What the monitor's queue carries: one event, or a batch of them.
MonitoredMessage = Annotated[
    RunStarted | RunFinished | JobHeartbeat | WorkerHeartbeat | SchedulerHeartbeat | EventBatch,
    Field(discriminator="type"),
]
MONITORED_ADAPTER: TypeAdapter[MonitoredMessage] = TypeAdapter(MonitoredMessage)
TRIGGER_ADAPTER: TypeAdapter[Trigger] = TypeAdapter(Trigger)

ALL_MESSAGES: tuple[type[WireMessage], ...] = (
    Trigger,
    RunStarted,
    RunFinished,
    JobHeartbeat,
    WorkerHeartbeat,
    SchedulerHeartbeat,
    EventBatch,
    JobsChanged,
)
