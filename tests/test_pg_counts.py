"""PostgreSQL's queue counts: exact after bulk statements and concurrent writers, one count row
written per status per statement, one NOTIFY per statement, and the migration from the row-level
triggers of earlier versions; the bulk commands in batches, on both backends.

Every check compares the trigger-kept counts with a full GROUP BY of the queue. Nothing is timed:
"one delta per statement" is seen in PostgreSQL's own statistics of the current transaction.
"""
from __future__ import annotations

import os
import pty
import subprocess
import threading
import time
from contextlib import closing

import psycopg
import pytest

from kgsupervisor.queue.leased import queue_for
from kgsupervisor.store.commitwatch import QUEUE_CHANNEL
from kgsupervisor.store.pgschema import COUNT_FUNCTIONS, COUNT_TRIGGERS, NOTIFY_TRIGGERS
from kgsupervisor.store.postgres import PGConnection
from kgsupervisor.store.schema import STATUS_COUNTS_TABLE

from .conftest import KGSUPERVISOR, wait_for

pytestmark = pytest.mark.timeout(180)

STATUSES = ("pending", "processing", "completed", "failed", "skipped")


def scanned(conn) -> dict[str, int]:
    """Rows by status from a full GROUP BY, NULL and '' together as the counts table keeps them."""
    return {status: n for status, n in conn.execute(
        "SELECT COALESCE(status, ''), COUNT(*) FROM kg_processing_queue GROUP BY 1").fetchall()}


def counted(conn) -> dict[str, int]:
    """Rows by status as the counts table says, statuses whose rows add up to 0 left out."""
    return {status: n for status, n in conn.execute(
        f"SELECT status, CAST(SUM(n) AS BIGINT) FROM {STATUS_COUNTS_TABLE} GROUP BY 1").fetchall() if n}


def assert_exact(conn) -> None:
    assert counted(conn) == scanned(conn)


def insert_rows(conn, n: int, first_content_id: int = 1) -> None:
    """`n` rows in ONE INSERT … SELECT, every status, an unknown one, NULL and '' among them."""
    conn.execute(
        "INSERT INTO kg_processing_queue (content_id, status) "
        "SELECT g, (ARRAY['pending', 'processing', 'completed', 'failed', 'skipped', 'archived', NULL, ''])"
        "[1 + g % 8] FROM generate_series(?::bigint, ?::bigint) AS g",
        (first_content_id, first_content_id + n - 1))


@pytest.fixture
def pg(pg_backend):
    c = pg_backend.connect()
    yield c
    c.close()


def count_rows_written(conn) -> int:
    """Rows this connection has inserted or updated in the counts table (the view holds the
    open transaction's, and earlier ones' not yet flushed: callers compare two readings)."""
    return conn.execute("SELECT n_tup_ins + n_tup_upd FROM pg_stat_xact_user_tables "
                        "WHERE relname = ?", (STATUS_COUNTS_TABLE,)).fetchone()[0]


# -- bulk statements -------------------------------------------------------------------------------

def test_counts_are_exact_after_bulk_insert_update_delete_copy_and_truncate(pg):
    insert_rows(pg, 50_000)
    assert_exact(pg)
    assert sum(counted(pg).values()) == 50_000
    pg.execute("UPDATE kg_processing_queue SET status = CASE WHEN id % 3 = 0 THEN 'failed' "
               "WHEN id % 3 = 1 THEN NULL ELSE status END WHERE id % 2 = 0")
    assert_exact(pg)
    pg.execute("UPDATE kg_processing_queue SET priority = priority + 1")  # no status moves: nothing to add
    assert_exact(pg)
    pg.execute("DELETE FROM kg_processing_queue WHERE id % 5 = 0")
    assert_exact(pg)
    # One statement that deletes rows and inserts them back (a writable CTE), and an upsert.
    pg.execute("WITH gone AS (DELETE FROM kg_processing_queue WHERE status = 'failed' RETURNING content_id) "
               "INSERT INTO kg_processing_queue (content_id, status) SELECT content_id, 'pending' FROM gone")
    assert_exact(pg)
    pg.execute("INSERT INTO kg_processing_queue (id, content_id, status) SELECT id, content_id, 'completed' "
               "FROM kg_processing_queue WHERE id % 7 = 0 ON CONFLICT (id) DO UPDATE SET status = 'completed'")
    assert_exact(pg)
    with pg.raw.cursor().copy("COPY kg_processing_queue (content_id, status) FROM STDIN") as copy:
        for i in range(5_000):
            copy.write_row((i, STATUSES[i % 5]))
    assert_exact(pg)
    pg.execute("BEGIN")
    pg.execute("UPDATE kg_processing_queue SET status = 'skipped'")
    pg.execute("ROLLBACK")
    assert_exact(pg)
    pg.execute("TRUNCATE kg_processing_queue")
    assert counted(pg) == {} == scanned(pg)
    insert_rows(pg, 100)
    assert_exact(pg)


def test_a_bulk_statement_writes_one_count_row_per_status_not_one_per_row(pg):
    """The quadratic cost came from updating one counter row once per row of a statement; now a
    statement of 50,000 rows writes at most one count row per status it touches."""
    insert_rows(pg, 1_000)
    pg.execute("BEGIN")
    try:
        start = count_rows_written(pg)
        insert_rows(pg, 50_000, first_content_id=10_000)
        assert count_rows_written(pg) - start <= 7, "one row per status (NULL and '' count as one)"
        start = count_rows_written(pg)
        pg.execute("UPDATE kg_processing_queue SET status = 'pending' WHERE status = 'failed'")
        assert count_rows_written(pg) - start == 2, "thousands of rows moved: one delta out, one in"
        start = count_rows_written(pg)
        pg.execute("UPDATE kg_processing_queue SET priority = 3 WHERE status = 'pending'")
        assert count_rows_written(pg) == start, "no status moved: no count row written"
        pg.execute("DELETE FROM kg_processing_queue WHERE content_id >= 10000")
        assert count_rows_written(pg) - start <= 6, "'failed' has no rows left to delete"
        pg.execute("COMMIT")
    finally:
        if pg.in_transaction:
            pg.execute("ROLLBACK")
    assert_exact(pg)


def test_one_notify_per_statement_only_when_a_row_becomes_claimable(pg_backend):
    """The channel and its empty payload are the commit watcher's; a statement that makes 10,000
    rows pending sends one, a claim or a lease renewal sends none."""
    conn = pg_backend.connect()
    listener = psycopg.connect(pg_backend.target, autocommit=True)
    try:
        listener.execute(f"LISTEN {QUEUE_CHANNEL}")
        conn.execute("INSERT INTO kg_processing_queue (content_id, status) "
                     "SELECT g, 'failed' FROM generate_series(1, 10000) AS g")
        assert notifications_until_marker(conn, listener) == [""], "an INSERT notifies once"
        conn.execute("SET track_functions = 'pl'")
        conn.execute("BEGIN")
        conn.execute("UPDATE kg_processing_queue SET status = 'pending'")
        calls = dict(conn.execute("SELECT funcname, calls FROM pg_stat_xact_user_functions").fetchall())
        conn.execute("COMMIT")
        assert calls["kgq_notify_claimable"] == 1 and calls["kgq_counts_updated"] == 1, calls
        assert notifications_until_marker(conn, listener) == [""], "10,000 rows made pending: one NOTIFY"
        queue = queue_for(conn)
        claims = queue.claim("host:1", "tok", 5, 60, time.time())
        queue.extend("tok", 120, time.time())
        assert notifications_until_marker(conn, listener) == [], "nothing became claimable"
        assert queue.release(claims) == 5
        assert notifications_until_marker(conn, listener) == [""]
    finally:
        listener.close()
        conn.close()


def notifications_until_marker(conn, listener) -> list[str]:
    """The payloads the listener got before a marker NOTIFY sent now (they arrive in commit order)."""
    conn.execute(f"NOTIFY {QUEUE_CHANNEL}, 'marker'")
    got: list[str] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for note in listener.notifies(timeout=0.5):
            if note.payload == "marker":
                return got
            got.append(note.payload)
    raise AssertionError(f"no marker NOTIFY within 10 s (got {got})")


# -- concurrent writers ----------------------------------------------------------------------------

def test_concurrent_transactions_never_wait_for_each_others_count_rows(pg_backend):
    """Two open transactions changing the same statuses: neither waits for the other, because each
    connection adds to its own count rows (a lock wait would fail on the lock timeout)."""
    first, second = pg_backend.connect(), pg_backend.connect()
    try:
        for conn in (first, second):
            conn.execute("SET lock_timeout = '2s'")
        insert_rows(first, 800)
        first.execute("BEGIN")
        insert_rows(first, 800, first_content_id=1_000)
        first.execute("UPDATE kg_processing_queue SET status = 'completed' WHERE status = 'pending' AND id % 2 = 0")
        second.execute("BEGIN")
        insert_rows(second, 800, first_content_id=2_000)
        second.execute("UPDATE kg_processing_queue SET status = 'completed' WHERE status = 'pending' AND id % 2 = 1")
        second.execute("COMMIT")
        first.execute("COMMIT")
        assert_exact(first)
    finally:
        first.close()
        second.close()


def write_concurrently(url: str, writer: int, rounds: int, start: threading.Barrier, errors: list) -> None:
    """One writer: bulk and single-row statements, claims, rolled-back transactions and a fresh
    connection every few rounds (whose count rows the upkeep must fold). A deadlock PostgreSQL
    breaks rolls one statement back, which the counts must survive too."""
    conn = PGConnection(url)
    try:
        start.wait(30)
        for i in range(rounds):
            if i % 4 == 3:
                conn.close()
                conn = PGConnection(url)
            try:
                run_round(conn, writer, i)
            except psycopg.errors.DeadlockDetected:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
    except Exception as exc:  # reported by the test, with the writer that met it
        errors.append(f"writer {writer}: {exc!r}")
    finally:
        conn.close()


def run_round(conn: PGConnection, writer: int, i: int) -> None:
    queue = queue_for(conn)
    insert_rows(conn, 300, first_content_id=writer * 1_000_000 + i * 1_000)
    claims = queue.claim(f"host:{writer}", f"t{writer}-{i}", 20, 0.0 if i % 2 else 60.0, time.time())
    if claims:
        queue.fail(claims[0], "boom", time.time())
    # Rows of every writer, locked ones passed over: no deadlock between writers.
    conn.execute("UPDATE kg_processing_queue SET status = 'completed' WHERE id IN (SELECT id FROM "
                 "kg_processing_queue WHERE status = 'pending' LIMIT 150 FOR UPDATE SKIP LOCKED)")
    conn.execute("BEGIN")
    conn.execute("DELETE FROM kg_processing_queue WHERE id IN (SELECT id FROM kg_processing_queue "
                 "WHERE status = 'completed' LIMIT 100 FOR UPDATE SKIP LOCKED)")
    conn.execute("ROLLBACK" if i % 3 == 0 else "COMMIT")
    queue.retry(failed=True, batch_rows=7)
    queue.requeue_expired(time.time() + 1, batch_rows=5)  # also folds closed connections' rows


def test_counts_stay_exact_under_concurrent_writers_on_several_connections(pg_backend):
    writers, rounds = 4, 12
    start = threading.Barrier(writers)
    errors: list[str] = []
    threads = [threading.Thread(target=write_concurrently, args=(pg_backend.target, w, rounds, start, errors))
               for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    with closing(pg_backend.connect()) as conn:
        assert_exact(conn)
        assert sum(scanned(conn).values()) > 0
        queue_for(conn).requeue_expired(time.time())  # the writers' connections are all closed now
        assert_exact(conn)
        slots = conn.execute(f"SELECT COUNT(DISTINCT slot) FROM {STATUS_COUNTS_TABLE}").fetchone()[0]
        assert slots <= 2, "rows of closed connections folded into slot 0 (and this one's own)"


# -- the migration from the row-level triggers -----------------------------------------------------

# What kgsupervisor installed before statement-level counting (copied from its pgschema.py).
OLD_TRIGGER_SQL = [
    f"""CREATE OR REPLACE FUNCTION kgq_count_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO {STATUS_COUNTS_TABLE} (status, slot, n) VALUES (COALESCE(OLD.status, ''), pg_backend_pid(), -1)
            ON CONFLICT (status, slot) DO UPDATE SET n = {STATUS_COUNTS_TABLE}.n - 1;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        INSERT INTO {STATUS_COUNTS_TABLE} (status, slot, n) VALUES (COALESCE(NEW.status, ''), pg_backend_pid(), 1)
            ON CONFLICT (status, slot) DO UPDATE SET n = {STATUS_COUNTS_TABLE}.n + 1;
    END IF;
    RETURN NULL;
END $$""",
    "CREATE TRIGGER kgq_count_insert AFTER INSERT ON kg_processing_queue "
    "FOR EACH ROW EXECUTE FUNCTION kgq_count_status()",
    "CREATE TRIGGER kgq_count_delete AFTER DELETE ON kg_processing_queue "
    "FOR EACH ROW EXECUTE FUNCTION kgq_count_status()",
    "CREATE TRIGGER kgq_count_update AFTER UPDATE OF status ON kg_processing_queue "
    "FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION kgq_count_status()",
    f"""CREATE OR REPLACE FUNCTION kgq_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{QUEUE_CHANNEL}', '');
    RETURN NULL;
END $$""",
    "CREATE TRIGGER kgq_notify_insert AFTER INSERT ON kg_processing_queue "
    "FOR EACH STATEMENT EXECUTE FUNCTION kgq_notify()",
    "CREATE TRIGGER kgq_notify_pending AFTER UPDATE OF status ON kg_processing_queue "
    "FOR EACH ROW WHEN (NEW.status = 'pending' AND OLD.status IS DISTINCT FROM 'pending') "
    "EXECUTE FUNCTION kgq_notify()",
]


def make_old_schema(conn: PGConnection) -> None:
    """The schema as an older kgsupervisor left it: today's tables, yesterday's triggers."""
    for name in (*COUNT_TRIGGERS, *NOTIFY_TRIGGERS):
        conn.execute(f"DROP TRIGGER IF EXISTS {name} ON kg_processing_queue")
    for name in (*COUNT_FUNCTIONS, "kgq_notify_claimable"):
        conn.execute(f"DROP FUNCTION IF EXISTS {name}()")
    for sql in OLD_TRIGGER_SQL:
        conn.execute(sql)


def queue_triggers(conn) -> dict[str, bool]:
    """Trigger name -> fires once per row (the older kind), on the queue."""
    return {name: bool(tgtype & 1) for name, tgtype in conn.execute(
        "SELECT tgname, tgtype FROM pg_trigger WHERE tgrelid = 'kg_processing_queue'::regclass "
        "AND NOT tgisinternal").fetchall()}


def kg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(KGSUPERVISOR + list(args), capture_output=True, text=True, timeout=120)


def test_init_db_moves_a_queue_from_the_row_level_triggers_and_recounts_it_once(pg_backend):
    with closing(pg_backend.connect()) as conn:
        make_old_schema(conn)
        insert_rows(conn, 2_000)
        conn.execute("UPDATE kg_processing_queue SET status = 'failed' WHERE id % 4 = 0")
        assert queue_triggers(conn)["kgq_count_update"] is True
        # Counts an older version could have left wrong (a trigger disabled for a while): the
        # migration counts afresh instead of trusting them.
        conn.execute(f"UPDATE {STATUS_COUNTS_TABLE} SET n = n + 5")
        assert counted(conn) != scanned(conn)
    out = kg("init-db", "--db", pg_backend.target)
    assert out.returncode == 0, out.stderr
    assert ("replaced the row-level count triggers with statement-level ones and recounted "
            f"{STATUS_COUNTS_TABLE}") in out.stdout
    assert f"replaced the row-level NOTIFY {QUEUE_CHANNEL} trigger with a statement-level one" in out.stdout
    assert "schema up to date (2 change(s))" in out.stdout, out.stdout
    with closing(pg_backend.connect()) as conn:
        assert_exact(conn)
        triggers = queue_triggers(conn)
        assert set(triggers) == {*COUNT_TRIGGERS, *NOTIFY_TRIGGERS} and not any(triggers.values()), triggers
        assert conn.execute("SELECT COUNT(*) FROM pg_proc WHERE proname = 'kgq_count_status'").fetchone()[0] == 0
        insert_rows(conn, 3_000, first_content_id=10_000)
        conn.execute("UPDATE kg_processing_queue SET status = 'pending' WHERE status = 'failed'")
        assert_exact(conn)
    again = kg("init-db", "--db", pg_backend.target)
    assert again.returncode == 0 and again.stdout.strip().endswith("schema up to date (0 change(s))"), again.stdout


def test_the_migration_keeps_the_counts_exact_while_another_connection_writes(pg_backend):
    """A writer keeps inserting and moving rows through the old triggers, the migration, and the
    new ones: the recount under the lock leaves nothing counted twice or missed."""
    from kgsupervisor.store.pgschema import migrate_pg
    with closing(pg_backend.connect()) as conn:
        make_old_schema(conn)
    rounds: list[int] = []
    stop = threading.Event()
    errors: list[str] = []

    def write() -> None:
        try:
            with closing(pg_backend.connect()) as writer:
                while not stop.is_set():
                    insert_rows(writer, 100, first_content_id=len(rounds) * 100)
                    writer.execute("UPDATE kg_processing_queue SET status = 'completed' WHERE id IN "
                                   "(SELECT id FROM kg_processing_queue WHERE status = 'pending' LIMIT 20)")
                    rounds.append(1)
        except Exception as exc:  # reported by the test
            errors.append(repr(exc))

    thread = threading.Thread(target=write)
    thread.start()
    try:
        wait_for(lambda: len(rounds) >= 5, 30, message="writes through the old triggers")
        with closing(pg_backend.connect()) as conn:
            assert any("statement-level" in change for change in migrate_pg(conn))
        migrated_at = len(rounds)
        wait_for(lambda: len(rounds) >= migrated_at + 5, 30, message="writes through the new triggers")
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors
    with closing(pg_backend.connect()) as conn:
        assert_exact(conn)
        assert not any(queue_triggers(conn).values()), "no row-level trigger left"


def test_init_db_repairs_a_count_function_someone_changed(pg_backend):
    with closing(pg_backend.connect()) as conn:
        conn.execute("CREATE OR REPLACE FUNCTION kgq_counts_inserted() RETURNS trigger LANGUAGE plpgsql "
                     "AS $$ BEGIN RETURN NULL; END $$")
        insert_rows(conn, 100)
        assert counted(conn) == {}
    out = kg("init-db", "--db", pg_backend.target)
    assert out.returncode == 0 and f"created {STATUS_COUNTS_TABLE} and its triggers" in out.stdout, out.stdout
    with closing(pg_backend.connect()) as conn:
        assert_exact(conn)


# -- the bulk commands, on both backends -----------------------------------------------------------

def add_bare_documents(conn, n: int) -> list[int]:
    """`n` crawled_content rows in one statement (text is not needed to queue them)."""
    conn.executemany("INSERT INTO crawled_content (url) VALUES (?)", [(f"https://d{i}.example/",) for i in range(n)])
    return [r[0] for r in conn.execute("SELECT id FROM crawled_content ORDER BY id").fetchall()]


def any_counts_exact(conn) -> None:
    """The counts of either backend (queue.counts()) against a GROUP BY."""
    counts = queue_for(conn).counts()
    scan = {status or "(none)": n for status, n in scanned(conn).items()}
    assert {s: n for s, n in counts.items() if n and s != "total"} == scan
    assert counts["total"] == sum(scan.values())


def test_enqueue_all_unprocessed_works_in_batches_and_says_how_far_it_is(backend):
    with closing(backend.connect()) as conn:
        ids = add_bare_documents(conn, 2_500)
        conn.execute("UPDATE crawled_content SET kg_processed = 1 WHERE id % 10 = 0")
        conn.execute("INSERT INTO kg_processing_queue (content_id, status) SELECT id, 'pending' FROM crawled_content "
                     "WHERE id % 10 = 1")  # already live: not queued again
        conn.execute("INSERT INTO kg_processing_queue (content_id, status) SELECT id, 'failed' FROM crawled_content "
                     "WHERE id % 10 = 2")  # a failed row is not live: queued again
        seen: list[tuple[int, int]] = []
        added = queue_for(conn).enqueue_all_unprocessed(1, time.time(), batch_rows=300,
                                                        progress=lambda done, total: seen.append((done, total)))
        assert added == 2_000
        assert len(seen) == 9 and seen[-1] == (2_500, 2_500)
        assert [done for done, _ in seen] == sorted(done for done, _ in seen)
        live = conn.execute("SELECT COUNT(*) FROM kg_processing_queue WHERE status IN ('pending', 'processing') "
                            "GROUP BY content_id HAVING COUNT(*) > 1").fetchall()
        assert live == [] and len(ids) == 2_500
        order = [r[0] for r in conn.execute("SELECT content_id FROM kg_processing_queue WHERE status = 'pending' "
                                            "AND id > 500 ORDER BY id").fetchall()]
        assert order == sorted(order), "queued in document order"
        assert queue_for(conn).enqueue_all_unprocessed(1, time.time(), batch_rows=300) == 0
        any_counts_exact(conn)


def test_retry_in_batches_never_makes_two_live_rows_of_one_document(backend):
    with closing(backend.connect()) as conn:
        rows = [(cid, "failed") for cid in range(1, 1_201)]
        rows += [(cid, "failed") for cid in range(1, 101)]           # a second failed row of documents 1-100
        rows += [(cid, "pending") for cid in range(1_101, 1_201)]    # documents 1101-1200 already live
        rows += [(cid, "skipped") for cid in range(2_001, 2_051)]
        conn.executemany("INSERT INTO kg_processing_queue (content_id, status) VALUES (?, ?)", rows)
        seen: list[tuple[int, int]] = []
        queue = queue_for(conn)
        assert queue.retry(failed=True, batch_rows=250, progress=lambda d, t: seen.append((d, t))) == 1_100
        assert seen[-1] == (1_200, 1_200) and len(seen) == 5
        duplicates = conn.execute("SELECT content_id FROM kg_processing_queue WHERE status = 'pending' "
                                  "GROUP BY content_id HAVING COUNT(*) > 1").fetchall()
        assert duplicates == []
        newest = conn.execute("SELECT MAX(id) FROM kg_processing_queue WHERE content_id = 1").fetchone()[0]
        assert conn.execute("SELECT status FROM kg_processing_queue WHERE id = ?", (newest,)).fetchone()[0] == "pending"
        assert queue.retry(skipped=True, batch_rows=7) == 50
        any_counts_exact(conn)


def test_expired_leases_come_back_in_batches_and_live_ones_stay(backend):
    with closing(backend.connect()) as conn:
        conn.executemany("INSERT INTO kg_processing_queue (content_id) VALUES (?)", [(i,) for i in range(1, 2_001)])
        queue = queue_for(conn)
        now = time.time()
        assert len(queue.claim("gone:1", "a", 1_500, 10, now)) == 1_500
        assert len(queue.claim("alive:2", "b", 500, 1_000, now)) == 500
        assert queue.requeue_expired(now + 20, batch_rows=400) == 1_500
        assert dict(conn.execute("SELECT lease_owner, COUNT(*) FROM kg_processing_queue GROUP BY 1").fetchall()) == {
            None: 1_500, "alive:2": 500}
        any_counts_exact(conn)


def test_bulk_commands_show_a_progress_bar_on_a_terminal_and_only_the_summary_otherwise(db_path):
    from kgsupervisor.store.sqlite import connect
    with closing(connect(db_path)) as conn:
        add_bare_documents(conn, 2_500)
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(KGSUPERVISOR + ["enqueue", "--db", db_path, "--all-unprocessed"],
                                stdout=subprocess.PIPE, stderr=slave, text=True,
                                env={**os.environ, "COLUMNS": "100", "TERM": "xterm"})
        os.close(slave)
        slave = -1
        shown = read_until_closed(master)
        assert proc.wait(60) == 0
        assert proc.stdout.read().strip() == "queued 2500 unprocessed document(s)"
    finally:
        os.close(master)
        if slave != -1:
            os.close(slave)
    assert "documents looked at" in shown and "2500/2500" in shown, shown
    with closing(connect(db_path)) as conn:
        conn.execute("UPDATE kg_processing_queue SET status = 'failed'")
    piped = kg("retry", "--db", db_path, "--failed")
    assert piped.returncode == 0 and piped.stdout == "2500 row(s) back to pending\n" and piped.stderr == ""


def read_until_closed(fd: int) -> str:
    """Everything written to a pty until its last writer closes it."""
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the other end is closed
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")
