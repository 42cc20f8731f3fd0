"""A trigger that is not exactly what a current key signed, or that has expired, is never run:
it lands on the dead-letter queue with its reason, and the fleet goes on."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from common.actions import ShellAction
from common.clock import utcnow
from common.envelope import REJECTION_DETAIL_HEADER, REJECTION_HEADER
from common.messages import Trigger
from common.settings import Settings
from common.signing import KEY_ID_HEADER, SIGNATURE_HEADER, Keyring, Role
from common.store import Store
from common.topology import Topology
from tests.conftest import Start
from tests.fleet import eventually
from tests.integration.helpers import runs_of


def _trigger(marker: Path, job: str, *, expired: bool = False) -> Trigger:
    now = utcnow()
    scheduled = now - timedelta(minutes=10) if expired else now
    return Trigger(
        id=f"{job}@{scheduled.isoformat()}",
        job=job,
        pool="default",
        scheduled_at=scheduled,
        published_at=now,
        expires_at=scheduled + timedelta(minutes=5),
        timeout_seconds=10,
        action=ShellAction(argv=["touch", str(marker)]),
    )


Publish = Callable[[bytes, dict[str, Any]], Awaitable[None]]


def _signed(keys: Keyring, settings: Settings, body: bytes) -> dict[str, Any]:
    """``body`` signed with ``keys``' trigger key, as a trigger of pool ``default`` of this fleet."""
    return keys.sign(Role.TRIGGER, settings.namespace, "default", body)


async def _publisher(amqp: AbstractRobustConnection, settings: Settings) -> Publish:
    channel = await amqp.channel()
    exchange = await channel.get_exchange(Topology(settings.namespace).triggers_exchange)

    async def publish(body: bytes, headers: dict[str, Any]) -> None:
        await exchange.publish(aio_pika.Message(body, headers=headers), routing_key="default")

    return publish


async def _dead_letters(
    amqp: AbstractRobustConnection, settings: Settings, count: int
) -> list[AbstractIncomingMessage]:
    channel = await amqp.channel()
    queue = await channel.get_queue(Topology(settings.namespace).dead_queue)
    found: list[AbstractIncomingMessage] = []

    async def enough() -> bool:
        while (message := await queue.get(fail=False)) is not None:
            found.append(message)
        return len(found) >= count

    await eventually(enough)
    return found


async def test_forged_tampered_unknown_expired_and_malformed_triggers_are_dead_lettered_never_run(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection, tmp_path: Path
) -> None:
    await fleet("monitor", "worker")
    publish = await _publisher(amqp, settings)
    good = Keyring.parse(settings.keys)
    markers = {
        name: tmp_path / name for name in ("wrong-key", "tampered", "unknown-key", "expired", "unsigned")
    }

    forger = Keyring.parse("trigger:t1:not-the-real-secret-at-all-000000")
    body = _trigger(markers["wrong-key"], "wrong-key").to_bytes()
    await publish(body, _signed(forger, settings, body))

    body = _trigger(markers["tampered"], "tampered").to_bytes()
    headers = _signed(good, settings, body)
    await publish(body.replace(b'"touch"', b'"rm"'), headers)

    stranger = Keyring.parse("trigger:t9:a-key-nobody-configured-0123456789")
    body = _trigger(markers["unknown-key"], "unknown-key").to_bytes()
    await publish(body, _signed(stranger, settings, body))

    body = _trigger(markers["expired"], "expired", expired=True).to_bytes()
    await publish(body, _signed(good, settings, body))

    body = _trigger(markers["unsigned"], "unsigned").to_bytes()
    await publish(body, {})

    malformed = orjson.dumps({"v": 1, "type": "trigger", "job": "no-such-fields"})
    await publish(malformed, _signed(good, settings, malformed))

    dead = await _dead_letters(amqp, settings, 6)
    reasons = {}
    for message in dead:
        headers = message.headers or {}
        detail = headers.get(REJECTION_DETAIL_HEADER)
        assert detail, "every dead letter says why"
        job = orjson.loads(message.body).get("job")
        reasons[job] = headers.get(REJECTION_HEADER)
    assert reasons == {
        "wrong-key": "bad_signature",
        "tampered": "bad_signature",
        "unknown-key": "unknown_key",
        "expired": "expired",
        "unsigned": "missing_signature",
        "no-such-fields": "malformed",
    }
    # The body on the dead-letter queue is the exact body received (tampering included).
    assert any(b'"rm"' in m.body for m in dead)

    # None was executed, and the worker is still consuming: a genuine trigger still runs.
    ok_marker = tmp_path / "genuine"
    body = _trigger(ok_marker, "genuine").to_bytes()
    await publish(body, _signed(good, settings, body))
    await eventually(lambda: runs_of(store, "genuine", status="succeeded"))
    assert ok_marker.exists()
    assert not any(marker.exists() for marker in markers.values())
    for job in ("wrong-key", "tampered", "unknown-key", "unsigned"):
        assert await runs_of(store, job) == []
    # An expired trigger was genuine: it is not run, but its run is accounted for as expired.
    expired = await eventually(lambda: runs_of(store, "expired"))
    assert [r.status for r in expired] == ["expired"]


async def test_a_forged_event_never_reaches_the_store(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection
) -> None:
    await fleet("monitor")
    channel = await amqp.channel()
    events = await channel.get_exchange(Topology(settings.namespace).events_exchange)
    beat = orjson.dumps(
        {
            "v": 1,
            "type": "job.heartbeat",
            "id": "forged-1",
            "job": "victim",
            "kind": "success",
            "at": utcnow().isoformat(),
        }
    )
    forger = Keyring.parse("ping:p1:not-the-real-secret-at-all-000000")
    routing_key = "job.heartbeat.victim"
    headers = forger.sign(Role.PING, settings.namespace, routing_key, beat, job="victim")
    await events.publish(aio_pika.Message(beat, headers=headers), routing_key=routing_key)
    dead = await _dead_letters(amqp, settings, 1)
    assert (dead[0].headers or {})[REJECTION_HEADER] == "bad_signature"
    assert await runs_of(store, "victim") == []


async def test_signature_headers_of_any_type_are_refused_never_crash_the_worker(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection, tmp_path: Path
) -> None:
    await fleet("monitor", "worker")
    publish = await _publisher(amqp, settings)
    good = Keyring.parse(settings.keys)
    oddities: dict[str, Any] = {
        "an-int": 42,
        "a-list": ["t1", "t0"],
        "void": None,
        "a-table": {"k": "v"},
        "a-float": 1.5,
        "a-bool": True,
        "a-timestamp": utcnow(),
        "not-ascii": bytearray(b"\xff\xfe"),
        "huge": "f" * 100_000,
    }
    expected = {}
    for label, value in oddities.items():
        body = _trigger(tmp_path / label, label).to_bytes()
        headers = _signed(good, settings, body)
        headers[SIGNATURE_HEADER] = value
        await publish(body, headers)
        expected[label] = "bad_signature" if label == "huge" else "missing_signature"
        body = _trigger(tmp_path / f"{label}-id", f"{label}-id").to_bytes()
        headers = {**_signed(good, settings, body), KEY_ID_HEADER: value}
        await publish(body, headers)
        expected[f"{label}-id"] = "unknown_key" if label == "huge" else "missing_signature"
    # Headers that nearly fill a frame: a dead letter that kept them all and added its reason
    # would not fit, and the broker would close the worker's whole connection.
    body = _trigger(tmp_path / "padded", "padded").to_bytes()
    await publish(body, {**_signed(good, settings, body), "x-padding": "p" * 130_800, SIGNATURE_HEADER: 0})
    expected["padded"] = "missing_signature"

    dead = await _dead_letters(amqp, settings, len(expected))
    reasons = {orjson.loads(m.body)["job"]: (m.headers or {}).get(REJECTION_HEADER) for m in dead}
    assert reasons == expected
    assert not any((tmp_path / job).exists() for job in expected), "nothing was run"

    # A genuine signature sent as an AMQP byte array of ASCII verifies, as the protocol says.
    marker = tmp_path / "byte-array"
    body = _trigger(marker, "byte-array").to_bytes()
    signed = _signed(good, settings, body)
    await publish(body, {name: bytearray(value.encode()) for name, value in signed.items()})
    await eventually(lambda: runs_of(store, "byte-array", status="succeeded"))
    assert marker.exists()
