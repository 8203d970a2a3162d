"""kgsupervisor: a process supervisor that drains a knowledge-graph ingest queue held in SQLite."""
from __future__ import annotations

__version__ = "0.1.0"

from .api import (KGWorkerManager, check_worker_health_async, get_kg_manager, get_worker_stats,
                  get_worker_stats_async, restart_kg_workers, restart_kg_workers_async,
                  start_kg_workers, start_kg_workers_async, stop_kg_workers, stop_kg_workers_async)
from .worker import KGWorker

__all__ = ["KGWorkerManager", "KGWorker", "get_kg_manager", "start_kg_workers", "stop_kg_workers",
           "restart_kg_workers", "get_worker_stats", "start_kg_workers_async", "stop_kg_workers_async",
           "restart_kg_workers_async", "get_worker_stats_async", "check_worker_health_async"]
