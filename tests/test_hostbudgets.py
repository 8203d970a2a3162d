"""PostgresRateBudgets on a real throwaway PostgreSQL server: forked spenders never exceed any
window, a request one kind refuses spends neither, a wait ends as the oldest entry leaves (times
on the server's clock), a document over the whole budget is refused, each process uses its own
connection, and a lost connection is a database fault the next call recovers from."""
from __future__ import annotations

import json
import multiprocessing
import random
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from kgsupervisor.errors import DatabaseError
from kgsupervisor.kg.budgets import Budget, OverBudget
from kgsupervisor.queue.hostbudgets import APPLICATION_NAME, PostgresRateBudgets
from kgsupervisor.store.faults import is_database_fault
from kgsupervisor.store.owntables import BUDGET_SPENDS_TABLE

pytestmark = pytest.mark.timeout(120)

CTX = multiprocessing.get_context("fork")


@pytest.fixture
def pg_url(pg_server, request) -> str:
    """A fresh database on the session's server: the table is made by the first spend."""
    return pg_server.create_database(f"budgets_{request.node.name[:40].lower()}")


@pytest.fixture(autouse=True)
def no_stray_children() -> Iterator[None]:
    """Forked spenders left running by a failed test are ended with it."""
    yield
    for child in CTX.active_children():
        child.kill()
        child.join(10)


def query(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def spends(url: str, endpoint: str) -> list[tuple[int, int]]:
    """(server ms, tokens) of the rows the table holds for `endpoint`, oldest first."""
    return query(url, f"SELECT spent_ms, tokens FROM {BUDGET_SPENDS_TABLE} WHERE endpoint = %s "
                      "ORDER BY spent_ms, tokens", (endpoint,))


def server_ms(url: str) -> int:
    return query(url, "SELECT FLOOR(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT")[0][0]


def our_backends(url: str) -> int:
    """Server sessions of PostgresRateBudgets connected to this test's database."""
    return query(url, "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = %s "
                      "AND datname = current_database()", (APPLICATION_NAME,))[0][0]


def worst_window(spent: list[tuple[int, int]], window_ms: int) -> tuple[int, int]:
    """The most (requests, tokens) stamped within any closed window of `window_ms`: the worst
    window starts at some spend, so starting one at each spend covers every window."""
    most_requests = most_tokens = 0
    for start, _ in spent:
        inside = [tokens for stamp, tokens in spent if start <= stamp <= start + window_ms]
        most_requests, most_tokens = max(most_requests, len(inside)), max(most_tokens, sum(inside))
    return most_requests, most_tokens


def spend_documents(budgets: PostgresRateBudgets, worker: int, go, count: int, out: Path) -> None:
    """A forked worker: spends `count` documents as fast as the shared budget allows, logging the
    server time of each spend."""
    rng = random.Random(worker)
    go.wait(30)
    with out.open("w") as f:
        for _ in range(count):
            chars = rng.randint(400, 1600)
            if not budgets.wait_for("kg", chars, deadline=time.time() + 30):
                raise SystemExit(3)
            f.write(json.dumps([round(budgets.last_spent_at * 1000), budgets.tokens(chars), worker]) + "\n")


def test_forked_processes_spending_at_once_never_exceed_any_window(pg_url, tmp_path):
    budgets = PostgresRateBudgets(pg_url, {"kg": Budget(requests_per_minute=6, tokens_per_minute=1000)},
                                  window_s=0.3)
    go = CTX.Event()
    outs = [tmp_path / f"spent-{w}.jsonl" for w in range(4)]
    procs = [CTX.Process(target=spend_documents, args=(budgets, w, go, 4, outs[w])) for w in range(4)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    lines = [json.loads(line) for out in outs for line in out.read_text().splitlines()]
    spent = sorted((stamp, tokens) for stamp, tokens, _ in lines)
    assert len(spent) == 16
    most_requests, most_tokens = worst_window(spent, 300)
    assert most_requests <= 6 and most_tokens <= 1000
    # Over 600 tokens in a window (the next document, 400 at most, did not fit): the bound was
    # reached, and by several processes within one window, so they did contend.
    assert most_tokens > 600
    assert max(len({w for stamp, _, w in lines if start <= stamp <= start + 300})
               for start, _, _ in lines) >= 2
    # The table holds exactly the logged spends of the last window: older rows were deleted.
    assert spends(pg_url, "kg") == [s for s in spent if s[0] >= spent[-1][0] - 300]


def test_a_request_one_kind_refuses_spends_neither_kind(pg_url):
    budgets = PostgresRateBudgets(pg_url, {
        "tokens-short": Budget(requests_per_minute=5, tokens_per_minute=100),
        "requests-short": Budget(requests_per_minute=1, tokens_per_minute=100)})
    try:
        assert budgets.try_spend("tokens-short", 360)  # 90 tokens
        assert not budgets.try_spend("tokens-short", 80)  # 20 tokens do not fit: no request spent
        assert budgets.try_spend("requests-short", 4)
        assert not budgets.try_spend("requests-short", 4)  # no request left: its token not spent
        assert [tokens for _, tokens in spends(pg_url, "tokens-short")] == [90]
        assert [tokens for _, tokens in spends(pg_url, "requests-short")] == [1]
        assert budgets.used("tokens-short") == {"requests": 1, "tokens": 90}
        assert budgets.used("requests-short") == {"requests": 1, "tokens": 1}
    finally:
        budgets.close()


def test_the_wait_ends_as_the_oldest_entry_leaves_the_window_on_the_server_clock(pg_url):
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)

    budgets = PostgresRateBudgets(pg_url, {"kg": Budget(tokens_per_minute=10)}, window_s=60, sleep=sleep)
    try:
        assert budgets.used("kg") == {"tokens": 0}  # makes the table
        now_ms = server_ms(pg_url)
        leaves_ms = now_ms + 800  # the whole budget, stamped to leave the 60 s window 0.8 s from now
        query(pg_url, f"INSERT INTO {BUDGET_SPENDS_TABLE} VALUES ('kg', %s, 10)", (leaves_ms - 60_000,))
        assert budgets.next_free_at("kg", 1) == (leaves_ms + 1) / 1000  # the window includes both ends
        assert 0 < budgets.seconds_until_room("kg", 1) <= (leaves_ms + 1 - now_ms) / 1000
        assert budgets.seconds_until_room("kg", 0) == 0  # no tokens: only the requests, not limited
        assert not budgets.try_spend("kg", 1)
        assert not budgets.wait_for("kg", 1, deadline=leaves_ms / 1000)
        assert slept == []  # it gave up at once: the room comes after the deadline
        assert budgets.wait_for("kg", 1, deadline=(leaves_ms + 1) / 1000)
        # One sleep, no longer than the entry had left from before the call, ending in a spend
        # after the entry left: the wake was computed on the server's clock, not polled for.
        assert len(slept) == 1 and 0 < slept[0] <= (leaves_ms + 1 - now_ms) / 1000
        assert round(budgets.last_spent_at * 1000) >= leaves_ms + 1
        assert spends(pg_url, "kg") == [(round(budgets.last_spent_at * 1000), 1)]
    finally:
        budgets.close()


def test_a_document_bigger_than_the_whole_budget_is_refused_with_one_line(pg_url):
    budgets = PostgresRateBudgets(pg_url, {"kg": Budget(tokens_per_minute=1000)})
    try:
        with pytest.raises(OverBudget, match=r"^kg tokens: 1001 needed, the whole budget is 1000 a window$"):
            budgets.try_spend("kg", 4001)
        assert budgets.used("kg") == {"tokens": 0}
        assert budgets.try_spend("other", 10**9)  # an endpoint without a budget is never held back
    finally:
        budgets.close()


def spend_then_hold(budgets: PostgresRateBudgets, results, release) -> None:
    """A forked child: spend once, say so, then keep its connection open until released."""
    results.put(budgets.try_spend("kg", 4))
    release.wait(30)


def test_an_object_made_before_a_fork_opens_a_connection_per_process(pg_url):
    budgets = PostgresRateBudgets(pg_url, {"kg": Budget(requests_per_minute=100)})
    try:
        assert budgets.try_spend("kg", 4)  # the parent's connection is open before the fork
        results, release = CTX.Queue(), CTX.Event()
        child = CTX.Process(target=spend_then_hold, args=(budgets, results, release))
        child.start()
        assert results.get(timeout=30) is True
        assert our_backends(pg_url) == 2  # the child opened its own session
        release.set()
        child.join(30)
        assert child.exitcode == 0
        assert budgets.try_spend("kg", 4)  # the parent's session outlived the child
        assert budgets.used("kg") == {"requests": 3}
    finally:
        budgets.close()


def test_a_lost_connection_is_a_database_fault_and_the_next_call_reconnects(pg_url):
    budgets = PostgresRateBudgets(pg_url, {"kg": Budget(requests_per_minute=100)})
    try:
        assert budgets.try_spend("kg", 4)
        query(pg_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s "
                      "AND datname = current_database()", (APPLICATION_NAME,))
        with pytest.raises(DatabaseError, match=r"^rate budgets at postgresql://\S+: ") as raised:
            budgets.try_spend("kg", 4)
        assert is_database_fault(raised.value)
        assert budgets.try_spend("kg", 4)
        assert budgets.used("kg") == {"requests": 2}
    finally:
        budgets.close()

