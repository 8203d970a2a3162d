"""The asyncio KG manager's API, call for call: change its import line to this module
(the code is in kgsupervisor/ops/compat.py)."""
from kgsupervisor.ops.compat import (KGWorkerManager, get_kg_manager, get_worker_stats, start_kg_workers,
                                     stop_kg_workers)

__all__ = ["KGWorkerManager", "get_kg_manager", "start_kg_workers", "stop_kg_workers", "get_worker_stats"]
