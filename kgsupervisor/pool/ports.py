"""What the supervisor needs from the layer that builds it, as protocols: it names no renderer,
no HTTP server; `kgsupervisor run` and the Python API pass theirs in (ops.reporting, ops.statusd)."""
from __future__ import annotations

from multiprocessing.connection import Connection
from typing import Any, Protocol

from kgsupervisor.pool.snapshot import PoolSnapshot


class Reporter(Protocol):
    """Renders the pool's snapshots, tells systemd, and answers those who ask over a pipe."""

    controls: list[Connection]  # request pipes: the supervisor wakes when one has a request

    def start(self) -> None:
        """The pool is starting (a progress line may attach to the terminal)."""

    def wants_snapshot(self, now: float) -> bool:
        """Whether this turn's snapshot is wanted: one is due, or someone asks."""

    def due_in(self, now: float) -> float:
        """Seconds until it wants a snapshot unasked while the pool is quiet (inf: only when asked)."""

    def publish(self, snapshot: PoolSnapshot) -> None:
        """Take this turn's snapshot: render it, tell whoever listens, answer pending requests."""

    def notify(self, *states: str) -> None:
        """Tell the service manager (systemd) a state: READY=1, RELOADING=1, STOPPING=1."""

    def finish(self) -> None:
        """The pool has stopped: leave the terminal clean."""


class StatusServer(Protocol):
    """The status endpoint, served by a child of the supervisor."""

    def bind(self) -> int:
        """Listen, before any fork (a busy port is an error at start); the listening descriptor."""

    def address(self) -> str:
        """Where it listens, as `host:port`."""

    def serve(self, conn: Connection, parent_pid: int, fds: list[int]) -> None:
        """Entry point of the forked child: close `fds`, answer from `conn` until the parent is gone."""


class StatsStore(Protocol):
    """Where workers publish their stats (pool.manager.StatsManager: a Manager process)."""

    map: Any  # what a worker is given to publish into
    restarts: int

    def ensure_running(self, on_restart: Any) -> None:
        """Recreate the store if it died, then call `on_restart`."""

    def snapshot(self) -> dict[Any, Any]:
        """A copy of what the workers published; empty when unavailable."""

    def shutdown(self) -> None:
        """Stop the store; never raises."""
