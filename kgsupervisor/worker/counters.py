"""Per-worker counters and heartbeat in shared memory: they outlive a dead Manager process."""
from __future__ import annotations

import multiprocessing
import time

# Upper bounds (seconds) of the KG request latency histogram; +Inf is the count itself.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
_BUCKET_FIELDS = tuple(f"latency_le_{b:g}" for b in LATENCY_BUCKETS)

# Cumulative fields: a slot adds them up over every process that ran in it.
COUNTS = ("processed", "success", "failed", "retried", "released", "requests", "latency_sum") + _BUCKET_FIELDS
# Slot layout of the shared array; doubles hold counts exactly up to 2**53.
FIELDS = ("heartbeat", "current_content_id") + COUNTS
_INDEX = {name: i for i, name in enumerate(FIELDS)}
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

    def observe_latency(self, seconds: float) -> None:
        """One KG request took `seconds` (cumulative buckets, as Prometheus wants them)."""
        self._array[_INDEX["requests"]] += 1
        self._array[_INDEX["latency_sum"]] += seconds
        for bound, name in zip(LATENCY_BUCKETS, _BUCKET_FIELDS):
            if seconds <= bound:
                self._array[_INDEX[name]] += 1

    def counts(self) -> dict[str, float]:
        return {name: self._array[_INDEX[name]] if name == "latency_sum" else int(self._array[_INDEX[name]])
                for name in COUNTS}


def latency_histogram(counts: dict[str, float]) -> list[tuple[str, float]]:
    """[(le, cumulative count)] ending with +Inf, from summed counts."""
    buckets = [(f"{b:g}", counts.get(name, 0)) for b, name in zip(LATENCY_BUCKETS, _BUCKET_FIELDS)]
    return buckets + [("+Inf", counts.get("requests", 0))]
