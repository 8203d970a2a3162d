"""Fault suite, KG service misbehaving while a real `kgsupervisor run` drains the queue.

Each scenario seeds a few hundred documents (a few thousand with --soak), drains them through
harness.Supervisor against a FaultServer whose good answers are the reference extraction, and
then check_invariants() recomputes every document's rows. Faults are decided from a document's
content_id and how many times the server has seen it (faultserver.Attempts), or from the request
number, never from random, so a rerun injects the same faults into the same documents.

What each fault must cost (docs/document-lifecycle.md):
  service down / flapping, 429, connection cut mid-answer  -> nothing charged (retry_count 0)
  500 or read timeout while /health answers, invalid answer -> one attempt charged per fault
and in every case: nothing lost, nothing duplicated, nothing stuck, no worker died.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import json
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from kgsupervisor.kg.devextract import extract
from scripts.sampledata import add_documents

from ..conftest import seed, wait_for
from ..faultserver import RESET_MID_BODY, STALL_MID_BODY, Attempts, FaultServer, Journal
from .harness import Outcome, Supervisor, check_invariants, queue_done, worker_deaths

# pytest-timeout lets a marker beat the command line's --timeout, so a soak run (which passes
# --soak and a long --timeout) needs the long limit here too.
SOAK = "--soak" in sys.argv
pytestmark = [pytest.mark.timeout(1800 if SOAK else 150), pytest.mark.slow, pytest.mark.chaos]


# -- helpers ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Drained:
    """What a drained run left behind, for the assertions."""

    code: int
    stats: dict[str, Any]
    health: dict[str, Any]
    log: str


def drain(db_path: str, url: str, n: int, *, workers: int = 2, env: dict[str, str] | None = None,
          during: Callable[[Supervisor], None] | None = None, timeout: float = 90) -> Drained:
    """Run a supervisor until every queue row is completed or failed (running `during` first),
    take its /health and /stats, then stop it with SIGTERM."""
    sup = Supervisor(db_path, url, "--workers", str(workers), env=env)
    try:
        sup.wait_ready()
        if during:
            during(sup)
        wait_for(lambda: queue_done(db_path, n), timeout, interval=0.1,
                 message=f"all {n} documents completed or failed")
        stats = sup.stats_counting(n)
        health = sup.health()
        code = sup.stop()
    finally:
        if sup.proc.poll() is None:
            sup.kill_tree()
    return Drained(code, stats, health, sup.stderr)


def count(db_path: str, where: str) -> int:
    conn = sqlite3.connect(db_path, timeout=30)
    try:
        return conn.execute(f"SELECT COUNT(*) FROM kg_processing_queue WHERE {where}").fetchone()[0]
    finally:
        conn.close()


def retry_counts(db_path: str) -> dict[int, int]:
    conn = sqlite3.connect(db_path, timeout=30)
    try:
        return dict(conn.execute("SELECT content_id, retry_count FROM kg_processing_queue").fetchall())
    finally:
        conn.close()


def charged(db_path: str) -> int:
    """Rows an outage must never touch: failed, or with an attempt used."""
    return count(db_path, "status = 'failed' OR retry_count > 0")


def assert_clean_run(run: Drained, n: int) -> None:
    """Exit 0, every document a success, and no worker died or was replaced on the way."""
    assert run.code == 0, run.log[-3000:]
    assert run.stats["total_success"] == n and run.stats["total_failed"] == 0, run.stats
    restarts = {d["worker_id"]: d["restarts"] for d in run.health["worker_details"]}
    assert not any(restarts.values()), f"workers were respawned: {restarts}"
    deaths = worker_deaths(run.log)
    assert not deaths, deaths[:5]


def messages_with(log: str, text: str) -> int:
    return sum(1 for line in log.splitlines() if text in line)


# -- 1 + 7: flapping, then a 5 s outage ----------------------------------------------------------

def test_service_flapping_then_outage_charges_nothing(conn, db_path, soak):
    """Down 1.5 s / up 1.5 s four times, then down 5 s: no document failed or charged, at any time."""
    n = 3000 if soak else 200
    cycles = 8 if soak else 4
    down, up, outage = (3.0, 3.0, 20.0) if soak else (1.5, 1.5, 5.0)
    # An up phase also ends once this many more documents completed, so work is left for every
    # down phase however fast the machine is.
    up_quota = n // (2 * cycles + 2)
    ids = seed(conn, n)

    def behaviour(payload: dict, i: int) -> None:
        time.sleep(0.002)

    server = FaultServer(behaviour)
    port = int(server.url.rsplit(":", 1)[1])
    url = server.url
    notes: list[str] = []
    recovered: list[float] = []

    def completed() -> int:
        return count(db_path, "status = 'completed'")

    def go_down(seconds: float, label: str) -> None:
        nonlocal server
        left = count(db_path, "status IN ('pending', 'processing')")
        assert left > 0, f"{label}: the queue was already drained, the outage would test nothing"
        server.close()
        time.sleep(seconds)
        assert charged(db_path) == 0, f"{label}: an outage charged a document"
        notes.append(f"{label}: {left} left")

    def come_up(seconds: float, label: str) -> None:
        """The service back: documents complete again, however long the breakers take to try it;
        the up phase then lasts `seconds` from the return, or until `up_quota` more completed."""
        nonlocal server
        server = FaultServer(behaviour, port=port, journal=server.journal)
        back = time.monotonic()
        before = completed()
        wait_for(lambda: completed() > before, 60, interval=0.02, message=f"{label}: work flowing again")
        while time.monotonic() < back + seconds and completed() < before + up_quota:
            time.sleep(0.05)

    def inject(sup: Supervisor) -> None:
        nonlocal server
        wait_for(lambda: completed() >= up_quota, 30, interval=0.05, message="first documents done")
        for c in range(cycles):
            go_down(down, f"flap {c + 1}")
            come_up(up, f"flap {c + 1}")
        # The long outage: every worker must notice and pause its claims (its breaker opens).
        left = count(db_path, "status IN ('pending', 'processing')")
        assert left > 0, "the queue was drained before the outage"
        server.close()
        went = time.monotonic()
        wait_for(lambda: all(d.get("state") == "paused" for d in (sup.health() or {}).get("worker_details", [])),
                 60, interval=0.1, message="every worker paused by its breaker")
        paused_after = time.monotonic() - went
        time.sleep(max(0.0, outage - paused_after))
        assert charged(db_path) == 0, "the outage charged a document"
        notes.append(f"outage: {left} left, all workers paused after {paused_after:.1f}s")
        server = FaultServer(behaviour, port=port, journal=server.journal)
        back = time.monotonic()
        before = completed()
        wait_for(lambda: completed() > before, 60, interval=0.02, message="work flowing after the outage")
        recovered.append(time.monotonic() - back)

    try:
        run = drain(db_path, url, n, during=inject, timeout=600 if soak else 90)
    finally:
        server.close()
    outcome = check_invariants(
        db_path, ids, Outcome("KG service flapping, then down 5 s" if not soak else "KG service flapping, then down 20 s",
                              n, f"service down {down:g} s / up {up:g} s (or until {up_quota} more documents "
                                 f"completed) x{cycles}, connections refused; then down {outage:g} s",
                              recover_seconds=round(recovered[0], 2), exit_code=run.code,
                              notes="; ".join(notes)),
        queue_rows=n, journal=server.journal)
    assert outcome.failed == 0
    assert_clean_run(run, n)
    assert max(retry_counts(db_path).values()) == 0, "an outage charged an attempt"
    assert messages_with(run.log, "pausing claims (no document is charged)") >= 1
    assert messages_with(run.log, "healthy again; resuming") >= 1


# -- 2: slower than the read timeout --------------------------------------------------------------

def test_answers_slower_than_read_timeout_are_retried(conn, db_path, soak):
    """KG_SERVICE_TIMEOUT=1; every 10th document's first answer takes 2 s (every 50th: its first
    two), half of them before the headers, half stalling 2 s half-way through the body. /health
    answers, so each is an item failure: one attempt charged per timeout, then retried."""
    n = 2000 if soak else 200
    ids = seed(conn, n)
    attempts = Attempts()

    def slow(cid: int) -> list[str]:
        k = (cid % 10 == 3) + (cid % 50 == 3)
        return [("headers", "body")[(cid // 10 + j) % 2] for j in range(k)]

    def behaviour(payload: dict, i: int) -> Any:
        k = attempts(payload)
        kinds = slow(payload["content_id"])
        if k >= len(kinds):
            return None
        if kinds[k] == "headers":
            time.sleep(2.0)
            return None
        return STALL_MID_BODY, 2.0

    server = FaultServer(behaviour)
    try:
        run = drain(db_path, server.url, n, workers=4, env={"KG_SERVICE_TIMEOUT": "1", "KG_MAX_ATTEMPTS": "5"},
                    timeout=600 if soak else 90)
    finally:
        server.close()
    planned = {cid: slow(cid) for cid in ids}
    kinds = collections.Counter(kind for v in planned.values() for kind in v)
    outcome = check_invariants(db_path, ids, Outcome(
        "KG answers slower than the read timeout", n,
        f"read timeout 1 s; {sum(1 for v in planned.values() if v)} documents answered after 2 s "
        f"({kinds['headers']} times before the headers, {kinds['body']} stalling mid-body)",
        exit_code=run.code), queue_rows=n, journal=server.journal)
    assert outcome.failed == 0
    assert_clean_run(run, n)
    got = retry_counts(db_path)
    want = {cid: len(v) for cid, v in planned.items()}
    assert all(got[cid] >= 1 for cid in ids if want[cid]), {cid: got[cid] for cid in ids if want[cid] and got[cid] < 1}
    # Each timeout costs exactly one attempt, and nothing else costs any.
    assert got == want, {cid: (got[cid], want[cid]) for cid in ids if got[cid] != want[cid]}
    assert messages_with(run.log, "will retry: KG service did not answer within 1s") == kinds["headers"]
    assert messages_with(run.log, "will retry: KG service did not finish its answer within 1s") == kinds["body"]
    assert messages_with(run.log, "will retry") == sum(want.values())


# -- 3: 500s at 20% -----------------------------------------------------------------------------

def test_500s_at_20_percent_are_retried_and_complete(conn, db_path, soak):
    """A document whose content_id is a multiple of 5 gets a 500 on its first attempt, of 25 on
    its first two, of 125 on its first three: 20% of requests, never 5 in a row (KG_MAX_ATTEMPTS 5)."""
    n = 3000 if soak else 200
    ids = seed(conn, n)
    attempts = Attempts()
    served = collections.Counter()
    lock = threading.Lock()

    def failures(cid: int) -> int:
        return (cid % 5 == 0) + (cid % 25 == 0) + (cid % 125 == 0)

    def behaviour(payload: dict, i: int) -> Any:
        fail = attempts(payload) < failures(payload["content_id"])
        with lock:
            served[500 if fail else 200] += 1
        if fail:
            return 500, {"error": "internal error (injected)"}
        return None

    server = FaultServer(behaviour)
    try:
        run = drain(db_path, server.url, n, env={"KG_MAX_ATTEMPTS": "5"}, timeout=600 if soak else 90)
    finally:
        server.close()
    planned = {cid: failures(cid) for cid in ids}
    share = served[500] / (served[500] + served[200])
    outcome = check_invariants(db_path, ids, Outcome(
        "KG answers 500 to 20% of requests", n,
        f"{served[500]} of {served[500] + served[200]} requests ({share:.0%}) answered 500, "
        "up to 3 times for one document", exit_code=run.code), queue_rows=n, journal=server.journal)
    assert outcome.failed == 0
    assert_clean_run(run, n)
    assert 0.15 < share < 0.25, share
    got = retry_counts(db_path)
    # Every 500 charged exactly one attempt of its document, and nothing else charged any.
    assert got == planned, {cid: (got[cid], planned[cid]) for cid in ids if got[cid] != planned[cid]}
    assert sum(got.values()) == served[500]
    assert run.stats["total_success"] == n


# -- 4: malformed answers at 5% -------------------------------------------------------------------

def malformed(kind: str, payload: dict) -> tuple[int, bytes]:
    """A 200 whose body is no usable answer for `payload`, in one of five ways."""
    answer = extract(payload)
    good = json.dumps(answer).encode()
    if kind == "not-json":
        return 200, b"<html><body><h1>502 Bad Gateway</h1></body></html>"
    if kind == "truncated":
        return 200, good[: len(good) // 2]
    if kind == "success-false":
        return 200, json.dumps({"success": False, "content_id": payload["content_id"],
                                "error": "extraction model overloaded"}).encode()
    bad = copy.deepcopy(answer)
    if kind == "unknown-rowid":
        stranger = max(c["vector_rowid"] for c in payload["chunks"]) + 1_000_000
        if bad["entities"]:
            bad["entities"][0]["chunk_appearances"][0]["vector_rowid"] = stranger
        else:
            bad["entities"] = [{"text": "Ghost", "normalized": "ghost", "type_primary": "Person",
                                "confidence": 0.5, "chunk_appearances": [{"vector_rowid": stranger}]}]
    elif kind == "wrong-types":
        bad["entities_extracted"] = "many"
    return 200, json.dumps(bad).encode()


MALFORMED = ["not-json", "truncated", "success-false", "unknown-rowid", "wrong-types"]
# What the worker's log says for each kind (the JSON path at fault, docs/document-lifecycle.md).
MALFORMED_SAYS = {"not-json": "answer is not JSON", "truncated": "answer is not JSON",
                  "success-false": "answer.success is false", "unknown-rowid": "is not a chunk of document",
                  "wrong-types": "answer.entities_extracted must be an integer"}


def test_malformed_answers_at_5_percent_are_retried(conn, db_path, soak):
    """One document in 20 gets a malformed 200 on its first attempt (one in 100: on its first two),
    cycling through five kinds: each is charged as an item failure, retried, and completes."""
    n = 3000 if soak else 200
    ids = seed(conn, n)
    attempts = Attempts()

    def bad_kinds(cid: int) -> list[str]:
        k = (cid % 20 == 7) + (cid % 100 == 7)
        return [MALFORMED[(cid // 20 + j) % len(MALFORMED)] for j in range(k)]

    def behaviour(payload: dict, i: int) -> Any:
        k = attempts(payload)
        kinds = bad_kinds(payload["content_id"])
        return malformed(kinds[k], payload) if k < len(kinds) else None

    server = FaultServer(behaviour)
    try:
        run = drain(db_path, server.url, n, timeout=600 if soak else 90)
    finally:
        server.close()
    planned = {cid: bad_kinds(cid) for cid in ids}
    kinds = collections.Counter(kind for v in planned.values() for kind in v)
    outcome = check_invariants(db_path, ids, Outcome(
        "KG answers malformed at 5%", n,
        f"{sum(kinds.values())} malformed 200s: " + ", ".join(f"{kinds[k]} {k}" for k in MALFORMED),
        exit_code=run.code), queue_rows=n, journal=server.journal)
    assert outcome.failed == 0
    assert_clean_run(run, n)
    got = retry_counts(db_path)
    want = {cid: len(v) for cid, v in planned.items()}
    assert got == want, {cid: (got[cid], want[cid]) for cid in ids if got[cid] != want[cid]}
    for kind in MALFORMED:
        assert kinds[kind] > 0
        says = MALFORMED_SAYS[kind]
        assert messages_with(run.log, says) > 0, f"no log line says {says!r} for {kind}"
    assert messages_with(run.log, "will retry: invalid answer") == sum(kinds.values())


# -- 5: 429 with Retry-After --------------------------------------------------------------------

def test_429_with_retry_after_charges_nothing(conn, db_path, soak):
    """Requests 50..80 are answered 429 with Retry-After: 1: waited out or released with a
    not-before time, never charged, nothing failed."""
    n = 3000 if soak else 200
    first, last = (50, 300) if soak else (50, 80)
    ids = seed(conn, n)
    lock = threading.Lock()
    times: dict[str, list[float]] = {"429": [], "200": []}

    def behaviour(payload: dict, i: int) -> Any:
        limited = first <= i <= last
        with lock:
            times["429" if limited else "200"].append(time.monotonic())
        if limited:
            return 429, {"error": "too many requests (injected)"}, {"Retry-After": "1"}
        return None

    server = FaultServer(behaviour)
    try:
        run = drain(db_path, server.url, n, workers=4, timeout=600 if soak else 90)
    finally:
        server.close()
    limited_until = max(times["429"])
    resumed = min(t for t in times["200"] if t > limited_until) - limited_until
    outcome = check_invariants(db_path, ids, Outcome(
        "KG rate limits (429, Retry-After: 1)", n,
        f"requests {first}..{last} answered 429 with Retry-After: 1 ({len(times['429'])} answers)",
        recover_seconds=round(resumed, 2), exit_code=run.code), queue_rows=n, journal=server.journal)
    assert len(times["429"]) == last - first + 1
    assert outcome.failed == 0
    assert_clean_run(run, n)
    assert max(retry_counts(db_path).values()) == 0, "a 429 charged an attempt"
    assert messages_with(run.log, "rate limiting (429)") >= 1


# -- 6: connection cut mid-answer ---------------------------------------------------------------

def test_connection_cut_mid_answer_charges_nothing(conn, db_path, soak):
    """One document in 10 gets a 200 whose body is cut half-way (the connection closes before
    Content-Length bytes came); one in 30 three times in a row, which exhausts the inline retries
    and releases it; another one in 10 gets a 503 whose error body is cut the same way. A broken
    connection is the service's failure: nothing charged or failed, no worker hurt."""
    n = 3000 if soak else 200
    ids = seed(conn, n)
    attempts = Attempts()

    def cuts(cid: int) -> list[Any]:
        if cid % 30 == 4:
            return [RESET_MID_BODY] * 3
        if cid % 10 == 4:
            return [RESET_MID_BODY]
        if cid % 10 == 8:
            return [(RESET_MID_BODY, 503)]
        return []

    def behaviour(payload: dict, i: int) -> Any:
        k = attempts(payload)
        planned = cuts(payload["content_id"])
        return planned[k] if k < len(planned) else None

    server = FaultServer(behaviour)
    try:
        run = drain(db_path, server.url, n, timeout=600 if soak else 90)
    finally:
        server.close()
    planned = {cid: cuts(cid) for cid in ids}
    answers = sum(1 for v in planned.values() for c in v if c == RESET_MID_BODY)
    errors = sum(1 for v in planned.values() for c in v if c != RESET_MID_BODY)
    outcome = check_invariants(db_path, ids, Outcome(
        "KG connection cut mid-answer", n,
        f"{answers} answers cut half-way ({sum(1 for v in planned.values() if RESET_MID_BODY in v)} documents, "
        f"{sum(1 for v in planned.values() if len(v) == 3)} of them 3 times in a row), "
        f"{errors} 503 error bodies cut half-way", exit_code=run.code),
        queue_rows=n, journal=server.journal)
    assert outcome.failed == 0
    assert_clean_run(run, n)
    got = retry_counts(db_path)
    assert max(got.values()) == 0, {cid: k for cid, k in got.items() if k}
    # Every planned cut was really served (a document is only done after its good answer).
    assert all(attempts[cid] == len(planned[cid]) + 1 for cid in ids), \
        {cid: attempts[cid] for cid in ids if attempts[cid] != len(planned[cid]) + 1}
    assert messages_with(run.log, "connection broke mid-answer") >= 1


# -- 8: one of three KG service endpoints down, then back ----------------------------------------

def test_one_of_three_endpoints_down_and_back_slows_nothing_down_and_charges_nothing(conn, db_path, soak):
    """KG_SERVICE_URL lists three services; one is killed mid-run (connections refused) for 3 s
    (10 s with --soak) and started again on its port. The others take its documents meanwhile at
    the pace of before, nothing is charged or failed, and once back it gets documents again."""
    n = 3000 if soak else 900
    outage = 10.0 if soak else 3.0
    ids = seed(conn, n)
    # Queued once endpoint 2 is back: its breakers may wait up to 10 s to probe it again, and
    # the queue must not run dry before they let it in.
    reserve = add_documents(conn, n // 6, chunks=3, seed=n + 1)
    total = n + len(reserve)

    def behaviour(payload: dict, i: int) -> None:
        time.sleep(0.02)  # a GPU box's think time: keeps the run long enough to see the return

    journal = Journal()  # all three endpoints', and the restarted one's
    servers = [FaultServer(behaviour, journal=journal) for _ in range(3)]
    port = int(servers[1].url.rsplit(":", 1)[1])
    url = ",".join(s.url for s in servers)
    notes: list[str] = []
    recovered: list[float] = []

    def completed() -> int:
        return count(db_path, "status = 'completed'")

    def rate_while(wait: Callable[[], None]) -> float:
        """Documents completed per second while `wait()` runs."""
        done, started = completed(), time.monotonic()
        wait()
        return (completed() - done) / (time.monotonic() - started)

    def inject(sup: Supervisor) -> None:
        wait_for(lambda: completed() >= n // 12, 60, interval=0.05, message="first documents done")
        # The baseline: the pace with three endpoints up, over the next twelfth of the queue.
        before = rate_while(lambda: wait_for(lambda: completed() >= n // 6, 60, interval=0.05,
                                             message="a sixth done"))
        assert min(len(s.requests) for s in servers) > 0, "every endpoint took documents"
        servers[1].close()
        during = rate_while(lambda: time.sleep(outage))
        assert count(db_path, "status = 'pending'") > 0, "the queue ran dry during the outage"
        # Each worker sends one document at a time and two endpoints serve three workers as
        # well as three do: the pace holds. Workers pausing (or waiting out a backoff) for the
        # one endpoint's outage would bring it near zero.
        assert during >= before / 5, f"{during:.0f} documents/s during the outage, {before:.0f} before"
        assert charged(db_path) == 0, "an endpoint's outage charged a document"
        notes.append(f"{during:.0f} documents/s on the other two during the {outage:g} s outage "
                     f"({before:.0f} before)")
        servers[1] = FaultServer(behaviour, port=port, journal=journal)
        back = time.monotonic()
        wait_for(lambda: servers[1].health_checks > 0, 30, interval=0.02, message="a probe of the endpoint")
        conn.executemany("INSERT INTO kg_processing_queue (content_id) VALUES (?)", [(i,) for i in reserve])
        wait_for(lambda: len(servers[1].requests) > 0, 30, interval=0.02, message="the endpoint used again")
        recovered.append(time.monotonic() - back)

    try:
        run = drain(db_path, url, total, workers=3, during=inject, timeout=600 if soak else 120)
    finally:
        for s in servers:
            s.close()
    outcome = check_invariants(
        db_path, ids + reserve, Outcome("one of three KG endpoints down, then back", total,
                                        f"endpoint 2 of 3 refusing connections for {outage:g} s mid-run",
                                        recover_seconds=round(recovered[0], 2), exit_code=run.code,
                                        notes="; ".join(notes)),
        queue_rows=total, journal=journal)
    assert outcome.failed == 0
    assert_clean_run(run, total)
    assert max(retry_counts(db_path).values()) == 0, "an endpoint's outage charged an attempt"
    endpoints = {e["url"]: e for e in run.stats["kg_service_status"]["endpoints"]}
    assert sorted(endpoints) == sorted(s.url for s in servers)
    assert all(e["requests"] > 0 and e["is_healthy"] for e in endpoints.values()), endpoints
    assert endpoints[servers[1].url]["failures"] > 0, endpoints
    assert messages_with(run.log, "sending to the 2 other healthy endpoint(s)") >= 1
    assert messages_with(run.log, "healthy again; resuming") >= 1
