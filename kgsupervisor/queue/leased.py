"""The leased queue: claim, extend, release, retry, fail, requeue and count rows, on SQLite or PostgreSQL."""
from __future__ import annotations

import dataclasses
import random
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone

from kgsupervisor.errors import ConfigError, DatabaseError
from kgsupervisor.masking import hide_credentials
from kgsupervisor.states import ALL_JOB_STATUSES, JobStatus
from kgsupervisor.store.postgres import is_postgres
from kgsupervisor.store.schema import CLAIMABLE, STATUS_COUNTS_TABLE
from kgsupervisor.store.sqlite import transaction


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


CLAIM_SQL = f"""
            UPDATE kg_processing_queue
               SET status = 'processing', processing_started_at = ?, lease_owner = ?,
                   lease_token = ?, lease_expires_at = ?, started_at = NULL
             WHERE id IN (SELECT id FROM kg_processing_queue INDEXED BY idx_kgq_claim_order
                           WHERE {CLAIMABLE} AND (not_before IS NULL OR not_before <= ?)
                           ORDER BY priority DESC, id ASC LIMIT ?)
            RETURNING id, content_id, retry_count, priority"""
# PostgreSQL: the same claim, where a row another claimer has locked is passed over, not waited for.
PG_CLAIM_SQL = f"""
            UPDATE kg_processing_queue
               SET status = 'processing', processing_started_at = ?, lease_owner = ?,
                   lease_token = ?, lease_expires_at = ?, started_at = NULL
             WHERE id IN (SELECT id FROM kg_processing_queue
                           WHERE {CLAIMABLE} AND (not_before IS NULL OR not_before <= ?)
                           ORDER BY priority DESC, id ASC LIMIT ? FOR UPDATE SKIP LOCKED)
            RETURNING id, content_id, retry_count, priority"""


def db_timestamp(now: float) -> str:
    """The upstream's DATETIME text (UTC, `YYYY-MM-DD HH:MM:SS`), so old and new rows sort together."""
    return datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    """One queue row held under a lease: `token` fences every later write to it."""

    id: int
    content_id: int
    retry_count: int
    priority: int
    owner: str
    token: str
    # Why this row cannot be processed (a content_id that is not a document id), or None.
    problem: str | None = None


def _whole(value: object) -> int | None:
    """An integer column's value, or None when the row holds something else (text, a real)."""
    return value if type(value) is int else None


def claim_from_row(row: Sequence, owner: str, token: str) -> Claim:
    """A Claim for a claimed row; a row whose values no worker could use carries its problem.

    SQLite stores whatever the upstream wrote: one row with text in content_id must fail alone,
    not crash every worker that claims it. A priority or retry count that is not an integer
    only orders or counts the row, which goes on as 0.
    """
    qid, content_id, retry_count, priority = row[0], row[1], row[2], row[3]
    problem = None
    if _whole(content_id) is None:
        problem = (f"queue row {qid} has content_id {str(content_id)[:60]!r} "
                   f"({type(content_id).__name__}), not a crawled_content id")
    return Claim(qid, content_id, _whole(retry_count) or 0, _whole(priority) or 0, owner, token, problem)


@dataclasses.dataclass(frozen=True, slots=True)
class EnqueueResult:
    """What an enqueue did: rows added, ids already live in the queue, ids with no document."""

    added: list[int]
    already_queued: list[int]
    unknown: list[int]


@dataclasses.dataclass(frozen=True, slots=True)
class CrashRelease:
    """What releasing a crashed worker's claims did."""

    released: int
    in_flight: list[int]
    poisoned: list[int]


# What an INTEGER column holds in SQLite, and a BIGINT in PostgreSQL.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Rows per transaction of a bulk change (enqueue --all-unprocessed, retry, expired leases):
# a worker waits for one batch's locks at most, a progress bar moves, and an interrupted
# command keeps what it did. Also within every SQLite build's limit of bound parameters.
BULK_BATCH_ROWS = 1000
# rows done so far, rows in all: how a bulk change reports its progress
Progress = Callable[[int, int], None]
# How rows whose status is NULL or empty are counted (the counts table keeps both as '').
NO_STATUS = "(none)"


def check_int64(name: str, values: Iterable[int]) -> None:
    """Refuse, before any statement, a number the database cannot hold (the driver overflows)."""
    for value in values:
        if not INT64_MIN <= value <= INT64_MAX:
            raise ConfigError(name, value, f"an integer from {INT64_MIN} to {INT64_MAX} (the database's 64-bit range)")


@contextmanager
def insert_refusals() -> Iterator[None]:
    """A NOT NULL column without a default that kgsupervisor does not fill refuses every insert
    into the queue: say which column in one line, not a traceback per enqueue."""
    try:
        yield
    except Exception as exc:
        column = _not_null_column(exc)
        if column is None:
            raise
        raise DatabaseError(f"cannot queue documents: column {column} is NOT NULL without a default and "
                            f"kgsupervisor does not set it (give it a DEFAULT, or drop NOT NULL)") from None


def _not_null_column(exc: BaseException) -> str | None:
    """`table.column` of a NOT NULL violation (SQLite or PostgreSQL), else None."""
    if isinstance(exc, sqlite3.IntegrityError):
        match = re.match(r"NOT NULL constraint failed: (\S+)", str(exc))
        return match.group(1) if match else None
    if getattr(exc, "sqlstate", None) == "23502":  # psycopg's NotNullViolation
        diag = getattr(exc, "diag", None)
        return f"{getattr(diag, 'table_name', '?')}.{getattr(diag, 'column_name', '?')}"
    return None


def backoff_delay(retry_count: int, base: float, cap: float) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**retry_count)]."""
    return random.uniform(0, min(cap, base * (2 ** min(retry_count, 30))))


class LeasedQueue:
    """kg_processing_queue as a leased queue; every method is one short transaction.

    One body of SQL for both backends (a PostgreSQL connection takes SQLite's spelling, see
    pgdb.PGConnection), so their semantics cannot drift; only the claim statement differs.
    """

    claim_sql = CLAIM_SQL

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def claim(self, owner: str, token: str, limit: int, lease_seconds: float, now: float) -> list[Claim]:
        """Take up to `limit` due rows in `priority DESC, id ASC` order in ONE statement.

        INDEXED BY: without fresh statistics (a queue filled after ANALYZE) SQLite may plan an
        OR over the status index and sort, which grows with the queue; the claim index never does.
        """
        rows = self.conn.execute(
            self.claim_sql,
            (db_timestamp(now), owner, token, now + lease_seconds, now, limit),
        ).fetchall()
        claims = [claim_from_row(r, owner, token) for r in rows]
        # RETURNING does not promise the subquery's order.
        claims.sort(key=lambda c: (-c.priority, c.id))
        return claims

    def mark_started(self, claim: Claim, now: float) -> bool:
        """Record that this document is now in flight (a crash from here on counts against it).

        Only one row of a batch is in flight: the mark moves off the batch's earlier documents,
        whose answers may wait in memory for a group write-back, so a crash on this one does
        not charge them too.
        """
        cur = self.conn.execute(
            "UPDATE kg_processing_queue SET started_at = CASE WHEN id = ? THEN ? END "
            "WHERE lease_token = ? AND status = 'processing' AND (id = ? OR started_at IS NOT NULL) "
            "RETURNING id", (claim.id, now, claim.token, claim.id))
        return claim.id in {row[0] for row in cur.fetchall()}

    def extend(self, token: str, lease_seconds: float, now: float) -> int:
        """Push the lease expiry of every row held under `token`; returns rows still held."""
        cur = self.conn.execute(
            "UPDATE kg_processing_queue SET lease_expires_at = ? WHERE lease_token = ? "
            "AND status = 'processing'", (now + lease_seconds, token))
        return cur.rowcount

    def release(self, claims: Iterable[Claim], not_before: float | None = None) -> int:
        """PROCESSING -> PENDING without charging an attempt (drain, outage, unstarted rows)."""
        params = [(not_before, c.id, c.token) for c in claims]
        if not params:
            return 0
        with transaction(self.conn):
            cur = self.conn.executemany(
                "UPDATE kg_processing_queue SET status = 'pending', lease_owner = NULL, "
                "lease_token = NULL, lease_expires_at = NULL, started_at = NULL, "
                "processing_started_at = NULL, not_before = ? "
                "WHERE id = ? AND lease_token = ? AND status = 'processing'", params)
            return cur.rowcount

    def release_owner(self, owner: str) -> int:
        """Every claim of a dead owner back to pending at once, no attempt charged."""
        cur = self.conn.execute(
            "UPDATE kg_processing_queue SET status = 'pending', lease_owner = NULL, "
            "lease_token = NULL, lease_expires_at = NULL, started_at = NULL, "
            "processing_started_at = NULL WHERE status = 'processing' AND lease_owner = ?",
            (owner,))
        return cur.rowcount

    def release_crashed(self, owner: str, cause: str, poison_after: int, now: float) -> "CrashRelease":
        """Every claim of a worker that died, back at once: unstarted rows untouched, the row it
        was working on charged one crash, and failed as a poison pill after `poison_after` crashes.
        """
        with transaction(self.conn):
            in_flight = self.conn.execute(
                "UPDATE kg_processing_queue SET crash_count = COALESCE(crash_count, 0) + 1 "
                "WHERE status = 'processing' AND lease_owner = ? AND started_at IS NOT NULL "
                "RETURNING id, content_id, crash_count", (owner,)).fetchall()
            poisoned = [(qid, cid, n) for qid, cid, n in in_flight if n >= poison_after]
            for qid, cid, n in poisoned:
                # PROCESSING -> FAILED (poison pill)
                self.conn.execute(
                    "UPDATE kg_processing_queue SET status = 'failed', processed_at = ?, error_message = ?, "
                    "lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, started_at = NULL "
                    "WHERE id = ?",
                    (db_timestamp(now), f"poison pill: a worker died {n} times while processing this "
                     f"document (last: {cause}); not retried", qid))
            released = self.release_owner(owner)
        return CrashRelease(released, [cid for _, cid, _ in in_flight], [cid for _, cid, _ in poisoned])

    def owners_with_claims(self, prefix: str) -> list[str]:
        """Lease owners starting with `prefix` (a host) that hold rows in processing."""
        return [r[0] for r in self.conn.execute(
            "SELECT DISTINCT lease_owner FROM kg_processing_queue WHERE status = 'processing' "
            "AND lease_owner LIKE ? ESCAPE '\\'", (prefix.replace("%", "\\%").replace("_", "\\_") + "%",))]

    def has_live_work(self) -> bool:
        """True while any row is claimable (due or not) or processing; a cheap indexed probe."""
        return self.conn.execute(
            f"SELECT EXISTS (SELECT 1 FROM kg_processing_queue WHERE {CLAIMABLE}) "
            "OR EXISTS (SELECT 1 FROM kg_processing_queue WHERE status = 'processing')").fetchone()[0] == 1

    def requeue_expired(self, now: float, batch_rows: int = BULK_BATCH_ROWS) -> int:
        """The backstop for owners that vanished with their host: expired leases to pending,
        `batch_rows` at a time (a host that held a million claims does not lock them all at once)."""
        expired = "status = 'processing' AND lease_expires_at IS NOT NULL AND lease_expires_at < ?"
        return self._update_in_batches(
            "status = 'pending', lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, "
            "started_at = NULL, processing_started_at = NULL", expired, [now],
            self._ids(f"SELECT id FROM kg_processing_queue WHERE {expired}", [now]), batch_rows)

    def retry_later(self, claim: Claim, error: str, now: float, max_attempts: int,
                    backoff_base: float, backoff_cap: float) -> JobStatus | None:
        """Charge one attempt: PENDING again after a backoff, or FAILED when attempts run out;
        None when the lease was lost meanwhile (nothing changed: the row is someone else's)."""
        attempts = claim.retry_count + 1
        if attempts >= max_attempts:
            failed = self.fail(claim, f"gave up after {attempts} attempts: {error}", now, attempts=attempts)
            return JobStatus.FAILED if failed else None
        not_before = now + backoff_delay(claim.retry_count, backoff_base, backoff_cap)
        cur = self.conn.execute(
            "UPDATE kg_processing_queue SET status = 'pending', retry_count = ?, error_message = ?, "
            "not_before = ?, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, "
            "started_at = NULL, processing_started_at = NULL "
            "WHERE id = ? AND lease_token = ? AND status = 'processing'",
            (attempts, hide_credentials(error), not_before, claim.id, claim.token))
        return JobStatus.PENDING if cur.rowcount == 1 else None

    def fail(self, claim: Claim, error: str, now: float, attempts: int | None = None) -> bool:
        """PROCESSING -> FAILED with the reason in error_message (credentials a reason quotes hidden)."""
        cur = self.conn.execute(
            "UPDATE kg_processing_queue SET status = 'failed', error_message = ?, processed_at = ?, "
            "retry_count = ?, lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, "
            "not_before = NULL WHERE id = ? AND lease_token = ? AND status = 'processing'",
            (hide_credentials(error), db_timestamp(now), claim.retry_count if attempts is None else attempts,
             claim.id, claim.token))
        return cur.rowcount == 1

    def counts(self) -> dict[str, int]:
        """Rows by status plus `total`; a pure read of the trigger-kept counts table."""
        try:
            found = dict(self.conn.execute(
                f"SELECT status, CAST(SUM(n) AS BIGINT) FROM {STATUS_COUNTS_TABLE} GROUP BY status").fetchall())
        except sqlite3.OperationalError:
            # A database migrated by an older version (before the counts table): count by scan.
            found = dict(self.conn.execute(
                "SELECT status, COUNT(*) FROM kg_processing_queue GROUP BY status").fetchall())
        counts = {s: found.pop(s, 0) for s in ALL_JOB_STATUSES}
        # Statuses kgsupervisor does not know (written by hand or another tool) are shown too:
        # such rows are never claimed, and hiding them hides why the queue does not drain.
        for status, n in sorted(found.items(), key=lambda item: str(item[0])):
            if n:
                counts[str(status) if status not in (None, "") else NO_STATUS] = n
        counts["total"] = sum(counts.values())
        return counts

    def enqueue(self, content_ids: Sequence[int], priority: int, now: float) -> EnqueueResult:
        """Queue documents by id, in the order given; a document already pending or processing
        is not queued again. One transaction, a few statements per BULK_BATCH_ROWS ids."""
        check_int64("content_id", content_ids)
        check_int64("priority", [priority])
        added, already, unknown = [], [], []
        wanted = list(dict.fromkeys(content_ids))
        with insert_refusals(), transaction(self.conn):
            for start in range(0, len(wanted), BULK_BATCH_ROWS):
                batch = wanted[start:start + BULK_BATCH_ROWS]
                known = set(self._ids(f"SELECT id FROM crawled_content WHERE id IN ({marks(batch)})", batch))
                unknown += [cid for cid in batch if cid not in known]
                live_ones = set(self._ids(f"SELECT content_id FROM kg_processing_queue AS q WHERE content_id IN "
                                          f"({marks(batch)}) AND {live('q')}", batch))
                already += [cid for cid in batch if cid in known and cid in live_ones]
                added += self._queue_new([cid for cid in batch if cid in known and cid not in live_ones],
                                         priority, now)
        return EnqueueResult(added, already, unknown)

    def _queue_new(self, content_ids: list[int], priority: int, now: float) -> list[int]:
        """A pending row for each of these documents, in their order, in one statement.

        The callers look up live rows first with plain lookups, not INSERT … SELECT … NOT
        EXISTS: a join's plan rests on row estimates that a bulk change makes stale (PostgreSQL
        then sorts or scans every live row for each batch); a lookup by ids or an id range is
        served by the content_id index however stale they are.
        """
        if content_ids:
            stamp = db_timestamp(now)
            self.conn.execute("INSERT INTO kg_processing_queue (content_id, status, priority, queued_at) VALUES "
                              + ", ".join(["(?, 'pending', ?, ?)"] * len(content_ids)),
                              [value for cid in content_ids for value in (cid, priority, stamp)])
        return content_ids

    def enqueue_all_unprocessed(self, priority: int, now: float, *, batch_rows: int = BULK_BATCH_ROWS,
                                progress: Progress | None = None) -> int:
        """Queue every document with kg_processed = 0 that has no live queue row; returns how many.

        It walks crawled_content by id, `batch_rows` documents a transaction: workers write
        between batches, and an interrupted run keeps what it queued (running it again queues
        the rest, never a document twice).
        """
        check_int64("priority", [priority])
        total = self.conn.execute("SELECT COUNT(*) FROM crawled_content").fetchone()[0]
        added = done = 0
        low = self.conn.execute("SELECT MIN(id) FROM crawled_content").fetchone()[0]
        while low is not None:
            with insert_refusals(), transaction(self.conn):
                documents, queued = self._enqueue_unprocessed_from(low, batch_rows, priority, now)
            added += queued
            done += len(documents)
            if progress and documents:
                progress(min(done, total), max(total, done))
            low = documents[-1] + 1 if len(documents) == batch_rows and documents[-1] < INT64_MAX else None
        return added

    def _enqueue_unprocessed_from(self, low: int, batch_rows: int, priority: int, now: float) -> tuple[list[int], int]:
        """The next `batch_rows` documents from id `low` on: their ids, and how many were queued."""
        rows = self.conn.execute("SELECT id, COALESCE(kg_processed, 0) = 0 FROM crawled_content WHERE id >= ? "
                                 "ORDER BY id LIMIT ?", (low, batch_rows)).fetchall()
        if not rows:
            return [], 0
        # Their live rows by a range of the content_id index, however many history rows are in it.
        live_ones = set(self._ids(f"SELECT content_id FROM kg_processing_queue AS q WHERE content_id >= ? "
                                  f"AND content_id <= ? AND {live('q')}", (low, rows[-1][0])))
        fresh = [cid for cid, unprocessed in rows if unprocessed and cid not in live_ones]
        return [cid for cid, _ in rows], len(self._queue_new(fresh, priority, now))

    def _ids(self, sql: str, params: Sequence[object] = ()) -> list[int]:
        """The first column of every row `sql` returns."""
        return [row[0] for row in self.conn.execute(sql, params).fetchall()]

    def _update_in_batches(self, assignments: str, where: str, params: Sequence[object], ids: list[int],
                           batch_rows: int, progress: Progress | None = None) -> int:
        """UPDATE the rows `ids` (chosen by `where` before) `batch_rows` at a time, each batch
        its own statement; `where` is asked again of every row, as a row may have changed since
        it was chosen. Returns the rows changed."""
        changed = 0
        for start in range(0, len(ids), batch_rows):
            batch = ids[start:start + batch_rows]
            changed += self.conn.execute(
                f"UPDATE kg_processing_queue AS q SET {assignments} "
                f"WHERE ({where}) AND q.id IN ({marks(batch)})", [*params, *batch]).rowcount
            if progress:
                progress(start + len(batch), len(ids))
        return changed

    def retry(self, *, failed: bool = False, skipped: bool = False, ids: Sequence[int] = (),
              batch_rows: int = BULK_BATCH_ROWS, progress: Progress | None = None) -> int:
        """Put failed / skipped rows (or rows by queue id) back to pending with a fresh attempt
        budget, `batch_rows` a statement; returns how many."""
        check_int64("queue id", ids)
        clauses, params = [], []
        if failed:
            clauses.append("status = 'failed'")
        if skipped:
            clauses.append("status = 'skipped'")
        if ids:
            clauses.append(f"(id IN ({marks(ids)}) AND status IN ('failed', 'skipped', 'completed'))")
            params.extend(ids)
        if not clauses:
            return 0
        chosen = f"({' OR '.join(clauses)})"
        # One row per document, its newest, so that no retry makes two live rows of one document.
        newest = self._ids(f"SELECT MAX(id) FROM kg_processing_queue WHERE {chosen} "
                           "GROUP BY content_id, CASE WHEN content_id IS NULL THEN id END ORDER BY 1", params)
        # A document that meanwhile got a newer live row keeps that one only.
        where = (f"{chosen} AND NOT EXISTS (SELECT 1 FROM kg_processing_queue o "
                 f"WHERE o.content_id = q.content_id AND o.id != q.id AND {live('o')})")
        return self._update_in_batches(
            "status = 'pending', retry_count = 0, crash_count = 0, not_before = NULL, "
            "skipped_reason = NULL, processed_at = NULL", where, params, newest, batch_rows, progress)

    def make_due(self, now: float, *, every_pending: bool = False, ids: Sequence[int] = (),
                 batch_rows: int = BULK_BATCH_ROWS, progress: Progress | None = None) -> int:
        """Pending rows (all, or these queue ids) told to wait past `now`: due now, `batch_rows`
        a statement; returns how many.

        Their attempt count stays: they have not failed, they were told to wait (a Retry-After,
        a backoff), maybe far longer than anyone meant (a row left by an older version).
        """
        check_int64("queue id", ids)
        if not (every_pending or ids):
            return 0
        which = "" if every_pending else f" AND id IN ({marks(ids)})"
        waiting = "status = 'pending' AND not_before > ?"
        chosen = self._ids(f"SELECT id FROM kg_processing_queue WHERE {waiting}{which} ORDER BY id",
                           [now, *([] if every_pending else ids)])
        return self._update_in_batches("not_before = NULL", waiting, [now], chosen, batch_rows, progress)


class SQLiteQueue(LeasedQueue):
    """The queue in an SQLite file (WAL): one writer at a time, the claim served by its partial index."""


class PostgresQueue(LeasedQueue):
    """The queue in PostgreSQL: claimers on many hosts skip each other's locked rows."""

    claim_sql = PG_CLAIM_SQL

    def requeue_expired(self, now: float, batch_rows: int = BULK_BATCH_ROWS) -> int:
        """The lease-expiry backstop, and (as periodic upkeep) the count rows of closed
        connections folded into one, so a count reads few rows however many have come and gone."""
        count = super().requeue_expired(now, batch_rows)
        self.conn.execute(
            f"""WITH gone AS (DELETE FROM {STATUS_COUNTS_TABLE}
                               WHERE slot <> 0 AND slot NOT IN (SELECT pid FROM pg_stat_activity)
                           RETURNING status, n)
                INSERT INTO {STATUS_COUNTS_TABLE} (status, slot, n)
                SELECT status, 0, SUM(n) FROM gone GROUP BY status
                ON CONFLICT (status, slot) DO UPDATE SET n = {STATUS_COUNTS_TABLE}.n + EXCLUDED.n""")
        return count


def queue_for(conn: object) -> LeasedQueue:
    """The queue over `conn`, of that connection's backend."""
    return PostgresQueue(conn) if is_postgres(conn) else SQLiteQueue(conn)  # type: ignore[arg-type]
