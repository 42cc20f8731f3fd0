"""Secrets are masked wherever something is shown: by field or header name, and inside URLs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.connection import redact as broker_redact
from common.redact import MASK, is_secret_name, redact, redact_url


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "authorization",
        "Proxy-Authorization",
        "Cookie",
        "Set-Cookie",
        "X-Api-Key",
        "x-api-key",
        "API_TOKEN",
        "access_token",
        "client-secret",
        "DB_PASSWORD",
        "passwd",
        "private_key",
        "X-Hub-Signature",
        "aws_credentials",
    ],
)
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name", ["Content-Type", "Accept", "url", "method", "PATH", "schedule", "X-Request-Id"]
)
def test_plain_names(name: str) -> None:
    assert not is_secret_name(name)


def test_an_http_actions_credentials_are_masked_and_the_rest_kept() -> None:
    spec = {
        "name": "sync",
        "action": {
            "type": "http",
            "url": "https://bot:hunter2@api.example.com/v1/sync?token=abc123&page=2",
            "headers": {"Authorization": "Bearer abc.def", "X-Api-Key": "k-123", "Accept": "text/plain"},
            "expect_status": [200],
        },
    }
    shown = redact(spec)
    assert shown == {
        "name": "sync",
        "action": {
            "type": "http",
            "url": f"https://bot:{MASK}@api.example.com/v1/sync?token={MASK}&page=2",
            "headers": {"Authorization": MASK, "X-Api-Key": MASK, "Accept": "text/plain"},
            "expect_status": [200],
        },
    }
    assert spec["action"]["headers"]["Authorization"] == "Bearer abc.def"  # type: ignore[index]


def test_a_secret_field_is_masked_whatever_it_holds() -> None:
    assert redact({"env": {"API_TOKEN": "t", "HOME": "/root"}, "keys": ["a", "b"]}) == {
        "env": {"API_TOKEN": MASK, "HOME": "/root"},
        "keys": MASK,
    }


@pytest.mark.parametrize(
    "text",
    [
        "https://example.com/path?page=2",
        "https://user@example.com/",
        "not a url: password=1",
        "http://[::1",
        "",
    ],
)
def test_text_without_a_secret_is_unchanged(text: str) -> None:
    assert redact_url(text) == text


@given(st.text())
def test_redact_never_raises(text: str) -> None:
    redact({"a": [text, {"b": text}], text: text})
    redact_url("https://" + text)


@pytest.mark.parametrize(
    ("urls", "shown"),
    [
        ("amqp://u:p%40ss@h1:5672/v,amqp://u:p@h2/", "amqp://u:***@h1:5672/v,amqp://u:***@h2/"),
        # A port out of range made the broker's log line raise instead of masking the password.
        ("amqp://u:secret@h:99999/", "amqp://u:***@h:99999/"),
        ("amqp://guest@h/", "amqp://guest@h/"),
    ],
)
def test_every_password_of_a_list_of_broker_urls_is_masked(urls: str, shown: str) -> None:
    assert broker_redact(urls) == shown


@given(st.text())
def test_masking_broker_urls_never_raises(text: str) -> None:
    broker_redact("amqp://" + text)
