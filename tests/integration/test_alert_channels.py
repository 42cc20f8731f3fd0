"""Alert channels against real receivers started here: an HTTP server on 127.0.0.1 that records
what it is sent (webhook, Slack, Discord) and an SMTP server (aiosmtpd) with STARTTLS and AUTH.

The webhook signature is checked with a verifier written here from the Standard Webhooks
specification, and with the Python and Node verifiers that docs/alerts.md gives its readers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import re
import shutil
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from subprocess import PIPE
from typing import Any

import aiohttp
import orjson
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.errors import NotFound
from common.http_client import open_session
from monitor.channels import (
    Alert,
    Attempt,
    Dispatcher,
    RetryPolicy,
    Routes,
    build_channels,
    parse_channels,
    send_test,
)
from monitor.channels.base import Channel
from tests.fleet import eventually
from tests.http_server import serving

DOCS = Path(__file__).resolve().parents[2] / "docs" / "alerts.md"
SECRET = "whsec_" + base64.b64encode(b"a channel secret of 32 bytes....").decode()
SMTP_USER, SMTP_PASSWORD = "cronfleet", "smtp-pa55word"
NOW = datetime.now(UTC).replace(microsecond=0)
FAST = RetryPolicy(attempts=4, first_delay_seconds=0.2, max_delay_seconds=1)


def an_alert(job: str = "backup", **changes: Any) -> Alert:
    fields: dict[str, Any] = {
        "job": job,
        "from_state": "running",
        "to_state": "failing",
        "reason": "last run failed: run r1 failed with exit code 3 after 1m",
        "at": NOW,
        "flip_id": f"flip-{job}-1",
        "fleet": "prod",
        "link": "https://cronfleet.example/jobs/backup",
    }
    fields.update(changes)
    return Alert(**fields)


# A receiver that records ------------------------------------------------------------------------


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when it arrived


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1: answers each path with the statuses planned for it (200 once
    they run out), holds requests to /hang until released, and records every request."""

    base: str = ""
    plan: dict[str, list[int]] = field(default_factory=dict)
    poison: bytes | None = None  # a body containing it is refused for good (400)
    hold: bytes | None = None  # a body containing it (and not the poison) waits for ``release``
    requests: list[Request] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return self.base + path

    def seen(self, path: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            with state.lock:
                state.requests.append(
                    Request(
                        self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.monotonic()
                    )
                )
                planned = state.plan.get(self.path)
                status = planned.pop(0) if planned else 200
                if state.poison is not None and state.poison in body:
                    status = 400
            held = state.hold is not None and state.hold in body and status != 400
            if self.path == "/hang" or held:
                state.release.wait(60)
            reply = b"ok" if status == 200 else b'{"message": "try later"}'
            if self.path == "/discord" and status == 200:
                status, reply = 204, b""
            self.send_response(status)
            if status == 429:
                self.send_header("Retry-After", "0.5")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with serving(Handler) as base:
        state.base = base
        try:
            yield state
        finally:
            state.release.set()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with open_session(10) as http:
        yield http


class Recorder:
    """An ``on_attempt`` that keeps every attempt."""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []

    async def __call__(self, attempt: Attempt) -> None:
        self.attempts.append(attempt)

    def on(self, channel: str) -> list[Attempt]:
        return [a for a in self.attempts if a.channel == channel]


def channels_for(
    receiver: Receiver, client: aiohttp.ClientSession, group: int | None = None, **paths: str
) -> dict[str, Channel]:
    """Channels named after their kind (webhook, slack, discord; ``NAME=/path``) sending to the
    receiver, each with its default group or ``group``."""
    tables = []
    for name, path in paths.items():
        kind = name if name in ("webhook", "slack", "discord") else "webhook"
        extra = f'secret = "{SECRET}"\n' if kind == "webhook" else ""
        extra += "" if group is None else f"group = {group}\n"
        tables.append(
            f'[channels.{name}]\ntype = "{kind}"\nurl = "{receiver.url(path)}"\n{extra}timeout_seconds = 5\n'
        )
    return build_channels(parse_channels("\n".join(tables), "test.toml"), client)


# The Standard Webhooks verifier, written from the specification ---------------------------------


def spec_verify(
    secret: str, headers: dict[str, str], body: bytes, now: float, tolerance: float = 300
) -> bool:
    """Standard Webhooks: the key is the base64 after ``whsec_``; the signed content is
    ``msg_id.timestamp.payload``; the header lists ``v1,<base64 HMAC-SHA256>`` entries, space-separated."""
    key = base64.b64decode(secret.split("_", 1)[1])
    msg_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(now - int(timestamp)) > tolerance:
        return False
    mac = hmac.new(key, msg_id.encode() + b"." + timestamp.encode() + b"." + body, hashlib.sha256).digest()
    wanted = base64.b64encode(mac)
    return any(
        v == "v1" and hmac.compare_digest(s.encode(), wanted)
        for v, _, s in (entry.partition(",") for entry in headers["webhook-signature"].split(" "))
    )


async def test_a_webhook_is_signed_so_that_a_receiver_verifies_it(
    receiver: Receiver, client: aiohttp.ClientSession
) -> None:
    recorder = Recorder()
    channels = channels_for(receiver, client, webhook="/hook")
    async with Dispatcher(channels, Routes(default=["webhook"]), FAST, recorder) as dispatcher:
        assert dispatcher.submit(an_alert()) == ("webhook",)
        await eventually(lambda: _async(recorder.on("webhook")))
    [request] = receiver.seen("/hook")
    assert request.headers["content-type"] == "application/json"
    assert request.headers["webhook-id"] == "flip-backup-1"
    assert request.headers["webhook-signature"].startswith("v1,")
    assert spec_verify(SECRET, request.headers, request.body, time.time())
    assert not spec_verify(SECRET, request.headers, request.body.replace(b"failing", b"up"), time.time())
    other = "whsec_" + base64.b64encode(b"another secret of thirty-two byt").decode()
    assert not spec_verify(other, request.headers, request.body, time.time())
    assert not spec_verify(SECRET, request.headers, request.body, time.time() + 3600)  # a replay, later
    body = orjson.loads(request.body)
    assert body["type"] == "cronfleet.alarm"
    assert body["data"]["job"] == "backup" and body["data"]["to_state"] == "failing"
    [attempt] = recorder.attempts
    assert (attempt.channel, attempt.number, attempt.delivered, attempt.error, attempt.final) == (
        "webhook",
        1,
        True,
        None,
        True,
    )


def _docs_block(language: str) -> str:
    """The code block of ``language`` under the docs' "Verifying in ..." heading."""
    text = DOCS.read_text()
    title = {"python": "Python", "js": "Node"}[language]
    found = re.search(rf"### Verifying in {title}\n\n```{language}\n(.*?)```", text, re.S)
    assert found, f"docs/alerts.md has no {title} verifier"
    return found.group(1)


async def test_the_verifiers_in_the_docs_accept_a_real_delivery_and_refuse_a_changed_one(
    receiver: Receiver, client: aiohttp.ClientSession
) -> None:
    recorder = Recorder()
    channels = channels_for(receiver, client, webhook="/hook")
    async with Dispatcher(channels, Routes(default=["webhook"]), FAST, recorder) as dispatcher:
        dispatcher.submit(an_alert())
        await eventually(lambda: _async(recorder.on("webhook")))
    [request] = receiver.seen("/hook")
    tampered = request.body.replace(b"backup", b"restore")

    namespace: dict[str, Any] = {}
    exec(_docs_block("python"), namespace)
    assert namespace["verify"](SECRET, request.headers, request.body) is True
    assert namespace["verify"](SECRET, request.headers, tampered) is False

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the Python verifier was checked")
    script = _docs_block("js") + (
        "const input = JSON.parse(require('node:fs').readFileSync(0, 'utf8'));\n"
        "for (const body of input.bodies) {\n"
        "  console.log(verify(input.secret, input.headers, Buffer.from(body, 'base64')));\n"
        "}\n"
    )
    bodies = [base64.b64encode(b).decode() for b in (request.body, tampered)]
    stdin = orjson.dumps({"secret": SECRET, "headers": request.headers, "bodies": bodies})
    process = await asyncio.create_subprocess_exec(node, "-e", script, stdin=PIPE, stdout=PIPE, stderr=PIPE)
    out, err = await asyncio.wait_for(process.communicate(stdin), 60)
    assert process.returncode == 0, err.decode()
    assert out.decode().split() == ["true", "false"]


async def _async(value: Any) -> Any:
    return value


# Slack and Discord ------------------------------------------------------------------------------


async def test_slack_and_discord_get_their_payload_shapes_in_order(
    receiver: Receiver, client: aiohttp.ClientSession
) -> None:
    recorder = Recorder()
    channels = channels_for(receiver, client, slack="/slack", discord="/discord")
    alarm = an_alert()
    recovery = an_alert(
        from_state="running", to_state="up", recovered_from="failing", flip_id="flip-backup-2"
    )
    async with Dispatcher(channels, Routes(default=["slack", "discord"]), FAST, recorder) as dispatcher:
        dispatcher.submit(alarm)
        dispatcher.submit(recovery)
        await eventually(lambda: _async(len([a for a in recorder.attempts if a.delivered]) == 4))

    slack = [orjson.loads(r.body) for r in receiver.seen("/slack")]
    assert [m["text"] for m in slack] == [
        "[prod] backup is FAILING (was running)",
        "[prod] backup recovered: up again after failing",
    ]
    blocks = slack[0]["blocks"]
    assert [b["type"] for b in blocks] == ["header", "section", "section", "section", "context"]
    assert {"type": "mrkdwn", "text": "*Job*\nbackup"} in blocks[1]["fields"]
    assert blocks[2]["text"]["text"].startswith("*Reason*\nlast run failed")

    discord = [orjson.loads(r.body) for r in receiver.seen("/discord")]
    assert [m["content"] for m in discord] == [
        r"\[prod\] backup is FAILING (was running)",
        r"\[prod\] backup recovered: up again after failing",
    ]
    embed = discord[1]["embeds"][0]
    assert embed["color"] == 0x2EA44F
    assert embed["url"] == "https://cronfleet.example/jobs/backup"
    assert {"name": "Recovered from", "value": "failing", "inline": True} in embed["fields"]
    assert discord[0]["allowed_mentions"] == {"parse": []}


# Retries, backoff, and channels that do not hold each other up ---------------------------------


async def test_a_failing_receiver_is_retried_with_backoff_while_the_others_go_on(
    receiver: Receiver, client: aiohttp.ClientSession
) -> None:
    receiver.plan["/flaky"] = [500, 503]  # then 200
    recorder = Recorder()
    channels = channels_for(receiver, client, flaky="/flaky", hung="/hang", slack="/slack")
    routes = Routes(default=["flaky", "hung", "slack"])
    async with Dispatcher(channels, routes, FAST, recorder) as dispatcher:
        assert dispatcher.submit(an_alert()) == ("flaky", "hung", "slack")
        # The hung receiver holds its request: Slack is delivered meanwhile, and the flaky one
        # gets through on its third try.
        await eventually(lambda: _async([a.number for a in recorder.on("flaky") if a.delivered] == [3]))
        await eventually(lambda: _async([a.delivered for a in recorder.on("slack")] == [True]))
        assert recorder.on("hung") == [] and dispatcher.backlog()["hung"] == 1
        receiver.release.set()
        await eventually(lambda: _async(recorder.on("hung")))

    flaky = recorder.on("flaky")
    assert [(a.number, a.delivered, a.final) for a in flaky] == [
        (1, False, False),
        (2, False, False),
        (3, True, True),
    ]
    assert flaky[0].error == '127.0.0.1: HTTP 500: {"message": "try later"}'
    assert flaky[1].error is not None and flaky[1].error.startswith("127.0.0.1: HTTP 503")
    # Backoff: 0.2s then 0.4s between tries (lower bounds: a sleep never ends early).
    tries = [r.at for r in receiver.seen("/flaky")]
    assert tries[1] - tries[0] >= 0.2 and tries[2] - tries[1] >= 0.4
    assert flaky[0].retry_at is not None and flaky[0].retry_at >= flaky[0].at + timedelta(seconds=0.2)
    assert [a.delivered for a in recorder.on("hung")] == [True]


async def test_a_dead_receiver_ends_with_every_attempt_reported_as_an_error(
    receiver: Receiver, client: aiohttp.ClientSession
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    receiver.plan["/down"] = [500] * 10
    receiver.plan["/gone"] = [404]
    recorder = Recorder()
    channels = channels_for(receiver, client, down="/down", gone="/gone")
    channels |= build_channels(
        parse_channels(
            f'[channels.refused]\ntype = "slack"\nurl = "http://127.0.0.1:{closed}/services/T0/B0/token-abc"\n',
            "t.toml",
        ),
        client,
    )
    policy = RetryPolicy(attempts=3, first_delay_seconds=0.05, max_delay_seconds=0.1)
    async with Dispatcher(
        channels, Routes(default=["down", "gone", "refused"]), policy, recorder
    ) as dispatcher:
        dispatcher.submit(an_alert())
        await dispatcher.idle()

    down = recorder.on("down")
    assert [(a.number, a.delivered, a.final) for a in down] == [
        (1, False, False),
        (2, False, False),
        (3, False, True),
    ]
    assert all(a.error and "HTTP 500" in a.error for a in down)
    assert down[-1].retry_at is None
    # A 404 cannot get better by waiting: one attempt, final.
    [gone] = recorder.on("gone")
    assert (gone.number, gone.delivered, gone.final) == (1, False, True)
    assert gone.error is not None and "HTTP 404" in gone.error
    refused = recorder.on("refused")
    assert [(a.number, a.final) for a in refused] == [(1, False), (2, False), (3, True)]
    for attempt in refused:
        assert attempt.error is not None and attempt.error.startswith("127.0.0.1: ConnectError")
        assert "token-abc" not in attempt.error  # a Slack URL is a secret


async def test_delivery_goes_on_when_recording_an_attempt_fails(
    receiver: Receiver, client: aiohttp.ClientSession
) -> None:
    stored: list[Attempt] = []
    failed: list[Attempt] = []

    async def flaky_store(attempt: Attempt) -> None:
        stored.append(attempt)
        if not failed and attempt.number == 1 and attempt.alert.job == "first":
            failed.append(attempt)
            raise RuntimeError("the store is down")

    channels = channels_for(receiver, client, group=1, slack="/slack")  # a message each
    async with Dispatcher(channels, Routes(default=["slack"]), FAST, flaky_store) as dispatcher:
        dispatcher.submit(an_alert("first"))
        dispatcher.submit(an_alert("second"))
        await dispatcher.idle()
    # Two jobs' alerts go out concurrently (one job's in order): either may be recorded first.
    assert sorted(a.alert.job for a in stored) == ["first", "second"]
    assert [a.alert.job for a in failed] == ["first"]
    assert len(receiver.seen("/slack")) == 2


async def test_closing_reports_what_was_left_undelivered(
    receiver: Receiver, client: aiohttp.ClientSession
) -> None:
    recorder = Recorder()
    channels = channels_for(receiver, client, hung="/hang")
    dispatcher = Dispatcher(channels, Routes(default=["hung"]), FAST, recorder)
    dispatcher.start()
    dispatcher.submit(an_alert("one"))
    dispatcher.submit(an_alert("two"))
    await eventually(lambda: _async(receiver.seen("/hang")))
    left = await dispatcher.close(grace=0.1)
    assert [(a.job, name) for a, name in left] == [("one", "hung"), ("two", "hung")]
    assert [(a.alert.job, a.number, a.final) for a in recorder.attempts] == [
        ("one", 0, True),
        ("two", 0, True),
    ]
    assert dispatcher.submit(an_alert("three")) == ()
    assert len(recorder.attempts) == 2  # the reporter has stopped: nothing more is recorded


async def test_a_full_queue_refuses_and_records_instead_of_growing(
    receiver: Receiver, client: aiohttp.ClientSession
) -> None:
    recorder = Recorder()
    channels = channels_for(receiver, client, hung="/hang")
    policy = RetryPolicy(attempts=1, queue_limit=2, concurrency=1)
    async with Dispatcher(channels, Routes(default=["hung"]), policy, recorder) as dispatcher:
        assert dispatcher.submit(an_alert("a")) == ("hung",)
        await eventually(lambda: _async(receiver.seen("/hang")))  # "a" is in flight
        assert dispatcher.submit(an_alert("b")) == ("hung",)
        assert dispatcher.submit(an_alert("c")) == ("hung",)
        assert dispatcher.submit(an_alert("d")) == ()  # two already wait
        await eventually(lambda: _async(recorder.attempts))
        [refused] = recorder.attempts
        assert (refused.alert.job, refused.number, refused.delivered) == ("d", 0, False)
        assert refused.error == "not sent: 2 alerts already wait for this channel"
        receiver.release.set()
        await dispatcher.idle()
    assert sorted(a.alert.job for a in recorder.attempts if a.delivered) == ["a", "b", "c"]


async def test_a_channel_delivers_several_jobs_at_once_and_each_jobs_alerts_in_order(
    receiver: Receiver, client: aiohttp.ClientSession
) -> None:
    stored: list[list[Attempt]] = []

    async def store_all(attempts: list[Attempt]) -> None:
        stored.append(list(attempts))

    channels = channels_for(receiver, client, hung="/hang")
    policy = RetryPolicy(attempts=1, concurrency=2)
    async with Dispatcher(channels, Routes(default=["hung"]), policy, on_attempts=store_all) as dispatcher:
        dispatcher.submit(an_alert("a", flip_id="a-alarm"))
        dispatcher.submit(an_alert("a", flip_id="a-recovery"))
        dispatcher.submit(an_alert("b", flip_id="b-alarm"))
        # Two at once: a's alarm and b's; a's recovery waits for a's alarm, not for a free task.
        await eventually(lambda: _async(len(receiver.seen("/hang")) == 2))
        assert dispatcher.backlog()["hung"] == 3
        held = {orjson.loads(r.body)["data"]["id"] for r in receiver.seen("/hang")}
        assert held == {"a-alarm", "b-alarm"}
        receiver.release.set()
        await dispatcher.idle()
    ids = [orjson.loads(r.body)["data"]["id"] for r in receiver.seen("/hang")]
    assert sorted(ids) == ["a-alarm", "a-recovery", "b-alarm"]
    assert ids.index("a-alarm") < ids.index("a-recovery")
    attempts = [attempt for batch in stored for attempt in batch]
    assert sorted(a.alert.flip_id for a in attempts if a.delivered) == ["a-alarm", "a-recovery", "b-alarm"]


# Groups: a herd of alerts in a few messages ------------------------------------------------------


async def test_a_herd_goes_out_in_signed_groups_each_alert_once_and_each_jobs_in_order(
    receiver: Receiver, client: aiohttp.ClientSession
) -> None:
    stored: list[Attempt] = []

    async def store_all(attempts: list[Attempt]) -> None:
        stored.extend(attempts)

    channels = channels_for(receiver, client, group=10, webhook="/hook")
    herd = [an_alert(f"job-{n:03}", flip_id=f"prod/flip-{n}") for n in range(95)]
    # job-007's recovery, submitted with the herd: after its alarm, never in the same message.
    recovery = an_alert("job-007", to_state="up", recovered_from="failing", flip_id="prod/flip-95")
    policy = RetryPolicy(attempts=1, concurrency=2)
    async with Dispatcher(channels, Routes(default=["webhook"]), policy, on_attempts=store_all) as dispatcher:
        for alert in [*herd[:50], recovery, *herd[50:]]:
            dispatcher.submit(alert)
        await dispatcher.idle()

    requests = receiver.seen("/hook")
    bodies = [orjson.loads(r.body) for r in requests]
    assert all(b["type"] == "cronfleet.alerts" and 1 <= len(b["data"]["alerts"]) <= 10 for b in bodies)
    assert len(requests) <= 12  # 96 alerts, ten a message, but the recovery waits for its alarm
    for request in requests:
        assert spec_verify(SECRET, request.headers, request.body, time.time())
        ids = [a["id"] for a in orjson.loads(request.body)["data"]["alerts"]]
        digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:32]
        assert request.headers["webhook-id"] == f"prod/alerts-{digest}"
    sent = [(a["id"], a["job"]) for b in bodies for a in b["data"]["alerts"]]
    assert sorted(sent) == sorted((a.flip_id, a.job) for a in [*herd, recovery])
    group_of = {a["id"]: n for n, b in enumerate(bodies) for a in b["data"]["alerts"]}
    assert group_of["prod/flip-7"] < group_of["prod/flip-95"]
    assert sorted(a.alert.flip_id for a in stored if a.delivered and a.number == 1) == sorted(
        a.flip_id for a in [*herd, recovery]
    )


async def test_a_failed_group_is_retried_whole_and_each_alert_gets_each_attempt(
    receiver: Receiver, client: aiohttp.ClientSession
) -> None:
    receiver.plan["/flaky"] = [503]  # then 200
    recorder = Recorder()
    channels = channels_for(receiver, client, group=5, flaky="/flaky")
    async with Dispatcher(channels, Routes(default=["flaky"]), FAST, recorder) as dispatcher:
        receiver.release.clear()
        for n in range(5):
            dispatcher.submit(an_alert(f"job-{n}", flip_id=f"prod/flip-{n}"))
        await dispatcher.idle()
    first, second = [orjson.loads(r.body)["data"]["alerts"] for r in receiver.seen("/flaky")]
    assert [a["id"] for a in first] == [a["id"] for a in second]
    assert len(first) == 5
    [h1, h2] = [r.headers["webhook-id"] for r in receiver.seen("/flaky")]
    assert h1 == h2  # a retry of a group is the same message: receivers drop it if they had it
    by_alert: dict[str, list[tuple[int, bool]]] = {}
    for attempt in recorder.attempts:
        by_alert.setdefault(attempt.alert.flip_id, []).append((attempt.number, attempt.delivered))
    assert by_alert == {f"prod/flip-{n}": [(1, False), (2, True)] for n in range(5)}


async def test_one_alert_a_receiver_refuses_does_not_sink_the_rest_of_its_group(
    receiver: Receiver, client: aiohttp.ClientSession
) -> None:
    receiver.poison = b"poisoned-reason"
    recorder = Recorder()
    channels = channels_for(receiver, client, slack="/slack")  # 20 alerts a message
    alerts = [an_alert(f"job-{n}", flip_id=f"prod/flip-{n}") for n in range(5)]
    alerts[2] = an_alert("job-2", flip_id="prod/flip-2", reason="poisoned-reason")
    async with Dispatcher(channels, Routes(default=["slack"]), FAST, recorder) as dispatcher:
        for alert in alerts:
            dispatcher.submit(alert)
        await dispatcher.idle()
    by_alert: dict[str, list[tuple[int, bool, bool]]] = {}
    for attempt in recorder.attempts:
        by_alert.setdefault(attempt.alert.job, []).append((attempt.number, attempt.delivered, attempt.final))
    # The group of five was refused (400: not retryable); each was then tried alone.
    assert by_alert.pop("job-2") == [(1, False, False), (2, False, True)]
    assert by_alert == {f"job-{n}": [(1, False, False), (2, True, True)] for n in (0, 1, 3, 4)}
    texts = [orjson.loads(r.body)["text"] for r in receiver.seen("/slack")]
    assert texts[0] == "[prod] 5 alerts: 5 FAILING" and len(texts) == 6


async def test_stopping_while_a_split_group_is_tried_reports_only_what_was_not_delivered(
    receiver: Receiver, client: aiohttp.ClientSession
) -> None:
    receiver.poison, receiver.hold = b"poisoned-reason", b"job-1"
    recorder = Recorder()
    channels = channels_for(receiver, client, slack="/slack")
    alerts = [an_alert(f"job-{n}", flip_id=f"prod/flip-{n}") for n in range(3)]
    alerts[2] = an_alert("job-2", flip_id="prod/flip-2", reason="poisoned-reason")
    dispatcher = Dispatcher(channels, Routes(default=["slack"]), FAST, recorder)
    dispatcher.start()
    for alert in alerts:
        dispatcher.submit(alert)
    # Refused together, then tried alone: job-0 goes through, job-1 is held, job-2 refused.
    await eventually(
        lambda: _async({a.alert.job for a in recorder.attempts if a.final} == {"job-0", "job-2"})
    )
    left = await dispatcher.close(grace=0.2)
    assert [(alert.job, name) for alert, name in left] == [("job-1", "slack")]
    finals = {(a.alert.job, a.number, a.delivered) for a in recorder.attempts if a.final}
    assert finals == {("job-0", 2, True), ("job-1", 0, False), ("job-2", 2, False)}


async def test_a_grouped_webhook_sends_one_alert_as_a_group_too(
    receiver: Receiver, client: aiohttp.ClientSession
) -> None:
    channels = channels_for(receiver, client, group=50, webhook="/hook")
    attempt = await send_test(channels, "webhook", fleet="prod", flip_id="prod/test-1")
    assert attempt.delivered, attempt.error
    [request] = receiver.seen("/hook")
    body = orjson.loads(request.body)
    assert body["type"] == "cronfleet.alerts"
    [alert] = body["data"]["alerts"]
    assert (alert["id"], alert["kind"], alert["test"]) == ("prod/test-1", "test", True)
    assert spec_verify(SECRET, request.headers, request.body, time.time())


async def test_slack_and_discord_get_a_herd_in_a_few_messages_by_default(
    receiver: Receiver, client: aiohttp.ClientSession
) -> None:
    recorder = Recorder()
    channels = channels_for(receiver, client, slack="/slack", discord="/discord")
    herd = [an_alert(f"job-{n:02}", flip_id=f"prod/flip-{n}", to_state="down") for n in range(40)]
    async with Dispatcher(channels, Routes(default=["slack", "discord"]), FAST, recorder) as dispatcher:
        for alert in herd:
            dispatcher.submit(alert)
        await dispatcher.idle()
    assert len([a for a in recorder.attempts if a.delivered]) == 80
    slack = [orjson.loads(r.body) for r in receiver.seen("/slack")]
    assert len(slack) <= 4  # 20 alerts a message by default
    assert sum(len(m["blocks"]) - 1 for m in slack) == 40
    assert all(len(m["blocks"]) <= 50 for m in slack)
    assert any(re.fullmatch(r"\[prod\] \d+ alerts: \d+ DOWN", m["text"]) for m in slack)
    discord = [orjson.loads(r.body) for r in receiver.seen("/discord")]
    assert len(discord) <= 6 and sum(len(m["embeds"]) for m in discord) == 40  # ten a message
    assert all(len(m["embeds"]) <= 10 for m in discord)


def test_a_dispatcher_reports_to_one_callback() -> None:
    with pytest.raises(TypeError):
        Dispatcher({}, Routes(), RetryPolicy())


# Email over STARTTLS with AUTH ------------------------------------------------------------------


@dataclass
class MailServer:
    port: int
    cert: Path
    received: list[tuple[Envelope, Message, bool, bool]] = field(default_factory=list)  # + TLS?, authed?
    logins: list[bytes] = field(default_factory=list)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cronfleet test smtp")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "smtp-cert.pem", tmp_path / "smtp-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(params=["starttls", "tls", "plain"])
def mail_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MailServer]:
    """aiosmtpd on 127.0.0.1: with ``starttls``, STARTTLS required before anything and AUTH
    (LOGIN/PLAIN) only over TLS; with ``tls``, TLS from the first byte; with ``plain``, no TLS
    offered at all."""
    cert, key = _self_signed(tmp_path)
    server = MailServer(port=_free_port(), cert=cert)

    class Handler:
        async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
            content = envelope.original_content or b""
            assert smtp.transport is not None
            server.received.append(
                (
                    envelope,
                    message_from_bytes(content),
                    smtp.transport.get_extra_info("ssl_object") is not None,
                    bool(session.authenticated),
                )
            )
            return "250 OK"

    def authenticator(
        smtp: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        server.logins.append(data.login)
        ok = data.login == SMTP_USER.encode() and data.password == SMTP_PASSWORD.encode()
        return AuthResult(success=ok, handled=False)

    kwargs: dict[str, Any] = {"authenticator": authenticator, "auth_require_tls": True}
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if request.param == "starttls":
        kwargs |= {"tls_context": context, "require_starttls": True}
    elif request.param == "tls":
        # aiosmtpd counts only STARTTLS as TLS for AUTH; this connection is TLS from the start.
        kwargs |= {"ssl_context": context, "auth_require_tls": False}
    controller = Controller(Handler(), hostname="127.0.0.1", port=server.port, **kwargs)
    controller.start()
    try:
        yield server
    finally:
        controller.stop()


def email_channel(
    server: MailServer, *, password: str = SMTP_PASSWORD, trust: bool = True, security: str = "starttls"
) -> dict[str, Channel]:
    ca = f'ca_file = "{server.cert}"\n' if trust else ""
    text = (
        "[channels.mail]\n"
        'type = "email"\n'
        'host = "127.0.0.1"\n'
        f"port = {server.port}\n"
        f'security = "{security}"\n'
        f'username = "{SMTP_USER}"\n'
        f'password = "{password}"\n'
        'sender = "cronfleet@example.com"\n'
        'to = ["ops@example.com", "oncall@example.com"]\n'
        "timeout_seconds = 10\n"
        f"{ca}"
    )
    return build_channels(parse_channels(text, "mail.toml"), client=None)  # type: ignore[arg-type]


async def _send_mail(channels: dict[str, Channel]) -> list[Attempt]:
    recorder = Recorder()
    async with Dispatcher(channels, Routes(default=["mail"]), FAST, recorder) as dispatcher:
        dispatcher.submit(an_alert())
        await dispatcher.idle()
    return recorder.attempts


@pytest.mark.parametrize("mail_server", ["starttls", "tls"], indirect=True)
async def test_email_goes_over_starttls_or_tls_with_auth(
    mail_server: MailServer, request: pytest.FixtureRequest
) -> None:
    security = request.node.callspec.params["mail_server"]
    [attempt] = await _send_mail(email_channel(mail_server, security=security))
    assert attempt.delivered, attempt.error
    [(envelope, message, over_tls, authenticated)] = mail_server.received
    assert over_tls and authenticated
    assert mail_server.logins == [SMTP_USER.encode()]
    assert envelope.mail_from == "cronfleet@example.com"
    assert envelope.rcpt_tos == ["ops@example.com", "oncall@example.com"]
    assert message["Subject"] == "[prod] backup is FAILING (was running)"
    assert message["X-Cronfleet-Flip"] == "flip-backup-1"
    body = message.get_payload(decode=True).decode()  # type: ignore[union-attr]
    for fact in ("Job:", "backup", "running -> failing", "exit code 3", "Fleet:", "prod", "Link:"):
        assert fact in body


@pytest.mark.parametrize("mail_server", ["starttls"], indirect=True)
async def test_alerts_waiting_together_go_in_one_email(mail_server: MailServer) -> None:
    recorder = Recorder()
    herd = [an_alert(f"job-{n}", flip_id=f"prod/flip-{n}", to_state="down") for n in range(3)]
    recovery = an_alert("job-9", flip_id="prod/flip-9", to_state="up", recovered_from="down")
    async with Dispatcher(email_channel(mail_server), Routes(default=["mail"]), FAST, recorder) as dispatcher:
        for alert in [*herd, recovery]:
            dispatcher.submit(alert)
        await dispatcher.idle()
    assert [a.delivered for a in recorder.attempts] == [True] * 4
    [(_envelope, message, over_tls, _authenticated)] = mail_server.received
    assert over_tls
    assert message["Subject"] == "[prod] 4 alerts: 3 DOWN, 1 recovered"
    assert message["X-Cronfleet-Flip"] == "prod/flip-0 prod/flip-1 prod/flip-2 prod/flip-9"
    body = message.get_payload(decode=True).decode()  # type: ignore[union-attr]
    assert "4 alerts, in the order they happened." in body
    for line in ("1. [prod] job-0 is DOWN", "3. [prod] job-2 is DOWN", "4. [prod] job-9 recovered"):
        assert line in body


@pytest.mark.parametrize("mail_server", ["starttls"], indirect=True)
async def test_a_refused_login_or_an_untrusted_certificate_is_final(mail_server: MailServer) -> None:
    [wrong] = await _send_mail(email_channel(mail_server, password="not-the-password"))
    assert (wrong.delivered, wrong.final, wrong.number) == (False, True, 1)
    assert wrong.error is not None and "login refused: 535" in wrong.error
    assert "not-the-password" not in wrong.error

    [untrusted] = await _send_mail(email_channel(mail_server, trust=False))
    assert (untrusted.delivered, untrusted.final) == (False, True)
    assert untrusted.error is not None and "certificate not trusted" in untrusted.error
    assert mail_server.received == []


@pytest.mark.parametrize("mail_server", ["plain"], indirect=True)
async def test_a_server_without_starttls_never_gets_the_credentials(mail_server: MailServer) -> None:
    [attempt] = await _send_mail(email_channel(mail_server))
    assert (attempt.delivered, attempt.final, attempt.number) == (False, True, 1)
    assert attempt.error == (
        f"127.0.0.1:{mail_server.port} does not offer STARTTLS: "
        "refusing to send credentials or alerts in clear"
    )
    assert mail_server.logins == [] and mail_server.received == []


async def test_a_slow_smtp_server_does_not_block_the_event_loop(tmp_path: Path) -> None:
    # A listener that accepts and never speaks: smtplib waits for its greeting in a thread while
    # the loop goes on ticking.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        text = (
            '[channels.mail]\ntype = "email"\nhost = "127.0.0.1"\n'
            f"port = {listener.getsockname()[1]}\n"
            'sender = "cf@example.com"\nto = ["ops@example.com"]\ntimeout_seconds = 2\n'
        )
        channel = build_channels(parse_channels(text, "m.toml"), client=None)["mail"]  # type: ignore[arg-type]
        ticks = 0
        sending = asyncio.create_task(channel.send([an_alert()]))
        while not sending.done():
            await asyncio.sleep(0.01)
            ticks += 1
        with pytest.raises(Exception, match="no answer within 2s"):
            await sending
        assert ticks > 10
    finally:
        listener.close()


async def test_a_test_alert_is_sent_once_and_its_outcome_returned(
    receiver: Receiver, client: aiohttp.ClientSession
) -> None:
    receiver.plan["/broken"] = [500]
    channels = channels_for(receiver, client, slack="/slack", broken="/broken")
    sent = await send_test(channels, "slack", fleet="prod", flip_id="test-1")
    assert (sent.delivered, sent.number, sent.alert.kind) == (True, 1, "test")
    [request] = receiver.seen("/slack")
    assert orjson.loads(request.body)["text"] == "[prod] test alert: if you read this, the channel works"

    failed = await send_test(channels, "broken", fleet="prod", flip_id="test-2")
    assert (failed.delivered, failed.final) == (False, True)
    assert failed.error is not None and "HTTP 500" in failed.error
    assert len(receiver.seen("/broken")) == 1  # no retry: the person asking sees the error now

    with pytest.raises(NotFound, match=r"no channel called 'pager' \(channels: broken, log, slack\)"):
        await send_test(channels, "pager", fleet="prod", flip_id="test-3")
