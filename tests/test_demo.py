"""`make demo` runs end to end: what the README's first command does, checked in CI."""
from __future__ import annotations

import pathlib
import sqlite3
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

DEMO = pathlib.Path(__file__).parent.parent / "scripts" / "demo.py"


def test_demo_drains_every_document(tmp_path):
    proc = subprocess.run([sys.executable, str(DEMO), str(tmp_path / "demo")], capture_output=True,
                          text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo succeeded: every document completed" in proc.stdout
    db = sqlite3.connect(tmp_path / "demo" / "demo.db")
    assert db.execute("SELECT status, COUNT(*) FROM kg_processing_queue GROUP BY status").fetchall() == [("completed", 200)]
    assert db.execute("SELECT COUNT(*) FROM crawled_content WHERE kg_processed = 1").fetchone()[0] == 200
