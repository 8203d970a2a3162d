"""The adaptive in-flight limit of one KG endpoint: AIMD steered by a size-normalised latency gradient.

The limit shrinks multiplicatively on overload (429, 503, a timeout) or when latency rises well
above the endpoint's unloaded latency, as Netflix concurrency-limits' Gradient2 and Envoy's adaptive
concurrency filter do. Between those big moves it steps by a quarter permit to keep about half a
request of its own waiting in the service, as TCP Vegas does: every limit on one service then
holds the same number of permits, so several hosts adapting on their own share it fairly.
Latency is compared per 1,000 characters, since documents differ in size.

The state is a handful of doubles in a sequence the caller may place in shared memory (see
kgsupervisor.kg.permits), so the outcomes of every worker of a supervisor move one limit.
Pure: every method takes `now` (monotonic seconds), so tests drive it with a fake clock.
"""
from __future__ import annotations

import math
from collections.abc import MutableSequence

OVERLOAD_KINDS = ("429", "503", "timeout")

# A round ends after max(limit, ROUND_MIN_SAMPLES) successes: about one round trip of every
# permit, so each decision sees the load the current limit makes. Four samples at least, because
# at limit 1 a single document's noise would decide alone (the mean of four halves it).
ROUND_MIN_SAMPLES = 4
# The limit moves in quarter permits: the permit past its whole part is open for that share of
# the time (4.25: a fifth request a quarter of the time). Whole permits cannot match a service
# whose capacity lies between them: a worker holds its permit a few milliseconds outside the request,
# so at 4 permits a capacity-4 service idles 6% of the time, and at 5 a request queues too often
# for the p95 (measured, docs/benchmarks.md section 11). And two limits can only share a capacity
# of 6 as 3 + 3 or in a lopsided split when the time outside calls for 6.5 between them.
STEP = 0.25
# Vegas's rule (after slow start: a whole permit a round while nothing waits, until the first
# decrease, as TCP starts): a limit L whose rounds take `ratio` x the baseline has L x (1 - 1/ratio)
# of its own requests waiting in the service. A limit steps down while that averages over
# QUEUED_HIGH, and up while it is under QUEUED_LOW: each of several clients then keeps the same few
# tenths of a request waiting, so they hold the same number of permits whenever they read the same
# baseline (the one that holds more has more waiting and is the one that steps down). Decided on the
# moving average (QUEUED_GAIN) over QUEUED_ROUNDS round trips at least since the limit last moved.
# A noisy endpoint lifts both bounds to QUEUED_NOISES x L x the rounds' deviation: the baseline is a
# low round, so typical rounds sit above it, by a whole request's worth at limit 16 and 20% jitter.
QUEUED_LOW = 0.3
QUEUED_HIGH = 0.5
QUEUED_GAIN = 0.2
QUEUED_ROUNDS = 4
QUEUED_NOISES = 2.0
# The big moves: shrink once a round's latency per kchar is 20% over the baseline: at small limits,
# the noise of a round's mean on an idle service stays below that. A round counts towards the
# baseline only while within 15% of it (GROW_BELOW, see _learn_baseline).
GROW_BELOW = 1.15
SHRINK_ABOVE = 1.2
# One request queued behind C in service adds 1/C to the ratio, which at C = 8 or more falls below
# those margins: the limit would park a few over the knee, every request queueing (p95 = twice the
# service time). So the margins also shrink with the limit L: a round feeds the baseline only
# below a quarter of a queued request's worth (1 + 0.25/L), a big shrink needs nearly a whole one
# (1 + 0.9/L); the steps between are Vegas's above...
GROW_QUEUED_SHARE = 0.25
SHRINK_QUEUED_SHARE = 0.9
# ... but never below a few times the endpoint's round-to-round noise (the mean absolute deviation
# of a round's ratio from its moving average): the baseline is the lowest round of a window, so
# typical rounds sit a few deviations above it, and a tight margin would take jitter for queueing
# and walk the limit down to the floor. With a noisy service the margins widen back towards
# GROW_BELOW and SHRINK_ABOVE.
GROW_NOISES = 4.0
SHRINK_NOISES = 6.0
NOISE_GAIN = 0.1  # EWMA gain of the ratio's average and deviation: some ten rounds
# After a shrink from L, L is a ceiling: the limit climbs back to a step below as usual, but tries L
# again only after PROBE_WAIT_ROUNDS good rounds in a row, twice as many after each failed try (up to
# PROBE_WAIT_MAX_ROUNDS), as TCP probes slowly near its last loss. A probe costs a round or two of a
# quarter of a queued request, so 8 rounds apart is below the p95; longer waits let two clients
# that probe in step park both a step under their share (0.91 x capacity in simulation at 64).
# A good round at the ceiling lifts it. A Vegas step down sets a ceiling too, without a longer wait.
PROBE_WAIT_ROUNDS = 2
PROBE_WAIT_MAX_ROUNDS = 8
# A latency shrink goes to limit / ratio: by Little's law, with the service at capacity latency
# grows with the requests in flight, so that is the in-flight count that meets the baseline again.
# Never more than halving in one step: one bad round is weak evidence.
LATENCY_BACKOFF_FLOOR = 0.5
# 429, 503 and timeouts are the service saying it is full: halve, as TCP does on loss.
OVERLOAD_BACKOFF = 0.5
# The baseline is the lowest (averaged) round mean seen in the last one to two windows (two buckets that
# rotate): long enough that a busy spell does not lift it, short enough that a slower model after
# a reload is learnt within two minutes rather than holding the limit at its floor for good.
BASELINE_WINDOW_S = 60.0
# The minimum is of a moving average of some ten rounds, not of single rounds: with a jittery
# service (+-20% a document) the lowest of the hundreds of rounds in a window sits several
# deviations below a typical one: every round then looks queued and the limit sinks to a fraction of
# capacity. Only rounds within the grow margin feed the average (a queued round would lift it, and
# the limit with it), except at the floor, where a slower service is what there is to learn.
BASELINE_ROUNDS = 10
# A rise of a few milliseconds a request is not read as queueing, however large as a ratio: against a
# service that answers in 1-2 ms on the same host, latency rises with concurrency because clients and
# service share the CPUs (measured on 2 cores: 1.4 ms a request with 1 worker, 2.4 ms with 8, nothing
# refused), and reading that as queueing held the limit at 1-3 of 8 workers and cost 15-20% of the
# throughput. A queue that small costs no timeout and no thrash; at 100 ms a document one request
# queued behind 16 adds 6 ms, still seen. The limit shrinks only past SHRINK_ALLOWANCE_S and may grow
# while the rise stays under half of it (or within the ratio margin).
SHRINK_ALLOWANCE_S = 0.004
# The round-trip time (smoothed latency) bounds decreases to one per RTT; before any success,
# assume one second so a storm of 503s on a cold endpoint still counts once a second at most.
DEFAULT_RTT_S = 1.0
RTT_GAIN = 0.2  # EWMA gain of the RTT: the last five or so requests dominate

# Slots of the state, in order; a limit reads and writes state[offset + index].
FIELDS = ("value", "min_previous", "min_current", "bucket_started", "round_latency", "round_kchars",
          "round_count", "round_peak", "changed_at", "decreased_at", "rtt", "logged", "ceiling",
          "probe_wait", "good_rounds", "ratio_average", "noise", "smoothed", "rounds_seen", "credit",
          "extra", "queued", "rounds_at_value", "slow_start")
_INDEX = {name: i for i, name in enumerate(FIELDS)}


def shown(value: float) -> float | int:
    """A limit for people: 4 rather than 4.0, 4.25 as it is."""
    return int(value) if value == int(value) else round(value, 2)


def _field(name: str) -> property:
    index = _INDEX[name]

    def get(self: AdaptiveLimit) -> float:
        return self._state[self._offset + index]

    def put(self: AdaptiveLimit, value: float) -> None:
        self._state[self._offset + index] = value
    return property(get, put)


class AdaptiveLimit:
    """The in-flight limit of one endpoint, between min_limit and max_limit, moved by outcomes.

    Its state lives in `state[offset:offset + len(FIELDS)]` (a list of its own by default); whoever
    passes shared state calls reset() once, and holds a lock around every call.
    """

    value = _field("value")  # the limit, a multiple of STEP
    min_previous = _field("min_previous")  # lowest average round mean (s per kchar), last bucket
    min_current = _field("min_current")  # ... of the bucket in progress
    bucket_started = _field("bucket_started")
    round_latency = _field("round_latency")  # sum of latencies in the round (s)
    round_kchars = _field("round_kchars")  # sum of their sizes (thousands of characters)
    round_count = _field("round_count")
    round_peak = _field("round_peak")  # most requests in flight seen during the round
    changed_at = _field("changed_at")  # requests sent before this saw another limit
    decreased_at = _field("decreased_at")
    rtt = _field("rtt")  # smoothed latency of successes (s); 0 until the first
    logged = _field("logged")  # the limit last reported by factor_2_change
    ceiling = _field("ceiling")  # the limit last shrunk from: too many then; inf when none
    probe_wait = _field("probe_wait")  # good rounds at ceiling - 1 before trying the ceiling again
    good_rounds = _field("good_rounds")  # ... seen in a row so far
    ratio_average = _field("ratio_average")  # moving average of rounds' latency / baseline; 0 before
    noise = _field("noise")  # moving mean absolute deviation of a round's ratio from that average
    smoothed = _field("smoothed")  # moving average of unloaded round means (s per kchar)
    rounds_seen = _field("rounds_seen")  # rounds averaged into it, up to BASELINE_ROUNDS
    credit = _field("credit")  # the fractional part of the value, accrued an outcome at a time
    extra = _field("extra")  # 1 while the permit past the whole part is open
    queued = _field("queued")  # moving average of this limit's requests waiting in the service
    rounds_at_value = _field("rounds_at_value")  # rounds ended since the value last moved
    slow_start = _field("slow_start")  # 1 until the first decrease

    def __init__(self, min_limit: int, max_limit: int, state: MutableSequence[float] | None = None,
                 offset: int = 0) -> None:
        if not 1 <= min_limit <= max_limit:
            raise ValueError(f"in-flight limits: expected 1 <= min ({min_limit}) <= max ({max_limit})")
        self.min_limit = min_limit
        self.max_limit = max_limit
        self._state: MutableSequence[float] = [0.0] * len(FIELDS) if state is None else state
        self._offset = offset
        if state is None:
            self.reset()

    def reset(self) -> None:
        """Start at the floor, with nothing learnt (state in fresh shared memory is all zeros)."""
        for i in range(len(FIELDS)):
            self._state[self._offset + i] = 0.0
        self.value = self.logged = float(self.min_limit)
        self.slow_start = 1.0
        self.min_previous = self.min_current = self.ceiling = math.inf
        self.probe_wait = float(PROBE_WAIT_ROUNDS)
        self.changed_at = self.decreased_at = -math.inf

    @property
    def limit(self) -> int:
        """The permits to hand out now: the whole part, and one more for a share of the time."""
        return math.floor(self.value) + int(self.extra)

    def shown(self) -> float | int:
        """The limit as status and metrics show it: 4 or 4.25."""
        return shown(self.value)

    def _open_or_close_extra(self) -> None:
        """Each outcome opens the permit past the whole part with the value's fractional share."""
        self.credit += self.value - math.floor(self.value)
        self.extra = 1.0 if self.credit >= 1 else 0.0
        self.credit -= self.extra

    def baseline(self) -> float:
        """Seconds per kchar of an unloaded round lately; inf before the first round."""
        lowest = min(self.min_previous, self.min_current)
        return self.smoothed if lowest == math.inf and self.rounds_seen else lowest  # young: the average

    def note_in_flight(self, in_flight: int) -> None:
        """A request was sent with `in_flight` in flight: only a limit in use may grow (an idle
        endpoint's limit would otherwise climb to the maximum, and the next burst meet none)."""
        self.round_peak = max(self.round_peak, float(in_flight))

    def on_success(self, latency_s: float, chars: int, now: float) -> None:
        """A request of `chars` characters was answered in `latency_s` seconds."""
        self.rtt = latency_s if self.rtt == 0 else self.rtt + RTT_GAIN * (latency_s - self.rtt)
        self._open_or_close_extra()
        if now - latency_s < self.changed_at:
            return  # sent under the previous limit: it says nothing of this one
        self.round_latency += latency_s
        self.round_kchars += max(chars, 1) / 1000
        self.round_count += 1
        if self.round_count >= max(math.floor(self.value), ROUND_MIN_SAMPLES):
            self._end_round(now)

    def on_overload(self, kind: str, now: float, latency_s: float = 0.0) -> bool:
        """The service refused (429, 503) or timed out; True when this lowered the limit.

        One decrease per round trip at most, and none for requests sent before the last one:
        a burst of 503s is one signal, not one per request.
        """
        if kind not in OVERLOAD_KINDS:
            raise ValueError(f"overload kind: expected one of {', '.join(OVERLOAD_KINDS)}, got {kind!r}")
        self._open_or_close_extra()
        rtt = self.rtt or DEFAULT_RTT_S
        if now - self.decreased_at < rtt or now - latency_s < self.decreased_at:
            return False
        self._decrease(OVERLOAD_BACKOFF, now)
        return True

    def factor_2_change(self) -> tuple[float, float] | None:
        """(limit last reported, limit now) when the limit moved by more than a factor of 2 since
        the last report, which this records; else None. For the caller's log line."""
        before, now = self.logged, self.value
        if now <= 2 * before and 2 * now >= before:
            return None
        self.logged = now
        return before, now

    def _end_round(self, now: float) -> None:
        mean = self.round_latency / self.round_kchars
        kchars_a_request = self.round_kchars / self.round_count
        saturated = self.round_peak >= math.floor(self.value)
        filled = self.round_peak >= math.ceil(self.value)  # the permit past the whole part too
        self._learn_baseline(mean, now)
        baseline = self.baseline()
        ratio = mean / baseline
        rise_s = (mean - baseline) * kchars_a_request  # seconds a request over the baseline
        self._clear_round()
        below_ceiling = self.value < self.ceiling
        queued = self._note_queued(self.value * (1 - 1 / ratio))
        settled = self.rounds_at_value >= self._rounds_to_settle()
        high = max(QUEUED_HIGH, QUEUED_NOISES * self.value * self.noise)
        unloaded = ratio <= self._margin(GROW_BELOW, GROW_QUEUED_SHARE, GROW_NOISES)
        few_ms = rise_s < SHRINK_ALLOWANCE_S / 2  # host contention, not queueing
        if ratio >= self._margin(SHRINK_ABOVE, SHRINK_QUEUED_SHARE, SHRINK_NOISES) \
                and rise_s >= SHRINK_ALLOWANCE_S:
            self._decrease(max(LATENCY_BACKOFF_FLOOR, 1 / ratio), now)
        elif saturated and self.slow_start and (unloaded or few_ms):
            self._grow(now, filled, 1.0)
        elif settled and queued > high and not few_ms:
            self._step_down(now)
        elif saturated and settled and (queued < high - (QUEUED_HIGH - QUEUED_LOW) or few_ms):
            self._grow(now, filled)
        if below_ceiling:  # a probe's round has a queued request: a step, not noise
            self._note_noise(ratio)

    def _rounds_to_settle(self) -> int:
        """QUEUED_ROUNDS round trips' worth of rounds. Below ROUND_MIN_SAMPLES permits a round spans
        several round trips; counted in rounds, a limit of 2 would step half as often as one of 4,
        and the bigger of two supervisors on one service outgrow the smaller (measured: 1.6 x apart
        for minutes; with steps counted in round trips, fair in 13-17 of 17 spans of 10 s)."""
        whole = max(1, math.floor(self.value))
        return math.ceil(QUEUED_ROUNDS * whole / max(whole, ROUND_MIN_SAMPLES))

    def _note_queued(self, queued: float) -> float:
        """Average this limit's requests waiting in the service over the rounds at this value."""
        self.rounds_at_value += 1
        self.queued = queued if self.rounds_at_value == 1 else \
            self.queued + QUEUED_GAIN * (queued - self.queued)
        return self.queued

    def _note_noise(self, ratio: float) -> None:
        """Track the rounds' ratio and how far a round strays from it."""
        if self.ratio_average == 0:
            self.ratio_average = ratio
        self.noise += NOISE_GAIN * (abs(ratio - self.ratio_average) - self.noise)
        self.ratio_average += NOISE_GAIN * (ratio - self.ratio_average)

    def _margin(self, widest: float, queued_share: float, noises: float) -> float:
        """A ratio threshold: a share of one queued request at this limit, or more when the
        endpoint is noisy, but never past `widest`."""
        return 1 + min(widest - 1, max(queued_share / self.value, noises * self.noise))

    def _grow(self, now: float, filled: bool, step: float = STEP) -> None:
        """A step up after a good round; next to the ceiling, only after probe_wait good rounds.
        `filled`: the round had every permit in use, the one past the whole part included."""
        if self.value >= self.ceiling:  # a good round at the ceiling: the room is real now...
            if not filled:
                return  # ... if the round used it: at 2.25, most rounds have 2 in flight
            self.ceiling = math.inf
            self.probe_wait = float(PROBE_WAIT_ROUNDS)
        elif self.value + step >= self.ceiling:
            self.good_rounds += 1
            if self.good_rounds < self.probe_wait:
                return
        self.good_rounds = 0
        self._move_to(self.value + step, now)

    def _step_down(self, now: float) -> None:
        """A step down: more of this limit's requests wait than its share. The value left is a
        ceiling, probed again after the usual wait (not a longer one: no overload was seen)."""
        self.decreased_at = now
        self.slow_start = 0.0
        before = self.value
        self._move_to(self.value - STEP, now)
        if self.value < before:
            self.ceiling = before
            self.good_rounds = 0

    def _learn_baseline(self, mean: float, now: float) -> None:
        """Average the round means that look unloaded, and keep the lowest average of the window.

        A round over the grow margin may be queueing, not the service's speed, unless the limit is at
        its floor: then the service itself is slower (a reload, another tenant), and is learnt.
        """
        if mean > self.baseline() * self._margin(GROW_BELOW, GROW_QUEUED_SHARE, GROW_NOISES) \
                and self.value > self.min_limit:
            return
        self.rounds_seen = min(self.rounds_seen + 1, float(BASELINE_ROUNDS))
        self.smoothed += (mean - self.smoothed) / self.rounds_seen  # a plain average until it is full
        if self.rounds_seen >= BASELINE_ROUNDS:  # a younger average is a few rounds' noise
            self._note_minimum(self.smoothed, now)

    def _note_minimum(self, mean: float, now: float) -> None:
        """Keep the lowest average round mean of the current bucket, rotating buckets every window."""
        if now - self.bucket_started >= BASELINE_WINDOW_S:
            stale = now - self.bucket_started >= 2 * BASELINE_WINDOW_S
            self.min_previous = math.inf if stale else self.min_current
            self.min_current = math.inf
            self.bucket_started = now
        self.min_current = min(self.min_current, mean)

    def _decrease(self, factor: float, now: float) -> None:
        """Scale the limit down to the nearest step, by one step at least (a shrink that rounds
        back to where it was would let an overloaded endpoint sit at its limit)."""
        self.decreased_at = now
        self.slow_start = 0.0
        before = self.value
        self._move_to(min(self.value - STEP, math.floor(self.value * factor / STEP + 0.5) * STEP), now)
        if self.value < before:
            self._remember_ceiling(before)

    def _remember_ceiling(self, too_many: float) -> None:
        """`too_many` overloaded the endpoint: after a failed probe of the ceiling, wait longer
        before the next; below the ceiling the service changed (capacity, model), so learn anew."""
        failed_probe = too_many >= self.ceiling
        self.probe_wait = min(float(PROBE_WAIT_MAX_ROUNDS), 2 * self.probe_wait) if failed_probe \
            else float(PROBE_WAIT_ROUNDS)
        self.ceiling = too_many
        self.good_rounds = 0

    def _move_to(self, value: float, now: float) -> None:
        value = max(float(self.min_limit), min(float(self.max_limit), value))
        self._clear_round()
        if value != self.value:
            self.value = value
            self.changed_at = now
            self.rounds_at_value = 0
            self.extra = 0.0  # reopened by the next outcome, if the new value has a fraction

    def _clear_round(self) -> None:
        self.round_latency = self.round_kchars = self.round_count = self.round_peak = 0.0
