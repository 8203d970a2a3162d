"""Job and worker states and the exit codes of the process protocol; stdlib only."""
from __future__ import annotations

import enum
import signal


class JobStatus(str, enum.Enum):
    """The `status` column of kg_processing_queue (upstream values)."""

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"


ALL_JOB_STATUSES = tuple(s.value for s in JobStatus)
LIVE_JOB_STATUSES = (JobStatus.PENDING.value, JobStatus.PROCESSING.value)

# The upstream marked documents 'skipped' with this reason when the KG service was down and
# promised to retry them; the claim treats such rows as pending.
SKIPPED_SERVICE_UNAVAILABLE = "kg_service_unavailable"


class WorkerState(str, enum.Enum):
    """What a worker is doing, as published in its stats."""

    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    PAUSED = "paused"  # circuit breaker open: the KG service is down
    WAITING = "waiting"  # for a permit or room in the rate budget of a KG endpoint
    DISABLED = "disabled"  # KG_SERVICE_ENABLED=false
    STOPPING = "stopping"


class SupervisorState(str, enum.Enum):
    """The supervisor's own lifecycle."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"  # draining: no new claims, in-flight documents finishing
    STOPPED = "stopped"


# Exit codes are the protocol from a worker to its supervisor (as in gunicorn).
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_BOOT_ERROR = 3

# The signals an operator sends the supervisor (docs/operating.md, Signals). The supervisor also
# handles SIGCHLD; `run` holds these from its first instant until its handlers are in.
OPERATOR_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1)
