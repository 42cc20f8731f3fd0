"""The monitor alerts: a job's alarm and its recovery reach real receivers (a local HTTP server
for signed webhooks, aiosmtpd for email) from a real monitor on a real broker and store; a
failing or stalled channel delays nothing else; every attempt is stored and listed by
``cronfleet alerts``; an alert pending when the monitor stops is delivered once by the next one;
``cronfleet alerts test`` sends a test alert."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from common.settings import Settings
from common.store import AlertAttemptRow, FlipRow, JobHealthRow, Store
from tests.fleet import Fleet, eventually, run_cronfleet
from tests.integration import test_alert_channels as receivers
from tests.integration.helpers import apply_toml, runs_of
from tests.integration.test_alert_channels import (
    SECRET,
    SMTP_PASSWORD,
    SMTP_USER,
    MailServer,
    Receiver,
    spec_verify,
)

# The real receivers of the channels' own tests: an HTTP server, and aiosmtpd with STARTTLS.
receiver_fixture = pytest.fixture(name="receiver")(receivers.receiver.__wrapped__)
mail_server_fixture = pytest.fixture(name="mail_server", params=["starttls"])(
    receivers.mail_server.__wrapped__
)

pytestmark = pytest.mark.both_stores

# A heartbeat-only job due every second: with no run, it is late at once and down a second later.
MISSED = '[jobs.nightly]\nschedule = "* * * * * *"\ngrace_seconds = 1\n'
FAST_DELIVERY = "[delivery]\nattempts = 3\nfirst_delay_seconds = 0.1\nmax_delay_seconds = 0.2\n"


def webhook(name: str, receiver: Receiver, path: str, timeout: float = 10) -> str:
    return (
        f'[channels.{name}]\ntype = "webhook"\nurl = "{receiver.url(path)}"\nsecret = "{SECRET}"\n'
        f"timeout_seconds = {timeout}\n"
    )


def email(server: MailServer) -> str:
    return (
        '[channels.mail]\ntype = "email"\nhost = "127.0.0.1"\n'
        f'port = {server.port}\nusername = "{SMTP_USER}"\npassword = "{SMTP_PASSWORD}"\n'
        f'sender = "cronfleet@example.com"\nto = ["ops@example.com"]\nca_file = "{server.cert}"\n'
    )


def with_channels(settings: Settings, tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "channels.toml"
    path.write_text(text)
    return settings.model_copy(update={"channels_file": path})


async def run(settings: Settings, *args: str) -> Any:
    """``cronfleet ARGS`` with the settings' channels file, while the test's loop goes on."""
    return await run_cronfleet(settings, *args, CRONFLEET_CHANNELS_FILE=str(settings.channels_file))


def bodies(receiver: Receiver, path: str) -> list[dict[str, Any]]:
    return [orjson.loads(request.body)["data"] for request in receiver.seen(path)]


async def attempts_of(store: Store, channel: str | None = None) -> list[AlertAttemptRow]:
    query = select(AlertAttemptRow).order_by(AlertAttemptRow.id)
    if channel is not None:
        query = query.where(AlertAttemptRow.channel == channel)
    async with store.session() as session:
        return list((await session.execute(query)).scalars())


async def delivered_on(store: Store, channel: str) -> list[AlertAttemptRow]:
    return [a for a in await attempts_of(store, channel) if a.delivered]


async def alerted_flips(store: Store, job: str) -> list[FlipRow]:
    query = select(FlipRow).where(FlipRow.job == job, FlipRow.alert.is_not(None)).order_by(FlipRow.id)
    async with store.session() as session:
        return list((await session.execute(query)).scalars())


async def health_of(store: Store, job: str, *, failures: int) -> JobHealthRow | None:
    async with store.session() as session:
        row = await session.get(JobHealthRow, job)
    return row if row is not None and row.consecutive_failures == failures else None


async def _value(value: Any) -> Any:
    return value


async def test_a_missed_run_and_its_recovery_reach_every_channel_and_nothing_waits_for_a_bad_one(
    settings: Settings, store: Store, receiver: Receiver, mail_server: MailServer, tmp_path: Path
) -> None:
    receiver.plan["/broken"] = [500] * 1000
    text = (
        webhook("hook", receiver, "/hook")
        + webhook("broken", receiver, "/broken")
        + webhook("stalled", receiver, "/hang", timeout=60)
        + email(mail_server)
        + '[routes]\ndefault = ["stalled", "broken", "hook", "mail"]\n'
        + FAST_DELIVERY
    )
    alerting = with_channels(settings, tmp_path, text)
    await apply_toml(store, MISSED)
    monitor = Fleet(alerting)
    try:
        await monitor.start("monitor")

        # The run was missed: the job is down, and the signed webhook says so.
        await eventually(lambda: _value([b for b in bodies(receiver, "/hook") if b["kind"] == "alarm"]))
        [request, *_] = receiver.seen("/hook")
        assert spec_verify(SECRET, request.headers, request.body, time.time())
        alarm = orjson.loads(request.body)
        assert alarm["type"] == "cronfleet.alarm"
        assert (alarm["data"]["job"], alarm["data"]["to_state"]) == ("nightly", "down")
        assert alarm["data"]["fleet"] == settings.namespace
        [flip, *_] = await alerted_flips(store, "nightly")
        assert request.headers["webhook-id"] == alarm["data"]["id"] == f"{settings.namespace}/flip-{flip.id}"

        # So does the email.
        await eventually(lambda: _value(mail_server.received))
        _envelope, message, over_tls, authenticated = mail_server.received[0]
        assert over_tls and authenticated
        assert message["Subject"] == f"[{settings.namespace}] nightly is DOWN (was late)"
        assert message["X-Cronfleet-Flip"] == alarm["data"]["id"]

        # A successful run: the recovery follows, on the same channels.
        assert (await run(alerting, "ping", "nightly")).returncode == 0
        recovery = await eventually(
            lambda: _value([b for b in bodies(receiver, "/hook") if b["kind"] == "recovery"])
        )
        assert (recovery[0]["to_state"], recovery[0]["recovered_from"]) == ("up", "down")

        # The failing receiver was tried three times, the last attempt final.
        async def broken_gave_up() -> list[AlertAttemptRow]:
            rows = [a for a in await attempts_of(store, "broken") if a.alert_id == alarm["data"]["id"]]
            return rows if any(a.final for a in rows) else []

        first = await eventually(broken_gave_up)
        assert [a.attempt for a in first] == [1, 2, 3]
        assert [a.final for a in first] == [False, False, True]
        assert not any(a.delivered for a in first)
        assert all("500" in (a.error or "") for a in first)
        assert first[0].retry_at is not None and first[-1].retry_at is None

        # The stalled channel still holds its first request: the alarm, the recovery, the ping
        # and the other channels never waited for it.
        assert await delivered_on(store, "stalled") == []
        assert await runs_of(store, "nightly")
        receiver.release.set()
        await eventually(lambda: delivered_on(store, "stalled"))

        # The first alarm is done: every channel of its route has a final attempt.
        async def first_done() -> bool:
            async with store.session() as session:
                row = await session.get(FlipRow, flip.id)
            return row is not None and row.alert == "done"

        await eventually(first_done)
    finally:
        await monitor.stop()

    # Every attempt is listed by `cronfleet alerts --json`, newest first.
    stored = await attempts_of(store)
    listed = await run(alerting, "alerts", "--json", "--limit", "10000")
    assert listed.returncode == 0, listed.stderr
    rows = orjson.loads(listed.stdout)
    assert len(rows) == len(stored)
    assert sorted((r["alert_id"], r["channel"], r["attempt"]) for r in rows) == sorted(
        (a.alert_id, a.channel, a.attempt) for a in stored
    )
    assert [r["at"] for r in rows] == sorted((r["at"] for r in rows), reverse=True)
    assert {"hook", "broken", "stalled", "mail"} <= {r["channel"] for r in rows}
    one_job = orjson.loads((await run(alerting, "alerts", "nightly", "--json", "--limit", "2")).stdout)
    assert len(one_job) == 2 and all(r["job"] == "nightly" for r in one_job)
    table = await run(alerting, "alerts", "--limit", "3")
    assert table.returncode == 0 and table.stdout.startswith("AT ")
    assert SECRET not in listed.stdout + table.stdout


async def test_an_alert_pending_when_the_monitor_stops_is_delivered_once_by_the_next(
    settings: Settings, store: Store, receiver: Receiver, tmp_path: Path
) -> None:
    receiver.plan["/later"] = [500] * 1000
    text = (
        webhook("later", receiver, "/later")
        + '[routes]\ndefault = ["later"]\n'
        + "[delivery]\nattempts = 100\nfirst_delay_seconds = 0.1\nmax_delay_seconds = 0.1\n"
    )
    alerting = with_channels(settings, tmp_path, text)
    await apply_toml(store, MISSED)
    first = Fleet(alerting)
    try:
        await first.start("monitor")
        await eventually(lambda: _value(len(receiver.seen("/later")) >= 2))
    finally:
        await first.stop()
    [flip] = await alerted_flips(store, "nightly")  # down, and it stays down: one alarm
    assert flip.alert == "pending"
    tried = await attempts_of(store, "later")
    assert not any(a.delivered for a in tried)
    assert tried[-1].attempt == 0 and "stopped" in (tried[-1].error or "")

    receiver.plan["/later"] = []  # the receiver is back
    before = len(receiver.seen("/later"))
    again = Fleet(alerting)
    try:
        await again.start("monitor")

        async def done() -> bool:
            async with store.session() as session:
                row = await session.get(FlipRow, flip.id)
            return row is not None and row.alert == "done"

        await eventually(done)
    finally:
        await again.stop()
    delivered = receiver.seen("/later")[before:]
    assert [r.headers["webhook-id"] for r in delivered] == [f"{settings.namespace}/flip-{flip.id}"]
    assert next(a for a in await attempts_of(store, "later") if a.delivered).flip_id == flip.id
    assert len(await alerted_flips(store, "nightly")) == 1


async def test_alerts_test_sends_one_test_alert_and_refuses_an_unknown_channel_in_one_line(
    settings: Settings, store: Store, receiver: Receiver, tmp_path: Path
) -> None:
    alerting = with_channels(settings, tmp_path, webhook("hook", receiver, "/hook"))
    sent = await run(alerting, "alerts", "test", "hook")
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.strip() == "test alert delivered to channel 'hook'"
    [request] = receiver.seen("/hook")
    assert spec_verify(SECRET, request.headers, request.body, time.time())
    body = orjson.loads(request.body)
    assert body["type"] == "cronfleet.test" and body["data"]["test"] is True
    [stored] = await attempts_of(store)
    assert (stored.kind, stored.channel, stored.attempt, stored.delivered, stored.flip_id) == (
        "test",
        "hook",
        1,
        True,
        None,
    )
    assert stored.alert_id == body["data"]["id"]
    listed = orjson.loads((await run(alerting, "alerts", "--json")).stdout)
    assert [(r["kind"], r["channel"], r["delivered"]) for r in listed] == [("test", "hook", True)]

    unknown = await run(alerting, "alerts", "test", "nope")
    assert unknown.returncode == 1
    assert unknown.stderr == "cronfleet: no channel called 'nope' (channels: hook, log)\n"

    receiver.plan["/hook"] = [404]
    failed = await run(alerting, "alerts", "test", "hook")
    assert failed.returncode == 1
    assert failed.stderr.startswith("cronfleet: test alert to channel 'hook' failed: ")
    assert len(failed.stderr.splitlines()) == 1

    bad = with_channels(
        settings, tmp_path, f'[channels.hook]\ntype = "webhook"\nurl = "ftp://x"\nsecret = "{SECRET}"\n'
    )
    for args in (("alerts", "test", "hook"), ("monitor",)):
        refused = await run(bad, *args)
        assert refused.returncode == 1
        assert refused.stderr.endswith(
            "channels.toml:3: channel 'hook', field url: an http:// or https:// URL with a host\n"
        )
        assert "Traceback" not in refused.stderr


async def test_a_failure_threshold_makes_a_job_failing_after_that_many_failures(
    settings: Settings, store: Store, receiver: Receiver, tmp_path: Path
) -> None:
    alerting = with_channels(
        settings, tmp_path, webhook("hook", receiver, "/hook") + '[routes]\ndefault = ["hook"]\n'
    )
    await apply_toml(store, '[jobs.flaky]\nschedule = "@daily"\nfailure_threshold = 2\n')
    monitor = Fleet(alerting)
    try:
        await monitor.start("monitor")
        assert (await run(alerting, "ping", "flaky", "--fail")).returncode == 0
        await eventually(lambda: runs_of(store, "flaky"))
        assert (await run(alerting, "ping", "flaky", "--fail")).returncode == 0
        failing = await eventually(
            lambda: _value([b for b in bodies(receiver, "/hook") if b["kind"] == "alarm"])
        )
    finally:
        await monitor.stop()
    assert [(b["job"], b["to_state"]) for b in failing] == [("flaky", "failing")]
    async with store.session() as session:
        flips = list((await session.execute(select(FlipRow).where(FlipRow.job == "flaky"))).scalars())
    assert [(f.from_state, f.to_state) for f in flips] == [("new", "up"), ("up", "failing")]


async def test_two_monitors_send_each_alert_once(
    settings: Settings, store: Store, receiver: Receiver, tmp_path: Path
) -> None:
    text = webhook("hook", receiver, "/hook") + '[routes]\ndefault = ["hook"]\n' + FAST_DELIVERY
    alerting = with_channels(settings, tmp_path, text)
    await apply_toml(store, MISSED.replace("nightly", "first") + MISSED.replace("nightly", "second"))
    monitors = Fleet(alerting)
    try:
        await monitors.start("monitor", "monitor")

        async def all_done() -> list[FlipRow]:
            flips = await alerted_flips(store, "first") + await alerted_flips(store, "second")
            return flips if len(flips) == 2 and all(f.alert == "done" for f in flips) else []

        flips = await eventually(all_done)
    finally:
        await monitors.stop()
    ids = sorted(r.headers["webhook-id"] for r in receiver.seen("/hook"))
    assert ids == sorted(f"{settings.namespace}/flip-{f.id}" for f in flips)
    assert len(await delivered_on(store, "hook")) == 2


async def test_a_fleet_alarm_and_its_recovery_are_alerted_like_a_jobs(
    settings: Settings, store: Store, receiver: Receiver, tmp_path: Path
) -> None:
    # A job with an action needs a scheduler: with none running, `@scheduler` turns down.
    await apply_toml(
        store, '[jobs.nightly]\nschedule = "0 3 * * *"\naction = { type = "shell", argv = ["true"] }\n'
    )
    alerting = with_channels(
        settings, tmp_path, webhook("ops", receiver, "/ops") + '[routes]\ndefault = ["ops"]\n'
    )
    fleet = Fleet(alerting)
    try:
        await fleet.start("monitor")
        [alarm] = await eventually(lambda: _value(bodies(receiver, "/ops")))
        assert (alarm["job"], alarm["to_state"], alarm["kind"]) == ("@scheduler", "down", "alarm")
        request = receiver.seen("/ops")[0]
        assert spec_verify(SECRET, request.headers, request.body, time.time())

        await fleet.start("scheduler")
        sent = await eventually(
            lambda: _value(len(bodies(receiver, "/ops")) == 2 and bodies(receiver, "/ops"))
        )
        assert (sent[1]["job"], sent[1]["to_state"], sent[1]["kind"]) == ("@scheduler", "up", "recovery")
    finally:
        await fleet.stop()
    listed = orjson.loads((await run(alerting, "alerts", "@scheduler", "--json")).stdout)
    assert [row["delivered"] for row in listed] == [True, True]
