"""Handling one delivered trigger: verify, report the start, execute, report the end, ack.

The ack comes only after ``run.finished`` is confirmed by the broker, so a worker that dies
mid-run leaves the trigger to be redelivered (and the new run is marked as a redelivery).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import Mapping

from aio_pika.abc import AbstractIncomingMessage

from common.bus import Publisher, settle
from common.clock import Clock, utcnow
from common.envelope import Rejected, RejectionReason, open_envelope
from common.errors import BrokerUnavailable
from common.messages import TRIGGER_ADAPTER, RunFinished, RunStarted, RunStatus, Trigger
from common.signing import Keyring
from worker.actions import ActionResult, Executor

log = logging.getLogger("cronfleet.worker")

REQUEUE_PAUSE_SECONDS = 1.0
REMEMBERED_TRIGGERS = 10_000


class TriggerHandler:
    """Turns each delivered trigger into exactly one reported run, or a dead letter."""

    def __init__(
        self,
        publisher: Publisher,
        keyring: Keyring,
        executors: Mapping[str, Executor],
        worker: str,
        clock: Clock = utcnow,
    ) -> None:
        self.publisher = publisher
        self.keyring = keyring
        self.executors = executors
        self.worker = worker
        self.clock = clock
        self.running = 0
        # Triggers this worker is running, and the last ones it ran: a redelivery of one of them
        # (its channel was lost before the ack) is settled without running the job again.
        self._in_flight: dict[str, asyncio.Event] = {}
        self._done: OrderedDict[str, None] = OrderedDict()

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """Process one delivery to its ack.

        Once a job has started it is never handed back: its end is reported (retried until the
        broker confirms it) and then acked. Before that, a broker failure requeues the trigger
        after a pause.
        """
        try:
            await self._handle(message)
        except BrokerUnavailable as exc:
            log.warning("could not report %s (%s); it will be delivered again", message.message_id, exc)
            await asyncio.sleep(REQUEUE_PAUSE_SECONDS)
            await settle(message, ack=False, requeue=True)
        except Exception:
            # A bug must not kill the worker: requeue; the queue's delivery limit dead-letters
            # a trigger that keeps failing this way.
            log.exception("unexpected error handling %s; requeued", message.message_id)
            await settle(message, ack=False, requeue=True)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        opened = open_envelope(
            message.body, message.headers or {}, self.keyring, TRIGGER_ADAPTER, self.clock()
        )
        if isinstance(opened, Rejected):
            await self._refuse(message, opened)
            return
        trigger = opened.message
        if await self._already_run(trigger.id):
            log.warning("trigger %s was delivered again after this worker ran it; not run twice", trigger.id)
            await settle(message)
            return
        started = self._start(trigger, uuid.uuid4().hex, bool(message.redelivered))
        await self.publisher.event(started)
        log.info(
            "run %s of %s started%s",
            started.run_id,
            trigger.id,
            " (redelivery)" if started.redelivered else "",
        )
        self.running += 1
        finished = self._in_flight[trigger.id] = asyncio.Event()
        try:
            result = await self.executors[trigger.action.type].run(trigger.action, trigger.timeout_seconds)
            await self._finish(started, result, retry=True)
            self._remember_done(trigger.id)
        finally:
            self.running -= 1
            del self._in_flight[trigger.id]
            finished.set()
        await settle(message)

    async def _already_run(self, trigger_id: str) -> bool:
        """Whether this worker ran, or is running, ``trigger_id`` (waits for a running one)."""
        running = self._in_flight.get(trigger_id)
        if running is not None:
            await running.wait()
        return trigger_id in self._done

    def _remember_done(self, trigger_id: str) -> None:
        self._done[trigger_id] = None
        while len(self._done) > REMEMBERED_TRIGGERS:
            self._done.popitem(last=False)

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
        finished_at = self.clock()
        event = RunFinished(
            **started.model_dump(exclude={"type"}),
            finished_at=finished_at,
            duration_seconds=max(0.0, (finished_at - started.started_at).total_seconds()),
            status=result.status,
            exit_code=result.exit_code,
            http_status=result.http_status,
            output_tail=result.output_tail,
            error=result.error,
        )
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
        log.info("run %s of %s %s", started.run_id, started.trigger_id, result.status.value)
