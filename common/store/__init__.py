"""The SQL store shared by all processes: the same code on SQLite (one host) and PostgreSQL."""

from common.store.database import STORE_OUTAGES, Store, dialect_insert
from common.store.models import (
    ALARM_STATES,
    ALERT_KINDS,
    ALERT_STATES,
    HEALTH_STATES,
    AlertAttemptRow,
    Base,
    FireRow,
    FleetHealthRow,
    FlipRow,
    HeartbeatRow,
    JobHealthRow,
    JobRow,
    JobStateRow,
    LeaseRow,
    RunRow,
    TriggerClaimRow,
)

__all__ = [
    "ALARM_STATES",
    "ALERT_KINDS",
    "ALERT_STATES",
    "HEALTH_STATES",
    "STORE_OUTAGES",
    "AlertAttemptRow",
    "Base",
    "FireRow",
    "FleetHealthRow",
    "FlipRow",
    "HeartbeatRow",
    "JobHealthRow",
    "JobRow",
    "JobStateRow",
    "LeaseRow",
    "RunRow",
    "Store",
    "TriggerClaimRow",
    "dialect_insert",
]
