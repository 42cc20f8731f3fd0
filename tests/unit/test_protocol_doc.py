"""docs/protocol.md is the wire contract for producers written in other languages: keep it true.

Its JSON Schemas must be exactly what ``cronfleet schema`` prints now, its signature test vectors
must verify (and its shell recipes reproduce them), every example body in it must be accepted,
and its tables of fields, exchanges, queues, routing keys, key roles, rejection reasons and
dead-letter headers must match the code.

After changing a wire model, regenerate the schemas section with ``cronfleet schema`` (or run
``python -m tests.unit.test_protocol_doc``, which rewrites that section from the same output).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from common.actions import HttpAction, PythonAction, ShellAction
from common.cli import admin
from common.envelope import Accepted, Rejected, RejectionReason, open_envelope
from common.messages import (
    ALL_MESSAGES,
    CONTROL_ADAPTER,
    EVENT_ADAPTER,
    JOBS_CHANGED_ROUTING_KEY,
    MONITORED_ADAPTER,
    TRIGGER_ADAPTER,
    JobsChanged,
    RetryPolicy,
    Trigger,
    WireMessage,
)
from common.publisher import Publisher
from common.retries import DELAY_STEPS
from common.roles import SIGNED_BY
from common.settings import Settings
from common.signing import (
    KEY_ID_HEADER,
    SIGNATURE_HEADER,
    Keyring,
    Role,
    SignatureCheck,
    signature,
    signed_bytes,
)
from common.topology import Topology, event_routing_key

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
REGENERATE = (
    "docs/protocol.md is out of date with the wire models: regenerate its schemas section with "
    "`cronfleet schema` (one ```json block per type, under its `#### `type`` heading), or run "
    "`python -m tests.unit.test_protocol_doc`, which rewrites that section from the same output"
)
MODELS: dict[str, type[WireMessage]] = {m.model_fields["type"].default: m for m in ALL_MESSAGES}
MODELS_BY_CLASS = {model: name for name, model in MODELS.items()}
# The objects a trigger holds, each with a field table of its own (schemas in the trigger's $defs).
ACTIONS: dict[str, type[BaseModel]] = {
    "action.shell": ShellAction,
    "action.http": HttpAction,
    "action.python": PythonAction,
    "retry": RetryPolicy,
}

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)\n```[ \t]*$", re.MULTILINE | re.DOTALL)
SCHEMA_BLOCK = re.compile(r"^#### `([^`]+)`\n+```json\n(.*?)\n```[ \t]*$", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"<!-- (example|fields):([a-z.]+) -->")


# -- reading the document ---------------------------------------------------------------------


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _bounds(text: str, name: str) -> tuple[int, int]:
    """Where the body of section ``name`` (between its begin and end comments) starts and ends."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1, f"docs/protocol.md needs one {begin} … {end}"
    start = text.index(begin) + len(begin)
    stop = text.index(end)
    assert start < stop, f"{begin} must come before {end}"
    return start, stop


def _section(text: str, name: str) -> str:
    start, stop = _bounds(text, name)
    return text[start:stop]


def _table(text: str) -> list[list[str]]:
    """The body rows of the first markdown table in ``text`` (header and rule skipped)."""
    rows: list[list[str]] = []
    started = False
    for line in text.strip().splitlines():
        if not line.startswith("|"):
            if started:
                break
            continue
        started = True
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows.append(cells)
    assert len(rows) >= 3, f"expected a markdown table, found {text[:200]!r}"
    return rows[2:]


def _code(cell: str) -> str:
    """The text of the first `code span` of a table cell."""
    found = re.search(r"`([^`]+)`", cell)
    assert found, f"expected a `code` span in table cell {cell!r}"
    return found.group(1)


def _doc_schemas(text: str) -> dict[str, Any]:
    section = _section(text, "schemas")
    blocks = SCHEMA_BLOCK.findall(section)
    assert len(FENCE.findall(section)) == len(blocks), (
        f"every code block of the schemas section must sit under a #### `type` heading; {REGENERATE}"
    )
    schemas: dict[str, Any] = {}
    for name, body in blocks:
        assert name not in schemas, f"the schema of {name} is given twice; {REGENERATE}"
        try:
            schemas[name] = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            pytest.fail(f"the schema of {name} in docs/protocol.md is not JSON ({exc}); {REGENERATE}")
    return schemas


def _examples(text: str) -> list[tuple[str, str]]:
    """Every ```json block outside the schemas section, with the type its marker names."""
    start, stop = _bounds(text, "schemas")
    found = []
    for fence in FENCE.finditer(text):
        if start <= fence.start() < stop or fence.group(1).strip() != "json":
            continue
        before = text[: fence.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = re.fullmatch(r"<!-- example:([a-z.]+) -->", before.strip())
        assert marker, (
            f"the ```json block at offset {fence.start()} of docs/protocol.md has no "
            "<!-- example:TYPE --> line right above it (every JSON body in the document is checked)"
        )
        found.append((marker.group(1), fence.group(2)))
    return found


VECTOR_FIELDS = {"key_id", "role", "namespace", "routing_key", "body", "signature"}
HMAC_FIELDS = VECTOR_FIELDS | {"secret"}
ED25519_FIELDS = VECTOR_FIELDS | {"private_key", "public_key"}


def _vectors(text: str) -> list[dict[str, str]]:
    """The signature test vectors: fenced blocks of ``name: value`` lines in the vectors section."""
    vectors = []
    for _info, block in FENCE.findall(_section(text, "vectors")):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            name, sep, value = line.partition(": ")
            assert sep, f"a test vector line must be 'name: value', not {line!r}"
            fields[name] = value
        assert set(fields) in (HMAC_FIELDS, ED25519_FIELDS), f"bad test vector: {fields}"
        vectors.append(fields)
    return vectors


def _vector_keys(vector: dict[str, str]) -> tuple[Keyring, Keyring]:
    """The key of ``vector`` as a signer's key list and as a verifier's (the public key alone,
    for Ed25519)."""
    prefix = f"{vector['role']}:{vector['key_id']}"
    if "secret" in vector:
        keys = Keyring.parse(f"{prefix}:{vector['secret']}")
        return keys, keys
    return (
        Keyring.parse(f"{prefix}:ed25519:{vector['private_key']}"),
        Keyring.parse(f"{prefix}:ed25519-public:{vector['public_key']}"),
    )


def _signed_by_printf(vector: dict[str, str]) -> bytes:
    """The signed bytes as the document's shell recipes write them, with ``printf``."""
    script = 'printf \'cronfleet-v1\\n%s\\n%s\\n%s\' "$1" "$2" "$3"'
    result = subprocess.run(
        ["sh", "-c", script, "sh", vector["namespace"], vector["routing_key"], vector["body"]],
        capture_output=True,
        check=True,
    )
    return result.stdout


# -- what the code says -------------------------------------------------------------------------


def generated_schemas() -> dict[str, Any]:
    """What ``cronfleet schema`` prints, parsed (the command reads no setting)."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        asyncio.run(admin.schema(Settings.model_construct(), argparse.Namespace()))
    schemas: dict[str, Any] = orjson.loads(output.getvalue())
    return schemas


def render_schemas(schemas: dict[str, Any]) -> str:
    """The schemas section body, one heading and ```json block per message type."""
    blocks = [
        f"#### `{name}`\n\n```json\n{orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode()}\n```\n"
        for name, schema in schemas.items()
    ]
    return "\n\n" + "\n".join(blocks) + "\n"


class _Recorder:
    """A stand-in channel that records what a Topology declares."""

    def __init__(self) -> None:
        self.exchanges: dict[str, tuple[str, bool]] = {}
        self.queues: dict[str, tuple[dict[str, Any], bool]] = {}
        self.bindings: set[tuple[str, str, str]] = set()

    async def declare_exchange(self, name: str, kind: Any, durable: bool = False) -> str:
        self.exchanges[name] = (kind.value, durable)
        return name

    async def declare_queue(self, name: str, durable: bool = False, arguments: Any = None) -> Any:
        self.queues[name] = (dict(arguments or {}), durable)

        async def bind(exchange: Any, routing_key: str = "", arguments: Any = None) -> None:
            # A headers binding is written as its one header, ``name: value``, beside x-match.
            matched = [f"{k}: {v}" for k, v in (arguments or {}).items() if k != "x-match"]
            self.bindings.add((name, str(exchange), routing_key or "".join(matched)))

        return SimpleNamespace(bind=bind)


class _Exchange:
    """A stand-in exchange that keeps what is published on it."""

    def __init__(self) -> None:
        self.published: list[tuple[Any, str]] = []

    async def publish(self, message: Any, routing_key: str, mandatory: bool = False) -> None:
        self.published.append((message, routing_key))


# -- the tests ----------------------------------------------------------------------------------


def test_the_schemas_section_is_exactly_what_cronfleet_schema_prints() -> None:
    documented = _doc_schemas(_doc())
    generated = generated_schemas()
    assert list(documented) == list(generated), f"documented types {list(documented)}; {REGENERATE}"
    for name, schema in generated.items():
        assert documented[name] == schema, f"the JSON Schema of {name} differs; {REGENERATE}"


def test_every_message_type_has_a_field_table_matching_its_model() -> None:
    text = _doc()
    tables = {m.group(2): text[m.end() :] for m in MARKER.finditer(text) if m.group(1) == "fields"}
    assert set(tables) == set(MODELS) | set(ACTIONS), "one <!-- fields:TYPE --> table per message and action"
    schemas = generated_schemas()
    action_schemas = schemas["trigger"]["$defs"]
    for name, rest in tables.items():
        model = MODELS.get(name) or ACTIONS[name]
        schema = schemas[name] if name in MODELS else action_schemas[model.__name__]
        rows = _table(rest)
        fields = [_code(row[0]) for row in rows]
        assert sorted(fields) == sorted(model.model_fields), f"the field table of {name} lists {fields}"
        must = {_code(row[0]) for row in rows if row[2].lower().startswith("yes")}
        assert must == set(schema.get("required", [])), f"the Required column of {name}"


def test_every_example_body_is_accepted_by_its_model_and_by_the_receivers() -> None:
    examples = _examples(_doc())
    assert {kind for kind, _ in examples} == set(MODELS), "one example (at least) per message type"
    for kind, body in examples:
        strict = MODELS[kind].model_validate_json(body, strict=True)
        adapter: Any = {"trigger": TRIGGER_ADAPTER, "jobs.changed": CONTROL_ADAPTER}.get(
            kind, MONITORED_ADAPTER
        )
        received = adapter.validate_python(orjson.loads(body))  # as common.envelope parses it
        assert received == strict, f"the example {kind} body parses differently for a receiver"
        assert received.type == kind, f"an example marked {kind} is a {received.type}"


def test_the_signature_test_vectors_verify() -> None:
    vectors = _vectors(_doc())
    assert len(vectors) >= 3
    kinds = {orjson.loads(v["body"])["type"] for v in vectors}
    assert {"job.heartbeat", "trigger"} <= kinds, "vectors must include a heartbeat and a trigger"
    assert any(not v["body"].isascii() for v in vectors), "a vector must have non-ASCII UTF-8 in its body"
    assert any("private_key" in v and orjson.loads(v["body"])["type"] == "trigger" for v in vectors), (
        "a vector must be a trigger signed with an Ed25519 key"
    )
    assert len({v["namespace"] for v in vectors}) > 1, "a vector must use a namespace of its own"
    for vector in vectors:
        body = vector["body"].encode("utf-8")
        namespace, routing_key = vector["namespace"], vector["routing_key"]
        digits = 64 if "secret" in vector else 128
        assert re.fullmatch(f"[0-9a-f]{{{digits}}}", vector["signature"]), f"{digits} lowercase hex digits"
        if "secret" in vector:
            data = signed_bytes(namespace, routing_key, body)
            assert signature(vector["secret"].encode("utf-8"), data) == vector["signature"], vector
        signer, verifier = _vector_keys(vector)
        headers = {KEY_ID_HEADER: vector["key_id"], SIGNATURE_HEADER: vector["signature"]}
        assert verifier.check(namespace, routing_key, body, headers).outcome is SignatureCheck.VALID
        assert signer.sign(Role(vector["role"]), namespace, routing_key, body) == headers
        # And a receiver of that fleet accepts it, as sent with that routing key, at the time it says.
        message = MODELS[orjson.loads(body)["type"]].model_validate_json(body, strict=True)
        adapter: Any = TRIGGER_ADAPTER if isinstance(message, Trigger) else EVENT_ADAPTER
        expected_key = message.pool if isinstance(message, Trigger) else event_routing_key(message)
        assert routing_key == expected_key, "a vector's routing key is the one of section 3"
        now = datetime(2024, 5, 1, 2, 0, tzinfo=UTC)
        opened = open_envelope(
            body, headers, verifier, adapter, now, namespace=namespace, routing_key=routing_key
        )
        assert isinstance(opened, Accepted), (vector["key_id"], opened)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_the_openssl_commands_of_the_document_reproduce_the_vectors(tmp_path: Path) -> None:
    text = _doc()
    assert "printf 'cronfleet-v1\\n%s\\n%s\\n%s'" in text, "the recipes write the signed bytes with printf"
    version = subprocess.run(["openssl", "version"], capture_output=True, text=True, check=True).stdout
    for vector in _vectors(text):
        signed = _signed_by_printf(vector)
        assert signed == signed_bytes(vector["namespace"], vector["routing_key"], vector["body"].encode())
        if "secret" in vector:
            # printf 'cronfleet-v1\n%s\n%s\n%s' NS ROUTING_KEY BODY | openssl dgst -sha256 -hmac SECRET
            command = ["openssl", "dgst", "-sha256", "-hmac", vector["secret"]]
            result = subprocess.run(command, input=signed, capture_output=True, check=True)
            assert result.stdout.decode().split()[-1] == vector["signature"], vector
        elif not version.startswith("OpenSSL 1."):  # pkeyutl -rawin needs OpenSSL 3
            recipe = _section(text, "ed25519-recipe")
            script = FENCE.search(recipe)
            assert script is not None, "the Ed25519 recipe is a fenced block"
            lines = [line for line in script.group(2).splitlines() if not line.startswith("PRIVATE=")]
            result = subprocess.run(
                ["sh", "-c", "\n".join(lines)],
                cwd=tmp_path,
                env={
                    "PATH": os.environ["PATH"],
                    "PRIVATE": vector["private_key"],
                    "NS": vector["namespace"],
                    "POOL": vector["routing_key"],
                    "BODY": vector["body"],
                },
                capture_output=True,
                check=True,
            )
            assert result.stdout.decode() == vector["signature"], vector


def test_the_topology_table_matches_what_cronfleet_declares() -> None:
    channel = _Recorder()
    topology = Topology()  # the default namespace, as the document's table spells it
    asyncio.run(topology.declare_pool(channel, "default"))  # type: ignore[arg-type]
    asyncio.run(topology.declare_monitor(channel))  # type: ignore[arg-type]
    exchanges: dict[str, str] = {}
    queues: dict[str, dict[str, Any]] = {}
    bindings: set[tuple[str, str, str]] = set()
    for documented in _table(_section(_doc(), "topology")):
        # A delay queue's row stands for one queue per step (``<seconds>``).
        steps = DELAY_STEPS if "<seconds>" in documented[0] else [0]
        for seconds in steps:
            row = [
                cell.replace("<seconds>", str(seconds)).replace("<milliseconds>", str(seconds * 1000))
                for cell in documented
            ]
            name = _code(row[0]).replace("<pool>", "default")
            if row[1] == "exchange":
                exchanges[name] = _code(row[2])
                continue
            assert row[1] == "queue", f"the topology table knows exchanges and queues, not {row[1]!r}"
            queues[name] = orjson.loads(_code(row[3]))
            # "`exchange`, routing key `key`", "`exchange`, header `name: value`", or
            # "`exchange` (fanout: no routing key)"
            exchange, *key = re.findall(r"`([^`]*)`", row[4])
            bindings.add((name, exchange, key[0].replace("<pool>", "default") if key else ""))
    assert exchanges == {name: kind for name, (kind, _) in channel.exchanges.items()}
    assert queues == {name: arguments for name, (arguments, _) in channel.queues.items()}
    assert bindings == channel.bindings
    assert all(durable for _, durable in [*channel.exchanges.values(), *channel.queues.values()])


def test_the_routing_key_table_matches_the_publisher() -> None:
    patterns = {
        _code(row[0]): (_code(row[1]), _code(row[2])) for row in _table(_section(_doc(), "routing-keys"))
    }
    assert set(patterns) == set(MODELS)
    topology = Topology("<ns>")
    for kind, body in _examples(_doc()):
        message = MODELS[kind].model_validate_json(body)
        exchange, pattern = patterns[kind]
        expected = pattern
        for name, value in message.model_dump().items():
            expected = expected.replace(f"<{name}>", str(value))
        if isinstance(message, Trigger):
            assert exchange == topology.triggers_exchange
            assert expected == message.pool  # Publisher.trigger routes by the trigger's pool
        elif isinstance(message, JobsChanged):
            assert exchange == topology.control_exchange
            assert expected == JOBS_CHANGED_ROUTING_KEY
        else:
            assert exchange == topology.events_exchange
            assert expected == event_routing_key(message)


def test_the_roles_table_matches_the_code() -> None:
    documented = {
        _code(row[0]): {role.strip(" `") for role in row[1].split(",")}
        for row in _table(_section(_doc(), "roles"))
    }
    assert documented == {
        MODELS_BY_CLASS[model]: {role.value for role in roles} for model, roles in SIGNED_BY.items()
    }


def test_the_rejection_reasons_and_dead_letter_headers_match_the_code() -> None:
    text = _doc()
    reasons = {_code(row[0]) for row in _table(_section(text, "rejection-reasons"))}
    assert reasons == {reason.value for reason in RejectionReason}

    dead = _Exchange()
    keyring = Keyring.parse("event:k:" + "s" * 16)
    publisher = Publisher(channel=None, exchanges={"dead": dead}, keyring=keyring, namespace="ns")  # type: ignore[arg-type]
    original = {KEY_ID_HEADER: "k", SIGNATURE_HEADER: "00"}
    message = SimpleNamespace(
        headers=dict(original), body=b"{}", routing_key="default", exchange="x", message_id="m"
    )
    asyncio.run(publisher.dead_letter(message, Rejected(RejectionReason.MALFORMED, "d"), "w"))  # type: ignore[arg-type]
    [(copy, routing_key)] = dead.published
    added = set(copy.headers) - set(original)
    documented = {_code(row[0]) for row in _table(_section(text, "dead-letter-headers"))}
    assert documented == added
    assert copy.body == b"{}" and copy.message_id == "m" and routing_key == ""
    assert {KEY_ID_HEADER, SIGNATURE_HEADER} <= set(copy.headers), "dead letters keep the signature"


def main() -> None:
    """Rewrite the schemas section of docs/protocol.md from what ``cronfleet schema`` prints."""
    text = _doc()
    start, stop = _bounds(text, "schemas")
    DOC.write_text(text[:start] + render_schemas(generated_schemas()) + text[stop:], encoding="utf-8")
    print(f"rewrote the schemas section of {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()


def test_the_runs_json_fields_are_the_recorded_columns() -> None:
    """``cronfleet runs --json`` prints every column of a run: the doc names each, no other."""
    from common.messages import RunStatus
    from common.store.models import RunRow

    rows = _table(_section(_doc(), "runs-json"))
    assert [_code(row[0]) for row in rows] == [column.key for column in RunRow.__table__.columns]
    statuses = next(row[1] for row in rows if _code(row[0]) == "status")
    for status in RunStatus:
        assert f"`{status.value}`" in statuses, status
