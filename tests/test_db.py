"""Connections: several in one process, others coming and going, and no write is ever lost."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kgsupervisor.store.sqlite import connect

pytestmark = pytest.mark.timeout(30)


def test_a_second_connection_in_a_process_keeps_the_first_ones_locks(db_path):
    """Regression: opening the database file to sniff its header, then closing that descriptor,
    dropped every POSIX lock of the process (a worker's main connection included). The next
    process to close its connection then believed it was the last one and deleted the WAL
    under the worker, whose later commits went to an unlinked file and were lost."""
    first = connect(db_path)
    second = connect(db_path)  # what a worker's lease-keeper thread does
    wal_inode = os.stat(db_path + "-wal").st_ino
    # Another process opens and closes a connection, as the supervisor does to count the queue.
    subprocess.run([sys.executable, "-c", f"from kgsupervisor.store.sqlite import connect; connect({db_path!r}).close()"],
                   check=True, timeout=20)
    assert os.path.exists(db_path + "-wal") and os.stat(db_path + "-wal").st_ino == wal_inode
    first.execute("INSERT INTO kg_processing_queue (content_id) VALUES (42)")
    seen = subprocess.run([sys.executable, "-c", (
        "from kgsupervisor.store.sqlite import connect\n"
        f"print(connect({db_path!r}).execute('SELECT COUNT(*) FROM kg_processing_queue').fetchone()[0])")],
        capture_output=True, text=True, check=True, timeout=20)
    assert seen.stdout.strip() == "1", "a commit of the first connection is visible to other processes"
    second.close()
    first.close()
