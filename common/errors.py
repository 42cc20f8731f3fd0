"""The small hierarchy of unexpected failures. Each carries one line a user can act on."""


class CronfleetError(Exception):
    """Base of every error cronfleet raises on purpose; its message is one plain line."""


class ConfigError(CronfleetError):
    """Settings or keys are missing or malformed."""


class JobFileError(CronfleetError):
    """A jobs file cannot be applied; the message names the file, line, job and field."""


class BrokerUnavailable(CronfleetError):
    """RabbitMQ cannot be reached or refused us."""


class StoreUnavailable(CronfleetError):
    """The database cannot be reached or its schema cannot be created."""


class SchemaMismatch(CronfleetError):
    """The store's schema is not the one this code was written for (older, newer or missing)."""


class StatementTooLarge(CronfleetError):
    """A statement carries more bind parameters than every supported database accepts: a bug,
    never an outage, so it is never retried."""


class NotFound(CronfleetError):
    """A named thing (a job, a service) does not exist."""


class AlreadyExists(CronfleetError):
    """Something to be created exists already."""


class NoAction(CronfleetError):
    """A job that only receives heartbeats was asked to run."""
