"""Handling one delivered trigger: verify, report the start, execute, report the end, ack.

The ack comes only after ``run.finished`` is confirmed by the broker, so a worker that dies
mid-run leaves the trigger to be redelivered (and the new run is marked as a redelivery).
Nothing a trigger says can stop the worker or loop it: every delivery ends acked, as one run or
as one dead letter with its reason; only a broker outage hands a trigger back.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from typing import TypeVar

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from common.bus import Publisher, settle
from common.clock import Clock, utcnow
from common.envelope import Rejected, RejectionReason, internal_error, one_line, open_envelope
from common.errors import BrokerUnavailable
from common.messages import (
    OUTPUT_TAIL_LIMIT,
    TRIGGER_ADAPTER,
    RunFinished,
    RunStarted,
    RunStatus,
    Trigger,
)
from common.signing import Keyring, Role
from worker.actions import ActionResult, Executor

log = logging.getLogger("cronfleet.worker")

REQUEUE_PAUSE_SECONDS = 1.0
REMEMBERED_TRIGGERS = 10_000
V = TypeVar("V")


class TriggerHandler:
    """Turns each delivered trigger into exactly one reported run, or a dead letter."""

    def __init__(
        self,
        publisher: Publisher,
        keyring: Keyring,
        executors: Mapping[str, Executor],
        worker: str,
        clock: Clock = utcnow,
        *,
        pool: str | None = None,
    ) -> None:
        # A worker signs its run events and heartbeats: without an event key it cannot report.
        keyring.require([Role.EVENT], who="a worker")
        self.publisher = publisher
        self.keyring = keyring
        self.executors = executors
        self.worker = worker
        # The pool whose queue this worker consumes: a trigger of another pool (its queue bound
        # by hand under that pool's name too) is refused as wrong_pool, never run.
        self.pool = pool
        self.clock = clock
        self.running = 0
        # Triggers this worker is running, and the last ones it ran: a redelivery of one of them
        # (its channel was lost before the ack) is settled without running the job again.
        self._in_flight: dict[str, asyncio.Event] = {}
        self._done: OrderedDict[str, None] = OrderedDict()
        # The body (its SHA-256) each recent trigger id came with: the same id with another body
        # is not a redelivery but a conflict, refused rather than silently dropped.
        self._bodies: OrderedDict[str, bytes] = OrderedDict()

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """Process one delivery to its ack; never raises.

        Once a job has started it is never handed back: its end is reported (retried until the
        broker confirms it) and then acked. Before that, a broker failure requeues the trigger
        after a pause; any other failure dead-letters it as ``internal_error``.
        """
        try:
            await self._handle(message)
        except BrokerUnavailable as exc:
            log.warning("could not report %s (%s); it will be delivered again", message.message_id, exc)
            await asyncio.sleep(REQUEUE_PAUSE_SECONDS)
            await settle(message, ack=False, requeue=True)
        except Exception as exc:
            # A bug must neither kill the worker nor loop the trigger through redeliveries.
            log.exception("unexpected error handling %s; dead-lettered", message.message_id)
            await self._give_up(message, internal_error(exc))

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        # Verified against this fleet's namespace and the routing key the trigger came with: a
        # trigger signed for another pool or fleet does not verify, and one whose body names
        # another pool than its routing key, or than the pool consumed here, is refused
        # (wrong_pool).
        opened = open_envelope(
            message.body,
            message.headers or {},
            self.keyring,
            TRIGGER_ADAPTER,
            self.clock(),
            namespace=self.publisher.namespace,
            routing_key=message.routing_key or "",
            consumed_pool=self.pool,
        )
        if isinstance(opened, Rejected):
            await self._refuse(message, opened)
            return
        trigger = opened.message
        digest = hashlib.sha256(message.body).digest()
        if self._bodies.setdefault(trigger.id, digest) != digest:
            await self._refuse(
                message,
                Rejected(
                    RejectionReason.ID_CONFLICT,
                    one_line(f"trigger id {trigger.id!r} was already used for another body"),
                ),
            )
            return
        _remember(self._bodies, trigger.id, digest)
        if await self._already_run(trigger.id):
            log.warning("trigger %s was delivered again after this worker ran it; not run twice", trigger.id)
            await settle(message)
            return
        await self._run(message, trigger)

    async def _run(self, message: AbstractIncomingMessage, trigger: Trigger) -> None:
        """Announce, execute and report one run of ``trigger``, then ack it."""
        # In flight from here, before the first await, so that a duplicate delivered meanwhile waits.
        finished = self._in_flight[trigger.id] = asyncio.Event()
        try:
            started = self._start(trigger, uuid.uuid4().hex, bool(message.redelivered))
            await self.publisher.event(started)
            log.info(
                "run %s of %s started%s",
                started.run_id,
                trigger.id,
                " (redelivery)" if started.redelivered else "",
            )
            self.running += 1
            try:
                result = await self._execute(trigger)
                await self._finish(started, result, retry=True)
                _remember(self._done, trigger.id, None)
            finally:
                self.running -= 1
        finally:
            del self._in_flight[trigger.id]
            finished.set()
        await settle(message)

    async def _execute(self, trigger: Trigger) -> ActionResult:
        """The action's result; an executor that raises (a bug) makes a failed run, not a crash."""
        try:
            return await self.executors[trigger.action.type].run(trigger.action, trigger.timeout_seconds)
        except Exception as exc:
            log.exception("the %s executor raised on %s", trigger.action.type, trigger.id)
            return ActionResult(RunStatus.FAILED, error=f"internal_error: {type(exc).__name__}: {exc}")

    async def _already_run(self, trigger_id: str) -> bool:
        """Whether this worker ran, or is running, ``trigger_id`` (waits for a running one)."""
        running = self._in_flight.get(trigger_id)
        if running is not None:
            await running.wait()
        return trigger_id in self._done

    async def _refuse(self, message: AbstractIncomingMessage, rejected: Rejected) -> None:
        """Dead-letter a refused trigger with its reason; an expired one is also reported as a run."""
        log.warning("refused trigger %s: %s (%s)", message.message_id, rejected.reason.value, rejected.detail)
        await self.publisher.dead_letter(message, rejected, self.worker)
        if rejected.reason is RejectionReason.EXPIRED:
            # The signature was valid, so the body is ours: report the run as expired, under one
            # id per trigger so that a redelivered expired trigger is recorded once.
            trigger = TRIGGER_ADAPTER.validate_json(message.body, strict=True)
            started = self._start(trigger, f"{trigger.id}#expired", bool(message.redelivered))
            await self._finish(started, ActionResult(RunStatus.EXPIRED, error=rejected.detail))
        await settle(message)

    async def _give_up(self, message: AbstractIncomingMessage, rejected: Rejected) -> None:
        """Dead-letter ``message`` after an unexpected failure, so that it is never delivered again."""
        if message.processed:
            return  # already acked: what failed came after
        try:
            await self.publisher.dead_letter(message, rejected, self.worker)
        except BrokerUnavailable as exc:
            log.warning("could not dead-letter %s (%s); it will be delivered again", message.message_id, exc)
            await asyncio.sleep(REQUEUE_PAUSE_SECONDS)
            await settle(message, ack=False, requeue=True)
            return
        except Exception:
            # Even the copy failed: let the broker dead-letter it (without our reason headers).
            log.exception("could not dead-letter %s; the broker dead-letters it", message.message_id)
            await settle(message, ack=False, requeue=False)
            return
        await settle(message)

    def _start(self, trigger: Trigger, run_id: str, redelivered: bool) -> RunStarted:
        return RunStarted(
            run_id=run_id,
            trigger_id=trigger.id,
            job=trigger.job,
            pool=trigger.pool,
            worker=self.worker,
            redelivered=redelivered,
            scheduled_at=trigger.scheduled_at,
            started_at=self.clock(),
        )

    async def _finish(self, started: RunStarted, result: ActionResult, *, retry: bool = False) -> None:
        """Report the end of a run; with ``retry``, until the broker confirms it."""
        event = self._finished(started, result)
        delay = 0.5
        while True:
            try:
                await self.publisher.event(event)
                break
            except BrokerUnavailable as exc:
                if not retry:
                    raise
                log.warning(
                    "run %s ended; its report is not confirmed yet (%s), retrying", started.run_id, exc
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        log.info("run %s of %s %s", started.run_id, started.trigger_id, event.status.value)

    def _finished(self, started: RunStarted, result: ActionResult) -> RunFinished:
        """The ``run.finished`` of ``started``: always a valid event, whatever ``result`` holds.

        Output and errors are made wire text (no NUL, valid UTF-8, bounded); should the event
        still not validate, a failed run saying why is reported instead.
        """
        finished_at = max(self.clock(), started.started_at)
        ended = {
            **started.model_dump(exclude={"type"}),
            "finished_at": finished_at,
            "duration_seconds": (finished_at - started.started_at).total_seconds(),
        }
        try:
            event = RunFinished(
                **ended,
                status=result.status,
                exit_code=result.exit_code,
                http_status=result.http_status,
                output_tail=_wire_text(result.output_tail, keep_end=True),
                error=_wire_text(result.error),
            )
            event.to_bytes()
        except (ValidationError, TypeError, ValueError) as exc:
            log.exception("the result of run %s cannot be reported as it is", started.run_id)
            why = one_line(f"internal_error: {type(exc).__name__}: {exc}")
            event = RunFinished(**ended, status=RunStatus.FAILED, error=why)
        return event


def _remember(memory: OrderedDict[str, V], key: str, value: V) -> None:
    """Keep ``key`` as the most recent of at most ``REMEMBERED_TRIGGERS``."""
    memory[key] = value
    memory.move_to_end(key)
    while len(memory) > REMEMBERED_TRIGGERS:
        memory.popitem(last=False)


def _wire_text(text: str | None, *, keep_end: bool = False) -> str | None:
    """``text`` as the wire takes it: NUL and invalid UTF-8 replaced by U+FFFD, at most
    ``OUTPUT_TAIL_LIMIT`` characters (the last ones with ``keep_end``)."""
    if text is None:
        return None
    cleaned = text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
    return cleaned[-OUTPUT_TAIL_LIMIT:] if keep_end else cleaned[:OUTPUT_TAIL_LIMIT]
