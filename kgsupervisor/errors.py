"""The exceptions kgsupervisor raises, one class per way a thing can go wrong."""
from __future__ import annotations


class KGSupervisorError(Exception):
    """Base of every error kgsupervisor raises on purpose; the CLI shows it as one line."""


class ConfigError(KGSupervisorError):
    """A setting has a value that cannot be used."""

    def __init__(self, setting: str, value: object, expected: str) -> None:
        self.setting = setting
        self.value = value
        self.expected = expected
        super().__init__(f"{setting}={value!r}: expected {expected}")


class DatabaseError(KGSupervisorError):
    """The database is missing, not SQLite, too old, or lacks the queue table."""


class DatabaseBusy(DatabaseError):
    """The database stayed locked by another writer longer than we are willing to wait."""


class ServiceUnavailable(KGSupervisorError):
    """The KG service as a whole is down or refusing work: no document is to blame.

    The worker releases its claims without charging an attempt and feeds its circuit breaker.
    """

    def __init__(self, message: str, retry_after: float | None = None,
                 hold_back: float | None = None) -> None:
        self.retry_after = retry_after  # the service asked for this many seconds (Retry-After)
        self.hold_back = hold_back  # our own: how long the released document waits, if at all
        super().__init__(message)

    @property
    def requeue_delay(self) -> float | None:
        """Seconds a document released for this outage waits before it may be claimed again."""
        return self.retry_after or self.hold_back


class ItemFailure(KGSupervisorError):
    """This document failed while the service is up; it costs one attempt and is retried later."""


class InvalidAnswer(ItemFailure):
    """The service answered, but not with a usable result for this document."""


class DocumentRejected(KGSupervisorError):
    """This document can never succeed as it is (missing, no chunks, a 4xx): fail it at once."""


class LeaseLost(KGSupervisorError):
    """The claim was taken over by someone else; the write-back committed nothing."""


class NotReachable(KGSupervisorError):
    """A running supervisor's status endpoint did not answer."""

