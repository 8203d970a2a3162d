"""The queue's SQL fragments that several statements share, named once: who holds a row, and the
claim statement in each backend's dialect."""
from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime, timezone

from kgsupervisor.store.backend import Backend
from kgsupervisor.store.owntables import CONTROL_TABLE
from kgsupervisor.store.schema import CLAIMABLE

# SET list: the row is held by no one (its lease owner, token and expiry gone).
NO_LEASE = "lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL"
# SET list: the row is pending again and unleased. started_at (kept for older versions, which
# mark the row in flight there) is cleared as the claim clears it: this version keeps the row in
# flight in the worker's shared memory (worker.counters), and writes no mark of its own.
BACK_TO_PENDING = f"status = 'pending', {NO_LEASE}, started_at = NULL, processing_started_at = NULL"
# WHERE: the rows still held under a lease token (parameter: the token).
HELD = "lease_token = ? AND status = 'processing'"
# WHERE, the fence of every write for a claim: its row, still held under its token (parameters:
# the row id, the token). A worker whose lease was taken over changes nothing.
FENCED = f"id = ? AND {HELD}"
# WHERE: the rows a lease owner holds (parameter: the owner).
OWNED = "status = 'processing' AND lease_owner = ?"
# The claims a bulk release is about to give back, as the attempt history records them
# (history.held_from_row); append a WHERE condition.
HELD_ROWS = ("SELECT id, content_id, retry_count, lease_owner, lease_token, processing_started_at "
             "FROM kg_processing_queue WHERE ")
# The name of the pause flag's row in the control table (`kgsupervisor pause`).
PAUSED_FLAG = "paused"
# A row of the control table says an operator has paused the queue: claims take nothing.
PAUSE_SET = f"EXISTS (SELECT 1 FROM {CONTROL_TABLE} WHERE name = '{PAUSED_FLAG}')"


def pause_terms(backend: Backend) -> tuple[str, str]:
    """The claim's pause test, as (a WHERE term, the LIMIT), in the spelling with which `backend`
    looks it up once and skips the index scan while paused. In the claim statement itself, every
    worker of every host obeys a pause at its next claim, atomically and with no round trip of
    its own. PostgreSQL turns an uncorrelated WHERE term into a one-time filter over the scan;
    SQLite would test it on every row the scan passes (a paused claim would read the whole
    queue), but knows a LIMIT of 0 before the scan starts. The LIMIT's `?` is the batch size."""
    if backend.name == "postgresql":
        return f"AND NOT {PAUSE_SET}", "?"
    return "", f"(CASE WHEN {PAUSE_SET} THEN 0 ELSE ? END)"


@functools.cache
def claim_sql(backend: Backend) -> str:
    """Take the due rows in `priority DESC, id ASC` order in one statement, as `backend` spells it
    (SQLite names the claim index; PostgreSQL passes over rows another claimer has locked);
    nothing while the queue is paused. Parameters: started at, owner, token, lease expiry, now, limit."""
    unpaused, limit = pause_terms(backend)
    return f"""
            UPDATE kg_processing_queue
               SET status = 'processing', processing_started_at = ?, lease_owner = ?,
                   lease_token = ?, lease_expires_at = ?, started_at = NULL
             WHERE id IN (SELECT id FROM kg_processing_queue {backend.claim_index}
                           WHERE {CLAIMABLE} AND (not_before IS NULL OR not_before <= ?) {unpaused}
                           ORDER BY priority DESC, id ASC LIMIT {limit} {backend.claim_locking})
            RETURNING id, content_id, retry_count, priority"""


def marks(values: Sequence[object]) -> str:
    """One `?` per value, comma-separated: the inside of an IN (...) list."""
    return ",".join("?" * len(values))


def live(alias: str) -> str:
    """`alias`'s row is live (pending or processing), spelled so that no index on status can
    serve it: a look for one document's live rows must go through the content_id index. After
    a bulk change PostgreSQL's estimate of live rows is stale (a queue just filled: "none"), and
    with an index on status it scans every live row once per document, which makes a batched
    bulk command quadratic."""
    return f"COALESCE({alias}.status, '') IN ('pending', 'processing')"


def db_timestamp(now: float) -> str:
    """The upstream's DATETIME text (UTC, `YYYY-MM-DD HH:MM:SS`), so old and new rows sort together."""
    return datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
