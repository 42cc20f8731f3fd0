"""Alert channels' pure parts: which channels hear about a job, how long a failed delivery waits,
what a channels file may say (and the one line a bad one gets), and that no secret ever shows."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.errors import ConfigError
from common.webhooks import sign, signed_headers, webhook_key
from monitor.alerts import alert_id, flip_of
from monitor.channels import (
    Alert,
    RetryPolicy,
    Routes,
    build_channels,
    needs_alert,
    parse_channels,
    retry_delay,
    retry_schedule,
    route,
)
from monitor.channels.base import group_title
from monitor.channels.config import EmailSettings, WebhookSettings
from monitor.channels.discord import discord_group_message, discord_message
from monitor.channels.email import email_message
from monitor.channels.http import retry_after_seconds
from monitor.channels.log import LogChannel, log_line
from monitor.channels.slack import slack_group_message, slack_message
from monitor.channels.webhook import webhook_body
from monitor.health import Flip, State

NOW = datetime(2026, 3, 1, 3, 1, 0, tzinfo=UTC)
HOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SLACK_URL = "https://hooks.slack.com/services/T0SECRET/B0SECRET/slack-token-123"
SMTP_PASSWORD = "smtp-pa55word-xyz"

FILE = f"""
[channels.ops-hook]
type = "webhook"
url = "https://alerts.example.com/cronfleet?token=hook-token-456"
secret = "{HOOK_SECRET}"
headers = {{ Authorization = "Bearer header-token-789" }}

[channels.ops-slack]
type = "slack"
url = "{SLACK_URL}"

[channels.ops-discord]
type = "discord"
url = "https://discord.com/api/webhooks/1/discord-token-000"

[channels.ops-email]
type = "email"
host = "smtp.example.com"
username = "cronfleet"
password = "{SMTP_PASSWORD}"
sender = "cronfleet@example.com"
to = ["ops@example.com", "oncall@example.com"]

[routes]
default = ["ops-slack"]

[routes.jobs]
backup = ["ops-email", "ops-slack"]
quiet = []

[delivery]
attempts = 4
first_delay_seconds = 1
"""
SECRETS = [
    "hook-token-456",
    HOOK_SECRET,
    "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "header-token-789",
    "slack-token-123",
    "T0SECRET",
    "discord-token-000",
    SMTP_PASSWORD,
]


def alert(**changes: object) -> Alert:
    fields: dict[str, object] = {
        "job": "backup",
        "from_state": "running",
        "to_state": "failing",
        "reason": "run r1 failed (exit 3): 1 failed run(s) in a row",
        "at": NOW,
        "flip_id": "flip-42",
        "fleet": "prod",
    }
    fields.update(changes)
    return Alert(**fields)  # type: ignore[arg-type]


# Routing ---------------------------------------------------------------------------------------


def test_a_job_with_its_own_route_goes_there_and_others_to_the_default() -> None:
    routes = Routes(default=["ops-slack"], jobs={"backup": ["ops-email", "ops-slack"], "quiet": []})
    assert route(routes, "backup") == ("ops-email", "ops-slack")
    assert route(routes, "report") == ("ops-slack",)
    assert route(routes, "quiet") == ()


def test_without_routes_alerts_go_to_the_log() -> None:
    assert route(Routes(), "anything") == ("log",)


def test_a_channel_named_twice_in_a_route_gets_the_alert_once() -> None:
    assert route(Routes(default=["a", "b", "a"]), "job") == ("a", "b")


@pytest.mark.parametrize(
    ("flip", "told"),
    [
        (Flip(NOW, State.RUNNING, State.FAILING, "failed"), True),
        (Flip(NOW, State.LATE, State.DOWN, "no run"), True),
        (Flip(NOW, State.RUNNING, State.STUCK, "too long"), True),
        (Flip(NOW, State.RUNNING, State.UP, "ok", recovered_from=State.DOWN), True),
        (Flip(NOW, State.RUNNING, State.UP, "ok"), False),
        (Flip(NOW, State.UP, State.LATE, "due"), False),
        (Flip(NOW, State.LATE, State.RUNNING, "started"), False),
        (Flip(NOW, State.UP, State.PAUSED, "disabled"), False),
    ],
)
def test_alarms_and_recoveries_are_told_and_nothing_else(flip: Flip, told: bool) -> None:
    assert needs_alert(flip) is told


def test_an_alert_from_a_recovery_flip() -> None:
    flip = Flip(NOW, State.RUNNING, State.UP, "run r2 succeeded", recovered_from=State.DOWN)
    made = Alert.from_flip(
        flip, job="backup", flip_id="f-7", fleet="prod", link="https://cf.example/j/backup"
    )
    assert (made.kind, made.from_state, made.to_state, made.recovered_from) == (
        "recovery",
        "running",
        "up",
        "down",
    )
    assert made.title() == "[prod] backup recovered: up again after down"


# Backoff ---------------------------------------------------------------------------------------


def test_the_delay_doubles_from_the_first_and_stops_at_the_cap() -> None:
    policy = RetryPolicy(attempts=8, first_delay_seconds=2, max_delay_seconds=30)
    assert retry_schedule(policy) == [2, 4, 8, 16, 30, 30, 30]


def test_one_attempt_means_no_retry() -> None:
    assert retry_schedule(RetryPolicy(attempts=1)) == []


def test_a_receivers_retry_after_stretches_the_delay_within_the_cap() -> None:
    policy = RetryPolicy(first_delay_seconds=1, max_delay_seconds=60)
    assert retry_delay(policy, 1, retry_after=10) == 10
    assert retry_delay(policy, 1, retry_after=0.5) == 1
    assert retry_delay(policy, 1, retry_after=3600) == 60


@given(st.integers(min_value=1, max_value=10_000), st.floats(min_value=0.001, max_value=86_400))
def test_delays_never_shrink_and_never_pass_the_cap(attempt: int, first: float) -> None:
    policy = RetryPolicy(first_delay_seconds=first, max_delay_seconds=600)
    assert 0 < retry_delay(policy, attempt) <= retry_delay(policy, attempt + 1) <= 600


def test_attempts_are_numbered_from_one() -> None:
    with pytest.raises(ValueError, match="from 1"):
        retry_delay(RetryPolicy(), 0)


@pytest.mark.parametrize(
    ("header", "seconds"), [("5", 5.0), ("0.25", 0.25), (None, None), ("Wed, 21 Oct 2015 07:28:00 GMT", None)]
)
def test_retry_after_is_read_as_seconds(header: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(header) == seconds


@pytest.mark.parametrize("header", ["nan", "inf", "-1", "1e99"])
def test_an_absurd_retry_after_is_ignored(header: str) -> None:
    assert retry_after_seconds(header) is None


# The channels file -----------------------------------------------------------------------------


def test_a_full_file_is_read() -> None:
    config = parse_channels(FILE, "channels.toml")
    assert sorted(config.channels) == ["log", "ops-discord", "ops-email", "ops-hook", "ops-slack"]
    assert config.routes.default == ["ops-slack"]
    assert config.routes.jobs == {"backup": ["ops-email", "ops-slack"], "quiet": []}
    assert config.delivery == RetryPolicy(attempts=4, first_delay_seconds=1)
    email = config.channels["ops-email"]
    assert isinstance(email, EmailSettings)
    assert (email.port, email.security, email.to) == (
        587,
        "starttls",
        ["ops@example.com", "oncall@example.com"],
    )
    assert config.describe()[2] == {
        "name": "ops-email",
        "type": "email",
        "target": "smtp smtp.example.com:587 (starttls) to ops@example.com, oncall@example.com",
    }


def test_no_file_at_all_gives_the_log_channel_and_route() -> None:
    config = parse_channels("", "<none>")
    assert list(config.channels) == ["log"]
    assert route(config.routes, "x") == ("log",)


def test_channels_are_built_by_type() -> None:
    config = parse_channels(FILE, "channels.toml")
    built = build_channels(config, client=None)  # type: ignore[arg-type]  # nothing is sent here
    assert {name: channel.type for name, channel in built.items()} == {
        "ops-hook": "webhook",
        "ops-slack": "slack",
        "ops-discord": "discord",
        "ops-email": "email",
        "log": "log",
    }
    for channel in built.values():
        assert all(secret not in repr(channel) for secret in SECRETS)


@pytest.mark.parametrize(
    ("replace", "by", "expected"),
    [
        (
            f'url = "{SLACK_URL}"',
            'url = "ftp://hooks.slack.com/x"',
            "channels.toml:10: channel 'ops-slack', field url: an http:// or https:// URL with a host",
        ),
        (
            f'url = "{SLACK_URL}"',
            f'url = "{SLACK_URL}"\nchannel = "#ops"',
            "channels.toml:11: channel 'ops-slack', field channel: unknown field",
        ),
        (
            'type = "discord"',
            'type = "teams"',
            "channels.toml:13: channel 'ops-discord', field type: type must be one of webhook, slack, "
            "discord, email, log",
        ),
        (
            'sender = "cronfleet@example.com"\n',
            "",
            "channels.toml:16: channel 'ops-email', field sender: required field is missing",
        ),
        (
            'to = ["ops@example.com", "oncall@example.com"]',
            'to = ["ops@example.com", "not an address"]',
            "channels.toml:22: channel 'ops-email', field to.1: not an email address (name@example.com)",
        ),
        (
            f'password = "{SMTP_PASSWORD}"\n',
            "",
            "channels.toml:16: channel 'ops-email': set both username and password, or neither",
        ),
        (
            f'secret = "{HOOK_SECRET}"',
            'secret = "whsec_c2hvcnQ="',
            "channels.toml:5: channel 'ops-hook', field secret: the key is 5 bytes; "
            "use 24 to 64 random bytes",
        ),
        (
            f'secret = "{HOOK_SECRET}"',
            'secret = "plain-old-password-1234567890"',
            "channels.toml:5: channel 'ops-hook', field secret: a webhook secret starts with 'whsec_' "
            "(then the key in base64)",
        ),
        (
            'headers = { Authorization = "Bearer header-token-789" }',
            'headers = { webhook-signature = "v1,forged" }',
            "channels.toml:6: channel 'ops-hook', field headers: header 'webhook-signature' is set by "
            "cronfleet itself; remove it",
        ),
        (
            'default = ["ops-slack"]',
            'default = ["ops-slak"]',
            "channels.toml:25: routes.default: no channel 'ops-slak' (channels: log, ops-discord, ops-email, "
            "ops-hook, ops-slack)",
        ),
        (
            'backup = ["ops-email", "ops-slack"]',
            'backup = ["ops-email", "pager"]',
            "channels.toml:28: routes.jobs.backup: no channel 'pager' (channels: log, ops-discord, "
            "ops-email, ops-hook, ops-slack)",
        ),
        (
            "attempts = 4",
            "attempts = 0",
            "channels.toml:32: delivery, field attempts: Input should be greater than or equal to 1",
        ),
        (
            "attempts = 4",
            'attempts = "4"',
            "channels.toml:32: delivery, field attempts: Input should be a valid integer",
        ),
        (
            "[delivery]",
            "[delivry]",
            "channels.toml:31: unknown top-level key 'delivry'; use [channels.NAME], [routes] and [delivery]",
        ),
        (
            "[routes.jobs]",
            "[routes.jobs",
            "channels.toml:27:13: not valid TOML: Expected ']' at the end of a table declaration "
            "(at line 27, column 13)",
        ),
    ],
)
def test_a_bad_file_is_refused_in_one_line_naming_where(replace: str, by: str, expected: str) -> None:
    assert replace in FILE
    with pytest.raises(ConfigError) as refused:
        parse_channels(FILE.replace(replace, by, 1), "channels.toml")
    assert str(refused.value) == expected
    assert refused.value.__cause__ is None  # a pydantic error would carry the input: the secret


def test_a_bad_channel_name_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^c.toml:1: channel 'ops slack': use letters"):
        parse_channels('[channels."ops slack"]\ntype = "log"\n', "c.toml")


# The environment -------------------------------------------------------------------------------


def test_the_environment_overrides_a_secret_of_the_file() -> None:
    config = parse_channels(
        FILE,
        "channels.toml",
        {
            "CRONFLEET_CHANNEL_OPS_SLACK_URL": "https://hooks.slack.com/services/T1/B1/from-env",
            "CRONFLEET_CHANNEL_OPS_EMAIL_PASSWORD": "from-env-password",
            "CRONFLEET_CHANNEL_OPS_EMAIL_PORT": "465",
            "CRONFLEET_CHANNEL_OPS_EMAIL_SECURITY": "tls",
            "CRONFLEET_CHANNELS_FILE": "/etc/cronfleet/channels.toml",  # not a channel field
            "HOME": "/root",
        },
    )
    slack = config.channels["ops-slack"]
    email = config.channels["ops-email"]
    assert slack.url.get_secret_value().endswith("/from-env")  # type: ignore[union-attr]
    assert isinstance(email, EmailSettings)
    assert email.password is not None and email.password.get_secret_value() == "from-env-password"
    assert (email.port, email.security) == (465, "tls")


def test_the_environment_alone_defines_a_channel_and_the_default_route() -> None:
    config = parse_channels(
        "",
        "<none>",
        {
            "CRONFLEET_CHANNEL_PAGER_TYPE": "webhook",
            "CRONFLEET_CHANNEL_PAGER_URL": "https://pager.example.com/hook",
            "CRONFLEET_CHANNEL_PAGER_SECRET": HOOK_SECRET,
            "CRONFLEET_ALERTS_DEFAULT_ROUTE": "pager, log",
        },
    )
    assert isinstance(config.channels["pager"], WebhookSettings)
    assert route(config.routes, "any") == ("pager", "log")


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (
            {"CRONFLEET_CHANNEL_OPS_EMAIL_PORT": "smtp"},
            "environment CRONFLEET_CHANNEL_OPS_EMAIL_PORT: channel 'ops-email', field port: not an integer",
        ),
        (
            {"CRONFLEET_CHANNEL_OPS_SLACK_URL": "hooks.slack.com/secret-path"},
            "environment CRONFLEET_CHANNEL_OPS_SLACK_URL: channel 'ops-slack', field url: an http:// or "
            "https:// URL with a host",
        ),
        (
            {"CRONFLEET_CHANNEL_PAGER_URL": "https://pager.example.com/secret-path"},
            "environment CRONFLEET_CHANNEL_PAGER_URL: no channel 'pager' in channels.toml; set "
            "CRONFLEET_CHANNEL_PAGER_TYPE to define it in the environment",
        ),
        (
            {"CRONFLEET_CHANNEL_OPS_SLACK_WEBHOOK": "https://x.example.com/secret-path"},
            "environment CRONFLEET_CHANNEL_OPS_SLACK_WEBHOOK: not CRONFLEET_CHANNEL_<NAME>_<FIELD> "
            "with FIELD one of TYPE, URL, SECRET, HOST, PORT, SECURITY, USERNAME, PASSWORD, SENDER, TO, "
            "CA_FILE, TIMEOUT_SECONDS, LEVEL, GROUP",
        ),
        (
            {"CRONFLEET_ALERTS_DEFAULT_ROUTE": "ops-slack,nowhere"},
            "environment CRONFLEET_ALERTS_DEFAULT_ROUTE: routes.default: no channel 'nowhere' "
            "(channels: log, ops-discord, ops-email, ops-hook, ops-slack)",
        ),
    ],
)
def test_a_bad_variable_is_named_and_its_value_never_shown(environ: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_channels(FILE, "channels.toml", environ)
    assert str(refused.value) == expected
    assert "secret-path" not in str(refused.value)


# Secrets never show ----------------------------------------------------------------------------


def test_no_secret_in_repr_str_or_dump_of_the_config() -> None:
    config = parse_channels(FILE, "channels.toml")
    shown = [
        repr(config),
        str(config),
        str(config.model_dump()),
        config.model_dump_json(),
        str(config.describe()),
        *(repr(c) for c in config.channels.values()),
    ]
    for text in shown:
        for secret in SECRETS:
            assert secret not in text


@pytest.mark.parametrize(
    ("replace", "by"),
    [
        (f'url = "{SLACK_URL}"', 'url = "https://hooks.slack.com/secret-path-0001 x"'),
        (f'url = "{SLACK_URL}"', 'url = "hooks.slack.com/secret-path-0001"'),
        (f'url = "{SLACK_URL}"', 'url = "https://hooks.slack.com:99999/secret-path-0001"'),
        (f'secret = "{HOOK_SECRET}"', 'secret = "whsec_secret-path-0001!"'),
        (f'secret = "{HOOK_SECRET}"', 'secret = "secret-path-0001"'),
        (
            'headers = { Authorization = "Bearer header-token-789" }',
            'headers = { Authorization = " secret-path-0001" }',
        ),
        (f'password = "{SMTP_PASSWORD}"', "password = 1"),
    ],
)
def test_a_refused_secret_is_never_quoted(replace: str, by: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_channels(FILE.replace(replace, by), "channels.toml")
    assert "secret-path-0001" not in str(refused.value)
    assert refused.value.__cause__ is None


# What each channel says ------------------------------------------------------------------------


def test_the_standard_webhooks_test_vector() -> None:
    # Published with the Standard Webhooks specification: matching it means its libraries verify us.
    key = webhook_key(HOOK_SECRET)
    assert sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}') == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )
    headers = signed_headers(key, "flip-42", 1614265330, b"{}")
    assert sorted(headers) == ["webhook-id", "webhook-signature", "webhook-timestamp"]
    assert headers["webhook-timestamp"] == "1614265330"


def test_the_webhook_body_carries_every_fact() -> None:
    import orjson

    body = orjson.loads(webhook_body(alert(link="https://cf.example/jobs/backup")))
    assert body == {
        "type": "cronfleet.alarm",
        "timestamp": "2026-03-01T03:01:00Z",
        "data": {
            "id": "flip-42",
            "kind": "alarm",
            "fleet": "prod",
            "job": "backup",
            "from_state": "running",
            "to_state": "failing",
            "recovered_from": None,
            "reason": "run r1 failed (exit 3): 1 failed run(s) in a row",
            "at": "2026-03-01T03:01:00Z",
            "link": "https://cf.example/jobs/backup",
            "test": False,
        },
    }


def test_slack_text_cannot_mention_or_link() -> None:
    message = slack_message(alert(reason="<!channel> see <https://evil.example|here> & more"))
    assert message["text"] == "[prod] backup is FAILING (was running)"
    reason = message["blocks"][2]["text"]["text"]
    assert reason == "*Reason*\n&lt;!channel&gt; see &lt;https://evil.example|here&gt; &amp; more"


def test_discord_pings_nobody_and_colours_by_kind() -> None:
    message = discord_message(alert(reason="@everyone look"))
    assert message["allowed_mentions"] == {"parse": []}
    assert message["embeds"][0]["color"] == 0xD93F0B
    recovered = discord_message(alert(to_state="up", recovered_from="failing"))
    assert recovered["embeds"][0]["color"] == 0x2EA44F
    assert recovered["content"] == r"\[prod\] backup recovered: up again after failing"


def test_an_email_has_the_title_as_subject_and_every_fact_in_the_body() -> None:
    message = email_message(
        [alert(reason="line one\nSubject: injected")], "cf@example.com", ("ops@example.com",)
    )
    assert message["Subject"] == "[prod] backup is FAILING (was running)"
    assert message["X-Cronfleet-Flip"] == "flip-42"
    body = message.get_content()
    assert "Reason: line one Subject: injected" in body  # one line: no header can be forged
    assert "Job:    backup" in body


def test_the_log_line_is_one_line_of_key_values(caplog: pytest.LogCaptureFixture) -> None:
    line = log_line(alert(reason='exit 3: "boom"\nnext'))
    assert "\n" not in line
    assert line.startswith("alert kind=alarm job=backup from=running to=failing reason=")
    assert 'reason="exit 3: \\"boom\\"\\nnext"' in line


async def test_the_log_channel_logs_alarms_as_warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cronfleet.alerts")
    channel = LogChannel("log")
    await channel.send([alert()])
    await channel.send([alert(to_state="up", recovered_from="failing")])
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO]
    assert caplog.records[0].alert["job"] == "backup"  # type: ignore[attr-defined]


def test_an_alert_needs_an_aware_instant() -> None:
    with pytest.raises(ValueError, match="time zone"):
        alert(at=datetime(2026, 1, 1))


@given(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True),
    st.integers(min_value=1, max_value=2**63 - 1),
)
def test_an_alert_id_names_its_fleet_and_gives_its_flip_back(fleet: str, flip_id: int) -> None:
    made = alert_id(fleet, flip_id)
    assert made == f"{fleet}/flip-{flip_id}" and flip_of(made) == flip_id
    assert flip_of(f"{fleet}/test-0123abcd") is None


# Groups: several alerts in one message ----------------------------------------------------------


def test_a_group_title_counts_the_alerts_by_state() -> None:
    alerts = [
        alert(job="a", to_state="down"),
        alert(job="b", to_state="down"),
        alert(job="c", to_state="up", recovered_from="failing"),
    ]
    assert group_title(alerts) == "[prod] 3 alerts: 2 DOWN, 1 recovered"
    assert group_title(alerts[:1]) == alerts[0].title()


def test_a_full_discord_group_of_long_reasons_stays_within_discords_limits() -> None:
    alerts = [alert(job=f"job-{n}" + "x" * 120, reason="r" * 5000, link="https://e.x/j") for n in range(10)]
    message = discord_group_message(alerts)
    embeds = message["embeds"]
    assert len(embeds) == 10  # Discord's limit of embeds a message
    size = sum(len(e["title"]) + len(e["description"]) + len(e["footer"]["text"]) for e in embeds)
    assert size <= 6000  # and of characters across them
    assert message["allowed_mentions"] == {"parse": []}
    with pytest.raises(ValueError):
        discord_group_message([*alerts, alert()])
    assert discord_group_message(alerts[:1]) == discord_message(alerts[0])


def test_a_full_slack_group_stays_within_slacks_limits_and_escapes_job_text() -> None:
    alerts = [alert(job=f"job-{n}", reason="<!channel> & " + "r" * 5000) for n in range(45)]
    message = slack_group_message(alerts)
    assert len(message["blocks"]) == 46 <= 50  # a header and a section each
    texts = [b["text"]["text"] for b in message["blocks"][1:]]
    assert all(len(t) <= 3000 and "<!channel>" not in t and "&lt;!channel&gt; &amp;" in t for t in texts)
    assert slack_group_message(alerts[:1]) == slack_message(alerts[0])


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('type = "discord"\nurl = "https://d.example/h"\ngroup = 11', "field group: Input should be less"),
        ('type = "slack"\nurl = "https://s.example/h"\ngroup = 0', "field group: Input should be greater"),
    ],
)
def test_a_group_beyond_what_the_service_takes_is_refused_with_its_line(table: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=rf"^g.toml:4: channel 'x', {expected}"):
        parse_channels(f"[channels.x]\n{table}\n", "g.toml")


def test_each_channel_kind_has_its_default_group() -> None:
    config = parse_channels(FILE, "f.toml")
    groups = {name: s.group for name, s in config.channels.items()}
    wanted = {"ops-hook": 1, "ops-slack": 20, "ops-discord": 10, "ops-email": 50}
    assert {name: groups[name] for name in wanted} == wanted
    env = parse_channels(FILE, "f.toml", {"CRONFLEET_CHANNEL_OPS_HOOK_GROUP": "25"})
    assert env.channels["ops-hook"].group == 25
