"""Ping URLs against a real monitor recording into a real store: every URL form becomes a signed
heartbeat on the bus and a run in the store; keys ping only their jobs; bodies are the runs' logs."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import aio_pika
import httpx
import pytest
from aio_pika.abc import AbstractRobustConnection
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import select

from common.clock import utcnow
from common.messages import HeartbeatKind, JobHeartbeat
from common.ping_keys import create_ping_key, revoke_ping_key
from common.settings import Settings
from common.signing import Keyring, Role
from common.store import HeartbeatRow, RunRow, Store
from common.topology import Topology, event_routing_key
from monitor.http.pings import MESSAGE_CHARACTERS
from tests.conftest import Start
from tests.fleet import eventually, run_cronfleet
from tests.integration.helpers import runs_of


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Monitor:
    """A running monitor's HTTP address and a client for it."""

    base: str
    client: httpx.AsyncClient


@pytest.fixture
async def monitor(fleet: Start) -> AsyncIterator[Monitor]:
    """A monitor serving HTTP on a free port of 127.0.0.1."""
    port = free_port()
    await fleet("monitor", http=("127.0.0.1", port))
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=30) as client:
        yield Monitor(base, client)


async def _cronfleet(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """``cronfleet ARGS``, in a thread: this loop runs the monitor meanwhile (blocked, a monitor
    in the middle of a SQLite write would hold the lock the command waits for)."""
    return await run_cronfleet(settings, *args)


async def _key(store: Store, *jobs: str) -> str:
    _key_row, token = await create_ping_key(store, jobs, None, utcnow())
    return token


async def _finished(store: Store, job: str, count: int) -> list[RunRow]:
    """``job``'s runs once ``count`` of them have finished (oldest first)."""

    async def check() -> list[RunRow] | None:
        runs = await runs_of(store, job)
        done = [run for run in runs if run.finished_at is not None]
        return runs if len(done) >= count else None

    found: list[RunRow] = await eventually(check)
    return found


async def test_every_ping_url_form_of_a_one_job_key_records_its_run(
    settings: Settings, store: Store, monitor: Monitor
) -> None:
    key = await _key(store, "solo")
    client = monitor.client
    for method, path in (
        ("GET", f"/ping/{key}"),
        ("POST", f"/ping/{key}/fail"),
        ("HEAD", f"/ping/{key}/0"),
        ("GET", f"/ping/{key}/3"),
        ("POST", f"/ping/{key}/solo"),
    ):
        answer = await client.request(method, path)
        assert answer.status_code == 200, (method, path, answer.text)
        assert answer.text == ("" if method == "HEAD" else "OK")
    runs = await _finished(store, "solo", 5)
    assert sorted((run.status, str(run.exit_code)) for run in runs) == sorted(
        [
            ("succeeded", "None"),
            ("failed", "None"),
            ("succeeded", "0"),
            ("failed", "3"),
            ("succeeded", "None"),
        ]
    )
    assert all(run.source == "heartbeat" and run.duration_seconds == 0.0 for run in runs)


async def test_a_start_then_its_finish_make_one_run_with_a_duration_and_the_body_is_its_log(
    settings: Settings, store: Store, monitor: Monitor
) -> None:
    key = await _key(store, "timed")
    client = monitor.client
    assert (await client.get(f"/ping/{key}/start")).status_code == 200
    answer = await client.post(f"/ping/{key}", content=b"backed up 12 files\nall good\n")
    assert answer.status_code == 200
    [run] = await _finished(store, "timed", 1)
    assert run.status == "succeeded" and run.finished_at is not None
    assert run.duration_seconds is not None and run.duration_seconds >= 0
    assert run.started_at <= run.finished_at
    assert run.output_tail == "backed up 12 files\nall good\n"


async def test_concurrent_pings_are_each_recorded_once(
    settings: Settings, store: Store, monitor: Monitor
) -> None:
    key = await _key(store, "busy")
    answers = await asyncio.gather(
        *(monitor.client.post(f"/ping/{key}/{n % 2}", content=f"run {n}") for n in range(40))
    )
    assert [answer.status_code for answer in answers] == [200] * 40
    runs = await _finished(store, "busy", 40)
    assert sorted(run.output_tail or "" for run in runs) == sorted(f"run {n}" for n in range(40))
    assert sum(run.status == "failed" for run in runs) == 20


async def test_rid_pairs_each_start_with_its_own_finish(
    settings: Settings, store: Store, monitor: Monitor
) -> None:
    key = await _key(store, "overlap")
    client = monitor.client
    # Two runs overlap; they finish in the order they started. Without rid the first finish
    # would close the latest start.
    assert (await client.get(f"/ping/{key}/start?rid=first")).status_code == 200
    assert (await client.get(f"/ping/{key}/start?rid=second")).status_code == 200
    assert (await client.post(f"/ping/{key}/fail?rid=first", content="first failed")).status_code == 200
    assert (await client.post(f"/ping/{key}/0?rid=second", content="second ok")).status_code == 200
    runs = {run.run_id: run for run in await _finished(store, "overlap", 2)}
    assert set(runs) == {"rid:overlap:first", "rid:overlap:second"}
    first, second = runs["rid:overlap:first"], runs["rid:overlap:second"]
    assert (first.status, first.output_tail) == ("failed", "first failed")
    assert (second.status, second.exit_code, second.output_tail) == ("succeeded", 0, "second ok")
    assert first.started_at <= second.started_at
    async with store.session() as session:
        beats = (await session.execute(select(HeartbeatRow).where(HeartbeatRow.job == "overlap"))).scalars()
        assert sorted(beat.rid or "" for beat in beats) == ["first", "first", "second", "second"]


async def test_a_key_of_several_jobs_names_the_job_and_pings_no_other(
    settings: Settings, store: Store, monitor: Monitor
) -> None:
    key = await _key(store, "alpha", "beta")
    other = await _key(store, "gamma")
    client = monitor.client
    for path in (f"/ping/{key}/alpha", f"/ping/{key}/beta/start", f"/ping/{key}/beta/7"):
        assert (await client.post(path)).status_code == 200, path
    for path in (
        f"/ping/{key}",  # which job?
        f"/ping/{key}/start",
        f"/ping/{key}/gamma",  # another key's job
        f"/ping/{key}/gamma/fail",
        f"/ping/{key}/alpha/nonsense",
        f"/ping/{other}/alpha",  # a key for gamma cannot ping alpha
        f"/ping/{other}/alpha/fail",
    ):
        answer = await client.get(path)
        assert answer.status_code == 404 and "Traceback" not in answer.text, path
    [alpha] = await _finished(store, "alpha", 1)
    [beta] = await _finished(store, "beta", 1)
    assert alpha.status == "succeeded"
    assert (beta.status, beta.exit_code) == ("failed", 7) and beta.duration_seconds is not None
    assert await runs_of(store, "gamma") == []


async def test_unknown_revoked_and_bad_pings_are_refused_in_plain_words(
    settings: Settings, store: Store, monitor: Monitor
) -> None:
    key = await _key(store, "guarded")
    client = monitor.client
    for path, status in (
        ("/ping/no-such-key", 404),
        ("/ping/no-such-key/start", 404),
        (f"/ping/{'x' * 5000}", 404),
        (f"/ping/{key}/256", 400),
        (f"/ping/{key}/-1", 400),
        (f"/ping/{key}/99999999999999999999", 400),
        (f"/ping/{key}/guarded/1000", 400),
        (f"/ping/{key}?rid=not%20a%20rid", 400),
        (f"/ping/{key}/start?rid={'r' * 65}", 400),
        (f"/ping/{key}/start?rid=abc%0A", 400),
        (f"/ping/{key}/3%0A", 404),
        (f"/ping/{key}/a/b/c", 404),
    ):
        for method in ("GET", "POST", "HEAD"):
            answer = await client.request(method, path)
            assert answer.status_code == status, (method, path, answer.status_code, answer.text)
            assert "Traceback" not in answer.text
    for method in ("PUT", "DELETE", "OPTIONS"):
        answer = await client.request(method, f"/ping/{key}/start")
        assert answer.status_code == 405 and answer.headers["allow"] == "GET, POST, HEAD", method
    assert (await client.get(f"/ping/{key}")).status_code == 200
    await _finished(store, "guarded", 1)
    await revoke_ping_key(store, "guarded", utcnow())
    assert (await client.get(f"/ping/{key}")).status_code == 404
    assert (await client.post(f"/ping/{key}/fail")).status_code == 404
    assert len(await runs_of(store, "guarded")) == 1


async def test_a_large_or_binary_body_is_cut_to_its_end_never_refused(
    settings: Settings, store: Store, monitor: Monitor
) -> None:
    key = await _key(store, "chatty")
    client = monitor.client
    body = b"".join(b"line %06d of a long log\n" % n for n in range(10_000)) + b"the end\n"
    assert len(body) > 200_000
    assert (await client.post(f"/ping/{key}", content=body)).status_code == 200
    [run] = await _finished(store, "chatty", 1)
    assert run.output_tail is not None and len(run.output_tail) <= MESSAGE_CHARACTERS
    assert run.output_tail.startswith(f"[cut: the body had {len(body)} bytes; its end follows]\n")
    assert run.output_tail.endswith("line 009999 of a long log\nthe end\n")

    binary = await _key(store, "binary")
    assert (
        await client.post(f"/ping/{binary}/fail", content=b"ok\x00\xff\xfe caf\xc3\xa9")
    ).status_code == 200
    [run] = await _finished(store, "binary", 1)
    assert run.output_tail == "ok\ufffd\ufffd\ufffd café"


async def test_cronfleet_keys_ping_url_new_list_revoke_and_its_url_works(
    settings: Settings, store: Store, monitor: Monitor
) -> None:
    made = await _cronfleet(settings, "keys", "ping-url", "new", "--jobs", "nightly", "--url", monitor.base)
    assert made.returncode == 0, made.stderr
    lines = made.stdout.splitlines()
    token, url = lines[1], lines[2]
    assert url == f"{monitor.base}/ping/{token}" and len(token) >= 22  # >= 128 bits
    assert "no job called 'nightly'" in made.stderr
    assert (await monitor.client.get(url)).status_code == 200
    await _finished(store, "nightly", 1)

    listed = await _cronfleet(settings, "keys", "ping-url", "list", "--json")
    assert listed.returncode == 0 and token not in listed.stdout
    assert '"name": "nightly"' in listed.stdout and '"state": "active"' in listed.stdout
    twice = await _cronfleet(settings, "keys", "ping-url", "new", "--jobs", "nightly")
    assert twice.returncode == 1 and "exists already" in twice.stderr

    revoked = await _cronfleet(settings, "keys", "ping-url", "revoke", "nightly")
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert (await monitor.client.get(url)).status_code == 404
    relisted = await _cronfleet(settings, "keys", "ping-url", "list", "--json")
    assert '"state": "revoked"' in relisted.stdout
    missing = await _cronfleet(settings, "keys", "ping-url", "revoke", "nope")
    assert missing.returncode == 1 and "no ping key" in missing.stderr
    # Signing keys are made as before.
    signing = await _cronfleet(settings, "keys", "new", "--role", "ping", "--jobs", "nightly")
    assert signing.returncode == 0 and signing.stdout.startswith("ping:")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_as_in_a_crontab_line(settings: Settings, store: Store, monitor: Monitor) -> None:
    key = await _key(store, "cron-line")
    url = f"{monitor.base}/ping/{key}"
    for args in (
        ["-fsS", "-m", "10", "--retry", "3", "-o", "/dev/null", f"{url}/start?rid=one"],
        ["-fsS", "-m", "10", "--retry", "3", "--data-raw", "done: 3 files", f"{url}/0?rid=one"],
    ):
        process = await asyncio.create_subprocess_exec(
            "curl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        _out, err = await process.communicate()
        assert process.returncode == 0, err
    [run] = await _finished(store, "cron-line", 1)
    assert (run.run_id, run.status, run.output_tail) == ("rid:cron-line:one", "succeeded", "done: 3 files")
    failing = await asyncio.create_subprocess_exec(
        "curl", "-fsS", "-m", "10", f"{monitor.base}/ping/wrong-key", stderr=asyncio.subprocess.PIPE
    )
    _out, err = await failing.communicate()
    assert failing.returncode == 22 and b"404" in err  # -f: an HTTP error fails the line


_SEGMENT = st.one_of(
    st.sampled_from(["start", "fail", "0", "1", "255", "256", "-1", "fuzz", "other", "%00", "%2F", ".."]),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=30).map(lambda text: quote(text, safe="")),
)


async def test_fuzzed_pings_never_get_a_server_error(
    settings: Settings, store: Store, monitor: Monitor
) -> None:
    keys = [await _key(store, "fuzz"), await _key(store, "fuzz", "other"), "not-a-key"]
    statuses: set[int] = set()

    @hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        method=st.sampled_from(["GET", "POST", "HEAD"]),
        which=st.sampled_from([0, 1, 2]),
        segments=st.lists(_SEGMENT, max_size=3),
        rid=st.one_of(st.none(), st.text(max_size=70)),
        body=st.binary(max_size=20_000),
    )
    @example(method="GET", which=0, segments=[], rid=None, body=b"")
    @example(method="POST", which=1, segments=["fuzz", "start"], rid="r", body=b"x")
    @example(method="HEAD", which=2, segments=[], rid=None, body=b"")
    def ping(method: str, which: int, segments: list[str], rid: str | None, body: bytes) -> None:
        path = "/ping/" + "/".join([keys[which], *segments])
        params = None if rid is None else {"rid": rid}
        with httpx.Client(base_url=monitor.base, trust_env=False, timeout=30) as client:
            answer = client.request(method, path, params=params, content=body)
        assert answer.status_code < 500, (method, path, rid, answer.status_code, answer.text)
        assert "Traceback" not in answer.text
        statuses.add(answer.status_code)

    assert (await monitor.client.get(f"/ping/{keys[0]}/")).status_code == 200  # a trailing slash
    # Hypothesis drives a blocking client: in a thread, while this loop serves the monitor.
    await asyncio.to_thread(ping)
    assert {200, 404} <= statuses


async def test_rid_heartbeats_pair_in_any_order_and_cronfleet_ping_sends_rid(
    settings: Settings, store: Store, fleet: Start, amqp: AbstractRobustConnection
) -> None:
    await fleet("monitor")
    t0 = utcnow().replace(microsecond=0)
    channel = await amqp.channel()
    exchange = await channel.get_exchange(Topology(settings.namespace).events_exchange)
    keyring = Keyring.parse(settings.keys)
    # The finish arrives first; the late start gives the run its start and its duration.
    for beat in (
        JobHeartbeat(
            id="late-1",
            job="late",
            kind=HeartbeatKind.FAIL,
            exit_code=2,
            at=t0 + timedelta(seconds=5),
            rid="x",
        ),
        JobHeartbeat(id="late-0", job="late", kind=HeartbeatKind.START, at=t0, rid="x"),
        JobHeartbeat(
            id="late-2", job="late", kind=HeartbeatKind.SUCCESS, at=t0 + timedelta(seconds=6), rid="x"
        ),
    ):
        body, routing_key = beat.to_bytes(), event_routing_key(beat)
        headers: dict[str, Any] = dict(keyring.sign(Role.PING, settings.namespace, routing_key, body))
        await exchange.publish(aio_pika.Message(body, headers=headers), routing_key)

    async def three_beats() -> bool:
        async with store.session() as session:
            found = (await session.execute(select(HeartbeatRow).where(HeartbeatRow.job == "late"))).all()
        return len(found) == 3

    await eventually(three_beats)
    runs = {run.run_id: run for run in await runs_of(store, "late")}
    paired = runs.pop("rid:late:x")
    assert (paired.status, paired.exit_code, paired.started_at, paired.duration_seconds) == (
        "failed",
        2,
        t0,
        5.0,
    )
    # A second finish of a finished rid is a run of its own.
    [extra] = runs.values()
    assert (extra.run_id, extra.status) == ("hb:late-2", "succeeded")

    for args in (("--start", "--rid", "r1"), ("--rid", "r1", "--message", "done")):
        sent = await _cronfleet(settings, "ping", "viacli", *args)
        assert sent.returncode == 0, sent.stderr
    [run] = await _finished(store, "viacli", 1)
    assert (run.run_id, run.status, run.output_tail) == ("rid:viacli:r1", "succeeded", "done")
    bad = await _cronfleet(settings, "ping", "viacli", "--rid", "not ok")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
