"""Per-worker counters and heartbeat in shared memory: they outlive a dead Manager process."""
from __future__ import annotations

import ctypes
import math
import multiprocessing
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from kgsupervisor.queue.history import InFlight

# Upper bounds (seconds) of the KG request latency histogram; +Inf is the count itself.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
_BUCKET_FIELDS = tuple(f"latency_le_{b:g}" for b in LATENCY_BUCKETS)

# Cumulative fields: a slot adds them up over every process that ran in it.
COUNTS = ("processed", "success", "failed", "retried", "released", "requests", "latency_sum") + _BUCKET_FIELDS
# Slot layout of the shared array; doubles hold counts exactly up to 2**53.
# held_since: when the worker took the document it holds (unix seconds; 0 when it holds none).
FIELDS = ("heartbeat", "current_content_id", "held_since") + COUNTS
_INDEX = {name: i for i, name in enumerate(FIELDS)}
NO_DOCUMENT = -1.0
# Room for a claim token in shared memory (a worker's are 32 hex digits).
TOKEN_BYTES = 64


class _InFlightSlot(ctypes.Structure):
    """The claim a worker is sending, for its supervisor to charge if it dies (queue.history.InFlight).
    Integers and bytes, not doubles: a row id is 64 bits, a token is text."""

    _fields_ = [("sending", ctypes.c_int32), ("row_id", ctypes.c_int64), ("since", ctypes.c_double),
                ("token", ctypes.c_char * TOKEN_BYTES)]


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
        self._in_flight = ctx.RawValue(_InFlightSlot)  # zeroed: nothing in flight

    def beat(self, now: float | None = None) -> None:
        self._array[_INDEX["heartbeat"]] = time.time() if now is None else now

    def heartbeat_age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self._array[_INDEX["heartbeat"]]

    def add(self, name: str, amount: int = 1) -> None:
        self._array[_INDEX[name]] += amount

    def set_current(self, content_id: int | None, now: float | None = None) -> None:
        """Name the document in hand; the time it was taken is kept until it changes."""
        if content_id is None:
            self._array[_INDEX["held_since"]] = 0.0
        elif float(content_id) != self._array[_INDEX["current_content_id"]]:
            self._array[_INDEX["held_since"]] = time.time() if now is None else now
        self._array[_INDEX["current_content_id"]] = NO_DOCUMENT if content_id is None else float(content_id)

    def held_for(self, now: float | None = None) -> float | None:
        """Seconds the document in hand has been held; None when the worker holds none."""
        since = self._array[_INDEX["held_since"]]
        if self.current() is None or not since:
            return None
        return max(0.0, (time.time() if now is None else now) - since)

    def current(self) -> int | None:
        value = self._array[_INDEX["current_content_id"]]
        return None if value == NO_DOCUMENT else int(value)

    @contextmanager
    def sending(self, row_id: int, token: str, now: float | None = None) -> Iterator[None]:
        """The claim (`row_id` under `token`) is in flight for the block: a death meanwhile is
        charged to it, and to nothing else the worker holds. Plain stores, no transaction."""
        raw = token.encode()
        if len(raw) > TOKEN_BYTES:
            raise ValueError(f"a claim token of {len(raw)} bytes; at most {TOKEN_BYTES} fit in shared memory")
        slot = self._in_flight
        # The flag last on the way in and first on the way out: a death between two stores
        # leaves either no record or a whole one, never a row with another claim's token.
        slot.sending = 0
        slot.row_id, slot.token = row_id, raw
        slot.since = time.time() if now is None else now
        slot.sending = 1
        try:
            yield
        finally:
            slot.sending = 0

    def in_flight(self) -> InFlight | None:
        """The claim being sent, or None; read by the supervisor once the worker is gone."""
        slot = self._in_flight
        if not slot.sending:
            return None
        return InFlight(slot.row_id, slot.token.decode(errors="replace"), slot.since)

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


class Progress:
    """When the worker's main thread last got anywhere: what its heartbeat says.

    The main thread marks progress at each step, and parks around each wait that is bounded by
    something of its own (a KG request's deadline, the wait for work, a lock wait): parked, it
    counts as making progress. The lease keeper beats with what this says, so the heartbeat's
    age is how long the main thread has been stuck outside a bounded wait (a spin in Python, a
    call that never returns). One float written by the main thread alone: no lock, no IPC.
    Each mark, and each end of a wait, also beats (`beat`, a store to shared memory): a C call
    holding the GIL right after a short wait keeps the keeper from beating, and the heartbeat
    must then say when the main thread last got somewhere, not when the keeper last ran.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 beat: Callable[[], None] = lambda: None) -> None:
        self._clock = clock
        self._beat = beat
        # Monotonic time up to which the main thread counts as progressing: its last mark, the
        # end of a park bounded here, or infinity inside a wait bounded elsewhere.
        self.until = clock()

    def mark(self) -> None:
        """The main thread got somewhere (inside a park, the park still holds)."""
        now = self._clock()
        if self.until < now:
            self.until = now
            self._beat()

    @contextmanager
    def parked(self, up_to: float | None = None) -> Iterator[None]:
        """For the block the main thread waits, and counts as progressing: for `up_to` seconds
        at most, or for as long as it takes when the wait has a bound of its own."""
        before = self.until
        self.until = math.inf if up_to is None else max(before, self._clock() + up_to)
        try:
            yield
        finally:
            # Back to the enclosing park, if any; else progress now.
            now = self._clock()
            self.until = max(before, now)
            if self.until == now:
                self._beat()

    def stuck_for(self) -> float:
        """Seconds the main thread has made no progress (0 while parked)."""
        return max(0.0, self._clock() - self.until)

    def heartbeat(self, grace: float, now: float | None = None) -> float:
        """The wall-clock time to beat with: `now` if the main thread progressed within `grace`
        seconds (a worker at work shows a heartbeat as fresh as the beats), else when it last did."""
        now = time.time() if now is None else now
        stuck = self.stuck_for()
        return now if stuck < grace else now - stuck


def latency_histogram(counts: dict[str, float]) -> list[tuple[str, float]]:
    """[(le, cumulative count)] ending with +Inf, from summed counts."""
    buckets = [(f"{b:g}", counts.get(name, 0)) for b, name in zip(LATENCY_BUCKETS, _BUCKET_FIELDS)]
    return buckets + [("+Inf", counts.get("requests", 0))]
