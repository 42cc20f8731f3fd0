"""``cronfleet broker permissions``: one RabbitMQ user per role, with only that role's rights."""

from __future__ import annotations

import argparse
import asyncio
import re
import secrets
import shlex
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from common.broker_permissions import BrokerPermissions, Role, permissions
from common.errors import BrokerUnavailable, ConfigError
from common.settings import Settings, split_urls

# What rabbitmqctl takes as a user name without mistaking it for an option or splitting it.
USER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$"
# Debian's rabbitmqctl wrapper, run as root, hands its arguments to ``sh -c`` inside double
# quotes: there a dollar sign, a backquote or a backslash would be the shell's, not the vhost's.
UNSAFE_VHOST = re.compile(r"[$`\\\n]")


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``broker permissions`` to the command line's subcommands."""
    text = "RabbitMQ users and their rights, one user per role"
    broker = commands.add_parser("broker", help=text, description=text)
    actions = broker.add_subparsers(dest="broker_command", required=True, metavar="ACTION")
    text = "print or apply the narrowest RabbitMQ rights of a role (with rabbitmqctl)"
    sub = actions.add_parser("permissions", help=text, description=text)
    sub.set_defaults(handler=permissions_command)
    sub.add_argument("--role", required=True, choices=[r.value for r in Role])
    sub.add_argument("--user", help="the RabbitMQ user (default: NAMESPACE-ROLE, or NAMESPACE-worker-POOL)")
    sub.add_argument(
        "--pool",
        action="append",
        default=[],
        help="a worker's pool (repeat; required for a worker); "
        "for a scheduler or admin, only these pools (default: any)",
    )
    sub.add_argument(
        "--job",
        action="append",
        default=[],
        help="for ping or admin, only these jobs' heartbeats (default: any)",
    )
    sub.add_argument("--vhost", help="the virtual host (default: the one in CRONFLEET_AMQP_URL)")
    sub.add_argument(
        "--create-user", action="store_true", help="also create the user, with a new password printed once"
    )
    sub.add_argument("--rabbitmqctl", default="rabbitmqctl", help="the rabbitmqctl to run (default: on PATH)")
    mode = sub.add_mutually_exclusive_group(required=True)
    mode.add_argument("--print", action="store_true", help="print the rabbitmqctl commands, run nothing")
    mode.add_argument("--apply", action="store_true", help="run them")


async def permissions_command(settings: Settings, args: argparse.Namespace) -> int:
    """Print or run the ``rabbitmqctl`` commands that give one user one role's rights.

    Raises ConfigError for a bad role, user, pool or job, or a missing rabbitmqctl;
    BrokerUnavailable when rabbitmqctl fails (its own reason, in one line)."""
    role = Role(args.role)
    vhost = args.vhost or vhost_of(settings.amqp_url)
    if UNSAFE_VHOST.search(vhost):
        raise ConfigError(
            f"virtual host {vhost!r} has a $, ` or \\ that rabbitmqctl's shell wrapper would expand"
        )
    user = args.user or default_user(settings.namespace, role, args.pool)
    if not re.fullmatch(USER_PATTERN, user):
        raise ConfigError(
            f"user name {user!r} is not one rabbitmqctl takes safely (it must match {USER_PATTERN})"
        )
    if args.pool and role in (Role.PING, Role.MONITOR):
        raise ConfigError(f"--pool narrows a scheduler, admin or worker; a {role} uses no pool")
    if args.job and role not in (Role.PING, Role.ADMIN):
        raise ConfigError(f"--job narrows a ping or admin user; a {role} publishes no job heartbeat")
    try:
        granted = permissions(settings.namespace, vhost, role, args.pool, args.job)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    password = secrets.token_hex(24) if args.create_user else None
    commands = granted.commands(user, args.rabbitmqctl)
    if password is not None:
        commands.insert(0, [args.rabbitmqctl, "add_user", user, password])
    url = role_url(settings.amqp_url, user, password or "PASSWORD", vhost)
    if args.print:
        print(f"# cronfleet role {role} in namespace {settings.namespace!r}, virtual host {vhost!r}")
        for argv in commands:
            print(shlex.join(argv))
        print(f"# then run its processes with CRONFLEET_AMQP_URL={url}")
        return 0
    if password is not None:
        await _run(commands[0], user, secret=password)
        # Said at once: if a later command fails, the user still exists.
        print(f"created {user!r}; its password is shown once: CRONFLEET_AMQP_URL={url}", flush=True)
        commands = commands[1:]
    # The rights in the virtual host and those on the topic exchange are independent of each
    # other: set together (each rabbitmqctl starts an Erlang VM, a second or so).
    ran = await asyncio.gather(
        *(_run(argv, user, secret=password) for argv in commands), return_exceptions=True
    )
    failures = [outcome for outcome in ran if isinstance(outcome, BaseException)]
    if failures:
        raise failures[0]
    print(f"gave {user!r} the rights of a {role} in namespace {settings.namespace!r}, virtual host {vhost!r}")
    _print_rights(granted)
    return 0


def _print_rights(granted: BrokerPermissions) -> None:
    for name in ("configure", "write", "read"):
        print(f"  {name:9} {getattr(granted, name)}")
    print(f"  topics on {granted.topic_exchange}: write {granted.topic_write}, read {granted.topic_read}")


async def _run(argv: list[str], user: str, *, secret: str | None) -> None:
    """Run one rabbitmqctl command; its failure becomes one line (never with ``secret`` in it)."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except OSError as exc:
        raise ConfigError(
            f"cannot run {argv[0]!r} ({exc.strerror or exc}): install RabbitMQ's command line tools "
            "here or pass --rabbitmqctl, or use --print and run the commands on the broker's host"
        ) from exc
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        said = " ".join((stderr or stdout).decode(errors="replace").split())[:500]
        if secret:
            said = said.replace(secret, "***")
        raise BrokerUnavailable(
            f"rabbitmqctl {argv[1]} for user {user!r} failed (exit {process.returncode}): "
            f"{said or 'no reason given'}"
        )


def vhost_of(amqp_url: str) -> str:
    """The virtual host an AMQP URL names (the first of several): its path, unquoted; ``/`` when
    it has none."""
    path = urlsplit(split_urls(amqp_url)[0]).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def default_user(namespace: str, role: Role, pools: list[str]) -> str:
    """``NAMESPACE-ROLE``; a worker of one pool is ``NAMESPACE-worker-POOL``."""
    if role is Role.WORKER and len(pools) == 1:
        return f"{namespace}-{role}-{pools[0]}"
    return f"{namespace}-{role}"


def role_url(amqp_url: str, user: str, password: str, vhost: str) -> str:
    """``amqp_url`` (scheme, host, port, TLS options; each node of several) for ``user`` in
    ``vhost``."""
    return ",".join(_node_url(url, user, password, vhost) for url in split_urls(amqp_url))


def _node_url(amqp_url: str, user: str, password: str, vhost: str) -> str:
    parts = urlsplit(amqp_url)
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}{port}"
    path = "/" if vhost == "/" else "/" + quote(vhost, safe="")
    return urlunsplit(parts._replace(netloc=netloc, path=path))
