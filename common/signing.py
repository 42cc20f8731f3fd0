"""HMAC-SHA256 over the exact body bytes, with the signing key's id beside it so keys can rotate.

The first key of a keyring signs; every key of it verifies. Signatures travel in the AMQP headers
``cronfleet-key-id`` and ``cronfleet-signature`` (lowercase hex).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from common.errors import ConfigError

KEY_ID_HEADER = "cronfleet-key-id"
SIGNATURE_HEADER = "cronfleet-signature"
MIN_SECRET_LENGTH = 16
_KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class SignatureCheck(enum.Enum):
    """The outcome of checking a body's signature."""

    VALID = "valid"
    MISSING_SIGNATURE = "missing_signature"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"


def signature(secret: bytes, body: bytes) -> str:
    """The lowercase hex HMAC-SHA256 of ``body`` under ``secret``."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Keyring:
    """Named secrets; ``signing_key_id`` names the one that signs."""

    secrets: Mapping[str, bytes]
    signing_key_id: str

    @classmethod
    def parse(cls, text: str) -> Keyring:
        """Read ``id:secret`` pairs separated by commas or new lines (``#`` starts a comment).

        The first pair signs. Raises ConfigError naming the bad entry (never its secret).
        """
        entries = [
            part.strip()
            for line in text.splitlines()
            for part in line.split("#", 1)[0].split(",")
            if part.strip()
        ]
        keys: dict[str, bytes] = {}
        for position, entry in enumerate(entries, start=1):
            key_id, sep, secret = entry.partition(":")
            key_id, secret = key_id.strip(), secret.strip()
            if not sep or not _KEY_ID.match(key_id):
                raise ConfigError(
                    f"signing key #{position} is not 'id:secret' with an id of letters, digits, '_.-'"
                )
            if len(secret) < MIN_SECRET_LENGTH:
                raise ConfigError(
                    f"signing key {key_id!r} is too short: a secret needs at least "
                    f"{MIN_SECRET_LENGTH} characters (make one with `cronfleet keys new`)"
                )
            if key_id in keys:
                raise ConfigError(f"signing key {key_id!r} is given twice")
            keys[key_id] = secret.encode()
        if not keys:
            raise ConfigError("no signing key given")
        return cls(secrets=keys, signing_key_id=next(iter(keys)))

    def sign(self, body: bytes) -> dict[str, str]:
        """The headers that carry ``body``'s signature under the signing key."""
        return {
            KEY_ID_HEADER: self.signing_key_id,
            SIGNATURE_HEADER: signature(self.secrets[self.signing_key_id], body),
        }

    def check(self, body: bytes, headers: Mapping[str, object]) -> SignatureCheck:
        """Whether ``headers`` carry a valid signature of exactly these ``body`` bytes."""
        key_id = _text(headers.get(KEY_ID_HEADER))
        claimed = _text(headers.get(SIGNATURE_HEADER))
        if key_id is None or claimed is None:
            return SignatureCheck.MISSING_SIGNATURE
        secret = self.secrets.get(key_id)
        if secret is None:
            return SignatureCheck.UNKNOWN_KEY
        if not hmac.compare_digest(signature(secret, body).encode(), claimed.strip().lower().encode()):
            return SignatureCheck.BAD_SIGNATURE
        return SignatureCheck.VALID


def new_key(key_id: str | None = None) -> str:
    """A fresh ``id:secret`` pair with 256 bits of randomness, ready for ``CRONFLEET_KEYS``."""
    return f"{key_id or 'k' + secrets.token_hex(3)}:{secrets.token_urlsafe(32)}"


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None
