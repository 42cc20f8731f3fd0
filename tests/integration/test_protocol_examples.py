"""docs/protocol.md's worked examples, run as they are written against the real broker, and
judged by what a real monitor recorded (issue 13): the doc is the single source, each example
taken from between its markers."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from common.settings import Settings
from common.store import Store
from tests.conftest import AMQP_URL, Start
from tests.fleet import eventually
from tests.integration.helpers import runs_of

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
# As an operator writes it: a comment, entries on lines and after commas.
KEYS = """# fleet keys
event:e1:test-event-secret-one-0123456789   # the monitor's
ping:p1:test-ping-secret-one-0123456789, trigger:t1:test-trigger-secret-one-0123456789
"""


def example(name: str, fence: str) -> str:
    """The code of the ``fence`` block between ``<!-- name:begin -->`` and ``<!-- name:end -->``."""
    text = DOC.read_text()
    block = text[text.index(f"<!-- {name}:begin -->") : text.index(f"<!-- {name}:end -->")]
    return block.split(f"```{fence}\n", 1)[1].rsplit("```", 1)[0]


async def run(
    argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``argv`` run to its end (two minutes at most), off the event loop the monitor runs on."""
    return await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=120, env=env, cwd=cwd, check=False
    )


def environment(settings: Settings) -> dict[str, str]:
    variables = {k: v for k, v in os.environ.items() if not k.startswith("CRONFLEET_")}
    # amqp://.../ as cronfleet reads it: the default vhost.
    return {**variables, "CRONFLEET_AMQP_URL": AMQP_URL, "CRONFLEET_NAMESPACE": settings.namespace}


@pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("amqp-publish", "jq", "openssl")),
    reason="needs amqp-publish (amqp-tools), jq and openssl",
)
async def test_the_shell_heartbeat_is_recorded_by_the_monitor(
    settings: Settings, store: Store, fleet: Start, tmp_path: Path
) -> None:
    await fleet("monitor")
    script = tmp_path / "cronfleet-heartbeat"
    script.write_text(example("shell-heartbeat", "sh"))
    env = {**environment(settings), "CRONFLEET_KEYS": KEYS}
    for args in (["nightly-report", "start"], ["nightly-report", "fail", "3"]):
        sent = await run(["sh", str(script), *args], env=env)
        assert sent.returncode == 0, sent.stderr
    runs = await eventually(lambda: runs_of(store, "nightly-report", status="failed"))
    assert [run.exit_code for run in runs] == [3]


@pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None, reason="needs node and npm")
async def test_the_node_heartbeat_is_recorded_by_the_monitor(
    settings: Settings, store: Store, fleet: Start, tmp_path: Path
) -> None:
    """With only what the example says to install: ``npm install amqplib``."""
    installed = await run(["npm", "install", "--prefix", str(tmp_path), "--no-audit", "--no-fund", "amqplib"])
    if installed.returncode != 0:
        pytest.skip(f"npm could not install amqplib (no registry?): {installed.stderr.strip()[-300:]}")
    await fleet("monitor")
    script = tmp_path / "heartbeat.mjs"
    script.write_text(example("node-heartbeat", "js"))
    env = {**environment(settings), "CRONFLEET_KEYS": KEYS}
    for args in (["nightly-report", "start"], ["nightly-report", "fail", "3"]):
        sent = await run(["node", str(script), *args], env=env, cwd=tmp_path)
        assert sent.returncode == 0, sent.stderr
    runs = await eventually(lambda: runs_of(store, "nightly-report", status="failed"))
    assert [run.exit_code for run in runs] == [3]
