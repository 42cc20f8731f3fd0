"""Signing and verifying messages with role keys, the signing key's id beside each signature.

What is signed is not the body alone but ``cronfleet-v1\\n<namespace>\\n<routing key>\\n<body>``
(``signed_bytes``), so that a message cannot be moved to another fleet, or a trigger to another
pool. Every key has a role (``trigger``, ``event``, ``ping``; a key of the old ``id:secret`` form
has none and serves every role). Keys are HMAC-SHA256 secrets or, for triggers only, Ed25519 key
pairs, so that workers can hold a public key that verifies triggers but cannot sign one. The
signature travels in the AMQP headers ``cronfleet-key-id`` and ``cronfleet-signature``
(lowercase hex). Which role may sign which message is ``common.roles``'s business.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from common.errors import ConfigError
from common.messages import JOB_NAME_PATTERN

KEY_ID_HEADER = "cronfleet-key-id"
SIGNATURE_HEADER = "cronfleet-signature"
SIGNING_CONTEXT = b"cronfleet-v1"
MIN_SECRET_LENGTH = 16
ED25519_KEY_BYTES = 32
ED25519_SIGNATURE_BYTES = 64
_KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_JOB_NAME = re.compile(JOB_NAME_PATTERN)
ED25519 = "ed25519"
ED25519_PUBLIC = "ed25519-public"


class Role(enum.StrEnum):
    """What a key may sign (``common.roles`` holds the table of which message needs which)."""

    TRIGGER = "trigger"
    EVENT = "event"
    PING = "ping"


class Algorithm(enum.StrEnum):
    """How a key signs."""

    HMAC = "hmac-sha256"
    ED25519 = "ed25519"


class SignatureCheck(enum.Enum):
    """The outcome of checking a message's signature."""

    VALID = "valid"
    MISSING_SIGNATURE = "missing_signature"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"


def signed_bytes(namespace: str, routing_key: str, body: bytes) -> bytes:
    """The bytes a signature covers: ``cronfleet-v1``, the namespace, the routing key and the body,
    joined by line feeds (UTF-8).

    Raises ValueError for a namespace or routing key holding a line feed (it would make two
    different messages sign the same bytes) or that is not valid Unicode.
    """
    if "\n" in namespace or "\n" in routing_key:
        raise ValueError("a namespace or routing key that holds a line feed cannot be signed")
    return b"\n".join((SIGNING_CONTEXT, namespace.encode(), routing_key.encode(), body))


def signature(secret: bytes, data: bytes) -> str:
    """The lowercase hex HMAC-SHA256 of ``data`` (usually ``signed_bytes(...)``) under ``secret``."""
    return hmac.digest(secret, data, "sha256").hex()


@dataclass(frozen=True)
class Key:
    """One key of a keyring: its id, its role (None: a legacy key, good for every role) and the
    material that signs or verifies. ``jobs`` limits a ping key to those jobs."""

    id: str
    role: Role | None
    algorithm: Algorithm
    jobs: frozenset[str] | None = None
    secret: bytes | None = field(default=None, repr=False, compare=False)
    private: Ed25519PrivateKey | None = field(default=None, repr=False, compare=False)
    public: Ed25519PublicKey | None = field(default=None, repr=False, compare=False)

    @property
    def can_sign(self) -> bool:
        """False for an Ed25519 public key, which only verifies."""
        return self.secret is not None or self.private is not None

    def serves(self, role: Role) -> bool:
        """Whether this key is of ``role`` (a legacy key serves every role)."""
        return self.role is None or self.role is role

    def may_ping(self, job: str | None) -> bool:
        """Whether this key's job limit (if any) lets it sign heartbeats of ``job`` (None: any)."""
        return self.jobs is None or job is None or job in self.jobs

    def describe(self) -> str:
        """What kind of key this is, in a few words (never its secret)."""
        kind = "legacy key" if self.role is None else f"{self.role} key"
        notes = [self.algorithm.value]
        if self.algorithm is Algorithm.ED25519 and self.private is None:
            notes.append("public only")
        if self.jobs is not None:
            notes.append("jobs " + "+".join(sorted(self.jobs)))
        if self.role is None:
            notes.append("no role: valid for every role")
        return f"{kind} {self.id!r} ({', '.join(notes)})"

    def sign(self, namespace: str, routing_key: str, body: bytes) -> dict[str, str]:
        """The headers that carry the signature of ``body`` published in ``namespace`` with
        ``routing_key``. Raises ValueError for a key that cannot sign, or a routing key that
        cannot be signed (see ``signed_bytes``)."""
        data = signed_bytes(namespace, routing_key, body)
        if self.secret is not None:
            value = signature(self.secret, data)
        elif self.private is not None:
            value = self.private.sign(data).hex()
        else:
            raise ValueError(f"key {self.id!r} is an Ed25519 public key: it verifies, it cannot sign")
        return {KEY_ID_HEADER: self.id, SIGNATURE_HEADER: value}

    def verifies(self, data: bytes, claimed: str) -> bool:
        """Whether ``claimed`` (hex, any case, spaces around forgiven) signs exactly ``data``."""
        claimed = claimed.strip().lower()
        if self.secret is not None:
            return hmac.compare_digest(signature(self.secret, data).encode(), claimed.encode())
        try:
            raw = bytes.fromhex(claimed)
        except ValueError:
            return False
        if len(raw) != ED25519_SIGNATURE_BYTES or self.public is None:
            return False
        try:
            self.public.verify(raw, data)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class Checked:
    """The outcome of a signature check, and the key that verified when it is VALID."""

    outcome: SignatureCheck
    key: Key | None = None


@dataclass(frozen=True)
class Keyring:
    """A process's keys, in the order given: per role, the first key that can sign signs; every
    key verifies (what it may sign is then ``common.roles``'s question)."""

    keys: tuple[Key, ...]
    _by_id: Mapping[str, Key] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {key.id: key for key in self.keys})

    @classmethod
    def parse(cls, text: str) -> Keyring:
        """Read keys separated by commas or new lines (``#`` starts a comment). Each is one of:

        * ``ROLE:ID:SECRET``: an HMAC-SHA256 key of ROLE (``trigger``, ``event`` or ``ping``);
        * ``trigger:ID:ed25519:PRIVATE`` / ``trigger:ID:ed25519-public:PUBLIC``: an Ed25519 key
          (32 bytes, base64url) that signs and verifies, or only verifies;
        * ``ping:ID:SECRET:jobs=A+B``: a ping key for those jobs only;
        * ``ID:SECRET`` (exactly one ``:``): a legacy key, valid for every role.

        Raises ConfigError naming the bad entry by id or position (never its secret).
        """
        entries = [
            part.strip()
            for line in text.splitlines()
            for part in line.split("#", 1)[0].split(",")
            if part.strip()
        ]
        keys: dict[str, Key] = {}
        for position, entry in enumerate(entries, start=1):
            key = _parse_entry(position, entry)
            if key.id in keys:
                raise ConfigError(f"signing key {key.id!r} is given twice")
            keys[key.id] = key
        if not keys:
            raise ConfigError("no signing key given")
        return cls(tuple(keys.values()))

    @property
    def legacy(self) -> tuple[Key, ...]:
        """The keys without a role (of the old ``id:secret`` form)."""
        return tuple(key for key in self.keys if key.role is None)

    def get(self, key_id: str) -> Key | None:
        """The key called ``key_id``, if this keyring has it."""
        return self._by_id.get(key_id)

    def signer(self, role: Role, job: str | None = None, who: str = "this process") -> Key:
        """The key that signs ``role``'s messages: the first, in the order given, of that role (or
        a legacy key) that can sign. For ``ping`` (heartbeats of ``job``, any job if None): the
        first ping or legacy key whose job limit allows it, else the first event key.

        Raises ConfigError, in one line naming the missing role (``who`` says who needs it).
        """
        for key in self.keys:
            if key.serves(role) and key.can_sign and (role is not Role.PING or key.may_ping(job)):
                return key
        if role is Role.PING:
            for key in self.keys:
                if key.role is Role.EVENT and key.can_sign:
                    return key
            limited = [key.id for key in self.keys if key.role is Role.PING and key.can_sign]
            what = "heartbeats" if job is None else f"heartbeats of job {job!r}"
            note = f" (ping key(s) {', '.join(map(repr, limited))} are for other jobs)" if limited else ""
            raise ConfigError(
                f"{who} signs {what}, and no signing key may{note}: add a ping key "
                "(`cronfleet keys new --role ping`) or an event key to CRONFLEET_KEYS"
            )
        public = any(key.role is role and not key.can_sign for key in self.keys)
        note = " (an ed25519-public key only verifies)" if public else ""
        raise ConfigError(
            f"{who} signs {role.value} messages and has no {role.value} key that can sign{note}: "
            f"add one to CRONFLEET_KEYS (`cronfleet keys new --role {role.value}`)"
        )

    def require(self, roles: Iterable[Role], who: str) -> None:
        """Raise ConfigError (see ``signer``) unless a key can sign each of ``roles``."""
        for role in roles:
            self.signer(role, who=who)

    def sign(
        self, role: Role, namespace: str, routing_key: str, body: bytes, *, job: str | None = None
    ) -> dict[str, str]:
        """The signature headers of ``body`` under ``role``'s signing key (see ``signer``)."""
        return self.signer(role, job).sign(namespace, routing_key, body)

    def check(self, namespace: str, routing_key: str, body: bytes, headers: Mapping[str, object]) -> Checked:
        """Whether ``headers`` carry a valid signature, by a key of this keyring, of exactly these
        ``body`` bytes published in ``namespace`` with ``routing_key``; and by which key."""
        key_id = _text(headers.get(KEY_ID_HEADER))
        claimed = _text(headers.get(SIGNATURE_HEADER))
        if key_id is None or claimed is None:
            return Checked(SignatureCheck.MISSING_SIGNATURE)
        key = self._by_id.get(key_id)
        if key is None:
            return Checked(SignatureCheck.UNKNOWN_KEY)
        try:
            data = signed_bytes(namespace, routing_key, body)
        except ValueError:  # a routing key nobody can have signed
            return Checked(SignatureCheck.BAD_SIGNATURE)
        if not key.verifies(data, claimed):
            return Checked(SignatureCheck.BAD_SIGNATURE)
        return Checked(SignatureCheck.VALID, key)


def _parse_entry(position: int, entry: str) -> Key:
    """One key entry as ``Keyring.parse`` describes; ConfigError names it without its secret."""
    fields = [part.strip() for part in entry.split(":")]
    roles = ", ".join(role.value for role in Role)
    if len(fields) == 2:
        key_id, secret = fields
        if key_id in {role.value for role in Role}:
            raise ConfigError(f"signing key #{position} has a role but no id: write '{key_id}:id:secret'")
        return Key(_key_id(position, key_id), None, Algorithm.HMAC, secret=_secret(key_id, secret))
    if len(fields) < 2 or fields[0] not in {role.value for role in Role}:
        raise ConfigError(
            f"signing key #{position} is not 'role:id:secret' with a role of {roles} "
            "(nor a legacy 'id:secret', which has exactly one ':')"
        )
    role, key_id, rest = Role(fields[0]), _key_id(position, fields[1]), fields[2:]
    if rest and rest[0] in (ED25519, ED25519_PUBLIC):
        if role is not Role.TRIGGER:
            raise ConfigError(
                f"signing key {key_id!r}: Ed25519 is for trigger keys only; a {role.value} key is "
                f"'{role.value}:id:secret' (make one with `cronfleet keys new --role {role.value}`)"
            )
        if len(rest) != 2:
            raise ConfigError(f"signing key {key_id!r} is not 'trigger:id:{rest[0]}:base64url-key'")
        return _ed25519_key(key_id, rest[0] == ED25519, rest[1])
    if not rest or not rest[0]:
        raise ConfigError(f"signing key {key_id!r} has no secret ('{role.value}:id:secret')")
    secret, options = rest[0], rest[1:]
    jobs = None
    if options:
        if role is not Role.PING or len(options) != 1 or not options[0].startswith("jobs="):
            raise ConfigError(
                f"signing key {key_id!r} has more than '{role.value}:id:secret' (a secret cannot "
                "contain ':'; the only option is ':jobs=a+b', on ping keys)"
            )
        jobs = _jobs(key_id, options[0].removeprefix("jobs="))
    return Key(key_id, role, Algorithm.HMAC, jobs=jobs, secret=_secret(key_id, secret))


def _key_id(position: int, key_id: str) -> str:
    if not _KEY_ID.match(key_id):
        raise ConfigError(f"signing key #{position} has no id of 1 to 64 letters, digits, '_.-'")
    return key_id


def _secret(key_id: str, secret: str) -> bytes:
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"signing key {key_id!r} is too short: a secret needs at least "
            f"{MIN_SECRET_LENGTH} characters (make one with `cronfleet keys new --role ROLE`)"
        )
    return secret.encode()


def _jobs(key_id: str, text: str) -> frozenset[str]:
    names = text.split("+")
    if not all(_JOB_NAME.match(name) for name in names):
        raise ConfigError(
            f"signing key {key_id!r}: jobs= takes job names joined by '+' (e.g. jobs=backup+report)"
        )
    return frozenset(names)


def _ed25519_key(key_id: str, private: bool, text: str) -> Key:
    what = "private" if private else "public"
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != ED25519_KEY_BYTES:
        raise ConfigError(
            f"signing key {key_id!r}: the Ed25519 {what} key is not 32 bytes in base64url "
            "(make a pair with `cronfleet keys new --role trigger --ed25519`)"
        )
    if private:
        signing = Ed25519PrivateKey.from_private_bytes(raw)
        return Key(key_id, Role.TRIGGER, Algorithm.ED25519, private=signing, public=signing.public_key())
    return Key(key_id, Role.TRIGGER, Algorithm.ED25519, public=Ed25519PublicKey.from_public_bytes(raw))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def new_key(role: Role, key_id: str | None = None, *, jobs: Iterable[str] = ()) -> str:
    """A fresh ``role:id:secret`` entry with 256 random bits (``:jobs=a+b`` for a limited ping
    key), ready for ``CRONFLEET_KEYS``."""
    entry = f"{role.value}:{key_id or _random_id(role)}:{secrets.token_urlsafe(32)}"
    names = list(jobs)
    if names:
        entry += ":jobs=" + "+".join(names)
    return entry


def new_ed25519_pair(key_id: str | None = None) -> tuple[str, str]:
    """A fresh Ed25519 trigger key: (the private entry, for schedulers; the public entry, for
    workers), under the same id."""
    private = Ed25519PrivateKey.generate()
    seed = private.private_bytes_raw()
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    key_id = key_id or _random_id(Role.TRIGGER)
    return (f"trigger:{key_id}:{ED25519}:{_b64(seed)}", f"trigger:{key_id}:{ED25519_PUBLIC}:{_b64(public)}")


def _random_id(role: Role) -> str:
    return f"{role.value[0]}{secrets.token_hex(3)}"


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None
