"""One message can never stop the fleet.

Each case here was measured: a signed message that crashed a consumer, left runs `running`
forever, or was silently dropped. Now each ends once, on the dead-letter queue with its reason
(or as one finished run), and the fleet goes on.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Awaitable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

import monitor.service
import worker.service
from common.actions import AnyAction, HttpAction, ShellAction
from common.bounds import MAX_MESSAGE_BYTES
from common.clock import utcnow
from common.envelope import REJECTED_BY_HEADER, REJECTION_DETAIL_HEADER, REJECTION_HEADER
from common.http_client import open_session
from common.messages import (
    Event,
    HeartbeatKind,
    JobHeartbeat,
    RunFinished,
    RunStarted,
    RunStatus,
    WireMessage,
)
from common.settings import Settings
from common.signing import SIGNATURE_HEADER, Keyring, Role
from common.store import Store
from common.topology import QueueMismatch, Topology, event_routing_key
from tests.conftest import Start
from tests.fleet import eventually
from tests.integration.helpers import runs_of
from worker.actions import ActionResult, RunContext
from worker.actions.http import HttpExecutor
from worker.actions.shell import ShellExecutor


class DeadLetters:
    """Everything that reaches the fleet's dead-letter queue, gathered as it arrives."""

    def __init__(self, queue: AbstractQueue) -> None:
        self.queue = queue
        self.messages: list[AbstractIncomingMessage] = []

    @classmethod
    async def open(cls, amqp: AbstractRobustConnection, settings: Settings) -> DeadLetters:
        channel = await amqp.channel()
        return cls(await channel.get_queue(Topology(settings.namespace).dead_queue))

    async def collect(self) -> list[AbstractIncomingMessage]:
        while (message := await self.queue.get(fail=False)) is not None:
            self.messages.append(message)
        return self.messages

    async def wait_for(self, count: int) -> list[AbstractIncomingMessage]:
        """At least ``count`` dead letters (waits for them), all gathered so far."""

        async def enough() -> bool:
            return len(await self.collect()) >= count

        await eventually(enough)
        return self.messages

    def reasons(self) -> Counter[str]:
        return Counter(str((m.headers or {}).get(REJECTION_HEADER)) for m in self.messages)


async def _exchange(amqp: AbstractRobustConnection, name: str) -> AbstractExchange:
    channel = await amqp.channel()
    return await channel.get_exchange(name)


async def _publish(exchange: AbstractExchange, body: bytes, routing_key: str, keys: Keyring) -> None:
    """Publish ``body`` signed as the fleet's own processes would: a trigger with the trigger key,
    an event with the event key, over the namespace (``<ns>.<exchange>``) and ``routing_key``."""
    namespace, _, kind = exchange.name.rpartition(".")
    role = Role.TRIGGER if kind == "triggers" else Role.EVENT
    headers = keys.sign(role, namespace, routing_key, body)
    await exchange.publish(aio_pika.Message(body, headers=headers), routing_key=routing_key)


async def _send_events(
    amqp: AbstractRobustConnection, settings: Settings, events: Sequence[WireMessage]
) -> None:
    exchange = await _exchange(amqp, Topology(settings.namespace).events_exchange)
    for event in events:
        await _publish(exchange, event.to_bytes(), event_routing_key(event), settings.keyring())


def _alive(fleet: Start) -> None:
    """Every process the ``fleet`` fixture started is still running."""
    tasks: list[asyncio.Task[None]] = fleet.__self__.tasks  # type: ignore[attr-defined]
    for task in tasks:
        assert not task.done(), f"a fleet process stopped: {task.exception() if not task.cancelled() else ''}"


def _trigger_body(job: str, action: dict[str, Any], *, trigger_id: str | None = None) -> bytes:
    """A trigger as raw JSON, so that it may carry what the models would refuse to build."""
    now = utcnow()
    return orjson.dumps(
        {
            "v": 1,
            "type": "trigger",
            "id": trigger_id or f"{job}@{now.isoformat()}",
            "job": job,
            "pool": "default",
            "scheduled_at": now.isoformat(),
            "published_at": now.isoformat(),
            "expires_at": (now + timedelta(minutes=5)).isoformat(),
            "timeout_seconds": 10,
            "action": action,
        }
    )


def _heartbeat(id: str, job: str, at: datetime, **extra: Any) -> JobHeartbeat:
    return JobHeartbeat(id=id, job=job, at=at, **extra)


# -- the monitor --------------------------------------------------------------------------------


async def test_a_heartbeat_at_the_edge_of_time_is_dead_lettered_once_and_the_monitor_goes_on(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection
) -> None:
    # Regression: this signed heartbeat made every monitor exit with OverflowError, on every
    # restart, and no event was ever stored again.
    await fleet("monitor")
    dead = await DeadLetters.open(amqp, settings)
    events = await _exchange(amqp, Topology(settings.namespace).events_exchange)
    keys = settings.keyring()
    for at in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"):
        body = orjson.dumps({"v": 1, "type": "job.heartbeat", "id": f"edge {at}", "job": "edge", "at": at})
        await _publish(events, body, "job.heartbeat.edge", keys)

    await dead.wait_for(2)
    assert dead.reasons() == {"malformed": 2}
    assert all("at" in str((m.headers or {})[REJECTION_DETAIL_HEADER]) for m in dead.messages)
    _alive(fleet)
    await _send_events(amqp, settings, [_heartbeat("after-edge", "alive", utcnow())])
    await eventually(lambda: runs_of(store, "alive"))
    assert await runs_of(store, "edge") == []


async def test_a_body_over_the_size_limit_is_dead_lettered_as_too_large(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection
) -> None:
    await fleet("monitor")
    dead = await DeadLetters.open(amqp, settings)
    events = await _exchange(amqp, Topology(settings.namespace).events_exchange)
    body = _heartbeat("big", "big", utcnow()).to_bytes()
    huge = body[:-1] + b"," + b" " * MAX_MESSAGE_BYTES + b"}"
    await _publish(events, huge, "job.heartbeat.big", settings.keyring())
    await dead.wait_for(1)
    assert dead.reasons() == {"too_large": 1}
    assert dead.messages[0].body == huge  # kept exactly as received
    _alive(fleet)


async def test_events_refused_inside_a_batch_leave_the_rest_of_it_acked_once(
    settings: Settings,
    store: Store,
    fleet: Start,
    amqp: AbstractRobustConnection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The monitor settles a batch with one multiple ack up to its last delivery. Events it
    # refuses inside the batch, the last one included, must be dead-lettered once and neither be
    # acked twice (the broker would close the channel and redeliver the whole batch) nor be left
    # unacked. Published before the monitor starts, so that they arrive as one batch.
    channel = await amqp.channel()
    topology = Topology(settings.namespace)
    events = (await topology.declare_exchanges(channel))["events"]
    keys = settings.keyring()
    for i in range(30):
        beat = _heartbeat(f"batch-{i}", "batch", utcnow())
        body, routing_key = beat.to_bytes(), event_routing_key(beat)
        headers = dict(keys.sign(Role.EVENT, settings.namespace, routing_key, body))
        if i % 10 == 9:
            headers[SIGNATURE_HEADER] = "0" * len(str(headers[SIGNATURE_HEADER]))
        await events.publish(aio_pika.Message(body, headers=headers), routing_key=routing_key)
    dead = await DeadLetters.open(amqp, settings)

    await fleet("monitor")
    await dead.wait_for(3)
    await eventually(lambda: _has(runs_of(store, "batch"), 27))

    assert sorted(str(orjson.loads(m.body)["id"]) for m in dead.messages) == [
        "batch-19",
        "batch-29",
        "batch-9",
    ]
    assert dead.reasons() == {"bad_signature": 3}
    queue = await channel.declare_queue(topology.monitor_queue, passive=True)
    assert queue.declaration_result.message_count == 0
    closed = [r.getMessage() for r in caplog.records if "consuming again" in r.getMessage()]
    unsettled = [r.getMessage() for r in caplog.records if "could not settle" in r.getMessage()]
    assert closed == [] and unsettled == []
    _alive(fleet)


async def _has(rows: Awaitable[Sequence[object]], count: int) -> bool:
    return len(await rows) >= count


@pytest.mark.both_stores  # it starts a monitor, which opens the store
async def test_the_monitor_queue_has_a_delivery_limit(
    settings: Settings, fleet: Start, amqp: AbstractRobustConnection
) -> None:
    # A poison event must not come back forever: the broker accepts this declaration only if
    # the queue the monitor declared has exactly these arguments.
    await fleet("monitor")
    topology = Topology(settings.namespace)
    channel = await amqp.channel()
    await channel.declare_queue(
        topology.monitor_queue,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": topology.dead_exchange,
            "x-delivery-limit": 5,
        },
    )


async def test_an_event_that_cannot_be_recorded_is_dead_lettered_as_internal_error(
    settings: Settings,
    store: Store,
    fleet: Start,
    amqp: AbstractRobustConnection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Any exception while recording (not only a database error) must end with that one event
    # dead-lettered with its reason, the others of its batch stored, and the monitor running.
    record_batch = monitor.service.record_batch

    async def failing_on_poison(session: Any, events: Sequence[Event], now: datetime) -> Any:
        if any(getattr(event, "job", None) == "poison" for event in events):
            raise ZeroDivisionError("a bug in recording")
        return await record_batch(session, events, now)

    monkeypatch.setattr(monitor.service, "record_batch", failing_on_poison)
    await fleet("monitor")
    dead = await DeadLetters.open(amqp, settings)
    now = utcnow()
    await _send_events(
        amqp,
        settings,
        [
            _heartbeat("p-1", "poison", now),
            _heartbeat("h-1", "healthy", now),
            _heartbeat("h-2", "healthy", now),
        ],
    )
    [letter] = await dead.wait_for(1)
    headers = letter.headers or {}
    assert headers[REJECTION_HEADER] == "internal_error"
    assert str(headers[REJECTION_DETAIL_HEADER]).startswith("ZeroDivisionError: a bug in recording")
    assert str(headers[REJECTED_BY_HEADER]).startswith("monitor")
    assert orjson.loads(letter.body)["id"] == "p-1"
    await eventually(lambda: _count(runs_of(store, "healthy"), 2))
    assert await runs_of(store, "poison") == []
    _alive(fleet)


async def _count(runs: Any, expected: int) -> bool:
    return len(await runs) == expected


async def test_an_event_reusing_a_stored_id_for_other_content_is_dead_lettered_as_id_conflict(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection
) -> None:
    await fleet("monitor")
    dead = await DeadLetters.open(amqp, settings)
    now = utcnow()
    beat = _heartbeat("hb-1", "owner", now, kind=HeartbeatKind.SUCCESS)
    run = {
        "run_id": "run-1",
        "trigger_id": "owner@2026-01-01T00:00:00Z",
        "job": "owner",
        "pool": "default",
        "worker": "w",
        "scheduled_at": now,
        "started_at": now,
    }
    await _send_events(amqp, settings, [beat, RunStarted(**run)])
    await eventually(lambda: _count(runs_of(store, "owner"), 2))

    # The same again: duplicates, recorded once, not refused.
    await _send_events(amqp, settings, [beat, RunStarted(**run)])
    conflicts: list[WireMessage] = [
        _heartbeat("hb-1", "intruder", now),  # another job
        _heartbeat("hb-1", "owner", now, kind=HeartbeatKind.FAIL),  # another outcome
        _heartbeat("hb-1", "owner", now + timedelta(seconds=1)),  # another instant
        RunStarted(**{**run, "job": "intruder"}),
        RunFinished(
            **{**run, "trigger_id": "owner@2027-01-01T00:00:00Z"},
            finished_at=now,
            duration_seconds=0,
            status=RunStatus.SUCCEEDED,
        ),
        # A worker run whose id is the run the heartbeat opened.
        RunStarted(**{**run, "run_id": "hb:hb-1"}),
    ]
    await _send_events(amqp, settings, conflicts)
    await dead.wait_for(len(conflicts))
    assert dead.reasons() == {"id_conflict": len(conflicts)}

    await _send_events(amqp, settings, [_heartbeat("after", "after", now)])
    await eventually(lambda: runs_of(store, "after"))
    assert await runs_of(store, "intruder") == []
    owner = await runs_of(store, "owner")
    assert sorted((r.run_id, r.status) for r in owner) == [("hb:hb-1", "succeeded"), ("run-1", "running")]
    _alive(fleet)


# -- the worker ---------------------------------------------------------------------------------


async def _outcome(store: Store, dead: DeadLetters, job: str) -> tuple[list[Any], list[str]]:
    """``job``'s finished runs and the reasons its triggers were dead-lettered, once either
    exists (the jobs file helper may one day refuse such an action before it reaches a worker:
    then it is malformed, never run)."""

    async def settled() -> tuple[list[Any], list[str]] | None:
        runs = await runs_of(store, job)
        await dead.collect()
        reasons = [
            str((m.headers or {}).get(REJECTION_HEADER))
            for m in dead.messages
            if orjson.loads(m.body).get("job") == job
        ]
        if reasons or (runs and all(r.finished_at is not None for r in runs)):
            return runs, reasons
        return None

    found: tuple[list[Any], list[str]] = await eventually(settled)
    return found


async def test_a_trigger_whose_action_cannot_start_ends_as_one_failed_run(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection, tmp_path: Path
) -> None:
    # Regression: a NUL in argv or an '=' in an env name raised in the worker, left one
    # `running` run per redelivery (six) and only then reached the dead-letter queue.
    await fleet("monitor", "worker")
    dead = await DeadLetters.open(amqp, settings)
    triggers = await _exchange(amqp, Topology(settings.namespace).triggers_exchange)
    keys = settings.keyring()
    cases = {
        "nul-in-argv": {"type": "shell", "argv": ["touch", str(tmp_path / "nul\x00marker")]},
        "nul-in-program": {"type": "shell", "argv": ["tou\x00ch", str(tmp_path / "marker")]},
        "equals-in-env-name": {"type": "shell", "argv": ["true"], "env": {"A=B": "x"}},
        "nul-in-env-value": {"type": "shell", "argv": ["true"], "env": {"A": "x\x00y"}},
        "missing-cwd": {"type": "shell", "argv": ["true"], "cwd": str(tmp_path / "nowhere")},
        "no-such-program": {"type": "shell", "argv": [str(tmp_path / "not-a-program")]},
    }
    for job, action in cases.items():
        await _publish(triggers, _trigger_body(job, action), "default", keys)

    for job in cases:
        runs, reasons = await _outcome(store, dead, job)
        if reasons:
            assert reasons == ["malformed"] and runs == [], (job, reasons, runs)
            continue
        assert len(runs) == 1, f"{job}: {len(runs)} runs, one per redelivery"
        assert runs[0].status == "failed" and runs[0].error, (job, runs[0].status)
        assert not runs[0].redelivered
    assert not (tmp_path / "marker").exists()
    _alive(fleet)
    genuine = tmp_path / "genuine"
    await _publish(
        triggers,
        _trigger_body("genuine", {"type": "shell", "argv": ["touch", str(genuine)]}),
        "default",
        keys,
    )
    await eventually(lambda: runs_of(store, "genuine", status="succeeded"))
    assert genuine.exists()


async def test_output_with_nul_bytes_and_invalid_utf8_still_ends_in_a_valid_run_finished(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection
) -> None:
    await fleet("monitor", "worker")
    triggers = await _exchange(amqp, Topology(settings.namespace).triggers_exchange)
    script = r"printf 'a\000b\377\376c\300'; exit 3"
    await _publish(
        triggers,
        _trigger_body("noisy", {"type": "shell", "argv": ["sh", "-c", script]}),
        "default",
        settings.keyring(),
    )
    [run] = await eventually(lambda: runs_of(store, "noisy", status="failed"))
    assert run.exit_code == 3
    assert run.output_tail is not None and "\x00" not in run.output_tail
    assert run.output_tail.startswith("a") and "b" in run.output_tail and "c" in run.output_tail


_RUN = RunContext(run_id="poison-run", trigger_id="poison@t", job="poison", scheduled_at=utcnow())


class _Exploding:
    """An executor with a bug: it raises instead of returning a result."""

    async def run(self, action: AnyAction, timeout: float, context: RunContext) -> ActionResult:
        raise ZeroDivisionError("a bug in the executor")


async def test_an_action_that_raises_still_ends_its_run_once_and_the_trigger_is_acked(
    settings: Settings,
    store: Store,
    fleet: Start,
    amqp: AbstractRobustConnection,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    real = worker.service.executors

    def with_a_bug(client: Any, commands: Any) -> dict[str, Any]:
        executors = dict(real(client, commands))
        executors["http"] = _Exploding()
        return executors

    monkeypatch.setattr(worker.service, "executors", with_a_bug)
    await fleet("monitor", "worker")
    triggers = await _exchange(amqp, Topology(settings.namespace).triggers_exchange)
    keys = settings.keyring()
    await _publish(
        triggers, _trigger_body("buggy", {"type": "http", "url": "http://127.0.0.1:1/"}), "default", keys
    )
    [run] = await eventually(lambda: runs_of(store, "buggy", status="failed"))
    assert run.error == "internal_error: ZeroDivisionError: a bug in the executor"

    # Acked, not handed back: a later trigger runs, and the buggy one ran once.
    marker = tmp_path / "after"
    await _publish(
        triggers, _trigger_body("after", {"type": "shell", "argv": ["touch", str(marker)]}), "default", keys
    )
    await eventually(lambda: runs_of(store, "after", status="succeeded"))
    assert len(await runs_of(store, "buggy")) == 1
    _alive(fleet)


async def test_a_trigger_reusing_another_triggers_id_is_dead_lettered_as_id_conflict(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection, tmp_path: Path
) -> None:
    # Regression: a trigger with the id of one already run, but another body, was acked and
    # dropped with only a log line.
    await fleet("monitor", "worker")
    dead = await DeadLetters.open(amqp, settings)
    triggers = await _exchange(amqp, Topology(settings.namespace).triggers_exchange)
    keys = settings.keyring()
    shared = "reused@2026-01-01T00:00:00Z"
    first = _trigger_body(
        "reused", {"type": "shell", "argv": ["touch", str(tmp_path / "first")]}, trigger_id=shared
    )
    second = _trigger_body(
        "reused", {"type": "shell", "argv": ["touch", str(tmp_path / "second")]}, trigger_id=shared
    )
    assert hashlib.sha256(first).digest() != hashlib.sha256(second).digest()

    await _publish(triggers, first, "default", keys)
    await eventually(lambda: runs_of(store, "reused", status="succeeded"))
    await _publish(triggers, first, "default", keys)  # a duplicate: acked, not run again
    await _publish(triggers, second, "default", keys)  # a conflict: dead-lettered
    [letter] = await dead.wait_for(1)
    assert (letter.headers or {})[REJECTION_HEADER] == "id_conflict"
    assert letter.body == second

    marker = tmp_path / "after"
    await _publish(
        triggers, _trigger_body("after", {"type": "shell", "argv": ["touch", str(marker)]}), "default", keys
    )
    await eventually(lambda: runs_of(store, "after", status="succeeded"))
    assert sorted(run.status for run in await runs_of(store, "reused")) == ["duplicate", "succeeded"]
    assert not (tmp_path / "second").exists()
    assert len(await dead.collect()) == 1
    _alive(fleet)


@pytest.mark.both_stores  # it starts a monitor, which opens the store
async def test_a_monitor_queue_of_an_older_version_stops_the_monitor_with_one_clear_line(
    settings: Settings, fleet: Start, amqp: AbstractRobustConnection
) -> None:
    # Upgrading: the queue exists without x-delivery-limit; the broker refuses the declaration.
    topology = Topology(settings.namespace)
    channel = await amqp.channel()
    await channel.declare_queue(
        topology.monitor_queue,
        durable=True,
        arguments={"x-queue-type": "quorum", "x-dead-letter-exchange": topology.dead_exchange},
    )
    with pytest.raises(QueueMismatch) as refused:
        await fleet("monitor")
    fleet.__self__.tasks.clear()  # type: ignore[attr-defined]  # it stopped; nothing to cancel
    line = str(refused.value)
    assert "\n" not in line and topology.monitor_queue in line and "PRECONDITION_FAILED" in line


async def test_executors_turn_what_the_kernel_or_http_refuses_into_a_failed_result(tmp_path: Path) -> None:
    # The jobs file and the wire refuse these now; the executors must not rely on it (a trigger
    # from an older publisher, a bound missed): each is a failed result, never an exception.
    def shell(**fields: Any) -> ShellAction:
        return ShellAction.model_construct(
            **{"type": "shell", "argv": ["true"], "cwd": None, "env": {}, "success_exit_codes": [0], **fields}
        )

    shell_actions = [
        shell(argv=["tou\x00ch", str(tmp_path / "x")]),
        shell(argv=["touch", str(tmp_path / "x\x00y")]),
        shell(env={"A=B": "x"}),
        shell(env={"A": "x\x00y"}),
        shell(cwd=str(tmp_path / "nowhere")),
        shell(cwd="a\x00b"),
        shell(argv=[str(tmp_path / "not-a-program")]),
    ]
    for action in shell_actions:
        result = await ShellExecutor().run(action, 5, _RUN)
        assert result.status is RunStatus.FAILED and result.error, action
    http = HttpAction.model_construct(
        type="http",
        url="http://127.0.0.1:1/",
        method="GET",
        headers={"X-Name": "é\x00"},  # not a value h11 can send
        body=None,
        expect_status=[200],
    )
    async with open_session(1) as session:
        result = await HttpExecutor(session).run(http, 5, _RUN)
    assert result.status is RunStatus.FAILED and result.error
    assert not (tmp_path / "x").exists()
