"""Handling one delivered trigger: verify, report the start, execute, report the end, ack.

Before it runs a trigger the worker claims its id in the store, so that the fleet runs it once:
a repeat (replayed, published twice, redelivered while its run goes on) is reported as a
``duplicate`` run and not executed. The ack comes only after ``run.finished`` is confirmed by the
broker, so a worker that dies mid-run leaves the trigger to be redelivered; once the dead
worker's claim has lapsed another worker runs it, marked as a redelivery.
Nothing a trigger says can stop the worker or loop it: every delivery ends acked, as one run or
as one dead letter with its reason; only a broker outage hands a trigger back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import Mapping

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from common.bus import Publisher, settle
from common.clock import Clock, utcnow
from common.envelope import Rejected, RejectionReason, internal_error, one_line, open_envelope
from common.errors import BrokerUnavailable, StoreUnavailable
from common.messages import (
    OUTPUT_TAIL_LIMIT,
    TRIGGER_ADAPTER,
    RunFinished,
    RunStarted,
    RunStatus,
    Trigger,
)
from common.retry import until_done
from common.signing import Keyring, Role
from common.trigger_claims import Claim, ClaimOutcome, TriggerClaims
from worker.actions import ActionResult, Executor, RunContext

log = logging.getLogger("cronfleet.worker")

# Refused triggers that are also reported as a run, so that the job's history shows them.
_REPORTED_REFUSALS = {
    RejectionReason.EXPIRED: RunStatus.EXPIRED,
    RejectionReason.NOT_ALLOWED: RunStatus.FAILED,
}

REQUEUE_PAUSE_SECONDS = 1.0
# How often a worker asks again about a trigger another run holds.
CLAIM_POLL_SECONDS = 0.5


class TriggerHandler:
    """Turns each delivered trigger into exactly one reported run, a reported duplicate, or a
    dead letter. The fleet runs a trigger once: its id is claimed in the store first
    (``common.trigger_claims``)."""

    def __init__(
        self,
        publisher: Publisher,
        keyring: Keyring,
        executors: Mapping[str, Executor],
        claims: TriggerClaims,
        clock: Clock = utcnow,
        *,
        pool: str | None = None,
    ) -> None:
        # A worker signs its run events and heartbeats: without an event key it cannot report.
        keyring.require([Role.EVENT], who="a worker")
        self.publisher = publisher
        self.keyring = keyring
        self.executors = executors
        self.claims = claims
        self.worker = claims.worker
        # The pool whose queue this worker consumes: a trigger of another pool (its queue bound
        # by hand under that pool's name too) is refused as wrong_pool, never run.
        self.pool = pool
        self.clock = clock
        self.running = 0
        # The claims this worker holds (trigger id -> run id), renewed by ``keep_claims``.
        self._held: dict[str, str] = {}

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """Process one delivery to its ack; never raises.

        Once a job has started it is never handed back: its end is reported (retried until the
        store and the broker confirm it) and then acked. Before that, a broker or store outage
        requeues the trigger after a pause; any other failure dead-letters it as
        ``internal_error``.
        """
        try:
            await self._handle(message)
        except (BrokerUnavailable, StoreUnavailable) as exc:
            log.warning("could not take %s (%s); it will be delivered again", message.message_id, exc)
            await asyncio.sleep(REQUEUE_PAUSE_SECONDS)
            await settle(message, ack=False, requeue=True)
        except Exception as exc:
            # A bug must neither kill the worker nor loop the trigger through redeliveries.
            log.exception("unexpected error handling %s; dead-lettered", message.message_id)
            await self._give_up(message, internal_error(exc))

    async def keep_claims(self) -> None:
        """Renew the claims of the runs in progress, every third of the lease, until cancelled.

        While the store cannot be reached the runs go on; should the outage outlast the lease, a
        repeat of one of their triggers may then run again elsewhere (and is marked redelivered).
        """
        every = self.claims.lease.total_seconds() / 3
        said = ""
        while True:
            await asyncio.sleep(every)
            if not self._held:
                continue
            try:
                await self.claims.renew(list(self._held), self.clock())
            except StoreUnavailable as exc:
                if str(exc) != said:
                    said = str(exc)
                    log.warning("%s; the runs go on, renewing again in %gs", said, every)
            else:
                said = ""

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
        refusal = self._refusal(trigger)
        if refusal is not None:
            await self._refuse(message, Rejected(RejectionReason.NOT_ALLOWED, one_line(refusal)))
            return
        run_id = uuid.uuid4().hex
        claim = await self._claim(trigger, hashlib.sha256(message.body).hexdigest(), run_id)
        match claim.outcome:
            case ClaimOutcome.CONFLICT:
                detail = f"trigger id {trigger.id!r} was run with another body (run {claim.run_id})"
                await self._refuse(message, Rejected(RejectionReason.ID_CONFLICT, one_line(detail)))
            case ClaimOutcome.DUPLICATE | ClaimOutcome.HELD:
                await self._report_duplicate(message, trigger, claim)
            case ClaimOutcome.RUN | ClaimOutcome.TAKEN_OVER:
                taken_over = claim.outcome is ClaimOutcome.TAKEN_OVER
                if taken_over:
                    log.warning(
                        "trigger %s was held by run %s on %s, which stopped renewing it; running it again",
                        trigger.id,
                        claim.run_id,
                        claim.worker,
                    )
                await self._run(message, trigger, run_id, redelivered=bool(message.redelivered) or taken_over)

    async def _claim(self, trigger: Trigger, body_sha256: str, run_id: str) -> Claim:
        """Claim ``trigger`` for ``run_id``. While another run holds it, wait (about one lease)
        for that run to end or its worker to be found dead; a run still held after that belongs
        to a live worker and the answer stays HELD."""
        waited = 0.0
        while True:
            claim = await self.claims.claim(trigger.id, body_sha256, run_id, trigger.expires_at, self.clock())
            if claim.outcome is not ClaimOutcome.HELD or waited > self.claims.lease.total_seconds():
                return claim
            if waited == 0:
                log.info(
                    "trigger %s is being run by run %s on %s; waiting for it",
                    trigger.id,
                    claim.run_id,
                    claim.worker,
                )
            await asyncio.sleep(CLAIM_POLL_SECONDS)
            waited += CLAIM_POLL_SECONDS

    async def _run(
        self, message: AbstractIncomingMessage, trigger: Trigger, run_id: str, *, redelivered: bool
    ) -> None:
        """Announce, execute and report one run of ``trigger`` under its claim, then ack it."""
        self._held[trigger.id] = run_id
        try:
            started = self._start(trigger, run_id, redelivered)
            try:
                await self.publisher.event(started)
            except BrokerUnavailable:
                # Not started: let the next delivery of the trigger claim it at once.
                with contextlib.suppress(StoreUnavailable):
                    await self.claims.release(trigger.id, run_id)
                raise
            log.info("run %s of %s started%s", run_id, trigger.id, " (redelivery)" if redelivered else "")
            self.running += 1
            try:
                result = await self._execute(trigger, run_id)
                finished = self._finished(started, result)
                # The claim keeps the end before it is reported: a repeat of the trigger reports it
                # again rather than running the job a second time.
                await until_done(
                    lambda: self.claims.finish(
                        trigger.id, run_id, finished.to_bytes().decode(), self.clock()
                    ),
                    (StoreUnavailable,),
                    log,
                    f"run {run_id} ended; recording its end in the store",
                )
                await self._report(finished)
            finally:
                self.running -= 1
        finally:
            self._held.pop(trigger.id, None)
        await settle(message)

    async def _report_duplicate(
        self, message: AbstractIncomingMessage, trigger: Trigger, claim: Claim
    ) -> None:
        """Record a repeat of a trigger the fleet ran (or is running) as a ``duplicate`` run, after
        reporting the original run's end again in case its first report was lost; then ack."""
        if claim.finished_event is not None:
            await self.publisher.event(RunFinished.model_validate_json(claim.finished_event))
        state = "ran" if claim.outcome is ClaimOutcome.DUPLICATE else "is running"
        why = f"not run again: {claim.worker} {state} this trigger as run {claim.run_id}"
        log.warning("trigger %s delivered again; %s", trigger.id, why)
        repeat = self._start(
            trigger, f"{trigger.id}#duplicate-{uuid.uuid4().hex[:12]}", bool(message.redelivered)
        )
        await self.publisher.event(self._finished(repeat, ActionResult(RunStatus.DUPLICATE, error=why)))
        await settle(message)

    def _refusal(self, trigger: Trigger) -> str | None:
        """Why this worker will not run ``trigger``'s action at all (``not_allowed``), or None."""
        executor = self.executors.get(trigger.action.type)
        if executor is None:
            return f"this worker runs no {trigger.action.type!r} actions"
        refusal = getattr(executor, "refusal", None)
        return None if refusal is None else refusal(trigger.action)

    async def _execute(self, trigger: Trigger, run_id: str) -> ActionResult:
        """The action's result; an executor that raises (a bug) makes a failed run, not a crash."""
        try:
            executor = self.executors[trigger.action.type]
            return await executor.run(trigger.action, trigger.timeout_seconds, RunContext.of(trigger, run_id))
        except Exception as exc:
            log.exception("the %s executor raised on %s", trigger.action.type, trigger.id)
            return ActionResult(RunStatus.FAILED, error=f"internal_error: {type(exc).__name__}: {exc}")

    async def _refuse(self, message: AbstractIncomingMessage, rejected: Rejected) -> None:
        """Dead-letter a refused trigger with its reason; an expired one is also reported as a run."""
        log.warning("refused trigger %s: %s (%s)", message.message_id, rejected.reason.value, rejected.detail)
        await self.publisher.dead_letter(message, rejected, self.worker)
        outcome = _REPORTED_REFUSALS.get(rejected.reason)
        if outcome is not None:
            # The signature was valid, so the body is ours: report the run (expired, or failed as
            # not allowed here), under one id per trigger and reason so that a redelivered
            # trigger is recorded once.
            trigger = TRIGGER_ADAPTER.validate_json(message.body, strict=True)
            started = self._start(trigger, f"{trigger.id}#{rejected.reason.value}", bool(message.redelivered))
            await self.publisher.event(
                self._finished(
                    started, ActionResult(outcome, error=f"{rejected.reason.value}: {rejected.detail}")
                )
            )
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

    async def _report(self, event: RunFinished) -> None:
        """Publish the end of a run, retried until the broker confirms it."""
        await until_done(
            lambda: self.publisher.event(event),
            (BrokerUnavailable,),
            log,
            f"run {event.run_id} ended; its report is not confirmed yet",
        )
        log.info("run %s of %s %s", event.run_id, event.trigger_id, event.status.value)

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
                result=result.result,
                endpoint_request_id=result.endpoint_request_id,
            )
            event.to_bytes()
        except (ValidationError, TypeError, ValueError) as exc:
            log.exception("the result of run %s cannot be reported as it is", started.run_id)
            why = one_line(f"internal_error: {type(exc).__name__}: {exc}")
            event = RunFinished(**ended, status=RunStatus.FAILED, error=why)
        return event


def _wire_text(text: str | None, *, keep_end: bool = False) -> str | None:
    """``text`` as the wire takes it: NUL and invalid UTF-8 replaced by U+FFFD, at most
    ``OUTPUT_TAIL_LIMIT`` characters (the last ones with ``keep_end``)."""
    if text is None:
        return None
    cleaned = text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
    return cleaned[-OUTPUT_TAIL_LIMIT:] if keep_end else cleaned[:OUTPUT_TAIL_LIMIT]
