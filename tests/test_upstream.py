"""init-db and the upstream pipeline share one database: what init-db creates the crawler can
use, what the crawler made init-db keeps, and every column the workers use is checked at start."""
from __future__ import annotations

import ast
import inspect
import re
import sqlite3
import subprocess
import sys
import time

import pytest

from kgsupervisor.queue import documents, outcomes, sql, writeback
from kgsupervisor.queue import leased as queue
from kgsupervisor.queue.history import InFlight
from kgsupervisor.queue.leased import queue_for
from kgsupervisor.store.owntables import OWN_TABLES
from kgsupervisor.store.schema import (QUEUE_COLUMNS, UPSTREAM_COLUMNS, USED_COLUMNS, column_declaration,
                                       init_db)
from kgsupervisor.store.sqlite import connect
from scripts.sampledata import add_documents

from .chaos.harness import record_hostile
from .conftest import status_counts
from .upstream import (CRAWLER_INSERT, UPSTREAM_TABLES, index_names, make_upstream_database, page, rows,
                       run_kg_migration, table_info)

pytestmark = pytest.mark.timeout(60)

KG_TABLES = ("content_chunks", "chunk_entities", "chunk_relationships", "kg_processing_queue")


def kg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kgsupervisor", *args], capture_output=True, text=True, timeout=45)


def snapshot(path: str) -> dict[str, tuple]:
    """Columns, rows and index names of every upstream table."""
    return {t: (table_info(path, t), rows(path, t), index_names(path, t)) for t in UPSTREAM_TABLES}


# -- a database init-db creates -----------------------------------------------------------------

def test_a_new_database_has_the_upstream_columns_exactly_and_takes_the_crawlers_insert(tmp_path):
    ours, theirs = str(tmp_path / "new.db"), str(tmp_path / "upstream.db")
    init_db(ours)
    make_upstream_database(theirs, pages=0)
    assert table_info(ours, "crawled_content") == table_info(theirs, "crawled_content")
    for table in KG_TABLES:  # the upstream's NOT NULLs aside (CONTRACT §2 does not list them)
        assert [c[:3] + c[4:] for c in table_info(ours, table)][:len(table_info(theirs, table))] == \
            [c[:3] + c[4:] for c in table_info(theirs, table)], table
    crawler = sqlite3.connect(ours)  # the crawler's own connection and statement, verbatim
    crawler.execute(CRAWLER_INSERT, page(1))
    crawler.execute(CRAWLER_INSERT, page(2))
    crawler.execute(CRAWLER_INSERT, page(1)[:1] + ("Page 1, crawled again",) + page(1)[2:])
    crawler.commit()
    stored = crawler.execute("SELECT url, title, retention_policy, timestamp IS NOT NULL, kg_processed "
                             "FROM crawled_content ORDER BY id").fetchall()
    assert stored == [(page(2)[0], "Page 2", "permanent", 1, 0), (page(1)[0], "Page 1, crawled again", "permanent", 1, 0)]
    with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
        crawler.execute(CRAWLER_INSERT, (None,) + page(3)[1:])
    crawler.close()


# -- a database the upstream made ---------------------------------------------------------------

def test_init_db_on_an_upstream_database_changes_nothing_the_upstream_reads(tmp_path):
    path = str(tmp_path / "crawl.db")
    make_upstream_database(path, pages=5)
    before = snapshot(path)
    changes = init_db(path)
    after = snapshot(path)
    assert {c for c in changes if c.startswith("created table")} == {f"created table {t}" for t in OWN_TABLES}, changes
    assert {c for c in changes if c.startswith("added column")} == \
        {f"added column kg_processing_queue.{name}" for name in QUEUE_COLUMNS}
    for table in UPSTREAM_TABLES:
        (cols, old_rows, indexes), (new_cols, new_rows, new_indexes) = before[table], after[table]
        assert new_cols[:len(cols)] == cols, f"{table}: every upstream column as it was"
        assert [r[:len(cols)] for r in new_rows] == old_rows, f"{table}: every row as it was"
        assert indexes <= new_indexes, f"{table}: the upstream's indexes kept"
    assert [c[1] for c in after["kg_processing_queue"][0][11:]] == list(QUEUE_COLUMNS)
    assert all(len(after[t][0]) == len(before[t][0]) for t in UPSTREAM_TABLES if t != "kg_processing_queue")
    assert init_db(path) == []
    # The crawler and the upstream's migration go on working on it.
    crawler = sqlite3.connect(path)
    crawler.execute(CRAWLER_INSERT, page(9))
    run_kg_migration(crawler)
    crawler.commit()
    assert crawler.execute("SELECT COUNT(*) FROM crawled_content").fetchone()[0] == 6
    assert crawler.execute("SELECT sql FROM sqlite_master WHERE name = 'content_vectors'").fetchone()[0].startswith(
        "CREATE VIRTUAL TABLE content_vectors USING vec0")
    crawler.close()


def test_init_db_on_a_crawler_database_adds_the_kg_migrations_columns_as_it_would(tmp_path):
    """No KG migration ever ran: init-db adds its columns to crawled_content (declared as the
    migration declares them) and creates its tables; the crawler's columns and rows stay."""
    bare, migrated = str(tmp_path / "bare.db"), str(tmp_path / "migrated.db")
    make_upstream_database(bare, kg_migration=False, pages=3)
    make_upstream_database(migrated, kg_migration=True, pages=0)
    before = rows(bare, "crawled_content")
    changes = init_db(bare)
    assert [c for c in changes if c.startswith("added column crawled_content.")] == [
        f"added column crawled_content.{c}" for c in
        ("kg_processed", "kg_entity_count", "kg_relationship_count", "kg_document_id", "kg_processed_at")]
    assert table_info(bare, "crawled_content") == table_info(migrated, "crawled_content")
    assert [r[:11] for r in rows(bare, "crawled_content")] == before
    assert [r[11:] for r in rows(bare, "crawled_content")] == [(0, 0, 0, None, None)] * 3
    out = kg("enqueue", "--db", bare, "--all-unprocessed")
    assert out.returncode == 0 and out.stdout.startswith("queued 3 unprocessed"), out.stderr


# -- every column the workers use, declared once ----------------------------------------------

def used_only_database(path: str) -> None:
    """Each table with the columns USED_COLUMNS lists and no other, then init-db's indexes and triggers."""
    conn = sqlite3.connect(path)
    for table, columns in USED_COLUMNS.items():
        conn.execute(f"CREATE TABLE {table} ({', '.join(f'{c} {column_declaration(table, c)}' for c in columns)})")
    conn.commit()
    conn.close()
    # kgsupervisor's own tables (history, pause flag, hosts) are its to make; nothing of the upstream's.
    own = {f"created table {table}" for table in OWN_TABLES}
    assert not [c for c in init_db(path) if c.startswith(("added column", "created table")) and c not in own]


def add_bare_documents(conn: sqlite3.Connection, count: int) -> list[int]:
    """Documents written through the used columns alone (sampledata also fills word_count)."""
    ids = []
    for n in range(count):
        text = f"Ada Lovelace wrote to Charles Babbage from London, letter number {n}."
        cur = conn.execute("INSERT INTO crawled_content (url, title, markdown, metadata, tags) VALUES (?, ?, ?, ?, ?)",
                           (f"https://letters.example/{n}", f"Letter {n}", text + " " + text, "{}", "letters"))
        ids.append(cur.lastrowid)
        for index in range(2):
            conn.execute("INSERT INTO content_chunks (content_id, chunk_index, chunk_text, char_start, char_end) "
                         "VALUES (?, ?, ?, ?, ?)", (cur.lastrowid, index, text, index * (len(text) + 1),
                                                    index * (len(text) + 1) + len(text)))
    return ids


def test_every_worker_statement_runs_on_a_database_with_only_the_declared_columns(tmp_path, kg_service):
    path = str(tmp_path / "used-only.db")
    used_only_database(path)
    conn = connect(path)
    q = queue_for(conn)
    ids = add_bare_documents(conn, 3)
    assert q.enqueue_all_unprocessed(1, time.time()) == 3
    out = kg("worker", "--db", path, "--service-url", kg_service, "--once")  # claim, payload, write-back
    assert out.returncode == 0, out.stderr
    assert status_counts(conn) == {"completed": 3}
    assert conn.execute("SELECT COUNT(*) FROM chunk_entities").fetchone()[0] > 0
    now = time.time()
    assert len(q.enqueue(ids, 5, now).added) == 3
    a, b, c = q.claim("host:1", "tok", 3, 30, now)
    assert q.extend("tok", 30, now) == 3
    assert q.owners_with_claims("host:") == ["host:1"] and q.has_live_work()
    q.retry_later(a, "boom", now, max_attempts=5, backoff_base=0, backoff_cap=0)
    q.fail(b, "bad document", now)
    assert q.release_crashed("host:1", InFlight(c.id, c.token, now), "SIGKILL", poison_after=1,
                             now=now).poisoned == [c.content_id]
    assert q.retry(failed=True) == 2
    assert q.release(q.claim("host:2", "tok2", 3, -1, now)) == 3
    assert q.requeue_expired(now) == 0 and q.release_owner("host:2") == 0
    assert q.counts()["pending"] == 3
    conn.close()


STATEMENT = re.compile(r"\s*(WITH|SELECT|UPDATE|INSERT|DELETE)\b")


def sql_texts(module) -> list[str]:
    """Every string of `module` that is a statement, an f-string's holes left blank."""
    texts = []
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.JoinedStr):
            texts.append("".join(v.value if isinstance(v, ast.Constant) else " " for v in node.values))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            texts.append(node.value)
    return [t for t in texts if STATEMENT.match(t)]


def test_the_declared_columns_are_the_ones_the_sql_of_the_workers_names():
    """A statement added later is held to USED_COLUMNS too, before any database meets it."""
    known = {c for columns in UPSTREAM_COLUMNS.values() for c in columns} | set(QUEUE_COLUMNS)
    used = {c for columns in USED_COLUMNS.values() for c in columns}
    statements = [s for m in (documents, queue, outcomes, sql, writeback) for s in sql_texts(m)]
    assert len(statements) > 20
    named = {word for s in statements for word in re.findall(r"[a-z_][a-z0-9_]*", s)} & known
    assert named - used == set(), "columns the workers use that USED_COLUMNS does not list"
    assert used - named == set(), "columns USED_COLUMNS lists that no statement uses"


# -- an older schema is caught at start ------------------------------------------------------

def older_database(tmp_path, drop: dict[str, str]) -> tuple[str, list[int]]:
    """A database with queued documents whose tables lack the columns in `drop` (table: column),
    as an older crawler or KG migration left them."""
    path = str(tmp_path / "older.db")
    init_db(path)
    conn = connect(path)
    ids = add_documents(conn, 3, seed=4)
    conn.executemany("INSERT INTO kg_processing_queue (content_id) VALUES (?)", [(i,) for i in ids])
    for table, column in drop.items():
        conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    conn.close()
    return path, ids


def one_error_line(out: subprocess.CompletedProcess) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


@pytest.mark.hostile
def test_run_and_worker_refuse_a_database_that_lacks_a_column_the_workers_use(tmp_path):
    path, _ = older_database(tmp_path, {"crawled_content": "tags", "content_chunks": "chunk_index"})
    expected = (f"Error: {path!r} needs migrating: crawled_content lacks tags; content_chunks lacks "
                f"chunk_index (run: kgsupervisor init-db --db {path})")
    assert one_error_line(kg("run", "--db", path, "--workers", "1", "--status-addr", "off")) == expected
    assert one_error_line(kg("worker", "--db", path, "--once")) == expected
    record_hostile("`run` / `worker` on an older schema (crawled_content without tags, content_chunks without "
                   "chunk_index)", "refused in one line naming each missing column and `init-db`",
                   "— (refused at start)")


@pytest.mark.hostile
def test_init_db_adds_the_missing_columns_says_so_and_the_workers_then_run(tmp_path, kg_service):
    path, ids = older_database(tmp_path, {"crawled_content": "tags", "content_chunks": "word_count"})
    first = kg("init-db", "--db", path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == ["added column crawled_content.tags",
                                         f"{path}: schema up to date (1 change(s))"]
    assert kg("init-db", "--db", path).stdout.strip() == f"{path}: schema up to date (0 change(s))"
    out = kg("worker", "--db", path, "--service-url", kg_service, "--once")
    assert out.returncode == 0, out.stderr
    with sqlite3.connect(path) as conn:
        assert status_counts(conn) == {"completed": len(ids)}
        assert "word_count" not in {r[1] for r in conn.execute("PRAGMA table_info(content_chunks)")}
    record_hostile("`init-db` on an older schema (crawled_content without tags)",
                   "adds the column and says so; the queued documents then complete", "no")

