"""What the queue hands out and reports: a claim under a lease, and the outcomes of bulk changes."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence


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
    claimed_at: float | None = None  # unix seconds of the claim, for the attempt history


def _whole(value: object) -> int | None:
    """An integer column's value, or None when the row holds something else (text, a real)."""
    return value if type(value) is int else None


def claim_from_row(row: Sequence, owner: str, token: str, claimed_at: float | None = None) -> Claim:
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
    return Claim(qid, content_id, _whole(retry_count) or 0, _whole(priority) or 0, owner, token, problem,
                 claimed_at)


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
