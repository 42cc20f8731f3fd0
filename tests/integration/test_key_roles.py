"""Keys and roles on the real broker (issue 13): whoever can ping cannot run commands.

A trigger runs only when a trigger key signed it, for this fleet and this pool; a heartbeat is
recorded only under an event key or a ping key allowed for its job; Ed25519 lets workers hold
only a public key; and each role's key rotates with real processes and commands, the retired
key then refused as ``unknown_key``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from common.actions import ShellAction
from common.clock import utcnow
from common.envelope import REJECTION_DETAIL_HEADER, REJECTION_HEADER
from common.errors import ConfigError
from common.messages import JobHeartbeat, Trigger
from common.settings import Settings
from common.signing import KEY_ID_HEADER, SIGNATURE_HEADER, Keyring, Role, new_ed25519_pair
from common.store import Store
from common.topology import Topology
from tests.conftest import TEST_KEYS
from tests.fleet import Fleet, eventually, run_cronfleet
from tests.integration.helpers import apply_toml, runs_of

Fleets = Callable[..., Awaitable[Fleet]]


@pytest.fixture
async def fleets(settings: Settings) -> AsyncIterator[Fleets]:
    """``await fleets(keys, "monitor", "worker", pool=...)``: real processes of the test's fleet
    holding ``keys`` instead of the test keys; all stopped when the test ends."""
    started: list[Fleet] = []

    async def start(keys: str, *names: str, **options: Any) -> Fleet:
        running = Fleet(settings.model_copy(update={"keys": keys}))
        started.append(running)
        await running.start(*names, **options)
        return running

    yield start
    for running in started:
        await running.stop()


class DeadLetters:
    """The fleet's dead-letter queue, read as letters arrive."""

    def __init__(self, queue: AbstractQueue) -> None:
        self.queue = queue
        self.messages: list[AbstractIncomingMessage] = []

    @classmethod
    async def open(cls, amqp: AbstractRobustConnection, settings: Settings) -> DeadLetters:
        channel = await amqp.channel()
        return cls(await channel.get_queue(Topology(settings.namespace).dead_queue))

    async def wait_for(self, count: int) -> list[AbstractIncomingMessage]:
        """At least ``count`` dead letters in all (waits for them)."""

        async def enough() -> bool:
            while (message := await self.queue.get(fail=False)) is not None:
                self.messages.append(message)
            return len(self.messages) >= count

        await eventually(enough)
        return self.messages

    def reasons(self) -> list[tuple[str, str]]:
        """(reason, key id) of each dead letter so far."""
        return [
            (str((m.headers or {}).get(REJECTION_HEADER)), str((m.headers or {}).get(KEY_ID_HEADER)))
            for m in self.messages
        ]


class Signed:
    """Copies of every event and of the triggers of one pool, to see which key signed them."""

    def __init__(self, queue: AbstractQueue) -> None:
        self.queue = queue
        self.messages: list[AbstractIncomingMessage] = []

    async def _fetch(self) -> None:
        while (message := await self.queue.get(no_ack=True, fail=False)) is not None:
            self.messages.append(message)

    @classmethod
    async def open(cls, amqp: AbstractRobustConnection, settings: Settings, pool: str) -> Signed:
        topology = Topology(settings.namespace)
        channel = await amqp.channel()
        await topology.declare_pool(channel, pool)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(topology.events_exchange, routing_key="#")
        await queue.bind(topology.triggers_exchange, routing_key=pool)
        return cls(queue)

    async def first(self, kind: str) -> AbstractIncomingMessage:
        """The first message of ``kind`` (a body ``type``), or the first ``event.batch`` carrying
        one, since the last ``clear``; waits for it."""

        async def found() -> AbstractIncomingMessage | None:
            await self._fetch()
            return next((m for m in self.messages if kind in _types(m.body)), None)

        message: AbstractIncomingMessage = await eventually(found)
        return message

    async def key_id(self, kind: str) -> str:
        """The id of the key that signed the first message of ``kind`` (or the batch with it)."""
        return str(((await self.first(kind)).headers or {})[KEY_ID_HEADER])

    async def clear(self) -> None:
        """Forget every message published so far."""
        await self._fetch()
        self.messages.clear()


def _types(body: bytes) -> set[str]:
    """The ``type`` of a message, with those of the events of a batch."""
    message = orjson.loads(body)
    return {message["type"], *(event["type"] for event in message.get("events", []))}


def _trigger(job: str, marker: Path, pool: str = "default") -> Trigger:
    now = utcnow()
    return Trigger(
        id=f"{job}@{now.isoformat()}",
        job=job,
        pool=pool,
        scheduled_at=now,
        published_at=now,
        expires_at=now + timedelta(minutes=5),
        timeout_seconds=10,
        action=ShellAction(argv=["touch", str(marker)]),
    )


async def _publish(
    amqp: AbstractRobustConnection, exchange: str, body: bytes, headers: dict[str, Any], routing_key: str
) -> None:
    channel = await amqp.channel()
    target = await channel.get_exchange(exchange)
    await target.publish(aio_pika.Message(body, headers=headers), routing_key=routing_key)


def _key(role: str, key_id: str) -> str:
    return f"{role}:{key_id}:{role}-secret-of-{key_id}-0123456789"


# -- roles ------------------------------------------------------------------------------------


async def test_a_trigger_signed_with_a_ping_or_event_key_is_dead_lettered_as_wrong_role_never_run(
    settings: Settings, store: Store, amqp: AbstractRobustConnection, fleets: Fleets, tmp_path: Path
) -> None:
    # The worker holds every test key (as a host with one shared key file would): the signatures
    # verify, and only the role stops them.
    await fleets(TEST_KEYS, "monitor", "worker")
    dead = await DeadLetters.open(amqp, settings)
    keys = Keyring.parse(TEST_KEYS)
    triggers = Topology(settings.namespace).triggers_exchange
    markers = {role: tmp_path / f"by-{role}" for role in (Role.PING, Role.EVENT)}
    for role, marker in markers.items():
        body = _trigger(f"by-{role}", marker).to_bytes()
        headers = keys.sign(role, settings.namespace, "default", body, job=f"by-{role}")
        await _publish(amqp, triggers, body, headers, "default")

    letters = await dead.wait_for(2)
    assert sorted(dead.reasons()) == [("wrong_role", "e1"), ("wrong_role", "p1")]
    details = {str((m.headers or {})[REJECTION_DETAIL_HEADER]) for m in letters}
    assert details == {
        "key 'p1' is a ping key; a trigger must be signed by a trigger key",
        "key 'e1' is an event key; a trigger must be signed by a trigger key",
    }
    # A genuine trigger still runs, and neither of the others did (nor was reported as a run).
    genuine = tmp_path / "genuine"
    body = _trigger("genuine", genuine).to_bytes()
    await _publish(
        amqp, triggers, body, keys.sign(Role.TRIGGER, settings.namespace, "default", body), "default"
    )
    await eventually(lambda: runs_of(store, "genuine", status="succeeded"))
    assert not any(marker.exists() for marker in markers.values())
    for role in markers:
        assert await runs_of(store, f"by-{role}") == []


async def test_a_ping_key_for_one_job_cannot_report_another(
    settings: Settings, store: Store, amqp: AbstractRobustConnection, fleets: Fleets
) -> None:
    limited = "ping:p-backup:ping-secret-for-backup-0123456789:jobs=backup"
    await fleets(f"{TEST_KEYS},{limited}", "monitor")
    dead = await DeadLetters.open(amqp, settings)

    # `cronfleet ping` with that key alone reports its job ...
    sent = await run_cronfleet(settings, "ping", "backup", CRONFLEET_KEYS=limited)
    assert sent.returncode == 0, sent.stderr
    await eventually(lambda: runs_of(store, "backup", status="succeeded"))
    # ... and refuses, in one line and before publishing, to sign for another.
    refused = await run_cronfleet(settings, "ping", "report", CRONFLEET_KEYS=limited)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        "cronfleet: `cronfleet ping` signs heartbeats of job 'report', and no signing key may "
        "(ping key(s) 'p-backup' are for other jobs): add a ping key (`cronfleet keys new --role ping`) "
        "or an event key to CRONFLEET_KEYS"
    )
    # A sender of its own that signs one anyway is refused by the monitor.
    beat = JobHeartbeat(id=uuid.uuid4().hex, job="report", at=utcnow())
    key = Keyring.parse(limited).keys[0]
    routing_key = "job.heartbeat.report"
    headers = key.sign(settings.namespace, routing_key, beat.to_bytes())
    await _publish(amqp, Topology(settings.namespace).events_exchange, beat.to_bytes(), headers, routing_key)
    [letter] = await dead.wait_for(1)
    assert dead.reasons() == [("wrong_role", "p-backup")]
    assert (letter.headers or {})[REJECTION_DETAIL_HEADER] == (
        "ping key 'p-backup' may sign a job.heartbeat of backup only, not of job 'report'"
    )
    assert await runs_of(store, "report") == []
    # An unlimited ping key reports any job.
    assert (await run_cronfleet(settings, "ping", "report")).returncode == 0
    await eventually(lambda: runs_of(store, "report", status="succeeded"))


# -- replay elsewhere ---------------------------------------------------------------------------


async def test_a_trigger_moved_to_another_pool_or_fleet_or_naming_another_pool_is_refused(
    settings: Settings, store: Store, amqp: AbstractRobustConnection, fleets: Fleets, tmp_path: Path
) -> None:
    await fleets(TEST_KEYS, "monitor")
    await fleets(TEST_KEYS, "worker", pool="other")
    dead = await DeadLetters.open(amqp, settings)
    keys = Keyring.parse(TEST_KEYS)
    triggers = Topology(settings.namespace).triggers_exchange
    marker = tmp_path / "moved"

    # Captured from pool default, published again to pool other: the pool is signed.
    body = _trigger("moved", marker).to_bytes()
    await _publish(
        amqp, triggers, body, keys.sign(Role.TRIGGER, settings.namespace, "default", body), "other"
    )
    # Signed for another fleet that shares the key: the namespace is signed.
    body = _trigger("other-fleet", marker, pool="other").to_bytes()
    await _publish(amqp, triggers, body, keys.sign(Role.TRIGGER, "prod", "other", body), "other")
    # Signed for pool other, but the body says default: a signer's bug, refused as such.
    body = _trigger("mismatch", marker).to_bytes()
    await _publish(amqp, triggers, body, keys.sign(Role.TRIGGER, settings.namespace, "other", body), "other")

    letters = await dead.wait_for(3)
    reasons = {orjson.loads(m.body)["job"]: (m.headers or {})[REJECTION_HEADER] for m in letters}
    assert reasons == {"moved": "bad_signature", "other-fleet": "bad_signature", "mismatch": "wrong_pool"}
    # The same worker runs a trigger signed for its own pool and fleet.
    genuine = tmp_path / "genuine"
    body = _trigger("genuine", genuine, pool="other").to_bytes()
    await _publish(amqp, triggers, body, keys.sign(Role.TRIGGER, settings.namespace, "other", body), "other")
    await eventually(lambda: runs_of(store, "genuine", status="succeeded"))
    assert not marker.exists()


# -- Ed25519 ----------------------------------------------------------------------------------


async def test_an_ed25519_fleet_runs_triggers_whose_workers_cannot_sign_one(
    settings: Settings, store: Store, amqp: AbstractRobustConnection, fleets: Fleets, tmp_path: Path
) -> None:
    private, public = new_ed25519_pair("t-ed")
    event, ping = _key("event", "e-ed"), _key("ping", "p-ed")
    scheduler_keys = f"{private},{event}"
    worker_keys = f"{public},{event}"
    monitor_keys = f"{event},{ping}"
    marker = tmp_path / "every-second"
    await apply_toml(
        store,
        f"""
        [jobs.every-second]
        schedule = "* * * * * *"
        action = {{ type = "shell", argv = ["touch", "{marker}"] }}

        [jobs.by-hand]
        schedule = "@yearly"
        action = {{ type = "shell", argv = ["touch", "{tmp_path / "by-hand"}"] }}
        """,
    )
    signed = await Signed.open(amqp, settings, "default")
    await fleets(monitor_keys, "monitor")
    await fleets(worker_keys, "worker")
    await fleets(scheduler_keys, "scheduler")

    # The scheduler's triggers run end to end, signed with the private key (128 hex digits).
    await eventually(lambda: runs_of(store, "every-second", status="succeeded"))
    assert marker.exists()
    trigger = await signed.first("trigger")
    assert (trigger.headers or {})[KEY_ID_HEADER] == "t-ed"
    assert len(str((trigger.headers or {})[SIGNATURE_HEADER])) == 128
    # So does `cronfleet trigger` with the private key.
    manual = await run_cronfleet(settings, "trigger", "by-hand", CRONFLEET_KEYS=scheduler_keys)
    assert manual.returncode == 0, manual.stderr
    await eventually(lambda: runs_of(store, "by-hand", status="succeeded"))

    # What a worker holds cannot sign a trigger: not in the command line, not in a scheduler.
    with pytest.raises(ConfigError, match="ed25519-public key only verifies"):
        Keyring.parse(worker_keys).signer(Role.TRIGGER)
    forged = await run_cronfleet(settings, "trigger", "by-hand", CRONFLEET_KEYS=worker_keys)
    assert forged.returncode == 1 and "no trigger key that can sign" in forged.stderr
    no_key = await run_cronfleet(settings, "scheduler", CRONFLEET_KEYS=worker_keys)
    assert no_key.returncode == 1
    assert no_key.stderr.strip().startswith(
        "cronfleet: a scheduler signs trigger messages and has no trigger key that can sign "
        "(an ed25519-public key only verifies)"
    )
    # A trigger signed with an HMAC trigger key the workers do not hold is refused.
    dead = await DeadLetters.open(amqp, settings)
    stray = tmp_path / "stray"
    body = _trigger("stray", stray).to_bytes()
    headers = Keyring.parse(_key("trigger", "t-hmac")).sign(Role.TRIGGER, settings.namespace, "default", body)
    await _publish(amqp, Topology(settings.namespace).triggers_exchange, body, headers, "default")
    await dead.wait_for(1)
    assert dead.reasons() == [("unknown_key", "t-hmac")]
    assert not stray.exists()


# -- rotation ---------------------------------------------------------------------------------


async def test_each_roles_key_rotates_and_the_retired_key_is_refused(
    settings: Settings, store: Store, amqp: AbstractRobustConnection, fleets: Fleets, tmp_path: Path
) -> None:
    roles = ("trigger", "event", "ping")
    old = [_key(role, f"{role[0]}-old") for role in roles]
    new = [_key(role, f"{role[0]}-new") for role in roles]
    stages = {
        "before": ",".join(old),
        "added": ",".join(old + new),  # 1. the new keys second everywhere: nothing changes yet
        "switched": ",".join(new + old),  # 2. the new keys first: they sign, the old still verify
        "retired": ",".join(new),  # 3. the old keys gone
    }
    await apply_toml(
        store,
        f"""
        [jobs.rotated]
        schedule = "@yearly"
        action = {{ type = "shell", argv = ["touch", "{tmp_path / "ran"}"] }}
        """,
    )
    signed = await Signed.open(amqp, settings, "default")
    dead = await DeadLetters.open(amqp, settings)
    stage_fleets: list[Fleet] = []

    async def restart(keys: str, *names: str) -> None:
        """Stop the processes of the previous stage; start ``names`` holding ``keys``."""
        for running in stage_fleets:
            await running.stop()
        stage_fleets[:] = [await fleets(keys, *names)]

    async def stage(keys: str, number: int) -> list[str]:
        """Restart the monitor and the worker with ``keys``, then trigger and ping as a user
        holding the same keys: the key ids that signed the trigger, its run events, the ping."""
        await restart(keys, "monitor", "worker")
        await signed.clear()
        assert (await run_cronfleet(settings, "trigger", "rotated", CRONFLEET_KEYS=keys)).returncode == 0
        assert (await run_cronfleet(settings, "ping", "pinged", CRONFLEET_KEYS=keys)).returncode == 0

        async def recorded() -> bool:
            ran = await runs_of(store, "rotated", status="succeeded")
            return len(ran) >= number and len(await runs_of(store, "pinged")) >= number

        await eventually(recorded)
        return [await signed.key_id(kind) for kind in ("trigger", "run.finished", "job.heartbeat")]

    assert await stage(stages["before"], 1) == ["t-old", "e-old", "p-old"]
    assert await stage(stages["added"], 2) == ["t-old", "e-old", "p-old"]
    # Added but not signing yet, the new keys are accepted from a producer already on them.
    assert (await run_cronfleet(settings, "ping", "early", CRONFLEET_KEYS=stages["switched"])).returncode == 0
    await eventually(lambda: runs_of(store, "early"))
    assert await stage(stages["switched"], 3) == ["t-new", "e-new", "p-new"]
    # Switched, the old keys still verify: a producer not switched yet is accepted.
    assert (await run_cronfleet(settings, "ping", "late", CRONFLEET_KEYS=stages["added"])).returncode == 0
    await eventually(lambda: runs_of(store, "late"))
    assert await stage(stages["retired"], 4) == ["t-new", "e-new", "p-new"]
    assert await dead.wait_for(0) == [], "nothing was refused while rotating"

    # Retired: a trigger and a ping signed with the old keys are refused as unknown_key ...
    stale = stages["added"]  # a user who never updated: signs with the old keys
    marker = tmp_path / "ran"
    marker.unlink()
    assert (await run_cronfleet(settings, "trigger", "rotated", CRONFLEET_KEYS=stale)).returncode == 0
    assert (await run_cronfleet(settings, "ping", "stale-ping", CRONFLEET_KEYS=stale)).returncode == 0
    await dead.wait_for(2)
    assert sorted(dead.reasons()) == [("unknown_key", "p-old"), ("unknown_key", "t-old")]
    assert not marker.exists() and await runs_of(store, "stale-ping") == []
    # ... and so are the run events of a worker still signing with the old event key: it runs
    # the trigger (it holds the new trigger key too), but its report is refused.
    await restart(stages["retired"], "monitor")
    await fleets(stale, "worker")
    assert (
        await run_cronfleet(settings, "trigger", "rotated", CRONFLEET_KEYS=stages["retired"])
    ).returncode == 0

    async def run_events_refused() -> list[AbstractIncomingMessage]:
        letters = await dead.wait_for(0)
        found = [m for m in letters if orjson.loads(m.body)["type"] in ("run.started", "run.finished")]
        return found if len(found) == 2 else []

    # (Its worker heartbeats, signed with the old event key too, are refused as well.)
    for letter in await eventually(run_events_refused):
        headers = letter.headers or {}
        assert (headers[REJECTION_HEADER], headers[KEY_ID_HEADER]) == ("unknown_key", "e-old")
    assert marker.exists()
    assert len(await runs_of(store, "rotated")) == 4


# -- legacy keys --------------------------------------------------------------------------------


async def test_a_fleet_on_a_legacy_key_still_works_and_says_to_give_it_a_role(
    settings: Settings, store: Store, fleets: Fleets, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key_id = f"legacy-{uuid.uuid4().hex[:8]}"  # the warning is said once per process and key ids
    legacy = f"{key_id}:a-secret-from-before-roles-0123456789"
    marker = tmp_path / "ran"
    await apply_toml(
        store,
        f"""
        [jobs.old-style]
        schedule = "@yearly"
        action = {{ type = "shell", argv = ["touch", "{marker}"] }}
        """,
    )
    with caplog.at_level(logging.WARNING, logger="cronfleet.keys"):
        await fleets(legacy, "monitor", "worker")
    assert (await run_cronfleet(settings, "trigger", "old-style", CRONFLEET_KEYS=legacy)).returncode == 0
    assert (await run_cronfleet(settings, "ping", "old-ping", CRONFLEET_KEYS=legacy)).returncode == 0
    await eventually(lambda: runs_of(store, "old-style", status="succeeded"))
    await eventually(lambda: runs_of(store, "old-ping", status="succeeded"))
    assert marker.exists()
    warnings = [r.getMessage() for r in caplog.records if r.name == "cronfleet.keys"]
    assert len(warnings) == 1 and f"'{key_id}' has no role" in warnings[0]
    assert "a-secret-from-before-roles" not in warnings[0]
