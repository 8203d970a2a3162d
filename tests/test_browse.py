"""The console's data layer (queue/browse.py) on SQLite and PostgreSQL, held to an oracle: the rows
seeded here are kept in Python, and what each filter, page walk, count, retry and fail should
give is computed from them, never by asking the code under test."""
from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Iterator
from contextlib import closing

import pytest

from kgsupervisor.errors import ConfigError
from kgsupervisor.queue import browse
from kgsupervisor.queue.browse import (DocumentFilter, count_matching, document_detail, documents_page,
                                       fail_matching, failure_groups, max_queue_id, queue_counts,
                                       retry_document, retry_matching, throughput_series)
from kgsupervisor.queue.leased import LeasedQueue, queue_for
from kgsupervisor.queue.sql import db_timestamp

from .conftest import make_backend

pytestmark = pytest.mark.timeout(120)

NOW = 1_800_000_000.0
ERRORS = ["KG service error 500: 100% broken", "Snake_Case failure", "back\\slash in the path",
          "Timeout after 30s", "KG service rejected the document (422): bad chunk", None]
ENDPOINTS = ["http://kg-a.example:8088", "http://KG-B.example:8088"]
NO_DOCUMENT = 9999  # a content id with no crawled_content row
LIVE = ("pending", "processing")
TIME_FORM = "a duration like 90s, 15m, 2h or 7d, or a UTC date like 2026-11-30 or 2026-11-30T12:00"


@dataclasses.dataclass
class Row:
    """A queue row as seeded: what the oracle knows of it."""

    id: int
    content_id: int
    status: str
    error: str | None
    queued_at: str
    processed_at: str | None
    retry_count: int
    url: str | None
    title: str | None
    endpoints: list[str]

    @property
    def changed_at(self) -> str:
        return self.processed_at or self.queued_at


def seed(conn, rng: random.Random, rows: int = 360) -> list[Row]:
    """Documents (six with a rare url holding LIKE wildcards), queue rows of every status with
    varied errors, attempts at two endpoints, and a stretch of deleted ids; the rows, id order."""
    documents = {cid: (f"https://site.example/{'Needle_50%' if cid % 40 == 7 else 'graph'}/{cid}",
                       f"<b>Title</b> {cid}") for cid in range(1, 241)}
    conn.executemany("INSERT INTO crawled_content (id, url, title) VALUES (?, ?, ?)",
                     [(cid, url, title) for cid, (url, title) in documents.items()])
    seeded = []
    for n in range(rows):
        cid = NO_DOCUMENT if n % 97 == 5 else rng.randint(1, 240)
        status = rng.choices(["pending", "processing", "completed", "failed", "skipped"], [3, 1, 4, 3, 1])[0]
        error = rng.choice(ERRORS) if status in ("failed", "pending") else None
        queued = db_timestamp(NOW - (rows - n) * 600)
        done = status in ("completed", "failed", "skipped")
        processed = db_timestamp(NOW - rng.uniform(0, 3 * 86400)) if done else None
        retries = rng.randint(0, 3)
        qid = conn.execute("INSERT INTO kg_processing_queue (content_id, status, queued_at, processed_at, "
                           "retry_count, error_message, lease_owner) VALUES (?, ?, ?, ?, ?, ?, ?) "
                           "RETURNING id",
                           (cid, status, queued, processed, retries, error,
                            "web-1:1" if status == "processing" else None)).fetchone()[0]
        url, title = documents.get(cid, (None, None))
        seeded.append(Row(qid, cid, status, error, queued, processed, retries, url, title, []))
        for attempt in range(rng.choice([0, 0, 1, 2])):
            endpoint = rng.choice(ENDPOINTS)
            conn.execute("INSERT INTO kg_processing_attempts (queue_id, content_id, attempt, claim_key, "
                         "finished_at, outcome, endpoint) VALUES (?, ?, ?, ?, ?, 'retried', ?)",
                         (qid, cid, attempt + 1, f"t{qid}/{attempt}", NOW - 60, endpoint))
            seeded[-1].endpoints.append(endpoint)
    gone = [row.id for row in seeded[rows // 3:rows // 3 + rows // 12]]  # a gap the walks step over
    conn.execute("DELETE FROM kg_processing_queue WHERE id >= ? AND id <= ?", (gone[0], gone[-1]))
    return [row for row in seeded if row.id not in gone]


def oracle(rows: list[Row], chosen: DocumentFilter) -> list[int]:
    """The ids `chosen` takes, newest first, decided in Python from the seeded rows."""
    def within(wanted: str | None, *texts: str | None) -> bool:
        return wanted is None or any(wanted.lower() in (text or "").lower() for text in texts)

    def holds(row: Row) -> bool:
        return ((chosen.status is None or row.status == chosen.status)
                and within(chosen.error, row.error) and within(chosen.url, row.url)
                and within(chosen.endpoint, *row.endpoints)
                and (chosen.since is None or row.changed_at >= db_timestamp(chosen.since))
                and (chosen.until is None or row.changed_at < db_timestamp(chosen.until))
                and (chosen.content_id is None or row.content_id == chosen.content_id))
    return sorted((row.id for row in rows if holds(row)), reverse=True)


def retry_oracle(rows: list[Row], chosen: DocumentFilter, upto: int) -> list[int]:
    """`retry --failed` on the rows `chosen` takes: a document's newest failed row, none of a
    document that has a live row."""
    taken = set(oracle(rows, chosen))
    def stands(row: Row) -> bool:
        others = [o for o in rows if o.content_id == row.content_id and o.id != row.id]
        return not any(o.status in LIVE or (o.status == "failed" and o.id > row.id) for o in others)
    return sorted(row.id for row in rows if row.id in taken and row.id <= upto and row.status == "failed"
                  and stands(row))


def fail_oracle(rows: list[Row], chosen: DocumentFilter, upto: int) -> list[int]:
    """A fail of the rows `chosen` takes: the pending and skipped ones."""
    taken = set(oracle(rows, chosen))
    return sorted(row.id for row in rows
                  if row.id in taken and row.id <= upto and row.status in ("pending", "skipped"))


def walk(conn, chosen: DocumentFilter, limit: int) -> tuple[list[int], int]:
    """Every page from the first, by keyset: the ids in order, and how many pages were partial
    (fewer rows than `limit`, yet more to look at)."""
    ids: list[int] = []
    before, partial = None, 0
    for _ in range(10_000):
        page = documents_page(conn, chosen, before=before, limit=limit)
        shown = [row.queue_id for row in page.rows]
        assert len(shown) <= limit and shown == sorted(shown, reverse=True)
        assert before is None or all(qid < before for qid in shown)
        ids += shown
        if page.next_before is None:
            return ids, partial
        assert before is None or page.next_before < before, "every page moves on"
        assert page.scanned_to is not None and page.scanned_to <= page.next_before
        partial += len(shown) < limit
        before = page.next_before
    raise AssertionError("the walk did not end")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def seeded(request, tmp_path_factory) -> Iterator[tuple]:
    """One seeded database per backend for the read-only tests: (connection, rows)."""
    backend = make_backend(request.param, tmp_path_factory.mktemp("browse"), request)
    with closing(backend.connect()) as conn:
        yield conn, seed(conn, random.Random(16))


@pytest.fixture
def small_pages(monkeypatch) -> None:
    """Budgets small enough that a few hundred rows need partial pages and both ways of finding
    rows (a walk down the ids, a status index read whole)."""
    monkeypatch.setattr(browse, "FIRST_WINDOW", 4)
    monkeypatch.setattr(browse, "LAST_WINDOW", 16)
    monkeypatch.setattr(browse, "PAGE_ROWS_EXAMINED", 40)
    monkeypatch.setattr(browse, "LOOKUP_PROBES", 20)
    monkeypatch.setattr(browse, "STATUS_INDEX_ROWS", 60)


FILTERS = {
    "everything": DocumentFilter(),
    "failed": DocumentFilter(status="failed"),
    "processing (status index)": DocumentFilter(status="processing"),
    "a literal 100%": DocumentFilter(error="100%"),
    "a literal _ in any case": DocumentFilter(error="SNAKE_case"),
    "a backslash": DocumentFilter(error="k\\s"),
    "rare url with wildcards": DocumentFilter(url="needle_50%"),
    "url of failed rows": DocumentFilter(status="failed", url="NEEDLE"),
    "endpoint": DocumentFilter(endpoint="kg-b"),
    "endpoint and url": DocumentFilter(endpoint="KG-A", url="graph"),
    "time window": DocumentFilter(since=NOW - 2 * 86400, until=NOW - 86400),
    "pending with an error": DocumentFilter(status="pending", error="timeout"),
    "a document": DocumentFilter(content_id=NO_DOCUMENT),
    "hostile text": DocumentFilter(error="' OR 1=1 --"),
}


@pytest.mark.parametrize("name", FILTERS)
def test_walking_every_page_gives_exactly_the_oracles_rows(seeded, small_pages, name):
    conn, rows = seeded
    chosen = FILTERS[name]
    ids, _ = walk(conn, chosen, limit=7)
    assert ids == oracle(rows, chosen)
    assert len(set(ids)) == len(ids)


def test_a_rare_url_search_stops_early_with_partial_pages_and_still_finds_all(seeded, small_pages):
    conn, rows = seeded
    chosen = DocumentFilter(url="NEEDLE_50%")
    expected = oracle(rows, chosen)
    assert 0 < len(expected) < 30
    ids, partial = walk(conn, chosen, limit=7)
    assert ids == expected
    assert partial >= 5, "each page examined a bounded number of ids"
    first = documents_page(conn, chosen, limit=7)
    assert first.next_before is not None and first.scanned_to == first.next_before
    assert first.next_before > max(row.id for row in rows) - 60, "the first page looked at few ids"


def test_with_the_real_budgets_a_small_queue_fits_in_whole_pages(seeded):
    conn, rows = seeded
    for chosen in (DocumentFilter(), DocumentFilter(url="needle"),
                   DocumentFilter(status="failed", error="500")):
        ids, partial = walk(conn, chosen, limit=25)
        assert (ids, partial) == (oracle(rows, chosen), 0)


def test_a_page_row_carries_the_queue_row_and_its_document(seeded):
    conn, rows = seeded
    by_id = {row.id: row for row in rows}
    page = documents_page(conn, DocumentFilter(status="failed"), limit=200)
    assert page.rows and page.next_before is None
    for shown in page.rows:
        row = by_id[shown.queue_id]
        assert dataclasses.astuple(shown) == (row.id, row.content_id, row.status, row.url, row.title,
                                              row.retry_count, row.error, row.queued_at, row.processed_at)


# -- the filter from the form -----------------------------------------------------------------------

def test_the_form_fields_make_a_filter_and_its_links_make_it_again():
    args = {"status": "failed", "error": " 100% ", "endpoint": "", "since": "2h", "until": "2027-01-15T12:30",
            "content_id": "42", "url": "needle_"}
    chosen = DocumentFilter.from_query(args, NOW)
    assert chosen == DocumentFilter(status="failed", error="100%", since=NOW - 7200, until=1800016200,
                                    content_id=42, url="needle_")
    assert chosen.query_args() == {"status": "failed", "error": "100%", "since": "2027-01-15T06:00:00",
                                   "until": "2027-01-15T12:30:00", "content_id": "42", "url": "needle_"}
    assert DocumentFilter.from_query(chosen.query_args(), NOW + 999) == chosen
    assert DocumentFilter.from_query({"since": "2026-11-30"}, NOW).since == 1795996800
    assert DocumentFilter.from_query({"status": " ", "url": ""}, NOW).is_empty()
    assert not chosen.is_empty() and DocumentFilter().query_args() == {}


@pytest.mark.parametrize("field, value, expected", [
    ("status", "FAILED", "one of pending, processing, completed, failed, skipped"),
    ("content_id", "12abc", "a whole number (a crawled_content id)"),
    ("content_id", "99999999999999999999", "a whole number (a crawled_content id)"),
    ("content_id", "1; DROP TABLE x", "a whole number (a crawled_content id)"),
    ("since", "yesterday", TIME_FORM),
    ("until", "0s", TIME_FORM),
    ("since", "2026-13-01", TIME_FORM),
    ("error", "x" * 501, "at most 500 characters"),
    ("url", "a\x00b", "text without NUL characters"),
])
def test_a_bad_field_is_one_line_naming_the_field_and_what_it_takes(field, value, expected):
    with pytest.raises(ConfigError) as caught:
        DocumentFilter.from_query({field: value}, NOW)
    message = str(caught.value)
    assert message.startswith(f"{field}=") and message.endswith(f": expected {expected}")
    assert "\n" not in message and len(message) < 250


# -- bulk actions against the oracle ----------------------------------------------------------------

def queue_rows(conn) -> dict[int, tuple]:
    return {row[0]: row[1:] for row in conn.execute(
        "SELECT id, status, retry_count, error_message, processed_at, lease_owner FROM kg_processing_queue")}


@pytest.mark.parametrize("chosen", [DocumentFilter(), DocumentFilter(error="500"),
                                    DocumentFilter(url="needle"), DocumentFilter(status="pending"),
                                    DocumentFilter(endpoint="kg-b")],
                         ids=["all", "error", "url", "pending", "endpoint"])
def test_retry_matching_changes_exactly_the_counted_rows_none_above_the_bound(backend, small_pages, chosen):
    with closing(backend.connect()) as conn:
        rows = seed(conn, random.Random(3))
        upto = max_queue_id(conn)
        late = conn.execute("INSERT INTO kg_processing_queue (content_id, status, error_message) "
                            "VALUES (?, 'failed', 'KG service error 500 (late)') RETURNING id",
                            (NO_DOCUMENT + 1,)).fetchone()[0]
        expected = retry_oracle(rows, chosen, upto)
        assert count_matching(conn, chosen, "retry", upto) == len(expected)
        before = queue_rows(conn)
        assert retry_matching(queue_for(conn), chosen, upto) == len(expected)
        after = queue_rows(conn)
        assert {qid for qid in before if before[qid] != after[qid]} == set(expected)
        assert all(after[qid][:2] == ("pending", 0) for qid in expected)
        assert after[late] == before[late]
        assert count_matching(conn, chosen, "retry", upto) == 0


@pytest.mark.parametrize("chosen", [DocumentFilter(), DocumentFilter(error="timeout"),
                                    DocumentFilter(url="NEEDLE"), DocumentFilter(status="processing"),
                                    DocumentFilter(status="skipped")],
                         ids=["all", "error", "url", "processing", "skipped"])
def test_fail_matching_changes_exactly_the_counted_rows_never_a_processing_one(backend, small_pages, chosen):
    with closing(backend.connect()) as conn:
        rows = seed(conn, random.Random(4))
        upto = max_queue_id(conn) - 20
        expected = fail_oracle(rows, chosen, upto)
        assert count_matching(conn, chosen, "fail", upto) == len(expected)
        before = queue_rows(conn)
        assert fail_matching(queue_for(conn), chosen, upto, "bad\n batch", now=NOW) == len(expected)
        after = queue_rows(conn)
        assert {qid for qid in before if before[qid] != after[qid]} == set(expected)
        failed = ("failed", "failed by an operator: bad batch", db_timestamp(NOW), None)
        assert all((after[qid][0], *after[qid][2:]) == failed for qid in expected)
        assert all(after[row.id] == before[row.id] for row in rows if row.status == "processing")


class ClaimFirst(LeasedQueue):
    """A queue whose bulk UPDATE comes right after another host claimed every due row: the claim
    lands between the fail's selection and its UPDATE (a real claim, on its own connection)."""

    def __init__(self, conn, claimer: LeasedQueue) -> None:
        super().__init__(conn)
        self.claimer = claimer
        self.claimed: list[int] = []

    def _update_in_batches(self, *args, **kwargs) -> int:
        if not self.claimed:
            claims = self.claimer.claim("other:1", "tok", 10_000, 60, time.time())
            self.claimed = [claim.id for claim in claims]
        return super()._update_in_batches(*args, **kwargs)


def test_a_claim_that_lands_between_the_selection_and_the_fail_wins_its_rows(backend):
    with closing(backend.connect()) as conn, closing(backend.connect()) as other:
        rows = seed(conn, random.Random(5), rows=60)
        upto = max_queue_id(conn)
        pending = [row.id for row in rows if row.status == "pending"]
        expected = fail_oracle(rows, DocumentFilter(), upto)
        assert count_matching(conn, DocumentFilter(), "fail", upto) == len(expected)
        queue = ClaimFirst(conn, queue_for(other))
        changed = fail_matching(queue, DocumentFilter(), upto, "racing")
        assert sorted(queue.claimed) == sorted(pending)
        skipped = [row.id for row in rows if row.status == "skipped"]
        assert changed == len(skipped)
        after = queue_rows(conn)
        assert all(after[qid][0] == "processing" and after[qid][4] == "other:1" for qid in pending)
        assert all(after[qid][0] == "failed" for qid in skipped)


def test_retry_document_takes_one_failed_or_skipped_row_back_unless_its_document_is_live(backend):
    with closing(backend.connect()) as conn:
        q = queue_for(conn)
        conn.execute("INSERT INTO crawled_content (id, url) VALUES (1, 'u1'), (2, 'u2')")
        failed, skipped, completed, lone = (conn.execute(
            "INSERT INTO kg_processing_queue (content_id, status, retry_count) VALUES (?, ?, 3) RETURNING id",
            (cid, status)).fetchone()[0] for cid, status in ((1, "failed"), (1, "skipped"), (2, "completed"),
                                                            (2, "failed")))
        assert retry_document(q, completed) == 0
        assert retry_document(q, skipped) == 1, "no live row of document 1 yet"
        assert retry_document(q, failed) == 0, "document 1 is pending again through its other row"
        assert retry_document(q, lone) == 1
        assert queue_rows(conn)[lone][:2] == ("pending", 0)


def test_an_unknown_action_or_status_is_a_one_line_error(seeded):
    conn, _ = seeded
    with pytest.raises(ConfigError, match=r"^action='requeue': expected retry or fail$"):
        count_matching(conn, DocumentFilter(), "requeue", 10)
    with pytest.raises(ConfigError, match=r"^status='gone'"):
        documents_page(conn, DocumentFilter(status="gone"))
    assert count_matching(conn, DocumentFilter(status="completed"), "retry", 10**9) == 0


# -- one document, failures, throughput, counts -----------------------------------------------------

def test_a_document_page_has_its_rows_and_every_attempt_with_error_and_stack(backend):
    with closing(backend.connect()) as conn:
        conn.execute("INSERT INTO crawled_content (id, url, title, kg_processed) "
                     "VALUES (5, 'https://x.example/5', '<script>alert(1)</script>', 1)")
        conn.executemany("INSERT INTO content_chunks (content_id, chunk_index, chunk_text) "
                         "VALUES (5, ?, 't')", [(0,), (1,)])
        conn.execute("INSERT INTO chunk_entities (content_id, entity_text) VALUES (5, 'Ada')")
        qid = conn.execute("INSERT INTO kg_processing_queue (content_id, status) VALUES (5, 'failed') "
                           "RETURNING id").fetchone()[0]
        for n, (outcome, stack) in enumerate((("hung", "Traceback: frame 1"), ("failed", None)), 1):
            conn.execute("INSERT INTO kg_processing_attempts (queue_id, content_id, attempt, claim_key, "
                         "finished_at, outcome, error_message, stack) "
                         "VALUES (?, 5, ?, ?, ?, ?, 'KG service error 500', ?)",
                         (qid, n, f"k{n}", NOW + n, outcome, stack))
        detail = document_detail(conn, 5)
        assert dataclasses.astuple(detail)[:7] == (5, "https://x.example/5", "<script>alert(1)</script>",
                                                   2, 1, 0, True)
        assert [row["id"] for row in detail.queue_rows] == [qid]
        assert [(a["outcome"], a["error_message"], a["stack"]) for a in detail.attempts] == [
            ("hung", "KG service error 500", "Traceback: frame 1"), ("failed", "KG service error 500", None)]
        assert document_detail(conn, 6) is None


def test_failure_groups_are_the_failed_documents_by_class_newest_first(backend):
    with closing(backend.connect()) as conn:
        conn.executemany("INSERT INTO crawled_content (id, url) VALUES (?, ?)",
                         [(cid, f"u{cid}") for cid in range(1, 5)])
        for cid, message, ago in ((1, "KG service error 500: x", 300), (2, "KG service error 500: y", 100),
                                  (3, "KG service did not answer within 30s", 200), (4, "queued again", 50)):
            conn.execute("INSERT INTO kg_processing_queue (content_id, status, processed_at, error_message) "
                         "VALUES (?, 'failed', ?, ?)", (cid, db_timestamp(NOW - ago), message))
        conn.execute("INSERT INTO kg_processing_queue (content_id, status) VALUES (4, 'pending')")
        groups = failure_groups(conn)
        shown = [(group.error_class, group.count, group.example_content_id, group.example_message,
                  group.newest_at) for group in groups]
        assert shown == [
            ("http_500", 2, 2, "KG service error 500: y", db_timestamp(NOW - 100)),
            ("timeout", 1, 3, "KG service did not answer within 30s", db_timestamp(NOW - 200))]


def test_failure_groups_with_recorded_classes_are_counted_by_the_database(backend):
    """The classes the history recorded, counted in SQL: a superseded failed row (its document
    queued again, or failed again later) counts for nothing; the newest failure is the example."""
    with closing(backend.connect()) as conn:
        conn.executemany("INSERT INTO crawled_content (id, url) VALUES (?, ?)",
                         [(cid, f"u{cid}") for cid in range(1, 6)])
        failures = [(1, "http_500", 300), (2, "http_500", 100), (3, "timeout", 200), (4, "http_500", 10),
                    (5, "timeout", 400), (5, "invalid_answer", 50)]
        for n, (cid, error_class, ago) in enumerate(failures):
            qid = conn.execute("INSERT INTO kg_processing_queue (content_id, status, processed_at, error_message) "
                               "VALUES (?, 'failed', ?, ?) RETURNING id",
                               (cid, db_timestamp(NOW - ago), f"{error_class} of {cid}")).fetchone()[0]
            conn.execute("INSERT INTO kg_processing_attempts (queue_id, content_id, attempt, claim_key, "
                         "finished_at, outcome, error_class) VALUES (?, ?, 1, ?, ?, 'failed', ?)",
                         (qid, cid, f"k{n}", NOW - ago, error_class))
        conn.execute("INSERT INTO kg_processing_queue (content_id, status) VALUES (4, 'pending')")
        shown = [(g.error_class, g.count, g.example_content_id, g.example_message, g.newest_at)
                 for g in failure_groups(conn)]
        assert shown == [
            ("invalid_answer", 1, 5, "invalid_answer of 5", db_timestamp(NOW - 50)),
            ("http_500", 2, 2, "http_500 of 2", db_timestamp(NOW - 100)),
            ("timeout", 1, 3, "timeout of 3", db_timestamp(NOW - 200))]


def test_throughput_is_per_minute_with_every_minute_present_oldest_first(backend):
    with closing(backend.connect()) as conn:
        current = NOW - NOW % 60
        finished = [(current + 5, "completed"), (current + 59.9, "completed"), (current - 0.1, "failed"),
                    (current - 60, "poison_pill"), (current - 120 + 0.5, "retried"),
                    (current - 180, "completed"), (current - 181, "completed"), (current + 60, "completed")]
        conn.executemany("INSERT INTO kg_processing_attempts (queue_id, attempt, claim_key, finished_at, "
                         "outcome) VALUES (1, 1, ?, ?, ?)",
                         [(f"k{n}", at, outcome) for n, (at, outcome) in enumerate(finished)])
        series = throughput_series(conn, NOW, minutes=3)
        assert series == [(current - 120, 0, 0), (current - 60, 0, 2), (current, 2, 0)]
        assert len(throughput_series(conn, NOW)) == 60


def test_queue_counts_are_the_rows_by_status(seeded):
    conn, rows = seeded
    counts = queue_counts(conn)
    for status in browse.STATUSES:
        assert counts[status] == sum(row.status == status for row in rows)
    assert counts["total"] == len(rows)

