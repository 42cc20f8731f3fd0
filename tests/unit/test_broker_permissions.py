"""Each role's RabbitMQ rights match exactly the names its processes use, in its own namespace:
the regexes as the broker will read them (anchored, escaped), and the commands that set them."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from common.broker_permissions import (
    CREATING_ROLES,
    DECLARING_ROLES,
    NOTHING,
    BrokerPermissions,
    Role,
    anchored,
    permissions,
)
from common.cli.broker import UNSAFE_VHOST, default_user, role_url, vhost_of
from common.topology import Topology

NS = "cronfleet"
T = Topology(NS)
ALL_NAMES = [
    T.triggers_exchange,
    T.events_exchange,
    T.dead_exchange,
    T.dead_queue,
    T.monitor_queue,
    T.pool_queue("a"),
    T.pool_queue("b"),
]


def matches(regex: str, name: str) -> bool:
    """Whether RabbitMQ grants ``name`` under ``regex``: it searches with PCRE, which reads these
    regexes as Python does (anchors, escapes, ``(?:``, ``(?!``, ``{m,n}``)."""
    return re.search(regex, name) is not None


def rights(role: Role, **options: object) -> BrokerPermissions:
    return permissions(NS, "/", role, **options)  # type: ignore[arg-type]


def test_a_ping_user_may_publish_job_heartbeats_to_the_events_exchange_and_nothing_else() -> None:
    ping = rights(Role.PING)
    assert matches(ping.write, T.events_exchange)
    assert not matches(ping.write, T.triggers_exchange)
    assert ping.topic_exchange == T.events_exchange
    assert matches(ping.topic_write, "job.heartbeat.backup-db")
    for key in (
        "run.finished.backup-db",
        "run.started.backup-db",
        "worker.heartbeat.default",
        "scheduler.heartbeat",
        "job.heartbeat.",
        "job.heartbeat.a.b",
        "job.heartbeat.x\n",
        "xjob.heartbeat.x",
        "job.heartbeatxx",
    ):
        assert not matches(ping.topic_write, key), key
    for queue in (T.monitor_queue, T.pool_queue("a")):
        assert not matches(ping.read, queue), queue


def test_a_ping_user_can_be_narrowed_to_some_jobs() -> None:
    ping = rights(Role.PING, jobs=["backup", "report-1"])
    assert matches(ping.topic_write, "job.heartbeat.backup")
    assert matches(ping.topic_write, "job.heartbeat.report-1")
    assert not matches(ping.topic_write, "job.heartbeat.backup2")
    assert not matches(ping.topic_write, "job.heartbeat.other")


def test_a_ping_user_needs_no_right_but_publishing_heartbeats() -> None:
    """``cronfleet ping`` opens its publisher passively: it can neither declare nor delete
    anything, nor read any queue."""
    ping = rights(Role.PING)
    assert ping.configure == NOTHING
    assert ping.read == NOTHING
    assert ping.write == anchored([re.escape(T.events_exchange)])
    assert ping.topic_read == NOTHING
    for name in ALL_NAMES:
        assert not matches(ping.configure, name), name


def test_a_worker_reads_its_pools_and_writes_events_and_dead_letters_never_triggers() -> None:
    worker = rights(Role.WORKER, pools=["a"])
    assert matches(worker.read, T.pool_queue("a"))
    assert not matches(worker.read, T.pool_queue("b"))
    assert not matches(worker.read, T.monitor_queue)
    assert matches(worker.write, T.events_exchange)
    assert matches(worker.write, T.dead_exchange)
    assert not matches(worker.write, T.triggers_exchange)
    assert not matches(worker.configure, T.pool_queue("b"))
    for key in ("run.started.j", "run.finished.j", "worker.heartbeat.a", "event.batch.a"):
        assert matches(worker.topic_write, key), key
    for key in (
        "worker.heartbeat.b",
        "job.heartbeat.j",
        "scheduler.heartbeat",
        "run.finished.j.k",
        "event.batch.b",
        "event.batch",
    ):
        assert not matches(worker.topic_write, key), key


def test_a_worker_of_several_pools_reads_each_and_no_other() -> None:
    worker = rights(Role.WORKER, pools=["a", "b"])
    assert matches(worker.read, T.pool_queue("a"))
    assert matches(worker.read, T.pool_queue("b"))
    assert not matches(worker.read, T.pool_queue("c"))
    assert not matches(worker.read, T.pool_queue("ab"))


def test_a_worker_only_consumes_and_publishes() -> None:
    """A worker opens its publisher passively and looks its pool's queue up without declaring
    it: no configure right, so it cannot delete the queues it uses."""
    worker = rights(Role.WORKER, pools=["a"])
    assert worker.configure == NOTHING
    assert worker.read == anchored([re.escape(T.pool_queue("a"))])
    # It publishes events, dead letters and retries (to the headers exchange of the delay queues).
    assert worker.write == anchored(
        [re.escape(T.events_exchange), re.escape(T.dead_exchange), re.escape(T.retry_exchange)]
    )
    assert not matches(worker.write, T.triggers_exchange)
    assert worker.topic_read == NOTHING


def test_only_what_publishes_triggers_creates_the_delay_queues_that_dead_letter_to_them() -> None:
    for role in (Role.SCHEDULER, Role.ADMIN):
        assert matches(rights(role).configure, T.delay_queue(30))
        assert matches(rights(role).write, T.triggers_exchange)
    assert not matches(rights(Role.MONITOR).configure, T.delay_queue(30))
    assert matches(rights(Role.MONITOR).configure, T.retry_exchange)


def test_the_declaring_roles_are_the_ones_that_may_create() -> None:
    assert DECLARING_ROLES == CREATING_ROLES == {Role.SCHEDULER, Role.ADMIN, Role.MONITOR}


def test_a_monitor_reads_its_queue_and_publishes_only_dead_letters() -> None:
    monitor = rights(Role.MONITOR)
    assert matches(monitor.read, T.monitor_queue)
    assert not matches(monitor.read, T.pool_queue("a"))
    assert matches(monitor.write, T.dead_exchange)
    assert not matches(monitor.write, T.triggers_exchange)
    assert not matches(monitor.write, T.events_exchange)
    assert monitor.topic_write == NOTHING


def test_a_scheduler_publishes_triggers_to_any_pool_and_only_its_own_heartbeat() -> None:
    scheduler = rights(Role.SCHEDULER)
    assert matches(scheduler.write, T.triggers_exchange)
    for name in [*ALL_NAMES, T.pool_queue("any-pool_1")]:
        assert matches(scheduler.configure, name), name
    assert matches(scheduler.topic_write, "scheduler.heartbeat")
    for key in ("job.heartbeat.j", "run.finished.j", "worker.heartbeat.a"):
        assert not matches(scheduler.topic_write, key), key


def test_a_scheduler_can_be_narrowed_to_some_pools() -> None:
    scheduler = rights(Role.SCHEDULER, pools=["a"])
    assert matches(scheduler.configure, T.pool_queue("a"))
    assert not matches(scheduler.configure, T.pool_queue("b"))


def test_an_admin_is_a_scheduler_that_may_also_ping() -> None:
    admin, scheduler = rights(Role.ADMIN), rights(Role.SCHEDULER)
    # ... but does not listen for jobs.changed: no control queue of its own, nothing to refuse.
    control_queue = f"{NS}.control.0123456789ab"
    assert matches(scheduler.configure, control_queue) and not matches(admin.configure, control_queue)
    assert matches(scheduler.read, f"{NS}.control") and not matches(admin.read, f"{NS}.control")
    for right in ("configure", "write", "read"):
        for name in (f"{NS}.{n}" for n in ("triggers", "events", "pool.default", "monitor")):
            assert matches(getattr(admin, right), name) == matches(getattr(scheduler, right), name)
    assert matches(admin.write, f"{NS}.control") and matches(scheduler.write, f"{NS}.control")
    assert matches(admin.topic_write, "job.heartbeat.j")
    assert matches(admin.topic_write, "scheduler.heartbeat")
    assert not matches(admin.topic_write, "run.finished.j")


@pytest.mark.parametrize("role", sorted(DECLARING_ROLES))
def test_every_declaring_role_may_declare_what_its_publisher_declares(role: Role) -> None:
    """Publisher.open(declare=True) declares the exchanges and both shared queues; the roles
    that may create them also hold what creating the monitor queue takes."""
    granted = rights(role)
    for name in (T.triggers_exchange, T.events_exchange, T.dead_exchange, T.dead_queue, T.monitor_queue):
        assert matches(granted.configure, name), name
    for queue in (T.dead_queue, T.monitor_queue):
        assert matches(granted.write, queue), queue  # binding it
    assert matches(granted.read, T.events_exchange)  # binding the monitor queue to it
    assert matches(granted.topic_read, "#")
    assert not matches(granted.topic_read, "job.#")
    assert matches(granted.read, T.monitor_queue)


@pytest.mark.parametrize("role", list(Role))
def test_no_right_reaches_the_default_or_built_in_exchanges(role: Role) -> None:
    granted = rights(role, pools=["a"]) if role is Role.WORKER else rights(role)
    for regex in (granted.configure, granted.write, granted.read):
        for name in ("amq.default", "amq.topic", "amq.direct", "", "cronfleet", "cronfleet."):
            # NOTHING (``^$``) matches only the empty name, which no resource has: the broker
            # checks the default exchange as ``amq.default``.
            assert not matches(regex, name) or (regex, name) == (NOTHING, ""), (regex, name)


namespaces = st.from_regex(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,20}$", fullmatch=True)


def _names_of(namespace: str) -> list[str]:
    topology = Topology(namespace)
    return [
        topology.triggers_exchange,
        topology.events_exchange,
        topology.dead_exchange,
        topology.monitor_queue,
        topology.pool_queue("a"),
        topology.pool_queue("zz"),
    ]


@given(ours=namespaces, theirs=namespaces)
@example(ours="cronfleet", theirs="cronfleet2")
@example(ours="cronfleet", theirs="cronfleet.x")
@example(ours="cronfleet.x", theirs="cronfleet")
@example(ours="a", theirs="a.poolx")
def test_no_right_reaches_a_name_of_another_namespace(ours: str, theirs: str) -> None:
    """Except a namespace ``NS.pool`` or ``NS.pool.*``: its names are pool queue names of ``NS``
    too (see the next test)."""
    if ours == theirs or f"{theirs}.".startswith(f"{ours}.pool."):
        return
    for role in Role:
        granted = permissions(ours, "/", role, ["a"] if role is Role.WORKER else [])
        for regex in (granted.configure, granted.write, granted.read):
            for name in _names_of(theirs):
                assert not matches(regex, name), (role, regex, name)


def test_a_namespace_under_another_ones_pools_shares_its_names() -> None:
    """The topology's own limit, not the rights': namespace ``a``'s pool ``triggers`` and
    namespace ``a.pool``'s triggers exchange are both ``a.pool.triggers``. Give each fleet its
    own virtual host (or namespaces that do not nest)."""
    assert Topology("a").pool_queue("triggers") == Topology("a.pool").triggers_exchange
    assert matches(rights(Role.SCHEDULER).configure, Topology(f"{NS}.pool").triggers_exchange)


@given(namespace=namespaces, pool=st.from_regex(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", fullmatch=True))
def test_names_are_escaped_so_every_character_is_itself(namespace: str, pool: str) -> None:
    worker = permissions(namespace, "/", Role.WORKER, [pool])
    topology = Topology(namespace)
    assert matches(worker.read, topology.pool_queue(pool))
    # A dot in the namespace matches a dot only.
    assert not matches(worker.read, topology.pool_queue(pool).replace(".", "x", 1))


@pytest.mark.parametrize(
    ("pools", "jobs", "complaint"),
    [
        ([], [], "at least one pool"),
        (["a.b"], [], "pool 'a.b'"),
        (["a", "#"], [], "pool '#'"),
        (["a"], ["*"], "job '*'"),
        (["a"], ["x\n"], "job 'x\\n'"),
    ],
)
def test_a_name_the_wire_refuses_is_refused(pools: list[str], jobs: list[str], complaint: str) -> None:
    with pytest.raises(ValueError, match=re.escape(complaint)):
        permissions(NS, "/", Role.WORKER, pools, jobs)


def test_anchoring() -> None:
    assert anchored([]) == NOTHING
    assert anchored(["b", "a", "a"]) == "^(?:a|b)(?!\\n)$"
    assert anchored(["a"]) == "^a(?!\\n)$"


@pytest.mark.parametrize("role", list(Role))
def test_the_commands_replace_the_triple_and_the_topic_rights(role: Role) -> None:
    granted = permissions(NS, "my vhost", role, ["a"] if role is Role.WORKER else [])
    set_permissions, set_topic = granted.commands("u1", "/opt/rabbitmqctl")
    assert set_permissions == [
        "/opt/rabbitmqctl",
        "set_permissions",
        "-p",
        "my vhost",
        "u1",
        granted.configure,
        granted.write,
        granted.read,
    ]
    assert set_topic[:6] == [
        "/opt/rabbitmqctl",
        "set_topic_permissions",
        "-p",
        "my vhost",
        "u1",
        T.events_exchange,
    ]
    for argument in set_permissions + set_topic:
        # Debian's rabbitmqctl wrapper re-reads each argument in double quotes with sh -c.
        assert "$(" not in argument and "`" not in argument and "${" not in argument, argument
        assert not argument.startswith("-") or argument == "-p"
        re.compile(argument)


def test_the_vhost_comes_from_the_amqp_url() -> None:
    assert vhost_of("amqp://u:p@h:5672/") == "/"
    assert vhost_of("amqp://u:p@h:5672") == "/"
    assert vhost_of("amqp://u:p@h/%2F") == "/"
    assert vhost_of("amqps://u:p@h:5671/prod?cafile=/ca.pem") == "prod"
    assert vhost_of("amqp://h/my%20vhost") == "my vhost"
    assert vhost_of("amqp://u:p@node1/prod,amqp://u:p@node2/prod") == "prod"


def test_a_role_url_keeps_host_port_and_tls_options() -> None:
    url = role_url("amqps://guest:guest@rabbit.example:5671/old?cafile=/etc/ca.pem", "cf-ping", "s3", "prod")
    assert url == "amqps://cf-ping:s3@rabbit.example:5671/prod?cafile=/etc/ca.pem"
    assert role_url("amqp://h", "u", "p", "/") == "amqp://u:p@h/"
    assert role_url("amqp://h/", "u", "p@:/", "a b") == "amqp://u:p%40%3A%2F@h/a%20b"
    assert role_url("amqp://g:g@node1/,amqp://g:g@node2:5673/", "u", "p", "v") == (
        "amqp://u:p@node1/v,amqp://u:p@node2:5673/v"
    )


def test_default_user_names() -> None:
    assert default_user("cf", Role.PING, []) == "cf-ping"
    assert default_user("cf", Role.WORKER, ["gpu"]) == "cf-worker-gpu"
    assert default_user("cf", Role.WORKER, ["a", "b"]) == "cf-worker"


def test_a_vhost_the_shell_wrapper_would_expand_is_refused() -> None:
    for vhost in ("a$(id)", "a`id`", "a\\b", "a\nb"):
        assert UNSAFE_VHOST.search(vhost), vhost
    assert not UNSAFE_VHOST.search("prod-1 / eu")
