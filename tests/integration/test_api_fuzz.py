"""Schemathesis fuzzes the live monitor's OpenAPI document with a read-write key: whatever it
sends, no answer is a 5xx, and every answer has a status, a content type and a body that the
document declares for that operation. A bounded number of examples per operation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as fuzz_settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Err

from common.api_keys import create_api_key
from common.clock import utcnow
from common.store import Store
from tests.conftest import Counts, Start
from tests.integration.helpers import apply_toml
from tests.integration.test_http_server import free_port

EXAMPLES_PER_OPERATION = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _fuzz(base_url: str, headers: dict[str, str]) -> tuple[dict[str, int], dict[int, int]]:
    """Fuzz every ``/api/`` operation; how many requests each got, and how many got each status."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    calls: dict[str, int] = {}
    statuses: dict[int, int] = {}
    operations = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        operations.append(result.ok())
    # Deletions last, so that the other operations' examples find the job they name.
    operations.sort(key=lambda operation: operation.method.upper() == "DELETE")
    for operation in operations:
        if operation.path.startswith("/api/"):
            calls[operation.label] = 0
            _fuzz_operation(operation, base_url, headers, calls, statuses)
    return calls, statuses


def _fuzz_operation(
    operation: Any, base_url: str, headers: dict[str, str], calls: dict[str, int], statuses: dict[int, int]
) -> None:
    """Send ``EXAMPLES_PER_OPERATION`` generated requests to ``operation`` and check each answer;
    raises what the first failing check found."""

    @given(case=operation.as_strategy())
    @fuzz_settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def call(case: Any) -> None:
        response = case.call(base_url=base_url, headers=headers, timeout=10)
        calls[operation.label] += 1
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        case.validate_response(response, checks=CHECKS)

    call()


async def test_schemathesis_finds_no_server_error_and_no_answer_off_the_schema(
    store: Store, fleet: Start, counts: Counts
) -> None:
    await apply_toml(
        store,
        '[jobs.backup]\nschedule = "0 0 1 1 *"\naction = { type = "shell", argv = ["true"] }\n'
        '[jobs.beats]\nschedule = "@daily"\n',
    )
    _key, secret = await create_api_key(store, "fuzzer", read_only=False, now=utcnow())
    port = free_port()
    await fleet("monitor", http=("127.0.0.1", port))
    # schemathesis is synchronous: it runs in a thread while the monitor serves in this loop.
    calls, statuses = await asyncio.to_thread(_fuzz, f"http://127.0.0.1:{port}", {"X-API-Key": secret})
    assert len(calls) >= 14 and all(calls.values()), calls
    # The key was taken (not replaced by a generated header): reads and writes got through.
    assert statuses.get(200, 0) > 50 and statuses.get(401, 0) == 0, statuses
    counts(
        f"schemathesis: {sum(calls.values())} requests over {len(calls)} operations, no failure; "
        f"statuses {dict(sorted(statuses.items()))}"
    )


pytestmark = pytest.mark.timeout(120)
