"""The monitor serves HTTP when asked (``--http HOST:PORT``): the OpenAPI document at
``/openapi.json``, JSON errors, and the port is let go when the monitor stops."""

from __future__ import annotations

import socket

import httpx
import orjson

from common.services import ServiceOptions, parse_listen_address
from common.settings import Settings
from common.store import Store
from tests.fleet import Fleet, cronfleet, run_cronfleet


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_a_monitor_serves_its_openapi_document_and_lets_the_port_go_when_it_stops(
    settings: Settings,
) -> None:
    port = free_port()
    fleet = Fleet(settings)
    try:
        await fleet.start("monitor", http=("127.0.0.1", port))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
            document = await client.get("/openapi.json")
            assert document.status_code == 200 and document.json()["info"]["title"] == "cronfleet monitor"
            missing = await client.get("/no/such/page")
            assert missing.status_code == 404 and "Traceback" not in missing.text
    finally:
        await fleet.stop()
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # free again


def test_a_bad_http_address_is_refused_in_one_line(settings: Settings) -> None:
    for bad in ("8080", "host:", "host:99999", ":80"):
        result = cronfleet(settings, "monitor", "--http", bad)
        assert result.returncode == 1 and "--http" in result.stderr and "Traceback" not in result.stderr, bad
    assert parse_listen_address("[::1]:8080") == ("::1", 8080)
    assert ServiceOptions(http=("127.0.0.1", 0)).http == ("127.0.0.1", 0)


async def test_api_keys_are_made_listed_and_revoked_and_the_api_refuses_anything_else(
    settings: Settings, store: Store
) -> None:
    made = await run_cronfleet(settings, "keys", "api", "new", "grafana", "--read-only")
    assert made.returncode == 0, made.stderr
    key = made.stdout.splitlines()[-1]
    assert key.startswith("cfk_") and "shown only now" in made.stdout
    assert (
        await run_cronfleet(settings, "keys", "api", "new", "grafana")
    ).returncode == 1  # the name is taken
    listed = orjson.loads((await run_cronfleet(settings, "keys", "api", "list", "--json")).stdout)
    assert [(k["name"], k["access"], k["revoked_at"]) for k in listed] == [("grafana", "read-only", None)]
    assert key.split("_")[-1] not in (await run_cronfleet(settings, "keys", "api", "list")).stdout

    port = free_port()
    fleet = Fleet(settings)
    try:
        await fleet.start("monitor", http=("127.0.0.1", port))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
            ok = await client.get("/api/key", headers={"X-API-Key": key})
            assert ok.status_code == 200 and ok.json() == {"name": "grafana", "read_only": True}
            for wrong in (None, "", "cfk_nope", key[:-1] + ("A" if key[-1] != "A" else "B")):
                headers = {} if wrong is None else {"X-API-Key": wrong}
                refused = await client.get("/api/key", headers=headers)
                assert (refused.status_code, refused.json()) == (401, {"error": "unauthorized"}), wrong
            assert (await run_cronfleet(settings, "keys", "api", "revoke", "grafana")).returncode == 0
            revoked = await client.get("/api/key", headers={"X-API-Key": key})
            assert (revoked.status_code, revoked.json()) == (401, {"error": "unauthorized"})
    finally:
        await fleet.stop()
    assert (await run_cronfleet(settings, "keys", "api", "revoke", "nobody")).returncode == 1
