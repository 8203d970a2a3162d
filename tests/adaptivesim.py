"""Discrete-event simulations of a KG service and a client held to an AdaptiveLimit, on a fake clock.

Two service models: a queueing box (C requests in service, FIFO queue behind them, 503 beyond a
queue limit) and a thrashing box (everything admitted, each request slower as the load passes C:
service time x (n/C)^1.5). Service time is proportional to the document's size; the queueing box
may add seeded jitter to it, as a real GPU box's batching and cache hits do.
"""
from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kgsupervisor.kg.adaptive import AdaptiveLimit

REJECT_LATENCY_S = 0.002  # a 503 comes back after a network round trip, not at once


@dataclass
class Request:
    chars: int
    sent_at: float
    work: float  # seconds of service when served alone
    client: int = 0  # which supervisor sent it


class QueueingService:
    """C at a time; then a FIFO queue of up to queue_limit; beyond it, 503. Each request's service
    time is scaled by a uniform factor in [1 - jitter, 1 + jitter] (seeded)."""

    def __init__(self, capacity: int, s_per_kchar: float, queue_limit: int = 1000, jitter: float = 0.0,
                 seed: int = 7) -> None:
        self.capacity = capacity
        self.s_per_kchar = s_per_kchar
        self.queue_limit = queue_limit
        self.jitter = jitter
        self._rng = random.Random(seed)
        self.serving: list[tuple[float, int, Request]] = []  # heap of (finish time, seq, request)
        self.queue: deque[Request] = deque()
        self._seq = itertools.count()

    def admit(self, request: Request, now: float) -> bool:
        """False when refused with a 503."""
        if self.jitter:
            request.work *= 1 + self._rng.uniform(-self.jitter, self.jitter)
        if len(self.serving) < self.capacity:
            heapq.heappush(self.serving, (now + request.work, next(self._seq), request))
        elif len(self.queue) < self.queue_limit:
            self.queue.append(request)
        else:
            return False
        return True

    def next_event(self) -> float:
        return self.serving[0][0] if self.serving else math.inf

    def advance(self, until: float) -> list[tuple[float, Request]]:
        """The requests finished up to `until`, with their finish times."""
        done = []
        while self.serving and self.serving[0][0] <= until:
            finish, _, request = heapq.heappop(self.serving)
            done.append((finish, request))
            while self.queue and len(self.serving) < self.capacity:
                queued = self.queue.popleft()
                heapq.heappush(self.serving, (finish + queued.work, next(self._seq), queued))
        return done


class ThrashingService:
    """Admits everything; with n in service each progresses at rate 1 / max(1, n/C)^1.5."""

    def __init__(self, capacity: int, s_per_kchar: float) -> None:
        self.capacity = capacity
        self.s_per_kchar = s_per_kchar
        self.serving: list[list] = []  # [remaining work (s), request]
        self.clock = 0.0

    def rate(self) -> float:
        return 1 / max(1.0, len(self.serving) / self.capacity) ** 1.5

    def admit(self, request: Request, now: float) -> bool:
        self._progress(now)  # the caller advanced to `now` already: nothing finishes here
        self.serving.append([request.work, request])
        return True

    def next_event(self) -> float:
        if not self.serving:
            return math.inf
        return self.clock + min(r for r, _ in self.serving) / self.rate()

    def advance(self, until: float) -> list[tuple[float, Request]]:
        done = []
        while self.serving and self.next_event() <= until:
            finish = self.next_event()
            self._progress(finish)
            done += [(finish, req) for rem, req in self.serving if rem <= 1e-12]
            self.serving = [s for s in self.serving if s[0] > 1e-12]
        self._progress(until)
        return done

    def _progress(self, to: float) -> None:
        step = (to - self.clock) * self.rate()
        for entry in self.serving:
            entry[0] -= step
        self.clock = to


class ContendedHostService(ThrashingService):
    """A service of a few ms a document on the clients' own host: everything admitted, each request a
    little slower for every other one in service (they share the CPUs), with seeded jitter (the
    scheduler's). More concurrency still means more throughput, as on the benchmark's 2 cores."""

    def __init__(self, s_per_kchar: float, slowdown_each: float = 0.1, jitter: float = 0.5,
                 seed: int = 7) -> None:
        super().__init__(1, s_per_kchar)
        self.slowdown_each = slowdown_each
        self.jitter = jitter
        self._rng = random.Random(seed)

    def rate(self) -> float:
        return 1 / (1 + self.slowdown_each * max(0, len(self.serving) - 1))

    def admit(self, request: Request, now: float) -> bool:
        request.work *= 1 + self._rng.uniform(-self.jitter, self.jitter)
        return super().admit(request, now)


@dataclass
class Run:
    """What a simulation saw: the limit over time, each answer, each refusal."""

    limits: list[tuple[float, float]] = field(default_factory=list)  # (time, limit's value) at each change
    answers: list[tuple[float, float, int]] = field(default_factory=list)  # (time, latency, chars)
    refusals: list[float] = field(default_factory=list)

    def limits_between(self, start: float, end: float) -> list[float]:
        """Every limit in force at some moment of [start, end)."""
        before = [lim for t, lim in self.limits if t <= start][-1:]
        return before + [lim for t, lim in self.limits if start < t < end]

    def mean_limit(self, start: float, end: float) -> float:
        """The time-weighted mean limit over [start, end)."""
        total, points = 0.0, [(t, lim) for t, lim in self.limits if t < end]
        for (t, lim), nxt in zip(points, points[1:] + [(end, 0)]):
            total += lim * max(0.0, nxt[0] - max(t, start))
        return total / (end - start)

    def throughput(self, start: float, end: float, s_per_kchar: float) -> float:
        """Seconds of unloaded service answered per second in [start, end): C at full capacity."""
        return sum(c / 1000 * s_per_kchar for t, _, c in self.answers if start <= t < end) / (end - start)

    def latencies(self, start: float, end: float) -> list[float]:
        return sorted(lat for t, lat, _ in self.answers if start <= t < end)


def fixed_size(chars: int = 1000) -> Callable[[random.Random], int]:
    return lambda rng: chars


def mixed_sizes(low: int = 200, high: int = 8000) -> Callable[[random.Random], int]:
    """Log-uniform sizes: as many small documents as big ones, a 40x spread."""
    return lambda rng: int(math.exp(rng.uniform(math.log(low), math.log(high))))


def simulate(service, limit: AdaptiveLimit, seconds: float, sizes=fixed_size(), workers: int = 16,
             events: dict[float, Callable[[], None]] | None = None, seed: int = 1,
             held_outside_s: float = 0.0) -> Run:
    """`workers` clients each keep a request going whenever the limit lets them, for `seconds`.

    `events` maps simulated times to changes of the service (a capacity halving, a slower model).
    `held_outside_s`: how long a worker keeps its permit after the answer (its database work).
    """
    return simulate_clients(service, [limit], seconds, sizes=sizes, workers=workers, events=events, seed=seed,
                            held_outside_s=held_outside_s)[0]


def simulate_clients(service, limits: list[AdaptiveLimit], seconds: float, starts: list[float] | None = None,
                     sizes=fixed_size(), workers: int = 16, events: dict[float, Callable[[], None]] | None = None,
                     seed: int = 1, held_outside_s: float = 0.0) -> list[Run]:
    """Several supervisors on one service, each with its own limit and `workers` workers, the
    i-th starting at `starts[i]` (simulated seconds); one Run each."""
    rng, now = random.Random(seed), 0.0
    starts = starts or [0.0] * len(limits)
    runs, in_flight = [Run() for _ in limits], [0] * len(limits)
    returns: list[tuple[float, int, bool]] = []  # heap of (time, client, refused): a permit comes back
    pending = sorted((events or {}).items())
    for run, limit in zip(runs, limits):
        run.limits.append((0.0, limit.value))
    while now < seconds:
        for i, limit in enumerate(limits):
            while now >= starts[i] and in_flight[i] < min(limit.limit, workers):
                chars = sizes(rng)
                in_flight[i] += 1
                limit.note_in_flight(in_flight[i])
                if not service.admit(Request(chars, now, chars / 1000 * service.s_per_kchar, i), now):
                    heapq.heappush(returns, (now + REJECT_LATENCY_S, i, True))
        now = min(service.next_event(), returns[0][0] if returns else math.inf,
                  pending[0][0] if pending else math.inf, min((t for t in starts if t > now), default=math.inf),
                  seconds)
        if pending and pending[0][0] <= now:
            pending.pop(0)[1]()
        for finish, request in service.advance(now):
            i = request.client
            limits[i].on_success(finish - request.sent_at, request.chars, finish)
            runs[i].answers.append((finish, finish - request.sent_at, request.chars))
            if held_outside_s:
                heapq.heappush(returns, (finish + held_outside_s, i, False))
            else:
                in_flight[i] -= 1
        while returns and returns[0][0] <= now:
            _, i, refused = heapq.heappop(returns)
            in_flight[i] -= 1
            if refused:
                limits[i].on_overload("503", now, latency_s=REJECT_LATENCY_S)
                runs[i].refusals.append(now)
        for run, limit in zip(runs, limits):
            if limit.value != run.limits[-1][1]:
                run.limits.append((now, limit.value))
    return runs
