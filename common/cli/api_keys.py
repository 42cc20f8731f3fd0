"""``cronfleet keys api new NAME [--read-only] | list | revoke NAME``: the monitor's API keys."""

from __future__ import annotations

import argparse
from typing import Any

from common.api_keys import ApiKey, create_api_key, list_api_keys, revoke_api_key
from common.cli.admin import open_store
from common.cli.output import emit
from common.clock import utcnow
from common.settings import Settings


def add_parser(keys_commands: Any) -> None:
    """Add ``api`` under ``cronfleet keys``."""
    api = keys_commands.add_parser(
        "api", help="keys of the monitor's HTTP API", description="keys of the monitor's HTTP API (X-API-Key)"
    )
    actions = api.add_subparsers(dest="api_command", required=True, metavar="ACTION")
    new = actions.add_parser(
        "new", help="create a key and print it once", description="create a key, print it once"
    )
    new.set_defaults(handler=new_key)
    new.add_argument("name", help="what the key is for, e.g. grafana or deploy-bot")
    new.add_argument("--read-only", action="store_true", help="may read everything and change nothing")
    listing = actions.add_parser("list", help="every key (never its secret)", description="every API key")
    listing.set_defaults(handler=list_keys)
    listing.add_argument("--json", action="store_true", help="print JSON")
    revoke = actions.add_parser("revoke", help="refuse a key from now on", description="revoke an API key")
    revoke.set_defaults(handler=revoke_key)
    revoke.add_argument("name")


def _row(key: ApiKey) -> dict[str, object]:
    return {
        "name": key.name,
        "id": key.id,
        "access": "read-only" if key.read_only else "read-write",
        "created_at": key.created_at,
        "last_used_at": key.last_used_at,
        "revoked_at": key.revoked_at,
    }


async def new_key(settings: Settings, args: argparse.Namespace) -> int:
    """Create an API key and print it: it is not stored in clear and cannot be shown again."""
    async with open_store(settings) as store:
        key, text = await create_api_key(store, args.name, read_only=args.read_only, now=utcnow())
    access = "read-only" if key.read_only else "read-write"
    print(f"# API key {key.name!r} ({access}); send it as the X-API-Key header. It is shown only now.")
    print(text)
    return 0


async def list_keys(settings: Settings, args: argparse.Namespace) -> int:
    """List every API key, revoked ones too; never a secret."""
    async with open_store(settings) as store:
        keys = await list_api_keys(store)
    emit(
        [_row(key) for key in keys],
        ["name", "id", "access", "created_at", "last_used_at", "revoked_at"],
        args.json,
    )
    return 0


async def revoke_key(settings: Settings, args: argparse.Namespace) -> int:
    """Revoke a key: every request with it is refused from now on."""
    async with open_store(settings) as store:
        key = await revoke_api_key(store, args.name, utcnow())
    print(f"revoked API key {key.name!r}")
    return 0
