"""The adaptive in-flight limit, driven by simulated KG services on a fake clock."""
from __future__ import annotations

import pytest

from kgsupervisor.kg.adaptive import DEFAULT_RTT_S, PROBE_WAIT_ROUNDS, ROUND_MIN_SAMPLES, AdaptiveLimit

from .adaptivesim import (ContendedHostService, QueueingService, ThrashingService, mixed_sizes, simulate,
                          simulate_clients)

CAPACITY = 4
S_PER_KCHAR = 0.1  # a 1,000-character document takes 100 ms alone


def fresh() -> AdaptiveLimit:
    return AdaptiveLimit(1, 16)


def share_of_time_within(run, low: int, high: int, start: float, end: float) -> float:
    """Fraction of [start, end) during which the limit was within [low, high]."""
    points = [(t, lim) for t, lim in run.limits if t < end]
    inside = sum(max(0.0, nxt[0] - max(t, start))
                 for (t, lim), nxt in zip(points, points[1:] + [(end, 0)]) if low <= lim <= high)
    return inside / (end - start)


def test_converges_near_capacity_and_stays_there():
    run = simulate(QueueingService(CAPACITY, S_PER_KCHAR, queue_limit=8), fresh(), 60)
    settled = next(t for t, lim in run.limits if lim >= CAPACITY)
    assert settled < 5
    assert all(CAPACITY - 1 <= lim <= CAPACITY + 1 for lim in run.limits_between(settled, 60))
    assert run.throughput(10, 60, S_PER_KCHAR) >= 0.95 * CAPACITY
    assert not run.refusals


def test_a_limit_not_in_use_does_not_grow():
    limit = fresh()
    simulate(QueueingService(CAPACITY, S_PER_KCHAR), limit, 30, workers=2)
    assert limit.limit == 3  # one over what two workers used: it grew while they filled it


def test_a_burst_of_503s_halves_the_limit_once_per_round_trip():
    limit = fresh()
    now = 0.0
    while limit.limit < 16:  # unloaded rounds: 100 ms a document, the limit climbs to the top
        now += 0.1
        limit.note_in_flight(limit.limit)
        limit.on_success(0.1, 1000, now)
    assert limit.rtt == pytest.approx(0.1)
    lowered = [limit.on_overload("503", now + i * 0.001, latency_s=0.001) for i in range(30)]
    assert lowered.count(True) == 1 and limit.limit == 8
    assert limit.on_overload("429", now + 0.2, latency_s=0.001) and limit.limit == 4  # a RTT later
    # A timeout of a request sent before that decrease, past one RTT: the old limit's doing.
    assert not limit.on_overload("timeout", now + 0.5, latency_s=5.0) and limit.limit == 4


def test_a_cold_endpoint_counts_overloads_once_per_default_rtt():
    limit = AdaptiveLimit(1, 16)
    limit.value = 16.0
    assert limit.on_overload("503", 10.0)
    assert not limit.on_overload("503", 10.0 + DEFAULT_RTT_S / 2)
    assert limit.on_overload("503", 10.0 + DEFAULT_RTT_S) and limit.limit == 4


def test_follows_a_capacity_halving_within_ten_seconds():
    service = QueueingService(8, S_PER_KCHAR, queue_limit=8)
    run = simulate(service, fresh(), 60, events={30.0: lambda: setattr(service, "capacity", 4)})
    assert max(run.limits_between(20, 30)) <= 8 + 2  # at capacity 8, one queued adds only 1/8
    assert all(3 <= lim <= 5 for lim in run.limits_between(40, 60))
    assert max(run.limits_between(31, 60)) <= 5
    latencies = run.latencies(40, 60)
    assert latencies[len(latencies) // 2] <= 1.5 * S_PER_KCHAR


def test_mixed_document_sizes_do_not_fool_it():
    run = simulate(QueueingService(CAPACITY, S_PER_KCHAR), fresh(), 120, sizes=mixed_sizes())
    assert share_of_time_within(run, CAPACITY - 1, CAPACITY + 1, 10, 120) >= 0.9
    assert abs(run.mean_limit(10, 120) - CAPACITY) <= 0.75
    assert run.throughput(10, 120, S_PER_KCHAR) >= 0.9 * CAPACITY


@pytest.mark.parametrize("sizes", [None, mixed_sizes()], ids=["1000 chars", "mixed sizes"])
def test_a_thrashing_service_is_held_near_its_knee(sizes):
    kwargs = {"sizes": sizes} if sizes else {}
    run = simulate(ThrashingService(CAPACITY, S_PER_KCHAR), fresh(), 60, **kwargs)
    assert all(CAPACITY - 1 <= lim <= CAPACITY + 1 for lim in run.limits_between(10, 60))
    # Throughput falls past the knee (16 in service would give half): adaptive keeps ~0.95.
    assert run.throughput(10, 60, S_PER_KCHAR) >= 0.9 * CAPACITY


def test_a_slower_model_is_learnt_once_the_baseline_window_passes():
    service = QueueingService(CAPACITY, S_PER_KCHAR)
    run = simulate(service, fresh(), 240, events={30.0: lambda: setattr(service, "s_per_kchar", 0.2)})
    assert min(run.limits_between(30, 60)) == 1  # twice as slow looks like overload at first
    assert all(3 <= lim <= 5 for lim in run.limits_between(150, 240))
    assert run.throughput(150, 240, 0.2) >= 0.95 * CAPACITY


def test_a_move_by_more_than_a_factor_of_two_is_reported_once():
    limit = fresh()
    assert limit.factor_2_change() is None
    limit.value = 2.0
    assert limit.factor_2_change() is None  # exactly twice: not more than a factor of two
    limit.value = 3.0
    assert limit.factor_2_change() == (1, 3)
    assert limit.factor_2_change() is None
    limit.value = 2.0
    assert limit.factor_2_change() is None
    limit.value = 1.0
    assert limit.factor_2_change() == (3, 1)


def test_rounds_wait_for_requests_sent_under_the_current_limit():
    limit = fresh()
    for i in range(ROUND_MIN_SAMPLES):
        limit.note_in_flight(1)
        limit.on_success(0.1, 1000, 0.1 * (i + 1))
    assert limit.limit == 2 and limit.changed_at == pytest.approx(0.4)
    for i in range(ROUND_MIN_SAMPLES):  # each sent before the change: not this limit's evidence
        limit.on_success(0.3, 1000, 0.45 + i * 0.01)
    assert limit.limit == 2 and limit.round_count == 0


@pytest.mark.parametrize("args, message", [((0, 4), "expected 1 <= min (0) <= max (4)"),
                                           ((5, 4), "expected 1 <= min (5) <= max (4)")])
def test_limits_out_of_order_are_refused_in_one_line(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        AdaptiveLimit(*args)


def test_an_unknown_overload_kind_is_refused():
    with pytest.raises(ValueError, match="expected one of 429, 503, timeout, got '500'"):
        fresh().on_overload("500", 1.0)


def p95(latencies: list[float]) -> float:
    return latencies[int(0.95 * (len(latencies) - 1))]


@pytest.mark.parametrize("capacity", [2, 4, 8, 16])
def test_once_settled_nothing_queues_inside_the_service(capacity):
    workers = max(16, 2 * capacity)  # more workers than the service takes: the limit must hold them back
    service = QueueingService(capacity, S_PER_KCHAR, queue_limit=8)
    run = simulate(service, AdaptiveLimit(1, workers), 90, workers=workers)
    assert p95(run.latencies(30, 90)) <= 1.5 * S_PER_KCHAR  # one queued request would make it 2x
    assert run.throughput(30, 90, S_PER_KCHAR) >= 0.95 * capacity
    assert not run.refusals


@pytest.mark.parametrize("capacity", [2, 4, 8, 16])
def test_a_thrashing_service_keeps_its_throughput_at_every_capacity(capacity):
    workers = max(16, 2 * capacity)
    run = simulate(ThrashingService(capacity, S_PER_KCHAR), AdaptiveLimit(1, workers), 90, workers=workers)
    assert run.throughput(30, 90, S_PER_KCHAR) >= 0.9 * capacity
    assert p95(run.latencies(30, 90)) <= 1.5 * S_PER_KCHAR


def test_a_failed_probe_of_the_ceiling_doubles_the_wait_before_the_next():
    limit = fresh()
    limit.value, limit.ceiling, limit.probe_wait = 5.0, 5.0, 4.0
    limit.on_overload("503", 1.0)
    assert limit.value == 2.5 and limit.ceiling == 5 and limit.probe_wait == 8
    limit.value = 5.0
    limit.on_overload("503", 3.0)
    assert limit.probe_wait == 8  # doubling stops at eight rounds
    limit.value = 4.0
    limit.on_overload("503", 5.0)  # a shrink below the ceiling: the service changed, learn anew
    assert limit.ceiling == 4 and limit.probe_wait == PROBE_WAIT_ROUNDS


# At capacity 2 a quarter permit is an eighth of the service, and a request that waits waits up to
# a whole service time: the p95 there is bounded by 2 x (one queued request), not 1.5 x
# (docs/capacity.md says so).
P95_BOUND = {2: 2.0, 4: 1.5, 8: 1.5, 16: 1.5}


@pytest.mark.parametrize("capacity", [2, 4, 8, 16])
def test_a_jittery_service_is_not_taken_for_a_queueing_one(capacity):
    # +-20% service time a document: the lowest single round of a window would sit far below a
    # typical one, and every round look queued (measured: 0.28-0.83 x capacity before).
    workers = max(16, 2 * capacity)
    service = QueueingService(capacity, S_PER_KCHAR, queue_limit=8, jitter=0.2, seed=capacity)
    run = simulate(service, AdaptiveLimit(1, workers), 90, workers=workers, seed=capacity)
    assert run.throughput(30, 90, S_PER_KCHAR) >= 0.9 * capacity
    # alone: 1.19 x, one queued: ~1.2 + 1/C
    assert p95(run.latencies(30, 90)) <= P95_BOUND[capacity] * S_PER_KCHAR
    assert not run.refusals


def test_a_few_ms_of_host_contention_is_not_taken_for_queueing():
    # A 1.4 ms service on the workers' own host: each request in service slows the others by 10%
    # (measured on 2 cores: 1.4 ms with 1 worker, 2.4 ms with 8) and nothing ever queues; read as
    # queueing, the rise held the limit at 1-3 of 8 workers and cost 15-20% of the throughput.
    s_per_kchar, workers = 0.0014, 8
    run = simulate(ContendedHostService(s_per_kchar), AdaptiveLimit(1, workers), 30, workers=workers)
    assert run.mean_limit(5, 30) >= workers - 0.5
    all_sending = workers / (1 + 0.1 * (workers - 1))  # the service's throughput with every worker in it
    assert run.throughput(5, 30, s_per_kchar) >= 0.95 * all_sending


def test_a_limit_between_whole_permits_opens_the_last_one_that_share_of_the_time():
    limit = fresh()
    limit.value, limit.changed_at = 4.25, 1e9  # answers sent "before" a change: no round ends
    permits = []
    for _ in range(400):
        limit.on_success(0.1, 1000, 10.0)
        permits.append(limit.limit)
    assert permits.count(5) == 100 and permits.count(4) == 300


@pytest.mark.parametrize("capacity", [2, 4, 8, 16])
def test_a_permit_held_outside_the_request_still_keeps_the_service_busy(capacity):
    # A worker holds its permit some milliseconds past the answer (write-back, next claim): with
    # whole permits, C left a capacity-C service idle that share of the time and C + 1 queued
    # (measured: 0.94 x capacity at 4 permits, p95 > 1.5 x at 5); a quarter permit fits between.
    # At capacity 2 it does not: 2 idles 6%, 2.25 queues one request in fourteen.
    workers = max(16, 2 * capacity)
    service = QueueingService(capacity, S_PER_KCHAR, queue_limit=8)
    run = simulate(service, AdaptiveLimit(1, workers), 90, workers=workers, held_outside_s=0.006)
    assert run.throughput(30, 90, S_PER_KCHAR) >= (0.9 if capacity == 2 else 0.95) * capacity
    assert p95(run.latencies(30, 90)) <= P95_BOUND[capacity] * S_PER_KCHAR


@pytest.mark.parametrize("second_starts, jitter, held_outside_s, seed", [
    (1, 0.0, 0.01, 1), (1, 0.2, 0.0, 2), (0, 0.05, 0.008, 3), (60, 0.1, 0.01, 1), (1, 0.1, 0.01, 4)],
    ids=["1 s apart", "jittery", "together", "a minute apart", "10% jitter"])
def test_two_supervisors_on_one_service_converge_on_a_fair_share(second_starts, jitter, held_outside_s, seed):
    # Each adapts on its own. Measured before Vegas's rule: 1.27 / 0.73 and 0.59 / 1.41 over the
    # window in the first two cases; before its steps were counted in round trips, some 30 s windows
    # 1.6 x apart in all but the first case (a limit of 2 stepped half as often as one of 4).
    capacity = 6
    service = QueueingService(capacity, S_PER_KCHAR, queue_limit=12, jitter=jitter, seed=seed)
    runs = simulate_clients(service, [fresh(), fresh()], 300, starts=[0, second_starts],
                            held_outside_s=held_outside_s, seed=seed)
    fair = capacity / 2
    settled = second_starts + 60
    shares = [run.throughput(settled, 300, S_PER_KCHAR) / fair for run in runs]
    assert all(0.75 <= share <= 1.25 for share in shares), shares
    assert sum(shares) * fair >= 0.95 * capacity
    for start in range(settled, 300 - 29, 30):
        window = [run.throughput(start, start + 30, S_PER_KCHAR) / fair for run in runs]
        assert all(0.75 <= share <= 1.25 for share in window), (start, window)
