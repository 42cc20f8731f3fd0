"""``deploy/dev demo`` stops everything it started, however it is stopped: a service manager's
SIGTERM, a closed terminal's SIGHUP, or Ctrl-C (SIGINT to the terminal's foreground group)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from common.settings import Settings
from tests.fleet import eventually

ROOT = Path(__file__).resolve().parents[2]
READY = ("monitor", "consuming"), ("worker", "consuming pool"), ("scheduler", "planning")


@pytest.fixture(autouse=True)
def _demo_needs_no_install() -> None:
    # deploy/dev reinstalls .venv when pyproject.toml changed since its last install; a test must
    # not do that to the venv it runs in (`deploy/dev test` brings it up to date first).
    stamp = ROOT / ".venv" / ".cronfleet-installed"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text().strip() != wanted:
        pytest.skip("deploy/dev would reinstall .venv first: run `deploy/dev test` to bring it up to date")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _processes_of_session(session: int) -> dict[int, str]:
    """Every live (not zombie) process of ``session``, with its command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        # Fields after the command name, which is in parentheses and may hold anything.
        fields = stat[stat.rindex(")") + 2 :].split()
        state, sid = fields[0], int(fields[3])
        if sid == session and state != "Z":
            found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


@contextlib.contextmanager
def _demo(settings: Settings, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``deploy/dev demo`` in a session of its own, on the test's namespace and store; whatever
    of it is left when the test ends is killed."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CRONFLEET_")}
    environment |= {
        "CRONFLEET_AMQP_URL": settings.amqp_url,
        "CRONFLEET_DATABASE_URL": settings.database_url,
        "CRONFLEET_KEYS": settings.keys,
        "CRONFLEET_NAMESPACE": settings.namespace,
        "CRONFLEET_DEMO_PORT": str(_free_port()),
        "CRONFLEET_DEMO_HTTP_PORT": str(_free_port()),
    }
    if settings.database_schema:
        environment["CRONFLEET_DATABASE_SCHEMA"] = settings.database_schema
    with log.open("wb") as output:
        demo = subprocess.Popen(
            [str(ROOT / "deploy" / "dev"), "demo"],
            cwd=ROOT,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield demo
    finally:
        for pid in _processes_of_session(demo.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        demo.wait()


@pytest.mark.parametrize(
    ("sig", "to_group"),
    [(signal.SIGTERM, False), (signal.SIGHUP, False), (signal.SIGINT, True)],
    ids=["sigterm", "sighup", "ctrl-c"],
)
async def test_the_demo_stops_its_fleet_and_web_server_however_it_is_stopped(
    settings: Settings, tmp_path: Path, sig: signal.Signals, to_group: bool
) -> None:
    log = tmp_path / "demo.log"
    with _demo(settings, log) as demo:

        async def started() -> bool:
            text = log.read_text(errors="replace")
            commands = " ".join(_processes_of_session(demo.pid).values())
            assert demo.poll() is None, text
            return (
                all(any(a in line and b in line for line in text.splitlines()) for a, b in READY)
                and "http.server" in commands
                and "cronfleet run" in commands
                and "monitor HTTP on http://127.0.0.1:" in text
            )

        await eventually(started, timeout=60)
        # `run --http`: the monitor's HTTP interface answers (the dashboard's OpenAPI document).
        served = re.search(r"monitor HTTP on (http://127\.0\.0\.1:\d+/)", log.read_text(errors="replace"))
        assert served is not None
        async with httpx.AsyncClient(trust_env=False) as client:
            document = await client.get(served.group(1) + "openapi.json")
        assert document.status_code == 200 and document.json()["info"]["title"] == "cronfleet monitor"
        # SIGTERM and SIGHUP go to the shell alone, as a service manager or a parent sends them;
        # a terminal's Ctrl-C goes to its whole foreground process group.
        if to_group:
            os.killpg(demo.pid, sig)
        else:
            os.kill(demo.pid, sig)

        async def nothing_left() -> bool:
            return not _processes_of_session(demo.pid)

        try:
            await eventually(nothing_left, timeout=60)
        except AssertionError:
            left = _processes_of_session(demo.pid)
            pytest.fail(f"still running after {sig.name}: {left}\n{log.read_text(errors='replace')}")
        text = log.read_text(errors="replace")
        assert demo.wait() == 0, text
        assert "Traceback" not in text, text
