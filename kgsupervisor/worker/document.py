"""One claimed document: its request read, sent to the KG service, its outcome written and counted."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kgsupervisor.config import Settings
from kgsupervisor.errors import DocumentRejected, InvalidAnswer, ItemFailure, ServiceUnavailable
from kgsupervisor.kg.dispatch import Dispatcher
from kgsupervisor.kg.result import IngestResult
from kgsupervisor.queue.documents import build_payload, encode_payload
from kgsupervisor.queue.history import Attempt, Outcome
from kgsupervisor.queue.leased import Claim
from kgsupervisor.queue.writeback import Answered
from kgsupervisor.states import JobStatus
from kgsupervisor.store.faults import describe_database_fault, is_corruption, is_database_fault
from kgsupervisor.worker.counters import Progress
from kgsupervisor.worker.database import WorkerDatabase
from kgsupervisor.worker.stats import WorkerStats
from kgsupervisor.worker.worklog import WorkerLog


def error_class_of(exc: BaseException, http_status: int | None) -> str:
    """The attempt history's short, stable name for why a try failed (docs/history.md)."""
    if isinstance(exc, InvalidAnswer):
        return "invalid_answer"
    if isinstance(exc, (ItemFailure, ServiceUnavailable, DocumentRejected)) and (http_status or 0) >= 300:
        return f"http_{http_status}"
    if isinstance(exc, ItemFailure):
        return "timeout"  # the only item failure without an error status: no answer in time
    if isinstance(exc, ServiceUnavailable):
        return "connection"
    if isinstance(exc, DocumentRejected):
        return "document_rejected"
    return "internal_error"


class DocumentProcessor:
    """Takes a claimed document to an outcome (failed, retried later, released) or to an answer
    in hand, for the write-back thread (worker/writer.py)."""

    def __init__(self, settings: Settings, db: WorkerDatabase, dispatch: Dispatcher, stats: WorkerStats,
                 log: WorkerLog, busy: Callable[[], None], progress: Progress | None = None) -> None:
        self.settings = settings
        self.db = db
        self.dispatch = dispatch
        self.stats = stats
        self.log = log
        self._busy = busy
        # Marked after each step: the hang check counts the longest step, not the document.
        self.progress = progress or Progress()

    def process(self, claim: Claim) -> Answered | None:
        """One document from claimed to an outcome, or to an answer returned for the group write-back."""
        self.dispatch.last_exchange = None  # nothing sent yet for this document
        if claim.problem:
            # This row alone: nothing else waits on it.
            self.fail(claim, claim.problem, self.tried(claim), Outcome.BAD_ROW)
            return None
        self._busy()
        try:
            result, took, notes = self.send(claim)
        except DocumentRejected as exc:
            self.fail(claim, str(exc), self.tried(claim, exc))
        except InvalidAnswer as exc:
            self.retry(claim, f"invalid answer: {exc}", self.tried(claim, exc))
        except ItemFailure as exc:
            self.retry(claim, str(exc), self.tried(claim, exc))
        except ServiceUnavailable as exc:
            self.release_for_outage(claim, exc, self.tried(claim, exc))
        except Exception as exc:
            if is_database_fault(exc):
                raise  # the database, not this document: run() pauses the worker
            # A bug this document trips (a RecursionError on its data, ...): it costs the
            # document an attempt, and the worker lives on, instead of dying on it again and again.
            self.log.exception("unexpected error while processing this document; charging it an attempt")
            reason = f"internal error: {type(exc).__name__}: {str(exc)[:300]}"
            self.retry(claim, reason, self.tried(claim, exc))
        else:
            return Answered(claim, result, notes, at=time.monotonic(), took=took, attempt=self.tried(claim))
        return None

    def send(self, claim: Claim) -> tuple[IngestResult, float, list[str]]:
        """Read the document, send it and parse the answer: (result, seconds taken, notes).

        Meanwhile the claim is in flight in the worker's shared memory, not in the database (no
        transaction a document): a death from the read to the parsed answer (a document that
        crashes the reader or the parser, a hang, a kill) is charged to this claim alone.
        """
        with self.stats.counters.sending(claim.id, claim.token):
            payload, notes = self.read_document(claim)
            self.progress.mark()
            body = encode_payload(payload)
            self.progress.mark()
            # The request is parked (a wait bounded by KG_SERVICE_TIMEOUT); the answer's parse is
            # work, not a wait: a few seconds at most within KG_MAX_ANSWER_MB, and a spin in it hangs.
            result, took = self.dispatch.send(claim.content_id, body,
                                              {c["vector_rowid"] for c in payload["chunks"]})
            self.progress.mark()
        return result, took, notes

    def tried(self, claim: Claim, exc: BaseException | None = None) -> Attempt:
        """What this worker knows of its try of `claim`, for the attempt history: the request the
        dispatcher made last (endpoint, time, status, answer size) and why it failed, if it did."""
        exchange = self.dispatch.last_exchange
        status = exchange.http_status if exchange else None
        bad_row = claim.problem is not None
        return Attempt(
            worker=self.stats.worker_id, claimed_at=claim.claimed_at,
            sent_at=exchange.sent_at if exchange else None, endpoint=exchange.endpoint if exchange else None,
            http_status=status, answer_bytes=exchange.answer_bytes if exchange else None,
            error_class="bad_row" if bad_row else (error_class_of(exc, status) if exc else None),
            error_message=str(exc) if exc else None)

    def read_document(self, claim: Claim) -> tuple[dict[str, Any], list[str]]:
        """The document's request; a damaged page in its own rows rejects it alone.

        When reading the document hits SQLITE_CORRUPT but its queue row still reads, the damage
        is in this document's rows (a chunk's overflow page, say): no retry can help it, and
        the rest of the queue must not wait on it. A database that cannot be read at all fails
        that probe too, and the fault pauses the worker as any other database fault.
        """
        conn = self.db.conn
        try:
            return build_payload(conn, claim.content_id)
        except Exception as exc:
            if not is_corruption(exc):
                raise
            conn.execute("SELECT status FROM kg_processing_queue WHERE id = ?", (claim.id,)).fetchone()
            raise DocumentRejected(f"the document's rows cannot be read from the database: "
                                   f"{describe_database_fault(exc)}") from None

    # -- outcomes ----------------------------------------------------------------------------

    def fail(self, claim: Claim, reason: str, attempt: Attempt, outcome: Outcome = Outcome.FAILED) -> None:
        # PROCESSING -> FAILED
        if self.db.retrying(lambda q: q.fail(claim, reason, time.time(), outcome=outcome, attempt=attempt)):
            self.stats.record_outcome(False)
            self.log.warning("failed for good: %s", reason)

    def retry(self, claim: Claim, reason: str, attempt: Attempt) -> None:
        s = self.settings
        status = self.db.retrying(lambda q: q.retry_later(claim, reason, time.time(), s.max_attempts,
                                                          s.retry_backoff, s.retry_backoff_max,
                                                          attempt=attempt))
        if status is None:
            self.stats.count("lease_lost")
            self.log.warning("lease lost before this failure was recorded (the document went back to the "
                             "queue meanwhile); not charged: %s", reason)
        elif status is JobStatus.FAILED:
            # PROCESSING -> FAILED
            self.stats.record_outcome(False)
            self.log.warning("failed after %d attempts: %s", claim.retry_count + 1, reason)
        else:
            # PROCESSING -> PENDING (attempt charged)
            self.stats.record_retry()
            self.log.warning("attempt %d of %d failed, will retry: %s", claim.retry_count + 1,
                             s.max_attempts, reason)

    def release_for_outage(self, claim: Claim, exc: ServiceUnavailable, attempt: Attempt) -> None:
        """PROCESSING -> PENDING with no attempt charged: no endpoint could take the document."""
        now = time.time()
        not_before = now + exc.requeue_delay if exc.requeue_delay else None
        self.stats.record_released(self.db.retrying(
            lambda q: q.release([claim], not_before, outcome=Outcome.OUTAGE, attempt=attempt, now=now)))
        self.log.warning("KG service unavailable, document released: %s", exc)

    def release_unstarted(self, claims: list[Claim], stopping: bool) -> None:
        """The batch's documents not yet sent back to pending, uncharged: the worker is stopping
        (drained), or every endpoint is down (an outage)."""
        why = "the worker is stopping" if stopping else "every KG service endpoint is down"
        attempt = Attempt(worker=self.stats.worker_id, error_message=f"not sent: {why}")
        outcome = Outcome.DRAINED if stopping else Outcome.OUTAGE
        self.stats.record_released(self.db.retrying(
            lambda q: q.release(claims, outcome=outcome, attempt=attempt)))
