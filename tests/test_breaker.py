"""The circuit breaker, driven by a fake clock."""
from __future__ import annotations

from kgsupervisor.kg.breaker import BreakerState, CircuitBreaker


def test_opens_after_threshold_and_probes_with_growing_backoff():
    b = CircuitBreaker(threshold=3, probe_base=1.0, probe_cap=8.0)
    assert not b.record_failure(0.0) and not b.record_failure(0.0)
    assert b.record_failure(0.0) and b.state is BreakerState.OPEN
    assert not b.probe_due(0.5) and b.probe_due(1.3)
    delays = []
    now = 0.0
    for _ in range(6):
        now = b.next_probe_at
        b.record_failure(now)
        delays.append(b.next_probe_at - now)
    assert 8.0 * 0.8 <= delays[-1] <= 8.0 * 1.2, "capped"
    assert delays[0] < delays[2], "growing"


def test_a_success_closes_and_resets():
    b = CircuitBreaker(threshold=1)
    b.record_failure(0.0)
    assert b.is_open
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.consecutive_failures == 0 and not b.probe_due(100.0)


def test_retry_after_opens_at_once_and_delays_the_probe():
    b = CircuitBreaker(threshold=5, probe_base=0.5)
    assert b.record_failure(10.0, retry_after=30.0)
    assert not b.probe_due(39.0) and b.probe_due(40.0)


def test_a_trial_after_a_probe_closes_on_success_and_reopens_with_a_longer_wait_on_failure():
    b = CircuitBreaker(threshold=1, probe_base=1.0, probe_cap=8.0)
    b.record_failure(0.0)
    first_wait = b.next_probe_at
    b.allow_trial()
    assert b.is_half_open and not b.is_open
    assert not b.record_failure(first_wait), "a failed trial is no new opening"
    assert b.is_open and b.next_probe_at - first_wait > 1.0 * 1.2, "the probe backoff kept growing"
    b.allow_trial()
    b.record_success()
    assert b.state is BreakerState.CLOSED


def test_allow_trial_does_nothing_to_a_closed_breaker():
    b = CircuitBreaker()
    b.allow_trial()
    assert b.state is BreakerState.CLOSED
