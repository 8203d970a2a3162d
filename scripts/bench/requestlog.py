"""What the dev service's request log says (one JSON line per ingest: arrived, finished, chars,
status; unix seconds): throughput, latency, occupancy, rolling and sliding windows. For bench.adaptive."""
from __future__ import annotations

import math

from kgsupervisor.kg.adaptive import BASELINE_ROUNDS, ROUND_MIN_SAMPLES

from .common import percentile

S_PER_KCHAR = 0.1            # the service's default: ~103 ms for a document of ~1,030 characters
SAMPLE_EVERY_S = 0.25
ROLLING_S = 2.0              # the rolling p95 of the halving run: requests finished in the last 2 s
ROLLING_MIN_REQUESTS = 5     # ... once that many arrived after the halving
FIRST_ROUNDS = BASELINE_ROUNDS * ROUND_MIN_SAMPLES  # the answers a limit's first baseline averages


def served(lines: list[dict], lo: float, hi: float) -> list[dict]:
    """The 200 answers that finished within [lo, hi)."""
    return [x for x in lines if x["status"] == 200 and lo <= x["finished"] < hi]


def service_time(lines: list[dict]) -> float:
    """The unloaded service time of these documents: mean characters x S_PER_KCHAR / 1000."""
    return sum(x["chars"] for x in lines) * S_PER_KCHAR / 1000 / len(lines) if lines else math.nan


def window_stats(lines: list[dict], lo: float, hi: float, capacity: int, trace: list[dict]) -> dict:
    """Throughput, latency and refusals of the requests in [lo, hi) against the service's capacity."""
    ok = served(lines, lo, hi)
    svc = service_time(ok)
    rate = len(ok) / (hi - lo)
    p95 = percentile([x["finished"] - x["arrived"] for x in ok], 95)
    limits = [s["inflight_limit"] for s in trace if lo <= s["t"] < hi and "inflight_limit" in s]
    return {"served": len(ok), "window_s": hi - lo, "rate": rate, "service_s": svc,
            "capacity_rate": capacity / svc, "ratio": rate * svc / capacity, "p95_s": p95,
            "p95_ratio": p95 / svc, "mean_ratio": mean_ratio(ok), "in_service": occupancy(lines, lo, hi),
            "refused": sum(1 for x in lines if x["status"] != 200 and lo <= x["arrived"] < hi),
            "limit_median": percentile(limits, 50),
            "limit_mean": sum(limits) / len(limits) if limits else math.nan}


def rolling_p95(lines: list[dict], since: float, until: float) -> list[tuple[float, float | None]]:
    """(t, p95 latency of requests that arrived after `since` and finished in (t - ROLLING_S, t])
    every SAMPLE_EVERY_S from `since`; None while too few such requests finished."""
    after = [x for x in lines if x["status"] == 200 and x["arrived"] >= since]
    out = []
    t = since + SAMPLE_EVERY_S
    while t <= until:
        lat = [x["finished"] - x["arrived"] for x in after if t - ROLLING_S < x["finished"] <= t]
        out.append((t, percentile(lat, 95) if len(lat) >= ROLLING_MIN_REQUESTS else None))
        t += SAMPLE_EVERY_S
    return out


def sliding_max(arrivals: list[tuple[float, int]], width: float) -> tuple[int, float]:
    """The most tokens in any window [a, a + width) starting at an arrival, and where it starts."""
    best, at, j, inside = 0, math.nan, 0, 0
    for i, (a, _) in enumerate(arrivals):
        while j < len(arrivals) and arrivals[j][0] < a + width:
            inside += arrivals[j][1]
            j += 1
        if inside > best:
            best, at = inside, a
        inside -= arrivals[i][1]
    return best, at


def mean_ratio(lines: list[dict]) -> float:
    """Mean latency / unloaded service time of these requests."""
    if not lines:
        return math.nan
    return sum(x["finished"] - x["arrived"] for x in lines) / len(lines) / service_time(lines)


def early_ratio(lines: list[dict]) -> float:
    """Latency / unloaded service time of a supervisor's first FIRST_ROUNDS answers: what its limit
    learnt as the service's unloaded latency (the average of its first rounds, made at its floor)."""
    first = sorted((x for x in lines if x["status"] == 200), key=lambda x: x["finished"])[:FIRST_ROUNDS]
    return mean_ratio(first)


def occupancy(lines: list[dict], lo: float, hi: float) -> float:
    """The mean number of these requests inside the service (waiting or served) over [lo, hi)."""
    return sum(max(0.0, min(x["finished"], hi) - max(x["arrived"], lo)) for x in lines) / (hi - lo)
