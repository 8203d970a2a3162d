"""Asking a running supervisor's status endpoint, and telling it from any other HTTP service."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kgsupervisor import logs
from kgsupervisor.addresses import parse_addr
from kgsupervisor.errors import KGSupervisorError, NotReachable

if TYPE_CHECKING:
    import requests

# The keys of check_worker_health() and get_worker_stats() (CONTRACT §7): how `health` and
# `status` tell a kgsupervisor status endpoint from any HTTP service that answers 200.
HEALTH_KEYS = ("manager_running", "total_workers", "healthy_workers", "unhealthy_workers", "worker_details")
STATS_KEYS = ("total_workers", "manager_running", "manager_started_at", "workers_restarted", "total_processed",
              "total_success", "total_failed", "kg_service_enabled", "kg_service_status", "queue_size")
STATUS_SERVER = "kgsupervisor-status"  # statusd's Server header, on answers that carry no document


def fetch(addr: str, path: str) -> requests.Response:
    """GET from a running supervisor's status endpoint, or a one-line error (exit 2)."""
    import requests  # here: `queue` and `enqueue` share the CLI's import and never ask over HTTP
    parsed = parse_addr(addr)
    if parsed is None:
        raise NotReachable("the status endpoint is off (--status-addr off): nothing to ask")
    where = logs.host_port(*parsed)
    try:
        return requests.get(f"http://{where}{path}", timeout=5)
    except requests.RequestException:
        raise NotReachable(f"no supervisor answering on {where} (is `kgsupervisor run` running? "
                           f"is --status-addr the same?)") from None


def fetch_document(addr: str, path: str, keys: tuple[str, ...]) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON object of a status endpoint's `path`, checked to be ours.

    NotReachable (exit 2) for anything else that answers there; KGSupervisorError (exit 1) when
    it is our status process but the supervisor behind it does not answer.
    """
    resp = fetch(addr, path)
    where = logs.host_port(*parse_addr(addr))
    body = _json_object(resp)
    if body is not None and all(key in body for key in keys):
        return resp.status_code, body
    if resp.headers.get("Server", "").startswith(STATUS_SERVER):
        raise KGSupervisorError(f"the supervisor behind {where} does not answer its status process "
                                f"(HTTP {resp.status_code}): stuck, or stopping")
    raise NotReachable(f"{where} is not a kgsupervisor status endpoint (GET {path} answered HTTP "
                       f"{resp.status_code} without the keys of a kgsupervisor answer)")


def _json_object(resp: requests.Response) -> dict[str, Any] | None:
    """The answer's JSON if it is an object, else None."""
    try:
        body = resp.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def status_snapshot(addr: str) -> dict[str, Any]:
    """{"stats": /stats, "health": /health} of a kgsupervisor status endpoint."""
    return {"stats": fetch_document(addr, "/stats", STATS_KEYS)[1],
            "health": fetch_document(addr, "/health", HEALTH_KEYS)[1]}
