"""The leased queue: claim, extend, release, retry, fail, requeue and count rows, on SQLite or PostgreSQL."""
from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

from kgsupervisor.errors import ConfigError, DatabaseError
from kgsupervisor.queue.claims import Claim, EnqueueResult, claim_from_row
from kgsupervisor.queue.outcomes import ClaimOutcomes
from kgsupervisor.queue.sql import HELD, claim_sql, db_timestamp, live, marks
from kgsupervisor.states import ALL_JOB_STATUSES
from kgsupervisor.store.backend import POSTGRESQL, SQLITE, Backend, backend_of, open_database
from kgsupervisor.store.schema import CLAIMABLE, STATUS_COUNTS_TABLE
from kgsupervisor.store.sqlite import transaction

# The claim in each dialect, as the benches and plan tests read it.
CLAIM_SQL = claim_sql(SQLITE)
PG_CLAIM_SQL = claim_sql(POSTGRESQL)


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
def insert_refusals(backend: Backend) -> Iterator[None]:
    """A NOT NULL column without a default that kgsupervisor does not fill refuses every insert
    into the queue: say which column in one line, not a traceback per enqueue."""
    try:
        yield
    except Exception as exc:
        column = backend.not_null_column(exc)
        if column is None:
            raise
        raise DatabaseError(f"cannot queue documents: column {column} is NOT NULL without a default and "
                            f"kgsupervisor does not set it (give it a DEFAULT, or drop NOT NULL)") from None


class LeasedQueue(ClaimOutcomes):
    """kg_processing_queue as a leased queue; every method is one short transaction. How claims
    end (retried, failed, released) is ClaimOutcomes', each recorded in the attempt history.

    One body of SQL for both backends (a PostgreSQL connection takes SQLite's spelling, see
    store.postgres.PGConnection), so their semantics cannot drift; what differs (the claim's
    dialect, upkeep) the connection's Backend says.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.backend = backend_of(conn)
        self.claim_sql = claim_sql(self.backend)

    def claim(self, owner: str, token: str, limit: int, lease_seconds: float, now: float) -> list[Claim]:
        """Take up to `limit` due rows in `priority DESC, id ASC` order in ONE statement.

        On SQLite the claim names its index: without fresh statistics (a queue filled after ANALYZE)
        it may plan an OR over the status index and sort, which grows with the queue; the index never does.
        """
        rows = self.conn.execute(
            self.claim_sql,
            (db_timestamp(now), owner, token, now + lease_seconds, now, limit),
        ).fetchall()
        claims = [claim_from_row(r, owner, token, now) for r in rows]
        # RETURNING does not promise the subquery's order.
        claims.sort(key=lambda c: (-c.priority, c.id))
        return claims

    def extend(self, token: str, lease_seconds: float, now: float) -> int:
        """Push the lease expiry of every row held under `token`; returns rows still held."""
        cur = self.conn.execute(f"UPDATE kg_processing_queue SET lease_expires_at = ? WHERE {HELD}",
                                (now + lease_seconds, token))
        return cur.rowcount

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
        `batch_rows` at a time (a host that held a million claims does not lock them all at once);
        then, as periodic upkeep, the backend's tidying of the counts table."""
        count = self.requeue_expired_rows(now, batch_rows)
        self.backend.fold_count_rows(self.conn)
        return count

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
        with insert_refusals(self.backend), transaction(self.conn):
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
            with insert_refusals(self.backend), transaction(self.conn):
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
              id_statuses: Sequence[str] = ("failed", "skipped", "completed"),
              batch_rows: int = BULK_BATCH_ROWS, progress: Progress | None = None) -> int:
        """Put failed / skipped rows (or rows by queue id, while their status is one of
        `id_statuses`) back to pending with a fresh attempt budget, `batch_rows` a statement;
        returns how many."""
        check_int64("queue id", ids)
        clauses, params = [], []
        if failed:
            clauses.append("status = 'failed'")
        if skipped:
            clauses.append("status = 'skipped'")
        if ids:
            clauses.append(f"(id IN ({marks(ids)}) AND status IN ({marks(id_statuses)}))")
            params.extend([*ids, *id_statuses])
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


# One class serves both backends, its dialect taken from the connection: the names the benches
# and tests use for either.
SQLiteQueue = PostgresQueue = LeasedQueue


def queue_for(conn: object) -> LeasedQueue:
    """The queue over `conn`, of that connection's backend."""
    return LeasedQueue(conn)  # type: ignore[arg-type]


def open_queue(target: str) -> LeasedQueue:
    """The queue of the database `target` (its connection is `queue.conn`)."""
    return queue_for(open_database(target))
