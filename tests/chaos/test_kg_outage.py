"""Fault suite, KG service: down for a while in the middle of a run."""
from __future__ import annotations

import time

import pytest

from ..conftest import seed
from ..faultserver import FaultServer
from .harness import Outcome, Supervisor, check_invariants, queue_done

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow, pytest.mark.chaos]


def test_service_down_for_10s_mid_run(conn, db_path, soak):
    n = 3000 if soak else 200
    ids = seed(conn, n)
    server = FaultServer(lambda payload, i: time.sleep(0.002))
    port = int(server.url.rsplit(":", 1)[1])
    sup = Supervisor(db_path, server.url, "--workers", "2")
    try:
        sup.wait_ready()
        while conn.execute("SELECT COUNT(*) FROM kg_processing_queue WHERE status = 'completed'").fetchone()[0] < n // 4:
            time.sleep(0.05)
        server.close()  # the service goes away: connections are refused
        time.sleep(10)
        assert conn.execute("SELECT COUNT(*) FROM kg_processing_queue WHERE status = 'failed' "
                            "OR retry_count > 0").fetchone()[0] == 0, "an outage charged a document"
        back = time.monotonic()
        server = FaultServer(lambda payload, i: time.sleep(0.002), port=port, journal=server.journal)
        done_before = conn.execute("SELECT COUNT(*) FROM kg_processing_queue WHERE status = 'completed'").fetchone()[0]
        while conn.execute("SELECT COUNT(*) FROM kg_processing_queue WHERE status = 'completed'").fetchone()[0] == done_before:
            time.sleep(0.05)
        recovered = time.monotonic() - back
        deadline = time.monotonic() + 120
        while not queue_done(db_path, n):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        stats = sup.stats_counting(n)
        code = sup.stop()
    finally:
        if sup.proc.poll() is None:
            sup.kill_tree()
        server.close()
    outcome = check_invariants(db_path, ids, Outcome("KG service down for 10 s mid-run", n,
                                                     "service stopped 10 s (connections refused)",
                                                     recover_seconds=round(recovered, 2), exit_code=code),
                               queue_rows=n, journal=server.journal)
    assert code == 0 and outcome.failed == 0
    assert conn.execute("SELECT MAX(retry_count) FROM kg_processing_queue").fetchone()[0] == 0
    assert stats["total_success"] == n and stats["total_failed"] == 0
