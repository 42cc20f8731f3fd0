"""``cronfleet doctor --quick``, the health check of every container and unit in deploy/: it
passes on a healthy fleet, and fails in one line when the keys do not fit the process, the store
is not at this code's schema, or the broker does not answer in time."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.settings import Settings
from tests.fleet import cronfleet

WORKER_KEYS = "trigger:t:ed25519-public:" + "A" * 43 + ",event:e:worker-event-secret-0123456789"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel completes them) and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


@pytest.mark.both_stores
def test_quick_doctor_passes_on_a_healthy_fleet_and_reads_no_job(settings: Settings) -> None:
    result = cronfleet(settings, "doctor", "--quick", "--role", "worker", CRONFLEET_KEYS=WORKER_KEYS)
    assert result.returncode == 0, result.stdout
    lines = result.stdout.splitlines()
    assert lines[0] == "ok    keys: 2 key(s), fit for a worker"
    assert lines[1].startswith("ok    store: ") and "(head)" in lines[1]
    assert "job(s)" not in result.stdout  # the full doctor's job scan is skipped
    assert lines[2].startswith("ok    broker: RabbitMQ at ") and "accepts a connection" in lines[2]
    assert lines[-1] == "all good"


@pytest.mark.parametrize(
    ("role", "keys", "said"),
    [
        ("scheduler", WORKER_KEYS, "a scheduler signs trigger messages and has no trigger key that can sign"),
        ("worker", "event:e:worker-event-secret-0123456789", "a worker verifies trigger messages"),
        ("monitor", "trigger:t:trigger-secret-0123456789", "a monitor verifies event messages"),
    ],
)
def test_quick_doctor_fails_when_the_keys_do_not_fit_the_role(
    settings: Settings, role: str, keys: str, said: str
) -> None:
    result = cronfleet(settings, "doctor", "--quick", "--role", role, CRONFLEET_KEYS=keys)
    assert result.returncode == 1
    keys_line = result.stdout.splitlines()[0]
    assert keys_line.startswith("FAIL  keys: ") and said in keys_line, keys_line
    assert "secret" not in result.stdout


def test_quick_doctor_fails_on_a_store_without_the_schema(settings: Settings, tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    result = cronfleet(settings, "doctor", "--quick", CRONFLEET_DATABASE_URL=f"sqlite:///{empty}")
    assert result.returncode == 1
    assert "FAIL  store: " in result.stdout and "run `cronfleet db upgrade`" in result.stdout


def test_quick_doctor_gives_up_on_a_broker_that_never_answers(settings: Settings, silent_port: int) -> None:
    result = cronfleet(
        settings,
        "doctor",
        "--quick",
        "--timeout",
        "0.5",
        CRONFLEET_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{silent_port}/",
    )
    assert result.returncode == 1
    assert "FAIL  broker: no answer within 0.5 s" in result.stdout
    assert result.stdout.splitlines()[-1] == "1 problem(s) found"


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    from common.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"cronfleet {version('cronfleet')}"


def test_quick_doctor_names_a_refused_broker_without_its_password(settings: Settings) -> None:
    result = cronfleet(
        settings, "doctor", "--quick", CRONFLEET_AMQP_URL="amqp://guest:hunter2pw@127.0.0.1:1/"
    )
    assert result.returncode == 1
    assert "FAIL  broker: cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/" in result.stdout
    assert "hunter2pw" not in result.stdout + result.stderr
