"""The capacity of `dev-service --capacity`: a KG service that behaves like a GPU box.

C requests are in service at once and each takes a time proportional to its text; others wait
in FIFO order inside the service, and beyond the queue limit they are refused at once. In thrash
mode every request is admitted and all of them slow down together once more than C are in.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import math
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

log = logging.getLogger("kgsupervisor.devservice")

# A sample document of 3 chunks holds ~1,000 characters: ~100 ms of service.
DEFAULT_SERVICE_TIME_PER_KCHAR = 0.1
OVERLOAD_STATUSES = (503, 429)
# The thrashing slowdown is max(1, n/C) ** THRASH_EXPONENT for n requests in service.
THRASH_EXPONENT = 1.5
CAPACITY_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)  # halve, restore
# A request in service wakes at least this often, so a wait never meets threading's timeout cap.
LONGEST_WAIT_S = 3600.0


class QueueFull(Exception):
    """The service's queue holds its limit: the request is refused at once."""


class CapacityModel:
    """How many requests are served at once, how long each takes, and who waits or is refused.

    Every request in service progresses at the same rate (processor sharing), so service is kept
    as one clock: `_progress` is how many characters each request in service has been served
    since the model began. A change of load, capacity or speed first moves that clock on at the
    old rate, then wakes everyone, so each request sees its share at every rate it went through.
    """

    def __init__(self, capacity: int, *, queue_limit: int | None = None,
                 service_time_per_kchar: float = DEFAULT_SERVICE_TIME_PER_KCHAR,
                 thrash: bool = False, overload: int = 503,
                 schedule: tuple[tuple[float, int], ...] = ()) -> None:
        _check_capacity(capacity)
        if queue_limit is not None and queue_limit < 0:
            raise ValueError(f"queue_limit must be >= 0, got {queue_limit!r}")
        if overload not in OVERLOAD_STATUSES:
            raise ValueError(f"overload must be 503 or 429, got {overload!r}")
        self.initial_capacity = capacity
        self.queue_limit = queue_limit
        self.thrash = thrash
        self.overload = overload
        self.schedule = schedule
        self.started = time.monotonic()
        # (seconds since start, old capacity, new capacity, why), one entry a change.
        self.changes: list[tuple[float, int, int, str]] = []
        self._capacity = capacity
        self._per_kchar = _checked_service_time(service_time_per_kchar)
        self._changed = threading.Condition()
        self._waiting: deque[object] = deque()
        self._in_service = 0
        self._admitted = 0
        self._progress = 0.0
        self._progress_at = self.started
        self._served = self._refused = self._chars_served = 0
        self._service_seconds = 0.0
        self.request_log: TextIO | None = None  # see record()
        self._log_lock = threading.Lock()

    @property
    def capacity(self) -> int:
        """How many requests are served at once now."""
        return self._capacity

    def set_capacity(self, capacity: int, reason: str) -> int:
        """Serve `capacity` requests at once from now on, logging why; returns the old capacity."""
        _check_capacity(capacity)
        with self._changed:
            self._advance()
            old, self._capacity = self._capacity, capacity
            self.changes.append((round(time.monotonic() - self.started, 3), old, capacity, reason))
            self._changed.notify_all()
        log.info("capacity %d -> %d (%s)", old, capacity, reason)
        return old

    def halve(self, reason: str) -> int:
        """Halve the capacity (at least 1); returns the old one."""
        return self.set_capacity(max(1, self._capacity // 2), reason)

    def restore(self, reason: str) -> int:
        """Set the capacity back to the one the service started with; returns the old one."""
        return self.set_capacity(self.initial_capacity, reason)

    def obey(self, signum: int) -> int:
        """SIGUSR1 halves the capacity, SIGUSR2 restores it; returns the old one."""
        if signum == signal.SIGUSR1:
            return self.halve("SIGUSR1")
        return self.restore("SIGUSR2")

    def set_service_time(self, per_kchar: float) -> None:
        """Take `per_kchar` seconds per 1,000 characters from now on, requests in service included."""
        per_kchar = _checked_service_time(per_kchar)
        with self._changed:
            self._advance()
            self._per_kchar = per_kchar
            self._changed.notify_all()

    @contextmanager
    def slot(self) -> Iterator[int]:
        """Hold a place in service for the block, after waiting for it in FIFO order; yields the
        request's admission number (1 for the first). Raises QueueFull when the queue is full."""
        admitted_at, number = self._enter()
        try:
            yield number
        finally:
            self._leave(admitted_at)

    def process(self, chars: int) -> None:
        """Serve `chars` characters of text from a slot: blocks for their share of service."""
        with self._changed:
            self._advance()
            target = self._progress + chars
            while self._per_kchar > 0 and target - self._progress > 1e-9:
                self._changed.wait(min(LONGEST_WAIT_S, (target - self._progress) / self._rate()))
                self._advance()
            self._chars_served += chars

    def record(self, arrived: float, chars: int, status: int) -> None:
        """One line of the request log (--request-log), when there is one: when the request came
        and went (unix seconds), its characters and its answer's status; the benchmark's oracle."""
        if self.request_log is None:
            return
        line = json.dumps({"arrived": round(arrived, 6), "finished": round(time.time(), 6),
                           "chars": chars, "status": status})
        with self._log_lock:
            self.request_log.write(line + "\n")
            self.request_log.flush()

    def snapshot(self) -> dict:
        """What /health adds: capacity, in service, waiting, and the work done so far."""
        with self._changed:
            return {
                "capacity": self._capacity,
                "in_service": self._in_service,
                "waiting": len(self._waiting),
                "work": {"served": self._served, "refused": self._refused,
                         "chars_served": self._chars_served,
                         "service_seconds": round(self._service_seconds, 6)},
            }

    def _enter(self) -> tuple[float, int]:
        with self._changed:
            if not self._may_enter(None):
                self._wait_in_line()
            self._advance()
            self._in_service += 1
            self._admitted += 1
            # The load changed (thrash rate), and a raised capacity may admit the next in line too.
            self._changed.notify_all()
            return time.monotonic(), self._admitted

    def _wait_in_line(self) -> None:
        if self.queue_limit is not None and len(self._waiting) >= self.queue_limit:
            self._refused += 1
            raise QueueFull(f"{len(self._waiting)} requests wait already (queue limit {self.queue_limit})")
        ticket = object()
        self._waiting.append(ticket)
        try:
            self._changed.wait_for(lambda: self._may_enter(ticket))
        finally:
            self._waiting.remove(ticket)

    def _may_enter(self, ticket: object | None) -> bool:
        """Thrash mode admits everyone; otherwise a free slot goes to the first in line."""
        if self.thrash:
            return True
        first = self._waiting[0] if self._waiting else None
        return first is ticket and self._in_service < self._capacity

    def _leave(self, admitted_at: float) -> None:
        with self._changed:
            self._advance()
            self._in_service -= 1
            self._served += 1
            self._service_seconds += time.monotonic() - admitted_at
            self._changed.notify_all()

    def _advance(self) -> None:
        """Move the service clock on to now at the rate that held since it last moved."""
        now = time.monotonic()
        if self._in_service and self._per_kchar > 0:
            self._progress += (now - self._progress_at) * self._rate()
        self._progress_at = now

    def _rate(self) -> float:
        """Characters a second each request in service gets now."""
        return 1000.0 / (self._per_kchar * self._slowdown())

    def _slowdown(self) -> float:
        if not self.thrash:
            return 1.0
        return max(1.0, self._in_service / self._capacity) ** THRASH_EXPONENT


class CapacitySchedule:
    """Applies a model's schedule in a thread: at each step's second (from start()) its capacity."""

    def __init__(self, model: CapacityModel) -> None:
        self.model = model
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="devservice-schedule", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        begun = time.monotonic()
        for at, capacity in self.model.schedule:
            if self._stop.wait(max(0.0, begun + at - time.monotonic())):
                return
            self.model.set_capacity(capacity, f"schedule, at {at:g} s")


def parse_schedule(text: str) -> tuple[tuple[float, int], ...]:
    """'30:2,60:4' as ((30.0, 2), (60.0, 4)): at 30 s capacity 2, at 60 s capacity 4."""
    steps = []
    for item in text.split(","):
        at, sep, capacity = item.strip().partition(":")
        try:
            step = (float(at), int(capacity))
        except ValueError:
            step = None
        if not sep or step is None or not math.isfinite(step[0]) or step[0] < 0 or step[1] < 1:
            raise ValueError(f"{item.strip()!r} is not SECONDS:CAPACITY (seconds >= 0, capacity >= 1)")
        if steps and step[0] < steps[-1][0]:
            raise ValueError(f"{item.strip()!r} comes before the step ahead of it; list steps in time order")
        steps.append(step)
    return tuple(steps)


def admin_capacity(body: bytes) -> int | None:
    """The capacity a `POST /admin/capacity {"capacity": N}` body asks for; None if none is."""
    try:
        capacity = json.loads(body).get("capacity")
    except (ValueError, RecursionError, AttributeError):
        return None
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        return None
    return capacity


def is_loopback(host: str) -> bool:
    """Whether a peer's address is a loopback one (IPv4-mapped IPv6 included)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _check_capacity(capacity: int) -> None:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")


def _checked_service_time(per_kchar: float) -> float:
    if not (math.isfinite(per_kchar) and per_kchar >= 0):
        raise ValueError(f"service time per 1,000 characters must be >= 0, got {per_kchar!r}")
    return float(per_kchar)
