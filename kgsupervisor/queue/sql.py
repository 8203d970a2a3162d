"""The queue's SQL fragments that several statements share, named once: who holds a row, and the
claim statement in each backend's dialect."""
from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime, timezone

from kgsupervisor.store.backend import Backend
from kgsupervisor.store.schema import CLAIMABLE

# SET list: the row is held by no one (its lease owner, token and expiry gone).
NO_LEASE = "lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL"
# SET list: the row is pending again, unleased and not started (no crash can be charged to it).
BACK_TO_PENDING = f"status = 'pending', {NO_LEASE}, started_at = NULL, processing_started_at = NULL"
# WHERE: the rows still held under a lease token (parameter: the token).
HELD = "lease_token = ? AND status = 'processing'"
# WHERE, the fence of every write for a claim: its row, still held under its token (parameters:
# the row id, the token). A worker whose lease was taken over changes nothing.
FENCED = f"id = ? AND {HELD}"
# WHERE: the rows a lease owner holds (parameter: the owner).
OWNED = "status = 'processing' AND lease_owner = ?"


@functools.cache
def claim_sql(backend: Backend) -> str:
    """Take the due rows in `priority DESC, id ASC` order in one statement, as `backend` spells it
    (SQLite names the claim index; PostgreSQL passes over rows another claimer has locked).
    Parameters: started at, owner, token, lease expiry, now, limit."""
    return f"""
            UPDATE kg_processing_queue
               SET status = 'processing', processing_started_at = ?, lease_owner = ?,
                   lease_token = ?, lease_expires_at = ?, started_at = NULL
             WHERE id IN (SELECT id FROM kg_processing_queue {backend.claim_index}
                           WHERE {CLAIMABLE} AND (not_before IS NULL OR not_before <= ?)
                           ORDER BY priority DESC, id ASC LIMIT ? {backend.claim_locking})
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
