"""The attempt history (docs/history.md): one row per outcome of a claim, written in the
transaction of the outcome itself, read back by queue row, and pruned by age."""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from kgsupervisor.addresses import mask_urls
from kgsupervisor.masking import hide_credentials
from kgsupervisor.queue.claims import Claim
from kgsupervisor.store.owntables import ATTEMPT_COLUMNS, ATTEMPTS_TABLE
from kgsupervisor.store.sqlite import transaction

# An error message is stored up to this many characters: enough for the service's own error
# text and our context, never a whole HTML error page.
MAX_ERROR_CHARS = 2000
# A captured stack is bounded too: a deep recursion prints thousands of frames.
MAX_STACK_CHARS = 64 * 1024
# Rows one prune statement deletes: a short transaction, so no writer waits long on it.
PRUNE_BATCH_ROWS = 500


class Outcome(str, enum.Enum):
    """How one claim of a queue row ended (kg_processing_attempts.outcome)."""

    COMPLETED = "completed"
    RETRIED = "retried"          # an attempt charged; pending again after a backoff
    FAILED = "failed"            # failed for good (rejected, or out of attempts)
    OUTAGE = "outage"            # released uncharged: the KG service (or the database) was down
    DRAINED = "drained"          # released uncharged on a drain or a shutdown
    LEASE_LOST = "lease_lost"    # the worker's outcome was fenced out: someone else had the row
    CRASHED = "crashed"          # the worker died holding it
    HUNG = "hung"                # the supervisor killed the worker for a missed heartbeat
    POISON_PILL = "poison_pill"  # failed for good after KG_POISON_AFTER worker deaths on it
    BAD_ROW = "bad_row"          # the queue row itself cannot be processed (failed alone)


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    """What the worker (or the supervisor) knows of one try, beyond the claim: the queue fills
    in the rest (row, owner, token, times) when it records the outcome."""

    worker: int | None = None
    claimed_at: float | None = None      # None: the claim's own time
    sent_at: float | None = None         # when the request went to the KG service
    endpoint: str | None = None          # the KG service URL that answered last
    http_status: int | None = None
    error_class: str | None = None       # a short stable token: http_500, timeout, SIGKILL, ...
    error_message: str | None = None
    answer_bytes: int | None = None
    entities: int | None = None
    relationships: int | None = None
    stack: str | None = None             # a hung worker's stack


def claim_key(claim: Claim) -> str:
    """The attempt row's claim_key: the claim's token and its queue row, as one claim takes
    a whole batch under a single token. Unique per claim: nothing is recorded twice."""
    return f"{claim.token}/{claim.id}"


def bounded(text: str | None, limit: int = MAX_ERROR_CHARS) -> str | None:
    """`text` with its credentials hidden (before the cut, so no half secret is left to
    recognise), then cut to `limit` characters."""
    if text is None:
        return None
    text = hide_credentials(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


_NAMES = [name for name in ATTEMPT_COLUMNS if name not in ("id", "attempt")]
# attempt = 1 + the attempts recorded before for this queue row (idx_kga_queue): every claim
# counts, uncharged ones included, and a `retry` of a failed row carries on from its history.
INSERT_SQL = (f"INSERT INTO {ATTEMPTS_TABLE} (attempt, {', '.join(_NAMES)}) "
              f"VALUES ((SELECT COUNT(*) + 1 FROM {ATTEMPTS_TABLE} WHERE queue_id = ?), "
              f"{', '.join('?' * len(_NAMES))}) ON CONFLICT (claim_key) DO NOTHING")


def _whole(value: object) -> int | None:
    return value if type(value) is int else None


def attempt_values(claim: Claim, outcome: Outcome, now: float, attempt: Attempt) -> dict[str, Any]:
    """The attempt row of `claim` ending as `outcome` at `now`, column by column."""
    claimed_at = attempt.claimed_at if attempt.claimed_at is not None else claim.claimed_at
    return {
        "queue_id": claim.id, "content_id": _whole(claim.content_id), "claim_key": claim_key(claim),
        "owner": claim.owner, "worker": attempt.worker,
        "endpoint": mask_urls(attempt.endpoint) if attempt.endpoint else None,
        "claimed_at": claimed_at, "sent_at": attempt.sent_at, "finished_at": now,
        "duration": max(0.0, now - claimed_at) if claimed_at is not None else None,
        "outcome": Outcome(outcome).value, "http_status": attempt.http_status,
        "error_class": attempt.error_class, "error_message": bounded(attempt.error_message),
        "answer_bytes": attempt.answer_bytes, "entities": attempt.entities,
        "relationships": attempt.relationships, "stack": bounded(attempt.stack, MAX_STACK_CHARS),
    }


def record_attempt(conn: Any, claim: Claim, outcome: Outcome, now: float,
                   attempt: Attempt | None = None, error: str | None = None) -> bool:
    """Record how `claim` ended, inside the caller's transaction (the outcome's own); `error`,
    when given, is the message. False when this claim has its outcome recorded already."""
    attempt = attempt or Attempt()
    if error is not None:
        attempt = dataclasses.replace(attempt, error_message=error)
    values = attempt_values(claim, outcome, now, attempt)
    cur = conn.execute(INSERT_SQL, [claim.id, *(values[name] for name in _NAMES)])
    return cur.rowcount == 1


def db_time(value: object) -> float | None:
    """A timestamp column as unix seconds: the upstream's DATETIME text (UTC), or a number."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(value, str):
        try:
            return datetime.strptime(value[:19], "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            return None
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class InFlight:
    """The claim a worker was sending, as its slot of shared memory names it (worker.counters):
    the one row its death may be charged to, and since when it was in flight (the attempt's sent_at)."""

    row_id: int
    token: str
    since: float

    def names(self, claim: Claim) -> bool:
        """Is `claim` this one (its row, under its token)? A row claimed again is another claim."""
        return claim.id == self.row_id and claim.token == self.token


def held_from_row(row: Sequence[Any]) -> Claim:
    """A claim from a row of sql.HELD_ROWS (id, content_id, retry_count, owner, token, claimed)."""
    qid, content_id, retry_count, owner, token, claimed = row
    return Claim(qid, content_id, _whole(retry_count) or 0, 0, owner, token, claimed_at=db_time(claimed))


def record_held(conn: Any, held: Sequence[Claim], changed: set[int], outcome: Outcome, now: float,
                attempt: Attempt | None = None, in_flight: InFlight | None = None) -> int:
    """Record `outcome` for each held claim whose row the release changed (ids in `changed`).
    The claim `in_flight` names gets its sent time, and the stack: the document the worker was
    stuck on; with none in flight, every one gets the stack. Returns how many were recorded."""
    attempt = attempt or Attempt()
    # An in-flight claim that is not among these rows (finished, or another owner's) is no one's.
    flying = next((c for c in held if in_flight is not None and in_flight.names(c)), None)
    since = in_flight.since if in_flight is not None else None
    recorded = 0
    for claim in held:
        if claim.id not in changed or not claim.token:
            continue
        sending = claim is flying
        sent = since if sending and attempt.sent_at is None else attempt.sent_at
        stack = attempt.stack if sending or flying is None else None
        recorded += record_attempt(conn, claim, outcome, now,
                                   dataclasses.replace(attempt, sent_at=sent, stack=stack))
    return recorded


def attempts_of(conn: Any, queue_id: int) -> list[dict[str, Any]]:
    """Every recorded attempt of one queue row, first first, as column -> value."""
    names = list(ATTEMPT_COLUMNS)
    rows = conn.execute(f"SELECT {', '.join(names)} FROM {ATTEMPTS_TABLE} WHERE queue_id = ? ORDER BY id",
                        (queue_id,)).fetchall()
    return [dict(zip(names, row)) for row in rows]


def prune_attempts(conn: Any, before: float, batch_rows: int = PRUNE_BATCH_ROWS) -> int:
    """Delete up to `batch_rows` attempts finished before `before` (oldest first), in one short
    transaction of their own; returns how many."""
    with transaction(conn):
        return conn.execute(
            f"DELETE FROM {ATTEMPTS_TABLE} WHERE id IN (SELECT id FROM {ATTEMPTS_TABLE} "
            "WHERE finished_at < ? ORDER BY finished_at LIMIT ?)", (before, batch_rows)).rowcount
