"""kgsupervisor: a process supervisor that drains a knowledge-graph ingest queue held in SQLite."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["KGWorkerManager", "KGWorker", "get_kg_manager", "start_kg_workers", "stop_kg_workers",
           "restart_kg_workers", "get_worker_stats", "start_kg_workers_async", "stop_kg_workers_async",
           "restart_kg_workers_async", "get_worker_stats_async", "check_worker_health_async"]


def __getattr__(name: str) -> Any:
    # Resolved on first use (PEP 562): `import kgsupervisor.ops.cli` must not pay for the API, the
    # supervisor and their imports on every `kgsupervisor queue` a script runs.
    if name == "KGWorker":
        from kgsupervisor.worker.kgworker import KGWorker
        return KGWorker
    if name in __all__:
        from kgsupervisor.ops import api
        return getattr(api, name)
    raise AttributeError(f"module 'kgsupervisor' has no attribute {name!r}")
