"""What the console keeps in memory: the queue's depth every 10 s over the last hour (the chart);
and, inside `run`, its way to the local supervisor (snapshots and signals)."""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from kgsupervisor.errors import KGSupervisorError
from kgsupervisor.queue import browse
from kgsupervisor.store.backend import connect_to

log = logging.getLogger("kgsupervisor.console")

SAMPLE_EVERY = 10.0
KEEP_SECONDS = 3600.0

Fetch = Callable[[], "dict[str, Any] | None"]


class LocalPool:
    """The supervisor this console runs beside (inside `run`): its snapshots, asked over the
    status pipe, and its documented signals (SIGTTIN, SIGTTOU, SIGTERM)."""

    def __init__(self, fetch: Fetch, supervisor_pid: int) -> None:
        self.fetch = fetch
        self.supervisor_pid = supervisor_pid

    def snapshot(self) -> dict[str, Any] | None:
        """The supervisor's latest snapshot (None when it does not answer)."""
        return self.fetch()

    def signal(self, signum: int) -> None:
        """Send the supervisor `signum`; a KGSupervisorError when it is no longer our parent."""
        if os.getppid() != self.supervisor_pid:
            raise KGSupervisorError(f"supervisor pid {self.supervisor_pid} is gone: nothing signalled")
        os.kill(self.supervisor_pid, signum)


class DepthSamples:
    """The queue's counts by status every `every` seconds over the last `keep` seconds, taken by
    a thread of its own on a connection of its own."""

    def __init__(self, db_target: str, every: float = SAMPLE_EVERY,
                 keep: float = KEEP_SECONDS) -> None:
        self.db_target = db_target
        self.every = every
        self.keep = keep
        self._samples: collections.deque[tuple[float, dict[str, int]]] = collections.deque(
            maxlen=int(keep / every) + 1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self._failing = False

    def recent(self, now: float) -> list[tuple[float, dict[str, int]]]:
        """The samples of the last `keep` seconds, oldest first."""
        return [s for s in list(self._samples) if s[0] >= now - self.keep]

    def take(self, now: float) -> None:
        """One sample; a database that cannot answer is logged once, and tried again next time."""
        try:
            if self._conn is None:
                self._conn = connect_to(self.db_target)
            self._samples.append((now, browse.queue_counts(self._conn)))
            self._failing = False
        except Exception as exc:
            self._close()
            if not self._failing:
                log.warning("console: could not count the queue for its chart: %s", exc)
            self._failing = True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="console-samples", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._close()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            self.take(now)
            self._stop.wait(self.every)

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # a connection already broken has nothing left to close
                pass
            self._conn = None
