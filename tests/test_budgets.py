"""RateBudgets: no sliding window goes over budget (fake clock, and four real forked spenders),
the budget is used almost fully, and waiting for budget spends nothing until it spends."""
from __future__ import annotations

import json
import multiprocessing
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kgsupervisor.kg.budgets import Budget, OverBudget, RateBudgets, estimated_tokens

CTX = multiprocessing.get_context("fork")
TPM = 100_000
RPM = 40


class FakeClock:
    """Monotonic seconds that move only when a spender sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def budgets_on(clock: FakeClock, budget: Budget, shared: bool = False) -> RateBudgets:
    return RateBudgets({"kg": budget}, clock=clock, sleep=clock.sleep, shared=shared)


def greedy_run(budgets: RateBudgets, clock: FakeClock, minutes: int, seed: int) -> list[tuple[int, int]]:
    """(ms spent at, tokens) of a spender that always has a document waiting, 800-40,000 chars."""
    rng = random.Random(seed)
    spent = []
    while clock.now < minutes * 60:
        chars = rng.randint(800, 40_000)
        assert budgets.wait_for("kg", chars, deadline=clock.now + 120)
        spent.append((round(budgets.last_spent_at * 1000), budgets.tokens(chars)))
    return spent


def worst_window(spent: list[tuple[int, int]], window_ms: int) -> tuple[int, int]:
    """The most (requests, tokens) stamped within any closed window of `window_ms`: the worst
    window starts at some spend, so starting one at each spend covers every window."""
    stamps = sorted(spent)
    most_requests = most_tokens = 0
    for start, _ in stamps:
        inside = [tokens for stamp, tokens in stamps if start <= stamp <= start + window_ms]
        most_requests, most_tokens = max(most_requests, len(inside)), max(most_tokens, sum(inside))
    return most_requests, most_tokens


@pytest.fixture(scope="module")
def token_run() -> Iterator[tuple[list[tuple[int, int]], FakeClock]]:
    """Ten simulated minutes of a greedy spender on a tokens-per-minute budget."""
    clock = FakeClock()
    budgets = budgets_on(clock, Budget(tokens_per_minute=TPM))
    yield greedy_run(budgets, clock, minutes=10, seed=17), clock


def test_no_sixty_second_window_sends_more_than_the_token_budget(token_run):
    spent, _ = token_run
    assert worst_window(spent, 60_000)[1] <= TPM
    assert worst_window(spent, 60_000)[1] > 0.95 * TPM  # the bound was reached, so it was tested


def test_steady_throughput_is_at_least_95_percent_of_the_token_budget(token_run):
    spent, clock = token_run
    # After the first minute's burst, every minute is paced by the entries leaving the window.
    steady = sum(tokens for stamp, tokens in spent if 60_000 < stamp <= 600_000)
    assert steady >= 0.95 * TPM * 9


def test_requests_per_minute_hold_with_tokens_on_the_same_endpoint():
    clock = FakeClock()
    budgets = budgets_on(clock, Budget(requests_per_minute=RPM, tokens_per_minute=TPM * 10))
    spent = greedy_run(budgets, clock, minutes=5, seed=3)
    most_requests, _ = worst_window(spent, 60_000)
    assert most_requests == RPM
    assert sum(1 for stamp, _ in spent if 60_000 < stamp <= 300_000) >= 0.95 * RPM * 4


def test_the_window_is_closed_and_the_wait_is_exact():
    clock = FakeClock()
    budgets = budgets_on(clock, Budget(tokens_per_minute=10))
    assert budgets.try_spend("kg", 40)  # 10 tokens: the whole budget
    clock.now = 60.0
    assert not budgets.try_spend("kg", 1)  # an entry stamped 60 s ago is still in the window
    assert budgets.next_free_at("kg", 1) == pytest.approx(60.001)
    clock.now = 60.001
    assert budgets.try_spend("kg", 1)
    assert budgets.used("kg") == {"tokens": 1}


def test_a_refused_request_spends_nothing_of_either_kind():
    clock = FakeClock()
    budgets = budgets_on(clock, Budget(requests_per_minute=5, tokens_per_minute=100))
    assert budgets.try_spend("kg", 360)  # 90 tokens
    assert not budgets.try_spend("kg", 80)  # 20 tokens: no room for them, so no request is spent
    assert budgets.used("kg") == {"requests": 1, "tokens": 90}


def test_waiting_past_the_deadline_gives_up_at_once_and_spends_nothing():
    clock = FakeClock()
    budgets = budgets_on(clock, Budget(tokens_per_minute=100))
    assert budgets.try_spend("kg", 400)
    assert not budgets.wait_for("kg", 4, deadline=30.0)
    assert clock.now == 0.0  # it did not sleep towards a room it knew came too late
    assert budgets.wait_for("kg", 4, deadline=61.0)
    assert clock.now == pytest.approx(60.001)


def test_a_document_bigger_than_the_whole_budget_is_refused_with_one_line():
    budgets = budgets_on(FakeClock(), Budget(tokens_per_minute=1000))
    with pytest.raises(OverBudget, match=r"^kg tokens: 1001 needed, the whole budget is 1000 a window$"):
        budgets.try_spend("kg", 4001)


def test_an_endpoint_without_a_budget_is_never_held_back():
    budgets = budgets_on(FakeClock(), Budget(tokens_per_minute=1))
    assert all(budgets.try_spend("other", 10_000) for _ in range(100))
    assert estimated_tokens(9) == 3  # rounded up: an estimate errs towards the budget


def spend_documents(budgets: RateBudgets, worker: int, count: int, out: Path) -> None:
    """A forked worker: spends `count` documents as fast as the shared budget allows."""
    rng = random.Random(worker)
    with out.open("w") as f:
        for _ in range(count):
            chars = rng.randint(400, 1600)
            if not budgets.wait_for("kg", chars, deadline=time.monotonic() + 30):
                raise SystemExit(3)
            f.write(json.dumps([round(budgets.last_spent_at * 1000), budgets.tokens(chars), worker]) + "\n")


def test_four_forked_processes_share_one_budget_and_never_exceed_it(tmp_path):
    budgets = RateBudgets({"kg": Budget(requests_per_minute=6, tokens_per_minute=1000)}, window_s=0.5)
    try:
        outs = [tmp_path / f"spent-{w}.jsonl" for w in range(4)]
        procs = [CTX.Process(target=spend_documents, args=(budgets, w, 5, outs[w])) for w in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * 4
        lines = [json.loads(line) for out in outs for line in out.read_text().splitlines()]
        spent = [(stamp, tokens) for stamp, tokens, _ in lines]
        assert len(spent) == 20
        most_requests, most_tokens = worst_window(spent, 500)
        assert most_requests <= 6 and most_tokens <= 1000
        # A full window holds over 600 tokens (the next document, 400 at most, did not fit): the
        # bound was reached, and by several processes within one window, so they did contend.
        assert most_tokens > 600
        assert max(len({w for stamp, _, w in lines if start <= stamp <= start + 500})
                   for start, _, _ in lines) >= 2
    finally:
        budgets.close()
