"""kgsupervisor: a process supervisor that drains a knowledge-graph ingest queue held in SQLite."""
from __future__ import annotations

__version__ = "0.1.0"
