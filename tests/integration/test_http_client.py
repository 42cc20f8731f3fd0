"""The outgoing HTTP client (``common.http_client``) as the worker's http action and the alert
channels use it, against a real server on 127.0.0.1: what goes out, what is read back, and what
is refused (redirects, cookies, answers too large, timeouts, refused connections)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import orjson
import pytest

from common.actions import HttpAction
from common.clock import utcnow
from common.http_client import open_session
from common.messages import RunStatus
from monitor.channels.base import DeliveryFailed
from monitor.channels.http import post_json
from tests.http_server import serving
from tests.integration.test_actions import SECRET, verify_standard_webhook
from worker.actions.base import RunContext
from worker.actions.http import HttpExecutor

RUN = RunContext(run_id="run-client-1", trigger_id="client@t", job="client", scheduled_at=utcnow())
BIG = 200 * 1024


@dataclass
class Server:
    base: str = ""
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def seen(self, path: str) -> list[tuple[str, str, dict[str, str], bytes]]:
        with self.lock:
            return [r for r in self.requests if r[1] == path]


@pytest.fixture
def server() -> Iterator[Server]:
    """Answers by path: ``/json`` a JSON requestId and a cookie, ``/moved`` a 302 to ``/json``,
    ``/big`` 200 KiB of JSON, ``/refuse`` a 500 with 200 KiB of text, ``/slow`` after 2 s."""
    state = Server()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            with state.lock:
                state.requests.append(
                    (self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
            status, kind, extra, reply = 200, "application/json", {}, b'{"requestId": "ep-1"}'
            if self.path == "/json":
                extra = {"Set-Cookie": "session=abc; Path=/"}
            elif self.path == "/moved":
                status, extra, reply = 302, {"Location": "/json"}, b""
            elif self.path == "/big":
                reply = b'{"requestId": "ep-big", "pad": "' + b"x" * BIG + b'"}'
            elif self.path == "/refuse":
                status, kind, reply = 500, "text/plain", b"refused " + b"y" * BIG
            elif self.path == "/slow":
                time.sleep(2)
            self.send_response(status)
            for name, value in {"Content-Type": kind, **extra}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        do_GET = do_POST = answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    with serving(Handler) as base:
        state.base = base
        yield state


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def call(url: str, **fields: Any) -> HttpAction:
    return HttpAction(url=url, **fields)  # type: ignore[arg-type]


async def test_an_http_run_is_signed_keeps_the_request_id_and_follows_no_redirect(server: Server) -> None:
    async with open_session(4) as session:
        executor = HttpExecutor(session)
        body = '{"event": "tick"}'
        signed = call(f"{server.base}/json", method="POST", body=body, webhook_secret=SECRET)
        result = await executor.run(signed, 5, RUN)
        assert (result.status, result.http_status, result.endpoint_request_id) == (
            RunStatus.SUCCEEDED,
            200,
            "ep-1",
        )
        [(_, _, headers, sent)] = server.seen("/json")
        assert sent == body.encode() and headers["x-request-id"] == RUN.run_id
        assert headers["webhook-id"] == RUN.run_id
        assert verify_standard_webhook(SECRET, headers, sent)
        assert "content-type" not in headers  # none set by the job, none added

        # The cookie the endpoint set is not sent back: runs of unrelated jobs share the session.
        again = await executor.run(call(f"{server.base}/json", headers={"X-Job": "other"}), 5, RUN)
        assert again.status is RunStatus.SUCCEEDED
        assert "cookie" not in server.seen("/json")[1][2]
        assert "webhook-signature" not in server.seen("/json")[1][2]

        moved = await executor.run(call(f"{server.base}/moved"), 5, RUN)
        assert (moved.status, moved.http_status, moved.error) == (
            RunStatus.FAILED,
            302,
            "HTTP 302, expected 200, 201, 202, 204",
        )
        assert len(server.seen("/json")) == 2  # the redirect was not followed


async def test_a_large_answer_is_kept_as_a_tail_and_its_request_id_is_not_read(server: Server) -> None:
    async with open_session(4) as session:
        result = await HttpExecutor(session).run(call(f"{server.base}/big"), 5, RUN)
    assert result.status is RunStatus.SUCCEEDED and result.endpoint_request_id is None
    assert result.output_tail is not None and result.output_tail.endswith('xxx"}')
    assert len(result.output_tail) < BIG


async def test_an_http_run_that_times_out_or_cannot_connect_says_so(server: Server) -> None:
    async with open_session(4) as session:
        executor = HttpExecutor(session)
        slow = await executor.run(call(f"{server.base}/slow"), 0.3, RUN)
        refused = await executor.run(call(f"http://127.0.0.1:{closed_port()}/x"), 5, RUN)
    assert (slow.status, slow.error) == (RunStatus.TIMED_OUT, "no complete response within 0.3s")
    assert refused.status is RunStatus.FAILED
    assert refused.error is not None and refused.error.startswith("ConnectError: ")


async def test_an_alert_post_reads_a_bounded_answer_and_says_why_it_failed(server: Server) -> None:
    body = orjson.dumps({"text": "hello"})
    async with open_session(4) as session:
        await post_json(session, f"{server.base}/json", body, timeout=5)
        [(method, _, headers, sent)] = server.seen("/json")
        assert (method, sent, headers["content-type"]) == ("POST", body, "application/json")

        with pytest.raises(DeliveryFailed) as moved:
            await post_json(session, f"{server.base}/moved", body, timeout=5)
        assert moved.value.reason == "127.0.0.1: HTTP 302 (a redirect: configure the final URL)"
        assert not moved.value.retryable and len(server.seen("/json")) == 1

        with pytest.raises(DeliveryFailed) as refused:
            await post_json(session, f"{server.base}/refuse", body, timeout=5)
        assert refused.value.retryable and refused.value.reason.startswith("127.0.0.1: HTTP 500: refused yyy")
        assert len(refused.value.reason) < 300

        with pytest.raises(DeliveryFailed) as slow:
            await post_json(session, f"{server.base}/slow", body, timeout=0.3)
        assert slow.value.reason == "127.0.0.1: no answer within 0.3s (TimeoutError)"

        secret_url = f"http://127.0.0.1:{closed_port()}/services/T0/B0/token-abc"
        with pytest.raises(DeliveryFailed) as down:
            await post_json(session, secret_url, body, timeout=5)
        assert down.value.retryable and down.value.reason.startswith("127.0.0.1: ConnectError: ")
        assert "token-abc" not in down.value.reason
