"""How claims end short of a write-back: retried, failed, released, given back for a gone owner.
Each outcome is fenced by the claim's token, and recorded in the attempt history in its own
transaction (docs/history.md): only rows the outcome really changed get an attempt row."""
from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from kgsupervisor.masking import hide_credentials
from kgsupervisor.queue.claims import Claim, CrashRelease
from kgsupervisor.queue.history import Attempt, InFlight, Outcome, held_from_row, record_attempt, record_held
from kgsupervisor.queue.sql import BACK_TO_PENDING, FENCED, HELD_ROWS, NO_LEASE, OWNED, db_timestamp, marks
from kgsupervisor.states import JobStatus
from kgsupervisor.store.sqlite import transaction

# The rows whose lease ran out (parameter: now): their owner vanished without giving them back.
EXPIRED = "status = 'processing' AND lease_expires_at IS NOT NULL AND lease_expires_at < ?"
EXPIRED_ATTEMPT = Attempt(error_class="lease_expired",
                          error_message="lease expired: its owner vanished without giving it back")


def backoff_delay(retry_count: int, base: float, cap: float) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**retry_count)]."""
    return random.uniform(0, min(cap, base * (2 ** min(retry_count, 30))))


class ClaimOutcomes:
    """The outcome half of the leased queue (LeasedQueue inherits it); needs `self.conn`."""

    conn: Any

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """A transaction, unless the caller has one open already (then it is part of that)."""
        if self.conn.in_transaction:
            yield
            return
        with transaction(self.conn):
            yield

    def end_claim(self, claim: Claim, sql: str, params: Sequence[object], outcome: Outcome, now: float,
                  attempt: Attempt | None, error: str | None = None) -> bool:
        """Run one claim's fenced UPDATE and record its outcome in the same transaction. Fenced
        out, the claim is recorded as lease_lost, unless whoever took the row recorded it."""
        with self.atomic():
            changed = self.conn.execute(sql, params).rowcount == 1
            record_attempt(self.conn, claim, outcome if changed else Outcome.LEASE_LOST, now, attempt, error)
        return changed

    def release(self, claims: Iterable[Claim], not_before: float | None = None, *,
                outcome: Outcome = Outcome.DRAINED, attempt: Attempt | None = None,
                now: float | None = None) -> int:
        """PROCESSING -> PENDING without charging an attempt (drain, outage, unstarted rows)."""
        now = time.time() if now is None else now
        sql = f"UPDATE kg_processing_queue SET {BACK_TO_PENDING}, not_before = ? WHERE {FENCED}"
        claims = list(claims)
        if not claims:
            return 0
        with self.atomic():
            return sum(self.end_claim(c, sql, (not_before, c.id, c.token), outcome, now, attempt)
                       for c in claims)

    def release_owner(self, owner: str, *, outcome: Outcome = Outcome.DRAINED, attempt: Attempt | None = None,
                      now: float | None = None, in_flight: InFlight | None = None) -> int:
        """Every claim of an owner (dead, or leaving) back to pending at once, no attempt charged;
        `in_flight`, the claim it was sending, gets its sent time in the history."""
        with self.atomic():
            held = self.held(OWNED, (owner,))
            changed = self.released(OWNED, (owner,))
            record_held(self.conn, held, changed, outcome, time.time() if now is None else now, attempt,
                        in_flight)
        return len(changed)

    def release_crashed(self, owner: str, in_flight: InFlight | None, cause: str, poison_after: int,
                        now: float, *, outcome: Outcome = Outcome.CRASHED,
                        attempt: Attempt | None = None) -> CrashRelease:
        """Every claim of a worker that died, back at once: the claim it was sending (`in_flight`,
        from its shared memory) charged one crash, and failed as a poison pill after
        `poison_after` crashes; the rest, unsent or answered but unwritten, uncharged.
        """
        attempt = attempt or Attempt(error_message=cause)
        with transaction(self.conn):
            held = self.held(OWNED, (owner,))
            charged = self.charge_crash(owner, in_flight)
            poisoned = [(qid, cid, n) for qid, cid, n in charged if n >= poison_after]
            for qid, _, n in poisoned:
                # PROCESSING -> FAILED (poison pill)
                reason = (f"poison pill: a worker died {n} times while processing this document "
                          f"(last: {cause}); not retried")
                self.conn.execute(
                    "UPDATE kg_processing_queue SET status = 'failed', processed_at = ?, error_message = ?, "
                    f"{NO_LEASE}, started_at = NULL WHERE id = ?", (db_timestamp(now), reason, qid))
                record_held(self.conn, held, {qid}, Outcome.POISON_PILL, now,
                            dataclasses.replace(attempt, error_message=reason), in_flight)
            changed = self.released(OWNED, (owner,))
            record_held(self.conn, held, changed, outcome, now, attempt, in_flight)
        return CrashRelease(len(changed), [cid for _, cid, _ in charged], [cid for _, cid, _ in poisoned])

    def charge_crash(self, owner: str, in_flight: InFlight | None) -> list[tuple[int, Any, int]]:
        """One crash more on the claim in flight, if `owner` still holds it under its token:
        [(row id, content_id, crash_count)], empty when nothing was in flight."""
        if in_flight is None:
            return []
        return self.conn.execute(
            "UPDATE kg_processing_queue SET crash_count = COALESCE(crash_count, 0) + 1 "
            f"WHERE {OWNED} AND id = ? AND lease_token = ? RETURNING id, content_id, crash_count",
            (owner, in_flight.row_id, in_flight.token)).fetchall()

    def requeue_expired_rows(self, now: float, batch_rows: int) -> int:
        """Expired leases back to pending, `batch_rows` a transaction; each recorded as crashed."""
        ids = [row[0] for row in self.conn.execute(
            f"SELECT id FROM kg_processing_queue WHERE {EXPIRED}", (now,)).fetchall()]
        count = 0
        for start in range(0, len(ids), batch_rows):
            batch = ids[start:start + batch_rows]
            # The condition is asked again of every row: one may have changed since it was chosen.
            where, params = f"{EXPIRED} AND id IN ({marks(batch)})", (now, *batch)
            with transaction(self.conn):
                held = self.held(where, params)
                changed = self.released(where, params)
                record_held(self.conn, held, changed, Outcome.CRASHED, now, EXPIRED_ATTEMPT)
            count += len(changed)
        return count

    def held(self, where: str, params: Sequence[object]) -> list[Claim]:
        """The claims `where` selects, as their rows show them now (before a release)."""
        return [held_from_row(row) for row in self.conn.execute(HELD_ROWS + where, params).fetchall()]

    def released(self, where: str, params: Sequence[object]) -> set[int]:
        """Rows `where` selects back to pending, unleased and unstarted; the ids it changed."""
        sql = f"UPDATE kg_processing_queue SET {BACK_TO_PENDING} WHERE {where} RETURNING id"
        return {row[0] for row in self.conn.execute(sql, params).fetchall()}

    def retry_later(self, claim: Claim, error: str, now: float, max_attempts: int, backoff_base: float,
                    backoff_cap: float, *, attempt: Attempt | None = None) -> JobStatus | None:
        """Charge one attempt: PENDING again after a backoff, or FAILED when attempts run out;
        None when the lease was lost meanwhile (nothing changed: the row is someone else's)."""
        attempts = claim.retry_count + 1
        if attempts >= max_attempts:
            failed = self.fail(claim, f"gave up after {attempts} attempts: {error}", now,
                               attempts=attempts, attempt=attempt)
            return JobStatus.FAILED if failed else None
        not_before = now + backoff_delay(claim.retry_count, backoff_base, backoff_cap)
        sql = (f"UPDATE kg_processing_queue SET {BACK_TO_PENDING}, retry_count = ?, error_message = ?, "
               f"not_before = ? WHERE {FENCED}")
        params = (attempts, hide_credentials(error), not_before, claim.id, claim.token)
        retried = self.end_claim(claim, sql, params, Outcome.RETRIED, now, attempt, error)
        return JobStatus.PENDING if retried else None

    def fail(self, claim: Claim, error: str, now: float, attempts: int | None = None, *,
             outcome: Outcome = Outcome.FAILED, attempt: Attempt | None = None) -> bool:
        """PROCESSING -> FAILED with the reason in error_message (credentials a reason quotes hidden)."""
        sql = ("UPDATE kg_processing_queue SET status = 'failed', error_message = ?, processed_at = ?, "
               f"retry_count = ?, {NO_LEASE}, not_before = NULL WHERE {FENCED}")
        charged = claim.retry_count if attempts is None else attempts
        params = (hide_credentials(error), db_timestamp(now), charged, claim.id, claim.token)
        return self.end_claim(claim, sql, params, outcome, now, attempt, error)
