"""Fuzzing the wire (issue 12): nothing a message says can stop the fleet.

Hypothesis writes thousands of messages of every type, valid, at the bounds and hostile
(instants at the ends of the calendar, integers past 64 bits, inf and nan, NUL and lone
surrogates, non-UTF-8 bytes, bodies over 1 MiB and JSON nested 100,000 deep, missing and unknown
keys, wrong types, reused ids), under every kind of header (genuine signatures with either key
of the right role, in bytes or upper case, or with a key of another role; forged, unknown keys,
tampered bodies, no signature; header values of every AMQP type, huge ones), with routing keys
of any text (a trigger's pool may differ from its routing key). They are published, confirms
pipelined, at a live worker and monitor on the real broker. Then:

* every process is still running;
* nothing ran that was not a genuine, valid trigger (each trigger's action touches its own marker
  file), and every genuine, valid, new trigger ran, once;
* every refused message is on the dead-letter queue with its reason, and the counts by reason are
  what cronfleet's own opener gives the same bytes, with the worker's and the monitor's id rules
  replayed in publish order; every message not signed with a test key is there, unchanged;
* what was accepted is recorded, and a genuine trigger and heartbeat sent afterwards still work.

The run is reproducible (derandomized) and prints its counts: run with ``-s`` to read them.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import hashlib
import json
import operator
import string
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from common.actions import ShellAction
from common.bounds import INT32_MAX, INT32_MIN, MAX_MESSAGE_BYTES, MAX_TEXT_LENGTH, MAX_TIMEOUT_SECONDS
from common.clock import utcnow
from common.envelope import REJECTION_HEADER, Accepted, open_envelope
from common.messages import EVENT_ADAPTER, TRIGGER_ADAPTER, JobHeartbeat, RunFinished, RunStarted, Trigger
from common.settings import Settings
from common.signing import KEY_ID_HEADER, SIGNATURE_HEADER, SIGNING_CONTEXT, Keyring, Role, signature
from common.store import HeartbeatRow, RunRow, Store
from common.topology import Topology
from tests.conftest import TEST_KEYS, Counts, Start
from tests.fleet import eventually

TRIGGERS = 2000
EVENTS = 2000
GENERATION = settings(
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
)

KEYS = Keyring.parse(TEST_KEYS)  # t1, e1 and p1 sign; t0, e0 and p0 verify too
FORGED_SECRET = b"not-the-real-secret-at-all-000000"
STRANGER = "k9"  # a key id nobody configured
# The key each signing of a message on each exchange uses: of the right role, or another one.
SIGNING_KEYS = {
    "triggers": {"genuine": "t1", "genuine-k0": "t0", "genuine-other-role": "e1", "genuine-ping": "p1"},
    "events": {"genuine": "e1", "genuine-k0": "e0", "genuine-other-role": "t1", "genuine-ping": "p1"},
}

# -- values: valid, at the bounds, and hostile --------------------------------------------------

clean_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=30)
# What AMQP can carry in a header or a routing key: UTF-8, so no lone surrogate.
wire_chars = st.characters(exclude_categories=["Cs"])
some_text = clean_text.filter(bool)
ALPHANUMERIC = string.ascii_letters + string.digits
# Job and pool names (what from_regex would give, three times faster).
names = st.builds(operator.add, st.sampled_from(ALPHANUMERIC), st.text(ALPHANUMERIC + "_-", max_size=20))
valid_instants = st.builds(
    lambda moment, zone: moment.astimezone(zone).isoformat(),
    st.datetimes(datetime(1970, 1, 2), datetime(2199, 12, 30), timezones=st.just(UTC)),
    st.sampled_from([UTC, timezone(timedelta(hours=14)), timezone(-timedelta(hours=14, minutes=59))]),
)
boundary_instants = st.sampled_from(
    [
        "1970-01-01T00:00:00Z",
        "1970-01-01T00:00:00.000001+00:00",
        "2199-12-31T23:59:59.999999Z",
        "1970-01-01T00:00:00-14:00",
        "2199-12-31T23:59:59+14:00",
    ]
)
instants = st.one_of(valid_instants, boundary_instants)
HOSTILE_VALUES: list[Any] = [
    # instants
    "0001-01-01T00:00:00+14:00",
    "9999-12-31T23:59:59-14:00",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59.999999Z",
    "1969-12-31T23:59:59.999999Z",
    "2200-01-01T00:00:00Z",
    "2026-01-01T00:00:00",
    "2026-02-30T00:00:00Z",
    "now",
    # numbers
    2**31,
    INT32_MIN - 1,
    2**63,
    -(2**63) - 1,
    2**64,
    10**40,
    float("nan"),
    float("inf"),
    float("-inf"),
    1e308,
    -1,
    0,
    5e-324,
    MAX_TIMEOUT_SECONDS + 0.001,
    # wrong types and texts
    None,
    True,
    "3",
    "",
    [],
    [1],
    {},
    {"a": 1},
    1.5,
    "\x00",
    "a\x00b",
    "\ud800",
    "\udfff",
    "x" * (MAX_TEXT_LENGTH + 1),
    "x" * 201,
]
hostile_values = st.one_of(
    st.sampled_from(HOSTILE_VALUES),
    clean_text.map(lambda text: text + "\x00"),
    st.integers(1, 200_000).map(lambda n: "y" * n),
    st.integers(),
    st.floats(),
)


def _deep(depth: int) -> bytes:
    return b'{"v":1,"type":"job.heartbeat","id":' + b"[" * depth + b"]" * depth + b"}"


raw_bodies = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([10, 199, 300, 5000, 100_000]).map(_deep),
    st.sampled_from([b"[]", b"null", b"1", b'"trigger"', b"{}", b"\xef\xbb\xbf{}", b"", b"{" * 10]),
)

# Header values of every type AMQP carries (floats are single precision there; RabbitMQ 3.10
# answers a header float of +-inf by closing the publisher's connection with INTERNAL_ERROR).
header_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.binary(max_size=20).map(bytearray),
    st.lists(st.integers(0, 9), max_size=3),
    st.dictionaries(st.text(wire_chars, min_size=1, max_size=5), st.integers(0, 9), max_size=2),
    st.datetimes(datetime(1970, 1, 2), datetime(2199, 1, 1), timezones=st.just(UTC)),
    st.integers(1, 40_000).map(lambda n: "z" * n),  # three of them still fit in one frame
)

# -- message templates ------------------------------------------------------------------------------


def optional(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Some of ``fields``, each present or left out (built once: strategies are costly to make)."""
    return st.fixed_dictionaries({}, optional=fields)


OPTIONAL_TRIGGER = optional(manual=st.booleans())
OPTIONAL_RUN = optional(redelivered=st.booleans())
OPTIONAL_FINISHED = optional(
    exit_code=st.none() | st.integers(INT32_MIN, INT32_MAX),
    http_status=st.none() | st.integers(100, 999),
    output_tail=st.none() | clean_text,
    error=st.none() | clean_text,
)
OPTIONAL_HEARTBEAT = optional(
    kind=st.sampled_from(["start", "success", "fail"]),
    exit_code=st.none() | st.integers(INT32_MIN, INT32_MAX),
    message=st.none() | clean_text,
)
OPTIONAL_SCHEDULER = optional(next_fire_at=st.none() | instants)


def trigger_template(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "v": 1,
        "type": "trigger",
        "id": None,  # unique, given at render
        "job": draw(names),
        "pool": draw(st.sampled_from(["default"] * 8 + ["other", "p-1"])),  # published to "default"
        "scheduled_at": draw(instants),
        "published_at": draw(instants),
        # Days from now, given at render: far from now either way, so the verdict cannot drift.
        "expires_at": draw(st.sampled_from([-1, 1])) * draw(st.integers(1, 3650)),
        "timeout_seconds": draw(st.sampled_from([10, 10.0, 30, MAX_TIMEOUT_SECONDS, 9.0005])),
        "action": None,  # given at render, with its marker
        **draw(OPTIONAL_TRIGGER),
    }


def run_template(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    data: dict[str, Any] = {
        "v": 1,
        "type": kind,
        "run_id": None,
        "trigger_id": draw(some_text),
        "job": draw(names),
        "pool": draw(names),
        "worker": draw(some_text),
        "scheduled_at": draw(instants),
        "started_at": draw(instants),
        **draw(OPTIONAL_RUN),
    }
    if kind == "run.finished":
        data["finished_at"] = draw(instants)
        data["duration_seconds"] = draw(st.floats(0, 1e9))
        data["status"] = draw(
            st.sampled_from(["succeeded", "failed", "timed_out", "expired", "skipped", "lost"])
        )
        data |= draw(OPTIONAL_FINISHED)
    return data


def heartbeat_template(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "v": 1,
        "type": "job.heartbeat",
        "id": None,
        "job": draw(names),
        "at": draw(instants),
        **draw(OPTIONAL_HEARTBEAT),
    }


def worker_heartbeat_template(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "v": 1,
        "type": "worker.heartbeat",
        "worker": draw(some_text),
        "pool": draw(names),
        "at": draw(instants),
        "concurrency": draw(st.integers(1, INT32_MAX)),
        "running": draw(st.integers(0, INT32_MAX)),
    }


def scheduler_heartbeat_template(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "v": 1,
        "type": "scheduler.heartbeat",
        "scheduler": draw(some_text),
        "at": draw(instants),
        "jobs": draw(st.integers(0, 2**63 - 1)),
        **draw(OPTIONAL_SCHEDULER),
    }


TEMPLATES = {
    "trigger": trigger_template,
    "run.started": lambda draw: run_template(draw, "run.started"),
    "run.finished": lambda draw: run_template(draw, "run.finished"),
    "job.heartbeat": heartbeat_template,
    "worker.heartbeat": worker_heartbeat_template,
    "scheduler.heartbeat": scheduler_heartbeat_template,
}
KINDS = {
    "triggers": ["trigger"] * 9 + ["job.heartbeat"],  # an event on the triggers exchange is malformed
    "events": ["run.started", "run.finished"] * 2
    + ["job.heartbeat"] * 4
    + ["worker.heartbeat", "scheduler.heartbeat", "trigger"],
}
GENUINE = ("genuine", "genuine-k0", "genuine-bytes", "genuine-upper", "genuine-other-role", "genuine-ping")
SIGNINGS = [*["genuine"] * 11, *GENUINE[1:], "forged", "unknown-key", "unsigned", "tampered"]
SIGNINGS += ["odd-signature", "odd-key-id", "signature-only"]
ACTIONS = ["touch"] * 6 + ["missing-cwd", "http", "nul-in-argv", "equals-in-env"]


@dataclass
class Spec:
    """One message as drawn: where it goes, what it says and how it is signed."""

    exchange: str
    template: dict[str, Any] | None  # None: ``raw`` is the body
    raw: bytes
    action: str
    mutations: list[tuple[str, str, Any]]  # ("set" | "drop" | "add" | "bytes", field, value)
    reuse: str  # "", "duplicate" (an earlier message again) or "conflict" (an earlier id, this body)
    layout: tuple[bool, bool]  # json.dumps: ensure_ascii, spaced
    signing: str
    odd_header: Any
    extra_headers: dict[str, Any]
    routing_key: str | None  # None: the message's own topic (most events), else any text
    big: bool


mutations = st.one_of(
    st.tuples(st.just("set"), st.text(max_size=20), hostile_values),
    st.tuples(st.just("drop"), st.text(max_size=20), st.none()),
    st.tuples(st.just("add"), clean_text, st.integers(0, 3)),
    st.tuples(st.just("bytes"), st.just(""), st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"])),
)


def one_in(n: int) -> st.SearchStrategy[bool]:
    """True about once in ``n`` draws (hypothesis favours the ends of an integer range)."""
    return st.sampled_from([False] * (n // 2) + [True] + [False] * (n - n // 2 - 1))


RAW = one_in(50)
MUTATED = one_in(3)
BIG = one_in(400)
KIND_OF = {exchange: st.sampled_from(kinds) for exchange, kinds in KINDS.items()}
MUTATION_LISTS = st.lists(mutations, min_size=1, max_size=2)
SIGNING = st.sampled_from(SIGNINGS)
ACTION = st.sampled_from(ACTIONS)
REUSE = st.sampled_from([""] * 30 + ["duplicate", "conflict"])
EXTRA_HEADERS = st.dictionaries(st.text(wire_chars, min_size=1, max_size=10), header_values, max_size=2)
# Mostly the event's own topic, so that most events reach the monitor's recording; else any text
# (refused as wrong_routing_key or bad_signature). A routing key is UTF-8 on the wire: no lone surrogates.
ROUTING_KEYS = st.one_of(
    st.none(), st.none(), st.none(), st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
)


@st.composite
def specs(draw: st.DrawFn, exchange: str) -> Spec:
    template = None
    raw = b""
    if draw(RAW):
        raw = draw(raw_bodies)
    else:
        template = TEMPLATES[draw(KIND_OF[exchange])](draw)
    changes: list[tuple[str, str, Any]] = []
    if template is not None and draw(MUTATED):
        # Half the time on a field of the message, else on any key.
        fields = st.sampled_from(sorted(template))
        changes = [
            (op, draw(fields) if op in ("set", "drop") and draw(st.booleans()) else name, value)
            for op, name, value in draw(MUTATION_LISTS)
        ]
    signing = draw(SIGNING)
    return Spec(
        exchange=exchange,
        template=template,
        raw=raw,
        action=draw(ACTION),
        mutations=changes,
        reuse=draw(REUSE),
        layout=(draw(st.booleans()), draw(st.booleans())),
        signing=signing,
        odd_header=draw(header_values) if signing.startswith("odd") else None,
        extra_headers=draw(EXTRA_HEADERS),
        routing_key=draw(ROUTING_KEYS) if exchange == "events" else "default",
        big=draw(BIG),
    )


def draw_specs(exchange: str, count: int) -> list[Spec]:
    """``count`` messages for ``exchange``, the same ones every run (derandomized): drawn once
    per test process (the second store's run takes a copy: drawing them is a third of the test),
    a copy each time, since rendering fills a spec in."""
    return copy.deepcopy(_drawn_specs(exchange, count))


@functools.cache
def _drawn_specs(exchange: str, count: int) -> list[Spec]:
    drawn: list[Spec] = []

    @settings(GENERATION, max_examples=count)
    @given(specs(exchange))
    def collect(spec: Spec) -> None:
        drawn.append(spec)

    collect()
    return drawn


# -- rendering, and what the fleet must make of each message ----------------------------------------


@dataclass
class Case:
    """A message as published, and what the fleet must do with it."""

    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, Any]
    genuine: bool  # signed with a test key over exactly these bytes
    marker: Path | None = None  # a trigger's: the file its action touches
    expected: str = ""  # "accepted", "duplicate" or a rejection reason
    message: Any = None  # the parsed message, when it verified and parsed


@dataclass
class Oracle:
    """Renders specs into cases and replays, in publish order, what the consumers will decide."""

    now: datetime
    workdir: Path
    namespace: str
    cases: list[Case] = field(default_factory=list)
    accepted: dict[str, list[Case]] = field(default_factory=lambda: {"triggers": [], "events": []})
    trigger_bodies: dict[str, bytes] = field(default_factory=dict)  # trigger id -> SHA-256
    heartbeats: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # id -> content
    runs: dict[str, tuple[str, str]] = field(default_factory=dict)  # run id -> job, trigger id
    monitor_conflicts: int = 0  # expired runs the worker reports under an id recorded otherwise
    expired: set[str] = field(default_factory=set)  # ids of triggers refused as expired

    def render(self, spec: Spec, index: int) -> Case:
        earlier = self.accepted[spec.exchange]
        if spec.reuse == "duplicate" and earlier:
            first = earlier[index * 7919 % len(earlier)]
            case = Case(spec.exchange, first.routing_key, first.body, dict(first.headers), first.genuine)
        else:
            marker = None
            data: dict[str, Any] | None = None
            if spec.template is None:
                body = spec.raw
            else:
                data, marker = self._fill(spec, index, earlier)
                body = _write(data, spec)
            if spec.routing_key is None:
                spec.routing_key = _own_topic(data)
            headers = _sign(spec, body, self.namespace)
            case = Case(spec.exchange, spec.routing_key, body, headers, spec.signing in GENUINE, marker)
        case.expected = self._judge(case)
        if case.expected == "accepted":
            earlier.append(case)
        self.cases.append(case)
        return case

    def _fill(self, spec: Spec, index: int, earlier: list[Case]) -> tuple[dict[str, Any], Path | None]:
        assert spec.template is not None
        data = dict(spec.template)
        tag = f"~{spec.exchange[0]}{index}"
        for key in ("id", "run_id"):
            if key in data:
                data[key] = f"fz{tag}"
                if spec.reuse == "conflict" and earlier:
                    data[key] = getattr(earlier[index * 104729 % len(earlier)].message, key, data[key])
        marker = None
        if data["type"] == "trigger":
            marker = self.workdir / f"marker{tag}"
            data["action"] = _action(spec.action, marker, self.workdir)
            data["expires_at"] = (self.now + timedelta(days=data["expires_at"])).isoformat()
        for operation, name, value in spec.mutations:
            if operation == "set":
                if name in ("id", "run_id") and isinstance(value, str):
                    value += "\x00"  # ids stay unique: another valid id would be a conflict
                data[name] = value
            elif operation == "drop":
                data.pop(name, None)
            elif operation == "add":
                data.setdefault(name, value)
        return data, marker

    def _judge(self, case: Case) -> str:
        adapter: Any = TRIGGER_ADAPTER if case.exchange == "triggers" else EVENT_ADAPTER
        opened = open_envelope(
            case.body,
            case.headers,
            KEYS,
            adapter,
            self.now,
            namespace=self.namespace,
            routing_key=case.routing_key,
        )
        if not isinstance(opened, Accepted):
            if opened.reason.value == "expired":
                self._expired_run(TRIGGER_ADAPTER.validate_json(case.body, strict=True))
            return opened.reason.value
        case.message = message = opened.message
        match message:
            case Trigger():
                digest = hashlib.sha256(case.body).digest()
                known = self.trigger_bodies.setdefault(message.id, digest)
                if known is digest:
                    return "accepted"
                return "duplicate" if known == digest else "id_conflict"
            case JobHeartbeat():
                content = (message.job, message.kind, message.at, message.exit_code, message.message)
                seen = self.heartbeats.setdefault(message.id, content)
                if seen != content:
                    return "id_conflict"
                return "duplicate" if seen is not content else "accepted"
            case RunStarted() | RunFinished():
                owner = self.runs.setdefault(message.run_id, (message.job, message.trigger_id))
                if owner != (message.job, message.trigger_id):
                    return "id_conflict"
        return "accepted"

    def _expired_run(self, trigger: Trigger) -> None:
        """The worker reports an expired trigger as run ``<id>#expired`` of its job."""
        self.expired.add(trigger.id)
        owner = self.runs.setdefault(f"{trigger.id}#expired", (trigger.job, trigger.id))
        if owner != (trigger.job, trigger.id):
            self.monitor_conflicts += 1


def _action(kind: str, marker: Path, workdir: Path) -> dict[str, Any]:
    touch: dict[str, Any] = {"type": "shell", "argv": ["touch", str(marker)], "cwd": str(workdir)}
    match kind:
        case "missing-cwd":
            touch["cwd"] = str(workdir / "missing")
        case "http":
            return {"type": "http", "url": "http://127.0.0.1:1/", "method": "POST", "body": str(marker)}
        case "nul-in-argv":
            touch["argv"] = ["touch", f"{marker}\x00"]
        case "equals-in-env":
            touch["env"] = {"A=B": "x"}
    return touch


def _write(data: dict[str, Any], spec: Spec) -> bytes:
    ensure_ascii, spaced = spec.layout
    text = json.dumps(data, ensure_ascii=ensure_ascii, separators=(", ", ": ") if spaced else (",", ":"))
    body = text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes bytes no UTF-8 allows
    for operation, _name, value in spec.mutations:
        if operation == "bytes":  # inside the job's name: not UTF-8, or a raw control character
            body = body.replace(b'"job":"', b'"job":"' + value, 1).replace(
                b'"job": "', b'"job": "' + value, 1
            )
    if spec.big:
        body = body[:-1] + b"," + b" " * MAX_MESSAGE_BYTES + b"}"
    return body


def _own_topic(data: dict[str, Any] | None) -> str:
    """The topic an event with these fields is published under (as common.topology says), or a
    heartbeat's topic when the fields do not name one."""
    kind = (data or {}).get("type")
    name = (data or {}).get("pool" if kind == "worker.heartbeat" else "job")
    if kind == "scheduler.heartbeat":
        return kind
    topic = f"{kind}.{name}"
    # AMQP routing keys hold 255 bytes: a longer name (a mutated field) cannot be its own topic.
    topics = ("run.started", "run.finished", "job.heartbeat", "worker.heartbeat")
    # Nor can a name with a lone surrogate (a mutated field): routing keys are UTF-8.
    named = isinstance(name, str) and kind in topics
    if named and len(topic.encode("utf-8", "surrogatepass")) <= 255 and _utf8(topic):
        return topic
    return "job.heartbeat.x"


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _hmac(key_id: str, secret: bytes | None, namespace: str, spec: Spec, body: bytes) -> dict[str, str]:
    """Headers signing ``body`` as sent to ``spec``'s routing key, computed by hand rather than by
    ``Key.sign``, which refuses a routing key with a line feed (any text is drawn here: such a
    delivery must be refused as bad_signature whatever its headers say)."""
    assert secret is not None
    data = b"\n".join(
        (SIGNING_CONTEXT, namespace.encode(), (spec.routing_key or "").encode("utf-8", "surrogatepass"), body)
    )
    return {KEY_ID_HEADER: key_id, SIGNATURE_HEADER: signature(secret, data)}


def _secret(key_id: str) -> bytes | None:
    key = KEYS.get(key_id)
    return None if key is None else key.secret


def _sign(spec: Spec, body: bytes, namespace: str) -> dict[str, Any]:
    keys = SIGNING_KEYS[spec.exchange]
    right = keys["genuine"]
    genuine = _hmac(right, _secret(right), namespace, spec, body)
    headers: dict[str, Any]
    match spec.signing:
        case "genuine":
            headers = genuine
        case "genuine-k0" | "genuine-other-role" | "genuine-ping":
            key_id = keys[spec.signing]
            headers = _hmac(key_id, _secret(key_id), namespace, spec, body)
        case "genuine-bytes":
            headers = {name: bytearray(value.encode()) for name, value in genuine.items()}
        case "genuine-upper":
            headers = {**genuine, SIGNATURE_HEADER: f" {genuine[SIGNATURE_HEADER].upper()} "}
        case "forged":
            headers = _hmac(right, FORGED_SECRET, namespace, spec, body)
        case "unknown-key":
            headers = _hmac(STRANGER, FORGED_SECRET, namespace, spec, body)
        case "unsigned":
            headers = {}
        case "tampered":
            headers = _hmac(right, _secret(right), namespace, spec, body + b" ")
        case "odd-signature":
            headers = {**genuine, SIGNATURE_HEADER: spec.odd_header}
        case "odd-key-id":
            headers = {**genuine, KEY_ID_HEADER: spec.odd_header}
        case _:
            headers = {SIGNATURE_HEADER: genuine[SIGNATURE_HEADER]}
    return {**spec.extra_headers, **headers}


# -- the fleet's side -------------------------------------------------------------------------------------


async def _publish_all(channel: AbstractChannel, topology: Topology, cases: list[Case]) -> None:
    """Publish every case, confirms pipelined 500 at a time."""
    exchanges = {
        "triggers": await channel.get_exchange(topology.triggers_exchange),
        "events": await channel.get_exchange(topology.events_exchange),
    }
    for start in range(0, len(cases), 500):
        await asyncio.gather(
            *(
                exchanges[case.exchange].publish(
                    aio_pika.Message(case.body, headers=case.headers), routing_key=case.routing_key
                )
                for case in cases[start : start + 500]
            )
        )


class DeadLetters:
    """Everything that reaches the fleet's dead-letter queue, consumed as it arrives."""

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel  # kept: robust objects are weak references
        self.messages: list[AbstractIncomingMessage] = []

    async def start(self, topology: Topology) -> None:
        await self.channel.set_qos(prefetch_count=1000)
        self.queue = await self.channel.get_queue(topology.dead_queue)
        await self.queue.consume(self._keep, no_ack=True)

    async def _keep(self, message: AbstractIncomingMessage) -> None:
        self.messages.append(message)

    def reasons(self) -> Counter[str]:
        return Counter(str((m.headers or {}).get(REJECTION_HEADER, "by the broker")) for m in self.messages)


async def _count(store: Store, query: Any) -> int:
    async with store.session() as session:
        return int((await session.execute(query)).scalar_one())


async def _send(
    channel: AbstractChannel, topology: Topology, message: Trigger | JobHeartbeat, key: str
) -> None:
    body = message.to_bytes()
    if isinstance(message, Trigger):
        exchange, headers = topology.triggers_exchange, KEYS.sign(Role.TRIGGER, topology.namespace, key, body)
    else:
        exchange = topology.events_exchange
        headers = KEYS.sign(Role.PING, topology.namespace, key, body, job=message.job)
    target = await channel.get_exchange(exchange)
    await target.publish(aio_pika.Message(body, headers=headers), routing_key=key)


async def test_no_message_stops_the_fleet_and_every_refusal_is_dead_lettered_with_its_reason(
    settings: Settings,
    store: Store,
    fleet: Start,
    amqp: AbstractRobustConnection,
    tmp_path: Path,
    counts: Counts,
) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    oracle = Oracle(now=utcnow(), workdir=workdir, namespace=settings.namespace)
    drawn = draw_specs("triggers", TRIGGERS) + draw_specs("events", EVENTS)
    cases = [oracle.render(spec, index) for index, spec in enumerate(drawn)]
    refused = Counter(c.expected for c in cases if c.expected not in ("accepted", "duplicate"))
    refused["id_conflict"] += oracle.monitor_conflicts

    topology = Topology(settings.namespace)
    await fleet("monitor")
    await fleet("worker", concurrency=8)
    dead = DeadLetters(await amqp.channel())
    await dead.start(topology)
    channel = await amqp.channel(publisher_confirms=True)
    await _publish_all(channel, topology, cases)

    async def all_refused() -> bool:
        return len(dead.messages) >= refused.total()

    await eventually(all_refused, timeout=120, every=0.5)

    # Every accepted trigger ends as one finished run, and so does every expired one.
    accepted_triggers = [
        c.message for c in cases if c.expected == "accepted" and isinstance(c.message, Trigger)
    ]
    worker_runs = select(func.count()).select_from(RunRow).where(RunRow.worker == "worker-1")

    async def all_runs_finished() -> bool:
        return await _count(store, worker_runs.where(RunRow.finished_at.is_not(None))) >= len(
            accepted_triggers
        ) + len(oracle.expired)

    await eventually(all_runs_finished, timeout=120, every=0.5)

    # Afterwards, a genuine trigger and a genuine heartbeat still work.
    after = workdir / "after"
    now = utcnow()
    await _send(
        channel,
        topology,
        Trigger(
            id="after@now",
            job="after",
            pool="default",
            scheduled_at=now,
            published_at=now,
            expires_at=now + timedelta(minutes=5),
            timeout_seconds=10,
            action=ShellAction(argv=["touch", str(after)]),
        ),
        "default",
    )
    await _send(
        channel, topology, JobHeartbeat(id="after", job="after-beat", at=now), "job.heartbeat.after-beat"
    )

    async def both_recorded() -> bool:
        ran = (
            select(func.count())
            .select_from(RunRow)
            .where(RunRow.job == "after", RunRow.status == "succeeded")
        )
        beat = select(func.count()).select_from(HeartbeatRow).where(HeartbeatRow.id == "after")
        return await _count(store, ran) == 1 and await _count(store, beat) == 1

    await eventually(both_recorded, timeout=60)

    for task in fleet.__self__.tasks:  # type: ignore[attr-defined]
        assert not task.done(), f"a fleet process stopped: {task}"

    markers = [c.marker for c in cases if c.marker is not None]
    executed = {marker for marker in markers if await asyncio.to_thread(marker.exists)}
    must_run = {
        c.marker
        for c in cases
        if c.expected == "accepted"
        and isinstance(c.message, Trigger)
        and isinstance(c.message.action, ShellAction)
        and c.message.action.cwd == str(workdir)
        and c.message.action.argv == ["touch", str(c.marker)]
        and not c.message.action.env
    }
    heartbeats = await _count(store, select(func.count()).select_from(HeartbeatRow))
    fuzz_runs = await _count(
        store, select(func.count()).select_from(RunRow).where(RunRow.run_id.like("fz~e%"))
    )
    found = dead.reasons()
    counts(
        f"wire fuzz: published {dict(Counter(c.exchange for c in cases))}; "
        f"outcomes {dict(Counter(c.expected for c in cases))}; dead-lettered by reason {dict(found)}; "
        f"executed {len(executed)} (of {len(accepted_triggers)} accepted triggers); "
        f"recorded {heartbeats} heartbeats and {fuzz_runs} fuzzed runs"
    )

    assert "internal_error" not in found, "a message made a consumer raise: a bound is missing"
    assert executed == must_run, "a trigger ran that was not genuine and valid, or a valid one did not"
    # One run per accepted or expired trigger (and the one sent after): none twice, none still
    # running; and one `duplicate` run (not executed) per repeat of an accepted trigger.
    runs_by_trigger = select(RunRow.trigger_id, func.count()).where(RunRow.worker == "worker-1")
    not_repeats = RunRow.status != "duplicate"
    async with store.session() as session:
        grouped = await session.execute(runs_by_trigger.where(not_repeats).group_by(RunRow.trigger_id))
        counts = {trigger: n for trigger, n in grouped}
        repeats = await session.execute(runs_by_trigger.where(~not_repeats).group_by(RunRow.trigger_id))
        repeated = {trigger: n for trigger, n in repeats}
        running = await session.scalar(worker_runs.where(RunRow.finished_at.is_(None)))
    # (An expired trigger reusing an accepted one's id is its run "<id>#expired": a second run of it.)
    assert counts == Counter([*(t.id for t in accepted_triggers), *oracle.expired, "after@now"])
    assert repeated == Counter(
        c.message.id for c in cases if c.expected == "duplicate" and isinstance(c.message, Trigger)
    )
    assert running == 0
    assert after.exists()
    assert found == refused, "the dead letters by reason differ from what the opener says of these bytes"
    not_signed = Counter(c.body for c in cases if not c.genuine)
    missing = not_signed - Counter(m.body for m in dead.messages)
    assert not missing, f"{missing.total()} messages not signed with a test key are not dead-lettered"
    accepted_beats = {
        c.message.id for c in cases if c.expected == "accepted" and isinstance(c.message, JobHeartbeat)
    }
    assert heartbeats == len(accepted_beats) + 1
    accepted_runs = {
        c.message.run_id
        for c in cases
        if c.expected == "accepted" and isinstance(c.message, RunStarted | RunFinished)
    }
    assert fuzz_runs == len(accepted_runs)
