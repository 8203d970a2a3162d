"""Section 11: adaptive in-flight limits and rate budgets (issue 17) against `kgsupervisor dev-service
--capacity`, a service that behaves like a GPU box. Every number comes from the service's request log
(one JSON line per ingest: arrived, finished, characters, status), attempts charged from the queue's
history; the supervisors' /metrics are sampled every 0.25 s for the limit they held."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import closing, contextmanager
from dataclasses import dataclass, field

import psutil
import requests
from sampledata import add_documents

from kgsupervisor.store.schema import init_db

from .common import (KG, Supervisor, child_env, log, percentile, read_log_tail, reset_database, stop_process,
                     tree_cpu, wait_for)
from .context import Context
from .requestlog import (S_PER_KCHAR, SAMPLE_EVERY_S, early_ratio, mean_ratio, occupancy, rolling_p95, served,
                         service_time, sliding_max, window_stats)

SETTLE_S = 10.0              # a run is "settled" from 10 s after its workers were up
SENTENCES = 12               # one chunk of 12 sample sentences: ~1,030 characters
WORKERS = 16
CHARS_PER_TOKEN = 4
BUDGET_WINDOW_S = 60.0
CHARGED = ("retried", "failed")
SPAN_S = 10.0                # target 5's shares are also reported per 10 s of the settled window
METRIC = re.compile(r"^kgsupervisor_kg_endpoint_(inflight_limit|permits_in_use|permits_waiting|budget_used)"
                    r"\{([^}]*)\} (\S+)$", re.M)


@dataclass(frozen=True)
class Plan:
    """How long each scenario runs, in seconds; QUICK is the few-minute development version."""

    window_s: float              # targets 1 and 2: measured after SETTLE_S
    before_halving_s: float      # target 3
    after_halving_s: float
    budget_run_s: float          # target 4: at least 3 minutes in the full run
    pair_window_s: float         # target 5: measured after SETTLE_S
    documents: int               # queued per database, more than any run can take
    budget_tpm: int              # target 4's T: ~3.9 documents/s, far below the service's ~200/s


FULL = Plan(window_s=30, before_halving_s=30, after_halving_s=40, budget_run_s=250, pair_window_s=170,
            documents=10_000, budget_tpm=60_000)
QUICK = Plan(window_s=10, before_halving_s=15, after_halving_s=20, budget_run_s=125, pair_window_s=15,
             documents=2000, budget_tpm=60_000)


@dataclass
class Run:
    """One supervisor's run against one service: what the service logged, what /metrics said."""

    label: str
    db: str
    started: float = 0.0         # unix time: all workers up
    stopped: float = 0.0         # unix time: SIGTERM sent
    trace: list[dict] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    pending_left: int = 0
    other_cpu: float = math.nan  # cores busy with processes outside the benchmark's, during the run

    @property
    def charged(self) -> int:
        return sum(self.outcomes.get(o, 0) for o in CHARGED)


# -- databases, service, supervisors --------------------------------------------------------------

def build_template(path: str, documents: int, odd: bool) -> None:
    """A queued database of one-chunk documents whose chunk text has even (or odd) length, so the
    request log tells two supervisors' documents apart by the parity of their characters."""
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    init_db(path)
    with closing(sqlite3.connect(path)) as conn:
        add_documents(conn, documents, chunks=1, sentences=SENTENCES, seed=2 if odd else 1)
        conn.execute("UPDATE content_chunks SET chunk_text = chunk_text || '.' "
                     "WHERE LENGTH(chunk_text) % 2 != ?", (1 if odd else 0,))
        conn.commit()
    reset_database(path)


def fresh_db(ctx: Context, template: str, label: str) -> str:
    path = ctx.path(f"adaptive-{label}.db")
    shutil.copyfile(template, path)
    return path


@dataclass
class Service:
    """`kgsupervisor dev-service --capacity …` on a free port, logging every ingest."""

    url: str
    proc: subprocess.Popen
    request_log: str

    def requests(self) -> list[dict]:
        with open(self.request_log) as f:
            return [json.loads(line) for line in f if line.strip()]


@contextmanager
def capacity_service(ctx: Context, label: str, *args: str):
    request_log, err = ctx.path(f"adaptive-{label}.requests.jsonl"), ctx.path(f"adaptive-{label}.service.log")
    if os.path.exists(request_log):  # the service appends: a kept work directory holds an older run's
        os.unlink(request_log)
    with open(err, "w") as out:
        proc = subprocess.Popen(KG + ["dev-service", "--port", "0", *args, "--request-log", request_log],
                                env=child_env(), stdout=out, stderr=out)
    listening = re.compile(r"listening on (http://\S+)")
    try:
        wait_for(lambda: proc.poll() is not None or listening.search(read_log_tail(err, 50)), 30)
        found = listening.search(read_log_tail(err, 50))
        if found is None:
            raise RuntimeError(f"dev-service did not start: {read_log_tail(err)}")
        yield Service(found.group(1), proc, request_log)
    finally:
        stop_process(proc)


def sample_metrics(status_url: str) -> dict:
    """The endpoint gauges of one /metrics answer (one endpoint), by name; {} when it did not answer."""
    try:
        text = requests.get(status_url + "/metrics", timeout=1).text
    except requests.RequestException:
        return {}
    found = {}
    for name, labels, value in METRIC.findall(text):
        kind = re.search(r'kind="(\w+)"', labels)
        found[name + (f"_{kind.group(1)}" if kind else "")] = float(value)
    return found


@contextmanager
def sampling(runs: list[Run], sups: list[Supervisor]):
    """Sample every supervisor's /metrics each SAMPLE_EVERY_S while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(SAMPLE_EVERY_S):
            for run, sup in zip(runs, sups):
                run.trace.append({"t": time.time(), **sample_metrics(sup.status_url)})
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def start_supervisor(ctx: Context, run: Run, url: str, adaptive: str, env: dict[str, str]) -> Supervisor:
    sup = Supervisor(run.db, url, WORKERS, ctx.path(f"adaptive-{run.label}.log"), status=True,
                     extra=["--adaptive", adaptive, "--poll-interval", "1"], env=env)
    try:
        sup.start()
    except RuntimeError:
        sup.stop()  # it started but its workers did not: do not leave it running
        raise
    run.started = time.time()
    return sup


def finish(run: Run, sup: Supervisor) -> None:
    """SIGTERM the supervisor (its in-flight requests end after `stopped`), then read its queue."""
    run.stopped = time.time()
    sup.stop()
    with closing(sqlite3.connect(run.db)) as conn:
        run.outcomes = dict(conn.execute("SELECT outcome, COUNT(*) FROM kg_processing_attempts "
                                         "GROUP BY outcome"))
        run.pending_left = conn.execute("SELECT COUNT(*) FROM kg_processing_queue WHERE status = 'pending'"
                                        ).fetchone()[0]
    if run.pending_left == 0:
        log(f"    {run.label}: the queue ran empty before the stop: the window holds idle time")


def supervised(ctx: Context, service: Service, runs: list[Run], adaptive: str, seconds: float,
               env: dict[str, str] | None = None, at: tuple[float, Callable[[], None]] | None = None) -> None:
    """Run one supervisor per Run against `service` for `seconds`, sampled; `at` = (seconds, fn)
    calls fn that many seconds after the start."""
    sups: list[Supervisor] = []
    try:
        for run in runs:
            sups.append(start_supervisor(ctx, run, service.url, adaptive, env or {}))
        with sampling(runs, sups):
            begun, ours = time.monotonic(), [os.getpid()]  # the benchmark, its services and supervisors
            before = (psutil.cpu_times(), tree_cpu(ours))
            if at is not None:
                time.sleep(max(0.0, at[0] - (time.monotonic() - begun)))
                at[1]()
            time.sleep(max(0.0, seconds - (time.monotonic() - begun)))
            other = other_cpu(before, psutil.cpu_times(), tree_cpu(ours), time.monotonic() - begun)
            for run in runs:
                run.other_cpu = other
    finally:
        for run, sup in zip(runs, sups):
            finish(run, sup)


def other_cpu(before: tuple, after_times, after_ours: float, wall: float) -> float:
    """Cores the machine spent on processes other than ours over `wall` seconds: the benchmark
    shares 2 cores, and other work on them shows in its numbers."""
    def busy(t) -> float:
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)
    return max(0.0, (busy(after_times) - busy(before[0]) - (after_ours - before[1])) / wall)


# -- what the request log says ------------------------------------------------------------------

def summary(run: Run, lines: list[dict], capacity: int) -> dict:
    """A run's settled figures, its charged attempts and its refusals from the start."""
    settled = window_stats(lines, run.started + SETTLE_S, run.stopped, capacity, run.trace)
    return {"label": run.label, **settled, "charged": run.charged, "outcomes": run.outcomes,
            "refused_all": sum(1 for x in lines if x["status"] != 200 and x["arrived"] < run.stopped),
            "pending_left": run.pending_left, "load": os.getloadavg()[0], "other_cpu": run.other_cpu}


# -- the five scenarios ---------------------------------------------------------------------------

def fixed_vs_adaptive(ctx: Context, plan: Plan, template: str, name: str,
                      service_args: list[str]) -> list[dict]:
    """Targets 1 and 2: the same service, `--adaptive off` then on, 16 workers each."""
    out = []
    for mode in ("off", "on"):
        run = Run(f"{name}-{mode}", fresh_db(ctx, template, f"{name}-{mode}"))
        with capacity_service(ctx, run.label, *service_args) as service:
            supervised(ctx, service, [run], mode, SETTLE_S + plan.window_s)
            lines = service.requests()
        out.append({"adaptive": mode, **summary(run, lines, 4)})
        x = out[-1]
        log(f"    {name} adaptive {mode}: {x['ratio']:.3f} x capacity, p95 {x['p95_ratio']:.2f} x service "
            f"time, {x['refused']} refused after settling, {x['charged']} charged, "
            f"limit median {x['limit_median']}")
    return out


def halving(ctx: Context, plan: Plan, template: str) -> dict:
    """Target 3: capacity 4 -> 2 (SIGUSR1 to the service) in the middle of an adaptive run."""
    run = Run("halving", fresh_db(ctx, template, "halving"))
    halved: list[float] = []
    with capacity_service(ctx, run.label, "--capacity", "4", "--queue-limit", "8") as service:
        def halve() -> None:
            halved.append(time.time())
            service.proc.send_signal(signal.SIGUSR1)
        supervised(ctx, service, [run], "on", plan.before_halving_s + plan.after_halving_s,
                   at=(plan.before_halving_s, halve))
        lines = service.requests()
    t = halved[0]
    svc = service_time(served(lines, run.started, run.stopped))
    after = [s for s in run.trace if s["t"] >= t and "inflight_limit" in s]
    followed = next((s["t"] - t for s in after if s["inflight_limit"] <= 2 + 1), None)
    roll = rolling_p95(lines, t, run.stopped)
    back = next((tt - t for tt, p in roll if p is not None and p <= 1.5 * svc), None)
    later = [p for tt, p in roll if p is not None and back is not None and tt - t > back]
    before = [s["inflight_limit"] for s in run.trace if s["t"] < t and "inflight_limit" in s]
    return {"halved_after_s": t - run.started, "service_s": svc,
            "limit_at_halving": before[-1] if before else None,
            "limit_followed_s": followed, "p95_back_s": back,
            "rolling_over_after_back": (sum(1 for p in later if p > 1.5 * svc) / len(later)
                                        if later else math.nan),
            "before": window_stats(lines, run.started + SETTLE_S, t, 4, run.trace),
            "after_settled": window_stats(lines, t + SETTLE_S, run.stopped, 2, run.trace),
            "charged": run.charged, "outcomes": run.outcomes, "other_cpu": run.other_cpu,
            "limit_trace": [(round(s["t"] - t, 2), s["inflight_limit"])
                            for s in run.trace if "inflight_limit" in s],
            "rolling": [(round(tt - t, 2), None if p is None else round(p / svc, 3)) for tt, p in roll]}


def budget(ctx: Context, plan: Plan, template: str) -> dict:
    """Target 4: KG_TOKEN_BUDGET_TPM=T against a fast service with room for 64 at once."""
    run = Run("budget", fresh_db(ctx, template, "budget"))
    T = plan.budget_tpm
    with capacity_service(ctx, run.label, "--capacity", "64", "--service-time-per-kchar", "0.01") as service:
        supervised(ctx, service, [run], "on", plan.budget_run_s, env={"KG_TOKEN_BUDGET_TPM": str(T)})
        lines = service.requests()
    sent = sorted((x["arrived"], math.ceil(x["chars"] / CHARS_PER_TOKEN))
                  for x in lines if x["arrived"] < run.stopped)
    most, at = sliding_max(sent, BUDGET_WINDOW_S)
    # After the first window, over whole windows only: the log lets a window's worth through at once
    # whenever the one sent a window ago leaves it, so a part of a window is no measure of the rate.
    first = sent[0][0] + BUDGET_WINDOW_S
    windows = int((run.stopped - first) // BUDGET_WINDOW_S)
    span = windows * BUDGET_WINDOW_S
    tokens = sum(tok for a, tok in sent if first <= a < first + span)
    used = [s.get("budget_used_tokens") for s in run.trace if "budget_used_tokens" in s]
    return {"tpm": T, "run_s": run.stopped - run.started, "requests": len(sent),
            "refused": sum(1 for x in lines if x["status"] != 200),
            "tokens_per_document": sum(t for _, t in sent) / len(sent), "max_window_tokens": most,
            "max_window_ratio": most / T, "max_window_at_s": at - run.started,
            "whole_windows_after_first": windows,
            "tokens_per_s": tokens / span if span else math.nan,
            "throughput_ratio": tokens / span / (T / BUDGET_WINDOW_S) if span else math.nan,
            "metrics_used_max": max(used, default=None), "charged": run.charged, "outcomes": run.outcomes,
            "pending_left": run.pending_left, "other_cpu": run.other_cpu}


def pair(ctx: Context, plan: Plan, even: str, odd: str) -> dict:
    """Target 5: two supervisors, separate queues, one service of capacity 6 (queue limit 12); A
    starts first, B as soon as A's workers are up."""
    runs = [Run("pair-a", fresh_db(ctx, even, "pair-a")), Run("pair-b", fresh_db(ctx, odd, "pair-b"))]
    with capacity_service(ctx, "pair", "--capacity", "6", "--queue-limit", "12") as service:
        supervised(ctx, service, runs, "on", SETTLE_S + plan.pair_window_s)
        lines = service.requests()
    lo, hi = max(r.started for r in runs) + SETTLE_S, min(r.stopped for r in runs)
    total = window_stats(lines, lo, hi, 6, [])
    each = []
    for parity, run in enumerate(runs):
        mine = [x for x in lines if x["chars"] % 2 == parity]
        rate = len(served(mine, lo, hi)) / (hi - lo)
        bins = [len(served(mine, lo + t, lo + t + SPAN_S)) / SPAN_S / (total["capacity_rate"] / 2)
                for t in range(0, int(hi - lo - SPAN_S) + 1, int(SPAN_S))]
        each.append({"label": run.label, "rate": rate, "share": rate / (total["capacity_rate"] / 2),
                     "charged": run.charged, "outcomes": run.outcomes,
                     "started_s": run.started - runs[0].started,
                     "refused": sum(1 for x in mine if x["status"] != 200 and lo <= x["arrived"] < hi),
                     "refused_all": sum(1 for x in mine if x["status"] != 200), "shares_by_10s": bins,
                     "early_ratio": early_ratio(mine), "in_service": occupancy(mine, lo, hi),
                     "settled_p95_ratio": window_stats(mine, lo, hi, 6, [])["p95_ratio"],
                     "settled_mean_ratio": mean_ratio(served(mine, lo, hi)),
                     "limit_median": percentile([s["inflight_limit"] for s in run.trace
                                                 if lo <= s["t"] < hi and "inflight_limit" in s], 50)})
    spans = list(zip(*(e["shares_by_10s"] for e in each)))
    return {"total": total, "each": each, "sum_ratio": sum(e["rate"] for e in each) / total["capacity_rate"],
            "fair_spans": sum(all(0.75 <= x <= 1.25 for x in span) for span in spans), "spans": len(spans),
            "other_cpu": runs[0].other_cpu}


def run_adaptive(ctx: Context) -> dict:
    plan = QUICK if ctx.quick else FULL
    if ctx.quick:
        log(f"  QUICK: {plan.window_s:g} s windows, a {plan.budget_run_s:g} s budget run "
            "(not the target's 3 min)")
    even, odd = ctx.path("adaptive-even.db"), ctx.path("adaptive-odd.db")
    build_template(even, plan.documents, odd=False)
    build_template(odd, plan.documents, odd=True)
    load = [os.getloadavg()[0]]
    out: dict = {"plan": plan.__dict__, "settle_s": SETTLE_S, "workers": WORKERS, "s_per_kchar": S_PER_KCHAR}
    log("  target 1: capacity 4, queue limit 8")
    out["queueing"] = fixed_vs_adaptive(ctx, plan, even, "queueing",
                                        ["--capacity", "4", "--queue-limit", "8"])
    log("  target 2: thrashing, capacity 4")
    out["thrash"] = fixed_vs_adaptive(ctx, plan, even, "thrash", ["--capacity", "4", "--thrash"])
    log("  target 3: capacity halved mid-run")
    out["halving"] = h = halving(ctx, plan, even)
    log(f"    limit <= 3 after {h['limit_followed_s'] or math.nan:.2f} s, rolling p95 <= 1.5 x after "
        f"{h['p95_back_s'] or math.nan:.2f} s, {h['charged']} charged")
    log(f"  target 4: token budget {plan.budget_tpm:,}/min for {plan.budget_run_s:g} s")
    out["budget"] = b = budget(ctx, plan, even)
    log(f"    max 60 s window {b['max_window_ratio']:.3f} x T, throughput {b['throughput_ratio']:.3f} x T/60")
    log("  target 5: two supervisors, capacity 6")
    out["pair"] = p = pair(ctx, plan, even, odd)
    shares = ", ".join(f"{e['share']:.2f}" for e in p["each"])
    log(f"    fair shares {shares}, sum {p['sum_ratio']:.3f} x capacity")
    out["load"] = load + [os.getloadavg()[0]]
    return out
