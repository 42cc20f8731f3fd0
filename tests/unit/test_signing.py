"""Signing: exact bytes, constant-time check, key rotation, distinct rejections."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.errors import ConfigError
from common.signing import KEY_ID_HEADER, SIGNATURE_HEADER, Keyring, SignatureCheck, new_key
from tests.conftest import keyring

bodies = st.binary(max_size=2048)


@given(bodies)
def test_a_signed_body_verifies(body: bytes) -> None:
    keys = keyring()
    assert keys.check(body, keys.sign(body)) is SignatureCheck.VALID


@given(bodies, st.data())
def test_any_changed_byte_breaks_the_signature(body: bytes, data: st.DataObject) -> None:
    keys = keyring()
    headers = keys.sign(body)
    if body:
        index = data.draw(st.integers(0, len(body) - 1))
        flip = data.draw(st.integers(1, 255))
        changed = body[:index] + bytes([body[index] ^ flip]) + body[index + 1 :]
    else:
        changed = b"x"
    assert keys.check(changed, headers) is SignatureCheck.BAD_SIGNATURE


@given(bodies)
def test_the_signature_is_hmac_sha256_hex_of_the_exact_bytes(body: bytes) -> None:
    keys = Keyring.parse("a:0123456789abcdef0123")
    expected = hmac.new(b"0123456789abcdef0123", body, hashlib.sha256).hexdigest()
    assert keys.sign(body) == {KEY_ID_HEADER: "a", SIGNATURE_HEADER: expected}


def test_keys_rotate_the_first_signs_and_every_one_verifies() -> None:
    old = Keyring.parse("old:old-secret-0123456789abcdef")
    both = Keyring.parse("new:new-secret-0123456789abcdef\nold:old-secret-0123456789abcdef")
    body = b'{"v":1}'
    assert both.signing_key_id == "new"
    assert both.check(body, old.sign(body)) is SignatureCheck.VALID
    assert old.check(body, both.sign(body)) is SignatureCheck.UNKNOWN_KEY


def test_each_failure_is_named() -> None:
    keys = keyring()
    body = b"{}"
    assert keys.check(body, {}) is SignatureCheck.MISSING_SIGNATURE
    assert keys.check(body, {KEY_ID_HEADER: "k1"}) is SignatureCheck.MISSING_SIGNATURE
    assert keys.check(body, {KEY_ID_HEADER: "zz", SIGNATURE_HEADER: "00"}) is SignatureCheck.UNKNOWN_KEY
    assert keys.check(body, {KEY_ID_HEADER: "k1", SIGNATURE_HEADER: "00"}) is SignatureCheck.BAD_SIGNATURE
    assert (
        keys.check(body, {KEY_ID_HEADER: b"k1", SIGNATURE_HEADER: b"\xff"})
        is SignatureCheck.MISSING_SIGNATURE
    )
    assert keys.check(body, {KEY_ID_HEADER: 7, SIGNATURE_HEADER: 8}) is SignatureCheck.MISSING_SIGNATURE


def test_header_values_as_bytes_and_uppercase_hex_still_verify() -> None:
    keys = keyring()
    headers = keys.sign(b"body")
    raw = {
        KEY_ID_HEADER: headers[KEY_ID_HEADER].encode(),
        SIGNATURE_HEADER: headers[SIGNATURE_HEADER].upper().encode(),
    }
    assert keys.check(b"body", raw) is SignatureCheck.VALID


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no signing key"),
        ("k1", "is not 'id:secret'"),
        ("bad id:0123456789abcdef0", "is not 'id:secret'"),
        ("k1:short", "too short"),
        ("k1:0123456789abcdef,k1:0123456789abcdeg", "given twice"),
    ],
)
def test_bad_keys_are_refused_without_showing_the_secret(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        Keyring.parse(text)
    assert "0123456789abcdef" not in str(caught.value)
    assert "short" not in str(caught.value).replace("too short", "")


def test_new_keys_parse_and_differ() -> None:
    first, second = new_key("a"), new_key("b")
    assert Keyring.parse(first).signing_key_id == "a"
    assert first.split(":")[1] != second.split(":")[1]
    assert Keyring.parse(f"{first}  # a comment\n{second}").secrets.keys() == {"a", "b"}
