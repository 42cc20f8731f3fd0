"""The RabbitMQ rights of each cronfleet role, as the regexes the broker itself checks: pure.

A role's rights are derived from what its processes do on the broker (declare, bind, publish,
consume), following RabbitMQ's access-control table, so that each right has a reason:

- declare an exchange or a queue (not passive): configure on its name;
- create a queue that dead-letters to D: configure and read on the queue, write on D;
- bind queue Q to exchange X with key K: write on Q, read on X, topic read on K if X is a topic one;
- publish to exchange X with key K: write on X, topic write on K if X is a topic one;
- consume (or get from, or purge) queue Q: read on Q;
- declare passively: nothing.

Re-declaring a queue that already exists needs only ``configure`` on it (measured on 3.10.8);
creating one that dead-letters needs ``read`` on it and ``write`` on the dead-letter exchange as
well. Topic rights are checked on the events exchange only (the only topic exchange).
Permissions are per virtual host: a user holds one role, in one namespace, per virtual host.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from common.messages import (
    JOB_NAME_PATTERN,
    POOL_PATTERN,
    EventBatch,
    JobHeartbeat,
    RunFinished,
    RunStarted,
    SchedulerHeartbeat,
    WireMessage,
    WorkerHeartbeat,
)
from common.topology import Topology


class Role(enum.StrEnum):
    """What a broker user is for; each role gets only the rights its processes use."""

    SCHEDULER = "scheduler"  # publishes triggers to any pool, declares the pools' queues
    WORKER = "worker"  # consumes its pools (declared by a scheduler), publishes run events and dead letters
    MONITOR = "monitor"  # consumes the monitor queue, publishes dead letters
    PING = "ping"  # publishes job heartbeats, nothing else
    ADMIN = "admin"  # the command line (apply, trigger, ping): a scheduler that may also ping


# Roles whose processes declare (not passively) the shared topology: the three exchanges, the
# dead-letter queue and the monitor queue with its binding (``Publisher.open(declare=True)``).
# Declaring an existing name needs ``configure`` on it, which also allows deleting it, so
# ``cronfleet ping`` and workers open their publisher passively and a worker only looks its
# pool's queue up: they need no configure right at all, and cannot create what they use.
DECLARING_ROLES = frozenset({Role.SCHEDULER, Role.ADMIN, Role.MONITOR})

# Roles that may create the shared queues on a fresh broker (creating the monitor queue needs
# read on it and write on the dead-letter exchange): start a scheduler or a monitor before a
# worker or a ping; a scheduler (or ``cronfleet trigger``) creates the pools' queues.
CREATING_ROLES = frozenset({Role.SCHEDULER, Role.ADMIN, Role.MONITOR})

# RabbitMQ's idiom for "nothing": no exchange or queue has an empty name (the default exchange is
# checked as ``amq.default``), and every role that may write to the events exchange has topics.
NOTHING = "^$"


@dataclass(frozen=True)
class BrokerPermissions:
    """One user's rights in one virtual host: the permission triple and its topic rights."""

    vhost: str
    configure: str
    write: str
    read: str
    topic_exchange: str
    topic_write: str
    topic_read: str

    def commands(self, user: str, rabbitmqctl: str = "rabbitmqctl") -> list[list[str]]:
        """The ``rabbitmqctl`` argument lists that give ``user`` exactly these rights, replacing
        the ones it had in this virtual host (and on this exchange)."""
        return [
            [rabbitmqctl, "set_permissions", "-p", self.vhost, user, self.configure, self.write, self.read],
            [
                rabbitmqctl,
                "set_topic_permissions",
                "-p",
                self.vhost,
                user,
                self.topic_exchange,
                self.topic_write,
                self.topic_read,
            ],
        ]


def anchored(fragments: Iterable[str]) -> str:
    """A regex matching exactly one of ``fragments`` (regexes themselves), whole, or NOTHING.

    ``$`` alone also matches before a final newline, in Python as in RabbitMQ's PCRE, so
    ``(?!\\n)`` precedes it: ``job.heartbeat.x\\n`` is not ``job.heartbeat.x``. (Before it, not
    after: Debian's rabbitmqctl wrapper hands its arguments to ``sh -c`` in double quotes, where
    ``$(`` would start a command substitution.)
    """
    unique = sorted(set(fragments))
    if not unique:
        return NOTHING
    body = unique[0] if len(unique) == 1 else "(?:" + "|".join(unique) + ")"
    return f"^{body}(?!\\n)$"


@dataclass
class _Needs:
    """What a role does on the broker, as regex fragments per right (see the module's table)."""

    configure: set[str] = field(default_factory=set)
    write: set[str] = field(default_factory=set)
    read: set[str] = field(default_factory=set)
    topic_write: set[str] = field(default_factory=set)
    topic_read: set[str] = field(default_factory=set)

    def declare(self, *names: str) -> None:
        self.configure.update(names)

    def create_dead_lettered(self, queue: str, dead_exchange: str) -> None:
        self.configure.add(queue)
        self.read.add(queue)
        self.write.add(dead_exchange)

    def bind(self, queue: str, exchange: str, topic_key: str | None = None) -> None:
        self.write.add(queue)
        self.read.add(exchange)
        if topic_key is not None:
            self.topic_read.add(topic_key)

    def publish(self, exchange: str, topic_keys: Iterable[str] = ()) -> None:
        self.write.add(exchange)
        self.topic_write.update(topic_keys)

    def consume(self, queue: str) -> None:
        self.read.add(queue)


def _event_type(message: type[WireMessage]) -> str:
    """The first word(s) of a message's routing key: its ``type`` literal, regex-escaped."""
    return re.escape(str(message.model_fields["type"].default))


def _names(given: Sequence[str], pattern: str, what: str) -> list[str]:
    """Regex fragments for ``given`` names, or for any name the wire accepts when none is given
    (its own pattern, unanchored: job and pool names have no dot, so one never spans two words).

    Raises ValueError naming the first one the wire would refuse."""
    for name in given:
        if not re.fullmatch(pattern, name):
            raise ValueError(f"{what} {name!r} is not a valid {what} name (it must match {pattern})")
    return [re.escape(name) for name in given] or [pattern.removeprefix("^").removesuffix("$")]


def permissions(
    namespace: str,
    vhost: str,
    role: Role,
    pools: Sequence[str] = (),
    jobs: Sequence[str] = (),
    *,
    declaring: frozenset[Role] = DECLARING_ROLES,
) -> BrokerPermissions:
    """The narrowest rights with which ``role``'s processes work in ``namespace``.

    ``pools`` narrows a scheduler or admin to those pools (default: any) and names a worker's
    pools (required); ``jobs`` narrows a ping user to those jobs' heartbeats (default: any job).
    ``declaring`` are the roles whose processes declare the shared topology (see
    DECLARING_ROLES). Raises ValueError for a worker without pools or an invalid pool or job name.
    """
    if role is Role.WORKER and not pools:
        raise ValueError("a worker's rights are per pool: name at least one pool")
    topology = Topology(namespace)
    triggers = re.escape(topology.triggers_exchange)
    events = re.escape(topology.events_exchange)
    dead = re.escape(topology.dead_exchange)
    retry = re.escape(topology.retry_exchange)
    control = re.escape(topology.control_exchange)
    control_queues = re.escape(topology.control_queue("")) + "[0-9a-f]+"
    delay_queues = re.escape(topology.retry_exchange + ".") + "[0-9]+s"
    pool_names = _names(pools, POOL_PATTERN, "pool")
    job_names = _names(jobs, JOB_NAME_PATTERN, "job")
    pool_queues = [re.escape(topology.pool_queue("")) + name for name in pool_names]
    needs = _Needs()
    declares = role in declaring
    if declares:
        _shared_topology(needs, topology, create=role in CREATING_ROLES)
    match role:
        case Role.SCHEDULER | Role.ADMIN:
            for queue in pool_queues if declares else ():
                needs.declare(queue)
                needs.create_dead_lettered(queue, dead)
                needs.bind(queue, triggers)
            if declares:
                # ``Topology.declare_pool`` declares the retries' delay queues with the pool's.
                needs.declare(delay_queues)
                needs.create_dead_lettered(delay_queues, triggers)
                needs.bind(delay_queues, retry)
            needs.publish(triggers)
            needs.publish(events, [_event_type(SchedulerHeartbeat)])
            # ``jobs.changed`` after an apply; a scheduler listens on a queue of its own and
            # dead-letters a control message it refuses.
            needs.publish(control)
            if role is Role.SCHEDULER:
                needs.declare(control_queues)
                needs.bind(control_queues, control)
                needs.consume(control_queues)
                needs.publish(dead)
            if role is Role.ADMIN:
                needs.publish(events, [rf"{_event_type(JobHeartbeat)}\.{job}" for job in job_names])
        case Role.WORKER:
            for queue in pool_queues:
                if declares:
                    needs.declare(queue)
                    needs.create_dead_lettered(queue, dead)
                    needs.bind(queue, triggers)
                needs.consume(queue)
            run_events = [
                rf"{_event_type(kind)}\.{job}" for kind in (RunStarted, RunFinished) for job in job_names
            ]
            beats = [rf"{_event_type(WorkerHeartbeat)}\.{pool}" for pool in pool_names]
            # Its runs' events and heartbeats sent together (``event.batch.<pool>``).
            batches = [rf"{_event_type(EventBatch)}\.{pool}" for pool in pool_names]
            needs.publish(events, run_events + beats + batches)
            needs.publish(dead)
            # A failed run's retry: the trigger's signed bytes again, to wait in a delay queue.
            needs.publish(retry)
        case Role.MONITOR:
            needs.consume(re.escape(topology.monitor_queue))
            needs.publish(dead)
            # The HTTP API's job changes: ``jobs.changed``.
            needs.publish(control)
        case Role.PING:
            needs.publish(events, [rf"{_event_type(JobHeartbeat)}\.{job}" for job in job_names])
    return BrokerPermissions(
        vhost=vhost,
        configure=anchored(needs.configure),
        write=anchored(needs.write),
        read=anchored(needs.read),
        topic_exchange=topology.events_exchange,
        topic_write=anchored(needs.topic_write),
        topic_read=anchored(needs.topic_read),
    )


def _shared_topology(needs: _Needs, topology: Topology, *, create: bool) -> None:
    """What ``Topology.declare_exchanges`` does: declare the four exchanges and both shared
    queues, bind the dead-letter queue to its exchange and the monitor queue to every event."""
    triggers, events, dead, retry, control = (
        re.escape(name)
        for name in (
            topology.triggers_exchange,
            topology.events_exchange,
            topology.dead_exchange,
            topology.retry_exchange,
            topology.control_exchange,
        )
    )
    dead_queue, monitor_queue = re.escape(topology.dead_queue), re.escape(topology.monitor_queue)
    needs.declare(triggers, events, dead, retry, control, dead_queue, monitor_queue)
    if create:
        needs.create_dead_lettered(monitor_queue, dead)
    needs.bind(dead_queue, dead)
    needs.bind(monitor_queue, events, topic_key=re.escape("#"))
