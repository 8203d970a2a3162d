"""SharedAdaptiveLimits across real forked processes: the limit holds, a dead worker's permits return."""
from __future__ import annotations

import multiprocessing
import os
import signal

from kgsupervisor.kg.permits import SharedAdaptiveLimits, Success

from .conftest import wait_for

CTX = multiprocessing.get_context("fork")
ENDPOINT = "http://kg.test"


def hammer(limits: SharedAdaptiveLimits, worker: int, inside, peak, rounds: int) -> None:
    """Take and give back permits `rounds` times, counting holders at once in `inside`."""
    for n in range(rounds):
        waits = n % 2 == 1  # half the takes block, half only try
        taken = (limits.acquire(ENDPOINT, worker, timeout=30) if waits
                 else limits.try_acquire(ENDPOINT, worker))
        if not taken:
            continue
        with inside.get_lock():
            inside.value += 1
            peak.value = max(peak.value, inside.value)
        os.sched_yield()  # let the others run while this one holds its permit
        with inside.get_lock():
            inside.value -= 1
        limits.release(ENDPOINT, worker, Success(0.1, 1000))
    os._exit(0)


def test_four_processes_never_hold_more_than_the_limit():
    limits = SharedAdaptiveLimits([ENDPOINT], min_limit=3, max_limit=3, workers=4)
    inside, peak = CTX.Value("i", 0), CTX.Value("i", 0)
    procs = [CTX.Process(target=hammer, args=(limits, w, inside, peak, 2000)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert 1 <= peak.value <= 3
    assert limits.in_use(ENDPOINT) == 0 and limits.waiting(ENDPOINT) == 0


def hold(limits: SharedAdaptiveLimits, worker: int, count: int, holding) -> None:
    """Take `count` permits, say so, and sleep until killed."""
    for _ in range(count):
        assert limits.try_acquire(ENDPOINT, worker)
    holding.set()
    signal.pause()


def wait_then_take(limits: SharedAdaptiveLimits, worker: int, got) -> None:
    if limits.acquire(ENDPOINT, worker, timeout=30):
        got.set()
    os._exit(0)


def test_a_killed_holders_permits_come_back_and_wake_a_waiter():
    limits = SharedAdaptiveLimits([ENDPOINT], min_limit=2, max_limit=2, workers=2)
    holding, got = CTX.Event(), CTX.Event()
    holder = CTX.Process(target=hold, args=(limits, 0, 2, holding))
    holder.start()
    assert holding.wait(30)
    waiter = CTX.Process(target=wait_then_take, args=(limits, 1, got))
    waiter.start()
    wait_for(lambda: limits.waiting(ENDPOINT) == 1, message="the waiter to wait")
    assert not got.is_set() and limits.in_use(ENDPOINT) == 2
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(30)
    assert limits.release_all_of(0) == 2
    assert got.wait(30)  # woken by the release (or, had the wake-up been lost, within WAKE_BOUND_S)
    waiter.join(30)
    assert limits.in_use(ENDPOINT) == 1 and limits.waiting(ENDPOINT) == 0


def die_inside_the_lock(limits: SharedAdaptiveLimits, worker: int) -> None:
    with limits._locked(worker):
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_killed_inside_the_lock_does_not_stop_the_others():
    limits = SharedAdaptiveLimits([ENDPOINT], min_limit=1, max_limit=1, workers=2)
    limits.lock_stuck_s = 0.1  # the wait before a take-over; nothing else holds the lock here
    dying = CTX.Process(target=die_inside_the_lock, args=(limits, 0))
    dying.start()
    dying.join(30)
    assert dying.exitcode == -signal.SIGKILL
    assert limits.release_all_of(0) == 0  # takes the dead worker's lock over, then lets it go
    assert limits.try_acquire(ENDPOINT, 1)


def test_outcomes_of_every_worker_move_one_limit():
    limits = SharedAdaptiveLimits([ENDPOINT, "http://other.test"], min_limit=1, max_limit=8, workers=2)
    child = CTX.Process(target=succeed_four_times, args=(limits,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert limits.limit(ENDPOINT) == 2 and limits.limit("http://other.test") == 1
    assert limits.factor_2_change(ENDPOINT) is None  # 1 -> 2 is a factor of two, not more: no log line


def succeed_four_times(limits: SharedAdaptiveLimits) -> None:
    for n in range(4):
        assert limits.try_acquire(ENDPOINT, 1)
        limits.release(ENDPOINT, 1, Success(0.1, 1000), now=0.1 * (n + 1))
    os._exit(0)
