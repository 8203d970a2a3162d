"""Per-worker counters and heartbeat in shared memory: they outlive a dead Manager process."""
from __future__ import annotations

import multiprocessing
import time

# Slot layout of the shared array; doubles hold counts exactly up to 2**53.
FIELDS = ("heartbeat", "processed", "success", "failed", "retried", "released", "current_content_id")
_INDEX = {name: i for i, name in enumerate(FIELDS)}
COUNTS = ("processed", "success", "failed", "retried", "released")
NO_DOCUMENT = -1.0


class SharedCounters:
    """A fixed array of doubles a worker writes and its supervisor reads, with no IPC round trip.

    Created by the supervisor before the fork (so both processes map the same memory), written
    only by the worker. Single-writer, so no lock: a reader at worst sees a value one step old.
    """

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self._array = ctx.RawArray("d", len(FIELDS))
        self._array[_INDEX["heartbeat"]] = time.time()
        self._array[_INDEX["current_content_id"]] = NO_DOCUMENT

    def beat(self, now: float | None = None) -> None:
        self._array[_INDEX["heartbeat"]] = time.time() if now is None else now

    def heartbeat_age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self._array[_INDEX["heartbeat"]]

    def add(self, name: str, amount: int = 1) -> None:
        self._array[_INDEX[name]] += amount

    def set_current(self, content_id: int | None) -> None:
        self._array[_INDEX["current_content_id"]] = NO_DOCUMENT if content_id is None else float(content_id)

    def current(self) -> int | None:
        value = self._array[_INDEX["current_content_id"]]
        return None if value == NO_DOCUMENT else int(value)

    def counts(self) -> dict[str, int]:
        return {name: int(self._array[_INDEX[name]]) for name in COUNTS}
