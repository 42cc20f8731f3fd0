"""Signing: role keys in every form, what is signed (namespace, routing key, exact body bytes),
HMAC and Ed25519, which key signs, rotation, distinct rejections, and no secret ever shown."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import assume, given
from hypothesis import strategies as st

from common.errors import ConfigError
from common.settings import Settings
from common.signing import (
    KEY_ID_HEADER,
    SIGNATURE_HEADER,
    Algorithm,
    Keyring,
    Role,
    SignatureCheck,
    new_ed25519_pair,
    new_key,
    signed_bytes,
)
from tests.conftest import keyring

bodies = st.binary(max_size=2048)
# What a namespace or routing key can be: any text without a line feed.
names = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\n"), max_size=40)
SEED = bytes(range(32))
PRIVATE = base64.urlsafe_b64encode(SEED).decode().rstrip("=")
PUBLIC = (
    base64.urlsafe_b64encode(Ed25519PrivateKey.from_private_bytes(SEED).public_key().public_bytes_raw())
    .decode()
    .rstrip("=")
)
ED_SIGNER = Keyring.parse(f"trigger:ed:ed25519:{PRIVATE}")
ED_VERIFIER = Keyring.parse(f"trigger:ed:ed25519-public:{PUBLIC}")


# -- what is signed ----------------------------------------------------------------------------


@given(names, names, bodies)
def test_the_signed_bytes_are_the_context_namespace_routing_key_and_body(
    namespace: str, routing_key: str, body: bytes
) -> None:
    expected = b"cronfleet-v1\n" + namespace.encode() + b"\n" + routing_key.encode() + b"\n" + body
    assert signed_bytes(namespace, routing_key, body) == expected


def test_a_line_feed_in_the_namespace_or_routing_key_cannot_be_signed_nor_verify() -> None:
    keys = keyring()
    with pytest.raises(ValueError):
        signed_bytes("ns", "default\n{", b"x")
    with pytest.raises(ValueError):
        keys.sign(Role.TRIGGER, "ns\nx", "default", b"x")
    # Whatever the headers say, such a delivery does not verify.
    headers = keys.sign(Role.TRIGGER, "ns", "default", b"\n{}")
    assert keys.check("ns", "default\n", b"{}", headers).outcome is SignatureCheck.BAD_SIGNATURE


@given(names, names, bodies)
def test_an_hmac_signature_is_hmac_sha256_hex_of_the_signed_bytes(
    namespace: str, routing_key: str, body: bytes
) -> None:
    keys = Keyring.parse("event:a:0123456789abcdef0123")
    data = signed_bytes(namespace, routing_key, body)
    expected = hmac.new(b"0123456789abcdef0123", data, hashlib.sha256).hexdigest()
    assert keys.sign(Role.EVENT, namespace, routing_key, body) == {
        KEY_ID_HEADER: "a",
        SIGNATURE_HEADER: expected,
    }


@given(names, names, bodies)
def test_an_ed25519_signature_verifies_with_the_public_key_alone(
    namespace: str, routing_key: str, body: bytes
) -> None:
    headers = ED_SIGNER.sign(Role.TRIGGER, namespace, routing_key, body)
    assert (
        len(headers[SIGNATURE_HEADER]) == 128
        and headers[SIGNATURE_HEADER] == headers[SIGNATURE_HEADER].lower()
    )
    for verifier in (ED_VERIFIER, ED_SIGNER):
        checked = verifier.check(namespace, routing_key, body, headers)
        assert checked.outcome is SignatureCheck.VALID and checked.key is not None
        assert checked.key.algorithm is Algorithm.ED25519


@given(names, names, names, names, bodies)
def test_a_signature_for_one_namespace_or_routing_key_does_not_verify_under_another(
    namespace: str, other_namespace: str, routing_key: str, other_key: str, body: bytes
) -> None:
    assume(namespace != other_namespace and routing_key != other_key)
    for keys, role in ((keyring(), Role.TRIGGER), (keyring(), Role.EVENT), (ED_SIGNER, Role.TRIGGER)):
        headers = keys.sign(role, namespace, routing_key, body)
        assert keys.check(namespace, routing_key, body, headers).outcome is SignatureCheck.VALID
        assert keys.check(other_namespace, routing_key, body, headers).outcome is SignatureCheck.BAD_SIGNATURE
        assert keys.check(namespace, other_key, body, headers).outcome is SignatureCheck.BAD_SIGNATURE


@given(bodies, st.data())
def test_any_changed_byte_breaks_the_signature(body: bytes, data: st.DataObject) -> None:
    if body:
        index = data.draw(st.integers(0, len(body) - 1))
        flip = data.draw(st.integers(1, 255))
        changed = body[:index] + bytes([body[index] ^ flip]) + body[index + 1 :]
    else:
        changed = b"x"
    for keys in (keyring(), ED_SIGNER):
        headers = keys.sign(Role.TRIGGER, "ns", "default", body)
        assert keys.check("ns", "default", changed, headers).outcome is SignatureCheck.BAD_SIGNATURE


# -- which key signs ------------------------------------------------------------------------------


def test_the_first_key_of_each_role_signs() -> None:
    keys = keyring()
    assert [keys.signer(role).id for role in Role] == ["t1", "e1", "p1"]
    checked = keys.check("ns", "default", b"{}", keys.sign(Role.TRIGGER, "ns", "default", b"{}"))
    assert checked.key is not None and checked.key.id == "t1" and checked.key.role is Role.TRIGGER


def test_pings_are_signed_by_a_ping_key_that_may_ping_that_job_else_the_first_event_key() -> None:
    keys = Keyring.parse(
        "event:e:0123456789abcdef0,ping:only-a:0123456789abcdef1:jobs=a,ping:any:0123456789abcdef2"
    )
    assert keys.signer(Role.PING, "a").id == "only-a"
    assert keys.signer(Role.PING, "b").id == "any"
    limited = Keyring.parse("event:e:0123456789abcdef0,ping:only-a:0123456789abcdef1:jobs=a+c")
    assert limited.signer(Role.PING, "c").id == "only-a"
    assert limited.signer(Role.PING, "b").id == "e"
    alone = Keyring.parse("ping:only-a:0123456789abcdef1:jobs=a")
    with pytest.raises(ConfigError, match=r"heartbeats of job 'b'.*'only-a' are for other jobs") as caught:
        alone.signer(Role.PING, "b", who="`cronfleet ping`")
    assert str(caught.value).startswith("`cronfleet ping` signs") and "0123456789" not in str(caught.value)


def test_a_process_without_a_key_that_can_sign_a_role_is_told_which_role_is_missing() -> None:
    workers = ED_VERIFIER
    with pytest.raises(ConfigError, match="no trigger key that can sign") as caught:
        workers.require([Role.TRIGGER], who="a scheduler")
    message = str(caught.value)
    assert message.startswith("a scheduler") and "ed25519-public key only verifies" in message
    assert "\n" not in message and PUBLIC not in message
    with pytest.raises(ConfigError, match="no event key"):
        Keyring.parse("trigger:t:0123456789abcdef0").signer(Role.EVENT)
    # A worker needs only its event key; a monitor needs none.
    Keyring.parse("event:e:0123456789abcdef0").require([Role.EVENT], who="a worker")


def test_a_legacy_key_serves_every_role_in_its_place_in_the_list() -> None:
    legacy = Keyring.parse("old:old-secret-0123456789abcdef")
    assert [legacy.signer(role).id for role in Role] == ["old", "old", "old"]
    # Role keys added after a legacy key change nothing until they are moved first.
    added = Keyring.parse("old:old-secret-0123456789abcdef,trigger:t:0123456789abcdef0")
    assert added.signer(Role.TRIGGER).id == "old"
    moved = Keyring.parse("trigger:t:0123456789abcdef0,old:old-secret-0123456789abcdef")
    assert moved.signer(Role.TRIGGER).id == "t" and moved.signer(Role.EVENT).id == "old"
    assert [key.id for key in moved.legacy] == ["old"]


def test_keys_rotate_the_first_signs_and_every_one_verifies() -> None:
    old = Keyring.parse("trigger:old:old-secret-0123456789abcdef")
    both = Keyring.parse("trigger:new:new-secret-0123456789abcdef\ntrigger:old:old-secret-0123456789abcdef")
    body = b'{"v":1}'
    assert both.signer(Role.TRIGGER).id == "new"
    signed_by_old = old.sign(Role.TRIGGER, "ns", "p", body)
    assert both.check("ns", "p", body, signed_by_old).outcome is SignatureCheck.VALID
    signed_by_new = both.sign(Role.TRIGGER, "ns", "p", body)
    assert old.check("ns", "p", body, signed_by_new).outcome is SignatureCheck.UNKNOWN_KEY


# -- refusals -----------------------------------------------------------------------------------


def test_each_failure_is_named() -> None:
    keys = keyring()
    body = b"{}"

    def outcome(headers: dict[str, object]) -> SignatureCheck:
        return keys.check("ns", "default", body, headers).outcome

    assert outcome({}) is SignatureCheck.MISSING_SIGNATURE
    assert outcome({KEY_ID_HEADER: "t1"}) is SignatureCheck.MISSING_SIGNATURE
    assert outcome({KEY_ID_HEADER: "zz", SIGNATURE_HEADER: "00"}) is SignatureCheck.UNKNOWN_KEY
    assert outcome({KEY_ID_HEADER: "t1", SIGNATURE_HEADER: "00"}) is SignatureCheck.BAD_SIGNATURE
    assert outcome({KEY_ID_HEADER: b"t1", SIGNATURE_HEADER: b"\xff"}) is SignatureCheck.MISSING_SIGNATURE
    assert outcome({KEY_ID_HEADER: 7, SIGNATURE_HEADER: 8}) is SignatureCheck.MISSING_SIGNATURE
    for claimed in ("zz" * 64, "ab" * 63, "ab" * 65, "", "ü" * 128):
        headers = {KEY_ID_HEADER: "ed", SIGNATURE_HEADER: claimed}
        assert ED_VERIFIER.check("ns", "default", body, headers).outcome is SignatureCheck.BAD_SIGNATURE


def test_header_values_as_bytes_and_uppercase_hex_still_verify() -> None:
    for keys in (keyring(), ED_SIGNER):
        headers = keys.sign(Role.TRIGGER, "ns", "default", b"body")
        raw = {
            KEY_ID_HEADER: headers[KEY_ID_HEADER].encode(),
            SIGNATURE_HEADER: f" {headers[SIGNATURE_HEADER].upper()} ".encode(),
        }
        assert keys.check("ns", "default", b"body", raw).outcome is SignatureCheck.VALID


# -- the key file -------------------------------------------------------------------------------


def test_every_entry_form_parses() -> None:
    keys = Keyring.parse(
        f"""
        trigger:t-hmac:0123456789abcdef-t   # schedulers
        trigger:t-ed:ed25519:{PRIVATE}
        trigger:t-pub:ed25519-public:{PUBLIC}, event:e:0123456789abcdef-e
        ping:p:0123456789abcdef-p
        ping:p-some : 0123456789abcdef-q : jobs=backup+report
        k.0:old-0123456789abcdef   # legacy: exactly one ':'
        """
    )
    described = {key.id: (key.role, key.algorithm, key.can_sign, key.jobs) for key in keys.keys}
    assert described == {
        "t-hmac": (Role.TRIGGER, Algorithm.HMAC, True, None),
        "t-ed": (Role.TRIGGER, Algorithm.ED25519, True, None),
        "t-pub": (Role.TRIGGER, Algorithm.ED25519, False, None),
        "e": (Role.EVENT, Algorithm.HMAC, True, None),
        "p": (Role.PING, Algorithm.HMAC, True, None),
        "p-some": (Role.PING, Algorithm.HMAC, True, frozenset({"backup", "report"})),
        "k.0": (None, Algorithm.HMAC, True, None),
    }
    # The private and the public entry of one pair verify each other's signatures.
    signed = Keyring.parse(f"trigger:x:ed25519:{PRIVATE}").sign(Role.TRIGGER, "ns", "p", b"b")
    assert keys.check("ns", "p", b"b", {**signed, KEY_ID_HEADER: "t-pub"}).outcome is SignatureCheck.VALID
    # Base64 with its padding is read too.
    assert Keyring.parse(f"trigger:x:ed25519-public:{PUBLIC}=").keys[0].algorithm is Algorithm.ED25519


SECRET = "0123456789abcdef-SeCrEt"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no signing key"),
        ("  # only a comment", "no signing key"),
        ("k1", "is not 'role:id:secret'"),
        (f"bad id:{SECRET}", "has no id"),
        ("k1:short", "too short"),
        (f"k1:{SECRET},k1:{SECRET}x", "given twice"),
        (f"trigger:k1:{SECRET},ping:k1:{SECRET}x", "given twice"),
        (f"triger:t1:{SECRET}", "is not 'role:id:secret' with a role of trigger, event, ping"),
        (f"ping:{SECRET}", "has a role but no id"),
        ("event:e1:", "has no secret"),
        ("event:e1:short", "too short"),
        (f"event:e1:ed25519:{PRIVATE}", "Ed25519 is for trigger keys only"),
        (f"ping:p1:ed25519-public:{PUBLIC}", "Ed25519 is for trigger keys only"),
        ("trigger:t1:ed25519:not*base64", "is not 32 bytes in base64url"),
        (f"trigger:t1:ed25519:{PRIVATE[:-4]}", "is not 32 bytes in base64url"),
        ("trigger:t1:ed25519", "is not 'trigger:id:ed25519:base64url-key'"),
        (f"trigger:t1:ed25519-public:{PUBLIC}:jobs=a", "is not 'trigger:id:ed25519-public:base64url-key'"),
        (f"event:e1:{SECRET}:jobs=a", "the only option is ':jobs=a+b', on ping keys"),
        (f"event:e1:{SECRET}:{SECRET}", "a secret cannot contain ':'"),
        (f"ping:p1:{SECRET}:color=red", "the only option is ':jobs=a+b'"),
        (f"ping:p1:{SECRET}:jobs=bad name", "jobs= takes job names joined by '+'"),
        (f"ping:p1:{SECRET}:jobs=", "jobs= takes job names"),
    ],
)
def test_bad_keys_are_refused_in_one_line_without_showing_the_secret(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")) as caught:
        Keyring.parse(text)
    shown = str(caught.value)
    assert "\n" not in shown
    for secret in (SECRET, PRIVATE, PUBLIC, "short", PRIVATE[:-4]):
        assert secret not in shown.replace("too short", "")


def test_no_key_shows_its_secret_in_its_repr() -> None:
    keys = Keyring.parse(f"event:e:{SECRET},trigger:t:ed25519:{PRIVATE}")
    for shown in (repr(keys), *(repr(key) for key in keys.keys), *(key.describe() for key in keys.keys)):
        assert SECRET not in shown and PRIVATE not in shown


def test_new_keys_parse_and_differ() -> None:
    first, second = new_key(Role.EVENT, "a"), new_key(Role.EVENT, "b")
    assert Keyring.parse(first).signer(Role.EVENT).id == "a"
    assert first.split(":")[2] != second.split(":")[2]
    assert [key.id for key in Keyring.parse(f"{first}  # a comment\n{second}").keys] == ["a", "b"]
    limited = Keyring.parse(new_key(Role.PING, "p", jobs=["backup", "report"])).keys[0]
    assert limited.role is Role.PING and limited.jobs == {"backup", "report"}
    assert Keyring.parse(new_key(Role.TRIGGER)).keys[0].role is Role.TRIGGER


def test_a_new_ed25519_pair_signs_with_the_private_entry_and_verifies_with_the_public_one() -> None:
    private, public = new_ed25519_pair("t")
    signer, verifier = Keyring.parse(private), Keyring.parse(public)
    headers = signer.sign(Role.TRIGGER, "ns", "default", b"{}")
    assert verifier.check("ns", "default", b"{}", headers).outcome is SignatureCheck.VALID
    assert not verifier.keys[0].can_sign
    other, _ = new_ed25519_pair("t")
    assert other != private


def test_legacy_keys_are_logged_once_per_process_by_id_never_by_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A key id of its own: the warning is said once per process and these ids.
    settings = Settings(keys=f"legacy-once:{SECRET},event:e:{SECRET}x")
    with caplog.at_level(logging.WARNING, logger="cronfleet.keys"):
        for _ in range(3):
            assert settings.keyring().signer(Role.TRIGGER).id == "legacy-once"
        Settings(keys=f"legacy-once:{SECRET}").keyring()
    warnings = [r.getMessage() for r in caplog.records if r.name == "cronfleet.keys"]
    assert len(warnings) == 1
    assert "'legacy-once' has no role" in warnings[0] and "trigger:ID:SECRET" in warnings[0]
    assert SECRET not in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cronfleet.keys"):
        Settings(keys=f"legacy-quiet:{SECRET}").keyring(warn_legacy=False)
    assert not caplog.records
