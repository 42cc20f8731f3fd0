"""The SQL store shared by all processes: the same code on SQLite (one host) and PostgreSQL."""

from common.store.database import STORE_OUTAGES, Store, dialect_insert
from common.store.models import Base, FireRow, HeartbeatRow, JobRow, JobStateRow, LeaseRow, RunRow

__all__ = [
    "STORE_OUTAGES",
    "Base",
    "FireRow",
    "HeartbeatRow",
    "JobRow",
    "JobStateRow",
    "LeaseRow",
    "RunRow",
    "Store",
    "dialect_insert",
]
