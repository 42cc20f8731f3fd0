"""The ``cronfleet`` command as a user runs it: real broker, real store, and its main called in
this process (tests.fleet.cronfleet) except where the installed command itself is the point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from common.settings import Settings
from common.signing import Keyring, Role, SignatureCheck
from common.store import Store
from tests.conftest import Start
from tests.fleet import cronfleet, eventually, run_cronfleet
from tests.integration.helpers import runs_of

JOBS = """
[jobs.alpha]
schedule = "*/5 * * * *"
action = { type = "shell", argv = ["true"] }

[jobs.beta]
schedule = "@daily"
timezone = "Asia/Tokyo"
"""


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.both_stores
def test_apply_prints_the_diff_and_is_idempotent(settings: Settings, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(JOBS)
    first = cronfleet(settings, "apply", str(jobs))
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == ["added: alpha", "added: beta"]
    again = cronfleet(settings, "apply", str(jobs))
    assert again.stdout.strip() == "no changes (2 job(s) up to date)"

    jobs.write_text(
        JOBS.replace("*/5", "*/10").split("[jobs.beta]")[0] + '[jobs.gamma]\nschedule = "@hourly"\n'
    )
    dry = cronfleet(settings, "apply", "--dry-run", str(jobs))
    assert dry.stdout.splitlines() == [
        "would be added: gamma",
        "would be changed: alpha",
        "would be removed: beta",
    ]
    changed = cronfleet(settings, "apply", str(jobs))
    assert changed.stdout.splitlines() == ["added: gamma", "changed: alpha", "removed: beta"]

    listed = cronfleet(settings, "jobs", "--json")
    rows = orjson.loads(listed.stdout)
    assert [(r["name"], r["schedule"], r["action"]) for r in rows] == [
        ("alpha", "*/10 * * * *", "shell"),
        ("gamma", "@hourly", "heartbeat"),
    ]
    table = cronfleet(settings, "jobs")
    assert table.stdout.splitlines()[0].split() == [
        "NAME",
        "SCHEDULE",
        "TIMEZONE",
        "ACTION",
        "POOL",
        "ENABLED",
    ]


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        (
            'schedule = "61 * * * *"',
            ":3: job 'bad', field schedule: '61 * * * *' is not a valid cron expression",
        ),
        (
            'schedule = "* * * * *"\ntimezone = "Mars/Olympus"',
            ":4: job 'bad', field timezone: unknown time zone",
        ),
        ('schedule = "* * * * *"\ntimout_seconds = 5', ":4: job 'bad', field timout_seconds: unknown field"),
        (
            'schedule = "* * * * *"\n[jobs.bad.action]\ntype = "shell"\nargv = []',
            ":6: job 'bad', field action.argv: List should have at least 1 item",
        ),
        ('schedule = "* * * * *"\naction = { type = "ftp" }', ":4: job 'bad', field action: "),
        ("timezone = 'UTC'", ":2: job 'bad', field schedule: a job needs a schedule (cron) or every"),
    ],
)
def test_a_bad_jobs_file_names_line_job_and_field_and_changes_nothing(
    settings: Settings, tmp_path: Path, snippet: str, expected: str
) -> None:
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(JOBS)
    assert cronfleet(settings, "apply", str(jobs)).returncode == 0
    jobs.write_text("\n[jobs.bad]\n" + snippet + "\n" + JOBS.replace("alpha", "alpha2"))
    result = cronfleet(settings, "apply", str(jobs))
    assert result.returncode == 2
    no_traceback(result)
    assert result.stderr.startswith(f"cronfleet: {jobs}{expected}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    rows = orjson.loads(cronfleet(settings, "jobs", "--json").stdout)
    assert [r["name"] for r in rows] == ["alpha", "beta"]


def test_a_file_that_is_not_toml_is_one_clear_line(settings: Settings, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.toml"
    jobs.write_text("[jobs.x\nschedule = 1\n")
    result = cronfleet(settings, "apply", str(jobs))
    assert result.returncode == 2
    no_traceback(result)
    assert "not valid TOML" in result.stderr and "line 1" in result.stderr
    missing = cronfleet(settings, "apply", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


async def test_trigger_runs_a_job_now_and_runs_and_status_show_it(
    settings: Settings, store: Store, fleet: Start, tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(
        '[jobs.manual]\nschedule = "0 0 1 1 *"\naction = { type = "shell", argv = ["sh", "-c", "exit 7"] }\n'
    )
    assert (await run_cronfleet(settings, "apply", str(jobs))).returncode == 0
    await fleet("monitor", "worker")
    triggered = await run_cronfleet(settings, "trigger", "manual")
    assert triggered.returncode == 0, triggered.stderr
    assert triggered.stdout.startswith("triggered manual@")
    await eventually(lambda: runs_of(store, "manual", status="failed"))

    runs = orjson.loads((await run_cronfleet(settings, "runs", "manual", "--json")).stdout)
    assert runs[0]["status"] == "failed" and runs[0]["exit_code"] == 7
    status = await run_cronfleet(settings, "status", "--json")
    assert status.returncode == 1  # a failing job makes `status` fail, for scripts and probes
    assert orjson.loads(status.stdout)["jobs"][0]["health"] == "failing"

    unknown = await run_cronfleet(settings, "trigger", "nope")
    assert (
        unknown.returncode == 1
        and unknown.stderr.strip() == "cronfleet: no job called 'nope' (see `cronfleet jobs`)"
    )


async def test_ping_publishes_a_signed_heartbeat(settings: Settings, store: Store, fleet: Start) -> None:
    await fleet("monitor")
    assert (await run_cronfleet(settings, "ping", "outside", "--start")).returncode == 0
    result = await run_cronfleet(settings, "ping", "outside", "--exit-code", "4", "--message", "disk full")
    assert result.returncode == 0 and result.stdout.strip() == "sent fail heartbeat for outside"
    runs = await eventually(lambda: runs_of(store, "outside", status="failed"))
    assert runs[0].exit_code == 4 and runs[0].output_tail == "disk full"
    bad = await run_cronfleet(settings, "ping", "no spaces allowed")
    assert bad.returncode == 1
    no_traceback(bad)


@pytest.mark.both_stores
def test_doctor_says_what_is_wrong_in_plain_words(settings: Settings) -> None:
    healthy = cronfleet(settings, "doctor")
    assert healthy.returncode == 0, healthy.stdout
    assert "all good" in healthy.stdout and "WARN" not in healthy.stdout
    assert "ok    keys: 6 key(s)" in healthy.stdout
    assert "    trigger: signed with trigger key 't1' (hmac-sha256); 2 verify:" in healthy.stdout
    assert "    ping: signed with ping key 'p1' (hmac-sha256); 4 verify:" in healthy.stdout
    assert "test-trigger-secret" not in healthy.stdout

    # A key without a role works, and is reported as a warning, not as a failure.
    legacy = cronfleet(settings, "doctor", CRONFLEET_KEYS="old:old-secret-0123456789abcdef")
    assert legacy.returncode == 0, legacy.stdout
    assert "WARN  keys: 'old' has no role" in legacy.stdout
    assert "all good (1 warning(s))" in legacy.stdout
    assert "old-secret" not in legacy.stdout + legacy.stderr
    workers = cronfleet(settings, "doctor", CRONFLEET_KEYS="trigger:t:ed25519-public:" + "A" * 43)
    assert workers.returncode == 0, workers.stdout
    assert "trigger: no key here can sign" in workers.stdout
    assert "trigger key 't' (ed25519, public only)" in workers.stdout

    broken = cronfleet(
        settings, "doctor", CRONFLEET_AMQP_URL="amqp://guest:hunter2pw@127.0.0.1:1/", CRONFLEET_KEYS=""
    )
    assert broken.returncode == 1
    no_traceback(broken)
    assert "FAIL  keys: no signing key" in broken.stdout
    assert "FAIL  broker: cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/" in broken.stdout
    assert "hunter2pw" not in broken.stdout


def test_a_process_without_keys_or_broker_fails_in_one_line(settings: Settings) -> None:
    no_keys = cronfleet(settings, "worker", CRONFLEET_KEYS="")
    assert no_keys.returncode == 1
    assert no_keys.stderr.strip().startswith("cronfleet: no signing key")
    weak = cronfleet(settings, "ping", "x", CRONFLEET_KEYS="k:tiny-pw")
    assert weak.returncode == 1 and "too short" in weak.stderr
    assert "tiny-pw" not in weak.stderr
    no_broker = cronfleet(settings, "ping", "x", CRONFLEET_AMQP_URL="amqp://guest:guest@127.0.0.1:1/")
    assert no_broker.returncode == 1
    no_traceback(no_broker)
    assert no_broker.stderr.strip().startswith(
        "cronfleet: cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/"
    )
    bad_setting = cronfleet(settings, "jobs", CRONFLEET_HEARTBEAT_SECONDS="soon")
    assert bad_setting.returncode == 1
    assert bad_setting.stderr.startswith("cronfleet: bad setting CRONFLEET_HEARTBEAT_SECONDS")


def test_keys_new_prints_a_key_of_the_role_asked_for(settings: Settings) -> None:
    for role in ("trigger", "event", "ping"):
        result = cronfleet(settings, "keys", "new", "--role", role, "--id", "2026-11")
        got_role, key_id, secret = result.stdout.strip().split(":")
        assert (got_role, key_id) == (role, "2026-11") and len(secret) >= 32
        assert Keyring.parse(result.stdout).signer(Role(role)).id == "2026-11"
    limited = cronfleet(settings, "keys", "new", "--role", "ping", "--jobs", "backup, report")
    assert limited.stdout.strip().endswith(":jobs=backup+report")
    assert Keyring.parse(limited.stdout).keys[0].jobs == {"backup", "report"}

    # An Ed25519 pair: the private entry for schedulers, the public one for workers, each said.
    pair = cronfleet(settings, "keys", "new", "--role", "trigger", "--ed25519", "--id", "t-ed")
    assert pair.returncode == 0, pair.stderr
    lines = pair.stdout.splitlines()
    assert [line.startswith("#") for line in lines] == [True, False, True, False]
    assert "schedulers" in lines[0] and "workers" in lines[2]
    private, public = Keyring.parse(lines[1]), Keyring.parse(lines[3])
    headers = private.sign(Role.TRIGGER, "ns", "default", b"{}")
    assert public.check("ns", "default", b"{}", headers).outcome is SignatureCheck.VALID
    assert not public.keys[0].can_sign
    assert Keyring.parse(pair.stdout.replace(lines[3], "")).keys[0].can_sign  # pasted whole, minus one

    # The role is required, and each option fits its role.
    no_role = cronfleet(settings, "keys", "new")
    assert no_role.returncode == 2 and "--role {trigger,event,ping}" in no_role.stderr
    wrong = cronfleet(settings, "keys", "new", "--role", "event", "--ed25519")
    assert wrong.returncode == 1 and wrong.stderr.strip() == (
        "cronfleet: --ed25519 is for trigger keys only (--role trigger)"
    )
    wrong = cronfleet(settings, "keys", "new", "--role", "trigger", "--jobs", "a")
    assert wrong.returncode == 1 and "--jobs limits ping keys only" in wrong.stderr
    bad_id = cronfleet(settings, "keys", "new", "--role", "event", "--id", "no spaces")
    assert bad_id.returncode == 1 and "has no id of 1 to 64 letters" in bad_id.stderr
    no_traceback(bad_id)


def test_the_installed_command_runs_in_a_process_of_its_own(settings: Settings, tmp_path: Path) -> None:
    # Every other test calls the command line's main in this process; this one runs the console
    # script a user runs, so that its entry point stays covered.
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(JOBS)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CRONFLEET_")}
    environment |= {
        "CRONFLEET_AMQP_URL": settings.amqp_url,
        "CRONFLEET_DATABASE_URL": settings.database_url,
        "CRONFLEET_KEYS": settings.keys,
        "CRONFLEET_NAMESPACE": settings.namespace,
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [str(Path(sys.executable).parent / "cronfleet"), *args]
        return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=60)

    applied = run("apply", str(jobs))
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.splitlines() == ["added: alpha", "added: beta"]
    listed = run("jobs", "--json")
    assert [r["name"] for r in orjson.loads(listed.stdout)] == ["alpha", "beta"]


def test_usage_errors_and_help_end_as_the_commands_exit_status(settings: Settings) -> None:
    usage = cronfleet(settings, "runs", "--limit", "many")
    assert usage.returncode == 2 and "invalid int value: 'many'" in usage.stderr
    helped = cronfleet(settings, "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: cronfleet")


def test_a_command_sees_the_fleets_settings_and_no_others(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An outer CRONFLEET_* variable the fleet does not set would break the command if it saw it.
    monkeypatch.setenv("CRONFLEET_HEARTBEAT_SECONDS", "soon")
    monkeypatch.delenv("CRONFLEET_DRAIN_SECONDS", raising=False)
    outer = dict(os.environ)
    assert cronfleet(settings, "jobs").returncode == 0
    assert cronfleet(settings, "jobs", CRONFLEET_DRAIN_SECONDS="never").returncode == 1
    assert dict(os.environ) == outer
