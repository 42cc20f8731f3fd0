"""Handling one delivered trigger: verify, report the start, execute, report the end, ack.

Before it runs a trigger the worker claims its id in the store, so that the fleet runs it once:
a repeat (replayed, published twice, redelivered while its run goes on) is reported as a
``duplicate`` run and not executed. The ack comes only after ``run.finished`` is confirmed by the
broker, so a worker that dies mid-run leaves the trigger to be redelivered; once the dead
worker's claim has lapsed another worker runs it, marked as a redelivery.
Nothing a trigger says can stop the worker or loop it: every delivery ends acked, as one run or
as one dead letter with its reason; only a broker outage hands a trigger back.

A run that failed (or timed out) while its job allows more attempts is followed by a retry:
the same signed trigger, with the next attempt number, through a delay queue
(``common.retries``); its end is kept in its claim before the retry is published, so a worker
that dies in between leaves a repeat that publishes it, and the claim records the retry once
published, so a repeat of the attempt never publishes a second one. A trigger whose run was lost
with its worker (the claim lapsed) follows the job's ``on_lost``. Under overlap ``skip`` or
``queue`` (``exclusive``) a run also holds the job's lease while it runs; a fire that finds it
held is recorded ``skipped`` (``skip``) or waits (``queue``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import datetime, timedelta
from typing import NamedTuple

import orjson
from pydantic import ValidationError

from common.acks import AckedDelivery
from common.clock import Clock, utcnow
from common.envelope import Rejected, RejectionReason, internal_error, one_line, open_envelope
from common.errors import BrokerUnavailable, StoreUnavailable
from common.messages import (
    OUTPUT_TAIL_LIMIT,
    TRIGGER_ADAPTER,
    Overlap,
    RunFinished,
    RunStarted,
    RunStatus,
    Trigger,
)
from common.publisher import Publisher
from common.retries import (
    attempt_of,
    backoff_delay,
    claim_key,
    delay_step,
    exclusive_key,
    may_follow,
    next_attempt,
    retry_expires_at,
)
from common.retry import OutageLog, until_done
from common.signing import KEY_ID_HEADER, SIGNATURE_HEADER, Keyring, Role
from common.trigger_claims import Claim, ClaimOutcome, Lapsed, RetryTurn, TriggerClaims
from worker.actions import ActionResult, Executor, RunContext

log = logging.getLogger("cronfleet.worker")

# Refused triggers that are also reported as a run, so that the job's history shows them.
_REPORTED_REFUSALS = {
    RejectionReason.EXPIRED: RunStatus.EXPIRED,
    RejectionReason.NOT_ALLOWED: RunStatus.FAILED,
}

# The guard of a run no lease keeps from overlapping others: it never blocks.
_UNGUARDED: contextlib.nullcontext[str | None] = contextlib.nullcontext(None)

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
        early_ack_seconds: float | None = None,
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
        # A trigger whose timeout is longer than this is acked once its run has started (None:
        # every trigger is acked when its run ends).
        self.early_ack_seconds = early_ack_seconds
        self.running = 0
        # The claims this worker holds (trigger id -> run id), renewed by ``keep_claims``.
        self._held: dict[str, str] = {}

    async def handle(self, message: AckedDelivery) -> None:
        """Process one delivery to its ack; never raises.

        Once a job has started it is never handed back: its end is reported (retried until the
        store and the broker confirm it) and then acked. Before that, a broker or store outage
        requeues the trigger after a pause; any other failure dead-letters it as
        ``internal_error``.
        """
        try:
            await self._handle(message)
        except (BrokerUnavailable, StoreUnavailable) as exc:
            if message.processed:  # acked when its long run started: nothing to hand back
                log.warning("could not end the run of %s (%s)", message.message_id, exc)
                return
            log.warning("could not take %s (%s); it will be delivered again", message.message_id, exc)
            await asyncio.sleep(REQUEUE_PAUSE_SECONDS)
            await message.settle(ack=False, requeue=True)
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
        outage = OutageLog(log, f"the runs go on, their claims renewed every {every:g}s")
        while True:
            await asyncio.sleep(every)
            if not self._held:
                continue
            try:
                await self.claims.renew(list(self._held), self.clock())
            except StoreUnavailable as exc:
                outage.failed(exc)
            else:
                outage.ended()

    async def _handle(self, message: AckedDelivery) -> None:
        # Verified against this fleet's namespace and the routing key the trigger came with: a
        # trigger signed for another pool or fleet does not verify, and one whose body names
        # another pool than its routing key, or than the pool consumed here, is refused
        # (wrong_pool). A retry's expiry is its own, checked below.
        attempt = attempt_of(message.headers or {})
        opened = open_envelope(
            message.body,
            message.headers or {},
            self.keyring,
            TRIGGER_ADAPTER,
            self.clock(),
            namespace=self.publisher.namespace,
            routing_key=message.routing_key or "",
            consumed_pool=self.pool,
            check_expiry=attempt == 1,
        )
        if isinstance(opened, Rejected):
            await self._refuse(message, opened)
            return
        trigger = opened.message
        if attempt is None:
            detail = "the cronfleet-attempt header is not a whole number from 1 to 1000"
            await self._refuse(message, Rejected(RejectionReason.MALFORMED, detail))
            return
        refusal = self._refusal(trigger)
        if refusal is not None:
            await self._refuse(message, Rejected(RejectionReason.NOT_ALLOWED, one_line(refusal)), attempt)
            return
        expires_at = trigger.expires_at
        if attempt > 1:
            # The header is not signed: the store says whether this attempt is owed.
            previous = await self.claims.ended(claim_key(trigger.id, attempt - 1))
            why = may_follow(trigger, attempt, previous[0] if previous else None)
            if why is not None or previous is None:
                await self._refuse(message, Rejected(RejectionReason.BAD_ATTEMPT, one_line(why or "")))
                return
            expires_at = retry_expires_at(trigger, attempt, previous[1])
            if expires_at <= self.clock():
                expired = Rejected(RejectionReason.EXPIRED, f"retry expired at {expires_at.isoformat()}")
                await self._refuse(message, expired, attempt)
                return
        key = claim_key(trigger.id, attempt)
        run_id = uuid.uuid4().hex
        claim = await self._claim(trigger, key, expires_at, hashlib.sha256(message.body).hexdigest(), run_id)
        lost_policy = trigger.retry.on_lost if trigger.retry is not None else None
        match claim.outcome:
            case ClaimOutcome.CONFLICT:
                detail = f"trigger id {trigger.id!r} was run with another body (run {claim.run_id})"
                await self._refuse(message, Rejected(RejectionReason.ID_CONFLICT, one_line(detail)))
            case ClaimOutcome.DUPLICATE | ClaimOutcome.HELD:
                await self._report_duplicate(message, trigger, attempt, claim)
            case ClaimOutcome.TAKEN_OVER if lost_policy is not None:
                await self._lost(message, trigger, attempt, run_id, claim)
            case ClaimOutcome.RUN | ClaimOutcome.TAKEN_OVER:
                taken_over = claim.outcome is ClaimOutcome.TAKEN_OVER
                if taken_over:
                    log.warning(
                        "trigger %s was held by run %s on %s, which stopped renewing it; running it again",
                        key,
                        claim.run_id,
                        claim.worker,
                    )
                redelivered = bool(message.redelivered) or taken_over
                dead = claim.run_id if taken_over else None
                await self._run(
                    message, trigger, attempt, run_id, expires_at, redelivered=redelivered, dead=dead
                )

    async def _claim(
        self, trigger: Trigger, key: str, expires_at: datetime, body_sha256: str, run_id: str
    ) -> Claim:
        """Claim ``key`` (an attempt of ``trigger``) for ``run_id``. While another run holds it,
        wait (about one lease) for that run to end or its worker to be found dead; a run still
        held after that belongs to a live worker and the answer stays HELD."""
        waited = 0.0
        while True:
            claim = await self.claims.claim(key, body_sha256, run_id, expires_at, self.clock())
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
        self,
        message: AckedDelivery,
        trigger: Trigger,
        attempt: int,
        run_id: str,
        expires_at: datetime,
        *,
        redelivered: bool,
        dead: str | None = None,
    ) -> None:
        """Announce, execute and report one run of ``trigger`` under its claim, publish its retry
        if it failed and may be retried, then ack it. ``dead``: the run of the same trigger that
        was lost with its worker (its claim taken over), whose lease on the job this run waits
        out, even under ``skip``."""
        key = claim_key(trigger.id, attempt)
        self._held[key] = run_id
        try:
            async with self._overlap_guard(trigger, run_id, expires_at, dead) as blocked:
                # Started once the job's lease (if any) is held: the wait is not part of the run.
                started = self._start(trigger, run_id, redelivered, attempt)
                if blocked is not None:
                    # Never started: another run of the job is in flight (``skip``), or the
                    # trigger went stale while waiting for it (``queue``).
                    skipped = self._finished(started, ActionResult(RunStatus.SKIPPED, error=blocked))
                    await self._end(
                        message, message.body, message.headers, trigger, attempt, run_id, *skipped
                    )
                    return
                try:
                    await self.publisher.event(started)
                except BrokerUnavailable:
                    # Not started: let the next delivery of the trigger claim it at once.
                    with contextlib.suppress(StoreUnavailable):
                        await self.claims.release(key, run_id)
                    raise
                # A long run's trigger is acked now, not at its end (RabbitMQ's consumer_timeout):
                # its claim keeps the trigger, so that should this worker die, the worker that
                # finds the claim lapsed ends the run (``recover_lapsed``).
                settling: AckedDelivery | None = message
                if self._acks_early(trigger):
                    envelope = _envelope(message)
                    await until_done(
                        lambda: self.claims.keep_trigger(key, run_id, message.body, envelope),
                        (StoreUnavailable,),
                        log,
                        f"run {run_id} started; keeping its trigger before acking it",
                    )
                    await message.settle()
                    settling = None
                # One line per run, at its end; a long run's start is worth a line of its own.
                log.log(
                    logging.INFO if settling is None else logging.DEBUG,
                    "run %s of %s started%s%s",
                    run_id,
                    trigger.id,
                    f" (attempt {attempt})" if attempt > 1 else "",
                    " (redelivery)" if redelivered else "",
                )
                self.running += 1
                try:
                    result = await self._execute(trigger, run_id, attempt)
                    finished = self._finished(started, result)
                    await self._end(
                        settling, message.body, message.headers, trigger, attempt, run_id, *finished
                    )
                finally:
                    self.running -= 1
        finally:
            self._held.pop(key, None)

    def _acks_early(self, trigger: Trigger) -> bool:
        """Whether ``trigger``'s run may outlast what the broker waits for an ack."""
        return self.early_ack_seconds is not None and trigger.timeout_seconds > self.early_ack_seconds

    async def _end(
        self,
        message: AckedDelivery | None,
        body: bytes,
        headers: Mapping[str, object] | None,
        trigger: Trigger,
        attempt: int,
        run_id: str,
        finished: RunFinished,
        body_of_end: bytes,
    ) -> None:
        """Keep the end of a run (``finished``, ``body_of_end`` its bytes) in its claim, publish
        the retry it calls for (the trigger's ``body`` again, with its signature ``headers``),
        report it, ack ``message`` (None: acked already)."""
        # The claim keeps the end before it is reported: a repeat of the trigger reports it
        # again rather than running the job a second time (and publishes the retry if need be).
        key = claim_key(trigger.id, attempt)
        await until_done(
            lambda: self.claims.finish(key, run_id, body_of_end.decode(), self.clock()),
            (StoreUnavailable,),
            log,
            f"run {run_id} ended; recording its end in the store",
        )
        await self._retry_after(body, headers or {}, trigger, attempt, finished.status)
        await self._report(finished, body_of_end)
        if message is not None:
            await message.settle()

    async def _retry_after(
        self, body: bytes, headers: Mapping[str, object], trigger: Trigger, attempt: int, status: RunStatus
    ) -> None:
        """Publish the attempt that follows ``attempt`` after it ended with ``status``, if any, to
        wait its backoff in a delay queue (retried until the broker confirms it), and record in
        the attempt's claim that it was published."""
        following = next_attempt(trigger, attempt, status)
        if following is None or trigger.retry is None:
            return
        step = delay_step(backoff_delay(trigger.retry, following))
        await until_done(
            lambda: self.publisher.retry(body, headers, trigger.pool, following, step),
            (BrokerUnavailable,),
            log,
            f"attempt {attempt} of {trigger.id} ended {status.value}; publishing attempt {following}",
        )
        key = claim_key(trigger.id, attempt)
        await until_done(
            lambda: self.claims.retry_published(key, self.clock()),
            (StoreUnavailable,),
            log,
            f"attempt {following} of {trigger.id} published; recording it in the store",
        )
        log.info(
            "attempt %d of %s ended %s; attempt %d follows in %ds",
            attempt,
            trigger.id,
            status.value,
            following,
            step,
        )

    async def _retry_owed(
        self, body: bytes, headers: Mapping[str, object], trigger: Trigger, attempt: int, status: RunStatus
    ) -> None:
        """Handling a repeat of ``attempt``, which ended with ``status``: publish the retry that
        end calls for only if nobody did and nobody alive is doing it (the worker that ended the
        attempt died first). Waits, at most about a claim lease, while that worker may still be
        publishing it."""
        following = next_attempt(trigger, attempt, status)
        if following is None:
            return
        key = claim_key(trigger.id, attempt)
        while not await self.claims.exists(claim_key(trigger.id, following)):
            match await self.claims.take_retry(key, self.clock()):
                case RetryTurn.PUBLISHED:
                    return
                case RetryTurn.PUBLISH:
                    log.warning(
                        "attempt %d of %s ended %s and its retry was not published",
                        attempt,
                        trigger.id,
                        status.value,
                    )
                    await self._retry_after(body, headers, trigger, attempt, status)
                    return
                case RetryTurn.BUSY:
                    await asyncio.sleep(CLAIM_POLL_SECONDS)

    def _overlap_guard(
        self, trigger: Trigger, run_id: str, expires_at: datetime, dead: str | None = None
    ) -> contextlib.AbstractAsyncContextManager[str | None]:
        """Hold the job's lease around the block under overlap ``skip`` or ``queue``, renewed
        while it runs. Yields None once held (at once under ``allow``, most jobs, which take no
        lease), or why the run does not start: under ``skip`` when another (live) run holds the
        lease, under ``queue`` when the trigger expired while waiting for it. A lease ``dead``
        holds is waited out under both: that run was lost with its worker (this run replaces
        it), and its lease outlives it by its ttl, on purpose."""
        if trigger.policy is Overlap.ALLOW:
            return _UNGUARDED
        return self._leased(trigger, run_id, expires_at, dead)

    @contextlib.asynccontextmanager
    async def _leased(
        self, trigger: Trigger, run_id: str, expires_at: datetime, dead: str | None
    ) -> AsyncIterator[str | None]:
        """``_overlap_guard`` under ``skip`` or ``queue``."""
        policy = trigger.policy
        key = exclusive_key(trigger.job)
        ttl = (
            timedelta(seconds=trigger.exclusive_ttl_seconds)
            if trigger.exclusive_ttl_seconds
            else self.claims.lease
        )
        said = False
        while True:
            lease = await self.claims.take_lease(key, run_id, ttl, self.clock())
            if lease.outcome is not ClaimOutcome.HELD:
                break
            in_flight = f"run {lease.run_id} of job {trigger.job!r} is in flight on {lease.worker}"
            if policy is Overlap.SKIP and lease.run_id != dead:
                log.info("%s skipped: %s", trigger.id, in_flight)
                yield f'overlap = "skip": {in_flight}'
                return
            if self.clock() >= expires_at:
                yield f'overlap = "{policy}": the trigger expired while {in_flight}'
                return
            if not said:
                said = True
                log.info("%s waits (overlap %s): %s", trigger.id, policy, in_flight)
            await asyncio.sleep(CLAIM_POLL_SECONDS)
        if lease.outcome is ClaimOutcome.TAKEN_OVER:
            log.warning(
                "job %s's lease was held by run %s on %s, which stopped renewing it",
                trigger.job,
                lease.run_id,
                lease.worker,
            )
        renewing = asyncio.create_task(self._renew_lease(key, run_id, ttl))
        try:
            yield None
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
            await until_done(
                lambda: self.claims.give_back(key, run_id),
                (StoreUnavailable,),
                log,
                f"run {run_id} ended; giving back job {trigger.job}'s lease",
            )

    async def _renew_lease(self, key: str, run_id: str, ttl: timedelta) -> None:
        """Renew ``run_id``'s lease ``key`` every third of ``ttl`` until cancelled; a store outage
        is logged and waited out (the lease may then lapse: see docs/operations.md)."""
        every = ttl.total_seconds() / 3
        while True:
            await asyncio.sleep(every)
            try:
                await self.claims.renew_lease(key, run_id, ttl, self.clock())
            except StoreUnavailable as exc:
                log.warning("%s; the run goes on, renewing again in %gs", exc, every)

    async def _lost(
        self, message: AckedDelivery, trigger: Trigger, attempt: int, run_id: str, claim: Claim
    ) -> None:
        """The trigger came back after its run was lost with its worker (the claim lapsed): the
        lost run's end is recorded (``lost``) and, under ``on_lost = "retry"`` with attempts left,
        the next attempt follows; under ``fail`` the fire ends there."""
        finished = self._lost_run(trigger, attempt, claim, redelivered=bool(message.redelivered))
        await self._end(message, message.body, message.headers, trigger, attempt, run_id, *finished)

    def _lost_run(self, trigger: Trigger, attempt: int, claim: Claim, *, redelivered: bool) -> Ended:
        """The ``run.finished`` (``lost``) of the run that held ``claim`` when its worker died."""
        lost_at = self.clock()
        gone = RunStarted(
            run_id=claim.run_id,
            trigger_id=trigger.id,
            job=trigger.job,
            pool=trigger.pool,
            worker=claim.worker,
            redelivered=redelivered,
            scheduled_at=trigger.scheduled_at,
            started_at=min(claim.claimed_at or lost_at, lost_at),
            attempt=attempt,
        )
        why = f"lost: worker {claim.worker} stopped renewing its claim mid-run"
        log.warning(
            "run %s of %s (attempt %d) was lost with %s", claim.run_id, trigger.id, attempt, claim.worker
        )
        return self._finished(gone, ActionResult(RunStatus.LOST, error=why))

    async def recover_lapsed(self) -> None:
        """Every third of the claim lease, until cancelled: end the runs whose trigger was acked
        when they started (long runs) and whose worker stopped renewing their claim. Each is
        recorded ``lost`` and followed per the job's ``on_lost`` (with ``retry`` and attempts
        left, the next attempt; otherwise the fire ends there: nobody will deliver it again)."""
        every = self.claims.lease.total_seconds() / 3
        outage = OutageLog(log, f"lapsed long runs, looked for every {every:g}s")
        while True:
            await asyncio.sleep(every)
            try:
                for lapsed in await self.claims.lapsed(self.clock()):
                    await self._recover(lapsed)
            except StoreUnavailable as exc:
                outage.failed(exc)
            else:
                outage.ended()

    async def _recover(self, lapsed: Lapsed) -> None:
        """End one lapsed long run (see ``recover_lapsed``), unless another worker does first."""
        run_id = uuid.uuid4().hex
        if not await self.claims.take_over(lapsed.key, lapsed.holder.run_id, run_id, self.clock()):
            return
        # The body was verified before it was kept; it is parsed again, never trusted blind.
        trigger = TRIGGER_ADAPTER.validate_json(lapsed.body, strict=True)
        attempt = _attempt_of_key(lapsed.key, trigger.id)
        headers = orjson.loads(lapsed.envelope).get("headers", {})
        finished = self._lost_run(trigger, attempt, lapsed.holder, redelivered=False)
        await self._end(None, lapsed.body, headers, trigger, attempt, run_id, *finished)

    async def _report_duplicate(
        self, message: AckedDelivery, trigger: Trigger, attempt: int, claim: Claim
    ) -> None:
        """Record a repeat of a trigger the fleet ran (or is running) as a ``duplicate`` run, after
        reporting the original run's end again in case its first report was lost and publishing
        the retry that end calls for if it was never published (``_retry_owed``); then ack."""
        if claim.finished_event is not None:
            original = RunFinished.model_validate_json(claim.finished_event)
            await self._retry_owed(message.body, message.headers or {}, trigger, attempt, original.status)
            await self.publisher.event(original)
        state = "ran" if claim.outcome is ClaimOutcome.DUPLICATE else "is running"
        which = f"attempt {attempt} of this trigger" if attempt > 1 else "this trigger"
        why = f"not run again: {claim.worker} {state} {which} as run {claim.run_id}"
        key = claim_key(trigger.id, attempt)
        log.warning("trigger %s delivered again; %s", key, why)
        repeat = self._start(
            trigger, f"{key}#duplicate-{uuid.uuid4().hex[:12]}", bool(message.redelivered), attempt
        )
        await self.publisher.event(*self._finished(repeat, ActionResult(RunStatus.DUPLICATE, error=why)))
        await message.settle()

    def _refusal(self, trigger: Trigger) -> str | None:
        """Why this worker will not run ``trigger``'s action at all (``not_allowed``), or None."""
        executor = self.executors.get(trigger.action.type)
        if executor is None:
            return f"this worker runs no {trigger.action.type!r} actions"
        refusal = getattr(executor, "refusal", None)
        return None if refusal is None else refusal(trigger.action)

    async def _execute(self, trigger: Trigger, run_id: str, attempt: int = 1) -> ActionResult:
        """The action's result; an executor that raises (a bug) makes a failed run, not a crash."""
        try:
            executor = self.executors[trigger.action.type]
            return await executor.run(
                trigger.action, trigger.timeout_seconds, RunContext.of(trigger, run_id, attempt)
            )
        except Exception as exc:
            log.exception("the %s executor raised on %s", trigger.action.type, trigger.id)
            return ActionResult(RunStatus.FAILED, error=f"internal_error: {type(exc).__name__}: {exc}")

    async def _refuse(self, message: AckedDelivery, rejected: Rejected, attempt: int = 1) -> None:
        """Dead-letter a refused trigger with its reason; an expired one is also reported as a run
        (of ``attempt``)."""
        log.warning("refused trigger %s: %s (%s)", message.message_id, rejected.reason.value, rejected.detail)
        await self.publisher.dead_letter(message, rejected, self.worker)
        outcome = _REPORTED_REFUSALS.get(rejected.reason)
        if outcome is not None:
            # The signature was valid, so the body is ours: report the run (expired, or failed as
            # not allowed here), under one id per trigger and reason so that a redelivered
            # trigger is recorded once.
            trigger = TRIGGER_ADAPTER.validate_json(message.body, strict=True)
            key = claim_key(trigger.id, attempt)
            started = self._start(
                trigger, f"{key}#{rejected.reason.value}", bool(message.redelivered), attempt
            )
            await self.publisher.event(
                *self._finished(
                    started, ActionResult(outcome, error=f"{rejected.reason.value}: {rejected.detail}")
                )
            )
        await message.settle()

    async def _give_up(self, message: AckedDelivery, rejected: Rejected) -> None:
        """Dead-letter ``message`` after an unexpected failure, so that it is never delivered again."""
        if message.processed:
            return  # already acked: what failed came after
        try:
            await self.publisher.dead_letter(message, rejected, self.worker)
        except BrokerUnavailable as exc:
            log.warning("could not dead-letter %s (%s); it will be delivered again", message.message_id, exc)
            await asyncio.sleep(REQUEUE_PAUSE_SECONDS)
            await message.settle(ack=False, requeue=True)
            return
        except Exception:
            # Even the copy failed: let the broker dead-letter it (without our reason headers).
            log.exception("could not dead-letter %s; the broker dead-letters it", message.message_id)
            await message.settle(ack=False, requeue=False)
            return
        await message.settle()

    def _start(self, trigger: Trigger, run_id: str, redelivered: bool, attempt: int) -> RunStarted:
        return RunStarted(
            attempt=attempt,
            run_id=run_id,
            trigger_id=trigger.id,
            job=trigger.job,
            pool=trigger.pool,
            worker=self.worker,
            redelivered=redelivered,
            scheduled_at=trigger.scheduled_at,
            started_at=self.clock(),
        )

    async def _report(self, event: RunFinished, body: bytes) -> None:
        """Publish the end of a run (``body``: its bytes), retried until the broker confirms it."""
        await until_done(
            lambda: self.publisher.event(event, body),
            (BrokerUnavailable,),
            log,
            f"run {event.run_id} ended; its report is not confirmed yet",
        )
        log.info("run %s of %s %s", event.run_id, event.trigger_id, event.status.value)

    def _finished(self, started: RunStarted, result: ActionResult) -> Ended:
        """The ``run.finished`` of ``started``, and its bytes: always a valid event, whatever
        ``result`` holds.

        Output and errors are made wire text (no NUL, valid UTF-8, bounded); should the event
        still not validate, a failed run saying why is reported instead.
        """
        finished_at = max(self.clock(), started.started_at)
        # The run's fields as they are (a run event is flat: its values are the fields' own).
        ended = {name: value for name, value in started.__dict__.items() if name != "type"}
        ended["finished_at"] = finished_at
        ended["duration_seconds"] = (finished_at - started.started_at).total_seconds()
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
            return Ended(event, event.to_bytes())
        except (ValidationError, TypeError, ValueError) as exc:
            log.exception("the result of run %s cannot be reported as it is", started.run_id)
            why = one_line(f"internal_error: {type(exc).__name__}: {exc}")
            event = RunFinished(**ended, status=RunStatus.FAILED, error=why)
            return Ended(event, event.to_bytes())


class Ended(NamedTuple):
    """A run's ``run.finished`` and the bytes of its body."""

    event: RunFinished
    body: bytes


def _wire_text(text: str | None, *, keep_end: bool = False) -> str | None:
    """``text`` as the wire takes it: NUL and invalid UTF-8 replaced by U+FFFD, at most
    ``OUTPUT_TAIL_LIMIT`` characters (the last ones with ``keep_end``)."""
    if text is None:
        return None
    cleaned = text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
    return cleaned[-OUTPUT_TAIL_LIMIT:] if keep_end else cleaned[:OUTPUT_TAIL_LIMIT]


def _envelope(message: AckedDelivery) -> str:
    """What besides its body verifies a delivered trigger: its signature headers and routing key
    (JSON, kept in the claim of a run whose trigger is acked early)."""
    headers = message.headers or {}
    kept = {
        name: bytes(value).decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else str(value)
        for name in (KEY_ID_HEADER, SIGNATURE_HEADER)
        if (value := headers.get(name)) is not None
    }
    return orjson.dumps({"routing_key": message.routing_key or "", "headers": kept}).decode()


def _attempt_of_key(key: str, trigger_id: str) -> int:
    """The attempt a claim key names (``common.retries.claim_key``'s inverse)."""
    suffix = key.removeprefix(trigger_id)
    return int(suffix[1:]) if suffix.startswith("#") and suffix[1:].isdigit() else 1
