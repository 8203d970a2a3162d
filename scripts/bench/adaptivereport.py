"""Section 11 of docs/benchmarks.md (adaptive in-flight limits and rate budgets): its text, its rows
of the Targets table and its findings, from the results of bench.adaptive."""
from __future__ import annotations

import math

from .verdicts import fmt, shortfall, verdict


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]) + "\n"


def seconds(x: float | None) -> str:
    return "never" if x is None else f"{x:.2f} s"


def by_mode(runs: list[dict]) -> dict[str, dict]:
    return {r["adaptive"]: r for r in runs}


def none_row(label: str, count: int, what: str) -> list:
    """A target row for a count that must be 0."""
    return [label, f"{count} {what}", "0", verdict(count == 0), "met" if count == 0 else f"{count} too many"]


# -- targets --------------------------------------------------------------------------------------

def targets(results: dict) -> list[list]:
    a = results.get("adaptive")
    if not a:
        return []
    q, t = by_mode(a["queueing"])["on"], by_mode(a["thrash"])["on"]
    h, b, p = a["halving"], a["budget"], a["pair"]
    head = "adaptive, capacity 4 / queue 8, 16 workers:"
    rows = [[f"{head} throughput / capacity", fmt(q["ratio"], 3), "≥ 0.95", verdict(q["ratio"] >= 0.95),
             shortfall(q["ratio"], 0.95)],
            none_row(f"{head} attempts charged + 503s after settling", q["charged"] + q["refused"],
                     f"({q['charged']} charged, {q['refused']} refused)"),
            [f"{head} p95 latency / unloaded service time, settled", fmt(q["p95_ratio"], 2), "≤ 1.5",
             verdict(q["p95_ratio"] <= 1.5), shortfall(q["p95_ratio"], 1.5, False)],
            ["adaptive, thrashing service, capacity 4, 16 workers: throughput / capacity", fmt(t["ratio"], 3),
             "≥ 0.9", verdict(t["ratio"] >= 0.9), shortfall(t["ratio"], 0.9)]]
    for label, x in (("limit ≤ new capacity + 1", h["limit_followed_s"]),
                     ("rolling p95 back ≤ 1.5 × service time", h["p95_back_s"])):
        value = math.nan if x is None else x
        rows.append([f"capacity halved mid-run: {label}, after", seconds(x), "≤ 10 s", verdict(value <= 10),
                     shortfall(value, 10, False)])
    rows.append(none_row("capacity halved mid-run: attempts charged", h["charged"], "charged"))
    rows.append([f"token budget T = {b['tpm']:,}/min: most estimated tokens sent in any 60 s window / T",
                 fmt(b["max_window_ratio"], 3), "≤ 1.02", verdict(b["max_window_ratio"] <= 1.02),
                 shortfall(b["max_window_ratio"], 1.02, False)])
    rows.append(["token budget: tokens/s after the first window / (T / 60)", fmt(b["throughput_ratio"], 3),
                 "≥ 0.95", verdict(b["throughput_ratio"] >= 0.95), shortfall(b["throughput_ratio"], 0.95)])
    return rows + pair_targets(p)


def pair_targets(p: dict) -> list[list]:
    shares = [e["share"] for e in p["each"]]
    worst = max(shares, key=lambda s: abs(s - 1))
    fair = all(0.75 <= s <= 1.25 for s in shares)
    return [["two supervisors, capacity 6: each one's settled throughput / fair share",
             ", ".join(fmt(s, 2) for s in shares), "0.75 … 1.25", verdict(fair),
             "met" if fair else f"off by {abs(worst - 1) - 0.25:.2f}"],
            ["two supervisors: 10 s spans of the settled window with both within 0.75 … 1.25",
             f"{p['fair_spans']} of {p['spans']}", "all (not in the issue: the same target, span by span)",
             verdict(p["fair_spans"] == p["spans"]), "met" if p["fair_spans"] == p["spans"] else
             f"{p['spans'] - p['fair_spans']} span(s) outside"],
            ["two supervisors: sum / capacity", fmt(p["sum_ratio"], 3), "≥ 0.95",
             verdict(p["sum_ratio"] >= 0.95), shortfall(p["sum_ratio"], 0.95)]]


# -- the section -----------------------------------------------------------------------------------

def section(results: dict) -> str:
    a = results["adaptive"]
    plan = a["plan"]
    text = ("`kgsupervisor dev-service --capacity C --request-log FILE` (a GPU box: C requests in service "
            f"at once, {a['s_per_kchar']:g} s of service per 1,000 characters, others wait inside it, past "
            "`--queue-limit` refused with 503) against `kgsupervisor run --workers "
            f"{a['workers']} --adaptive on|off --poll-interval 1` with its status endpoint on. Every "
            "document is one chunk of 12 sample sentences (~1,030 characters: ~103 ms of service). Each "
            "run lasts a fixed time on a queue that cannot run empty and ends with SIGTERM. **Every figure "
            "comes from the service's request log** (arrived, finished, characters, status of each ingest), "
            "except attempts charged: the queue history's `retried` and `failed` rows of the whole run. "
            f"**Settled** means from {a['settle_s']:g} s after the supervisor's workers were up until its "
            "SIGTERM: answers that finished in it, refusals that arrived in it. Capacity = C / the unloaded "
            "service time, which is the mean of characters × 0.1 s / 1,000 over the documents served; p95 "
            "latency is finished − arrived at the service. The limits are the supervisors' `/metrics` "
            "sampled every 0.25 s.\n\n")
    if plan["budget_run_s"] < 180:
        text += (f"**Quick run: {plan['window_s']:g} s settled windows and a {plan['budget_run_s']:g} s "
                 "budget run (the target asks for 3 minutes).**\n\n")
    text += queueing_text(a) + halving_text(a["halving"]) + budget_text(a["budget"])
    text += pair_text(a["pair"], a["workers"])
    text += (f"\nLoad average (1 min) at the start and the end of the section: "
             f"{' / '.join(f'{x:.2f}' for x in a['load'])}. {other_cpu_text(a)}\n")
    return text


def other_cpu_text(a: dict) -> str:
    """The CPU other processes took during each run: the machine's 2 cores are shared."""
    runs = [(f"{name} {r['adaptive']}", r.get("other_cpu"))
            for name in ("queueing", "thrash") for r in a[name]]
    runs += [(name, a[name].get("other_cpu")) for name in ("halving", "budget", "pair")]
    return ("Cores busy with processes outside the benchmark's own during each run (system CPU time "
            "less the benchmark's process tree, of 2): "
            + ", ".join(f"{label} {fmt(x, 2)}" for label, x in runs) + ".")


def queueing_text(a: dict) -> str:
    rows = []
    for name, label in (("queueing", "capacity 4, queue limit 8"), ("thrash", "capacity 4, thrashing")):
        for r in a[name]:
            rows.append([label, r["adaptive"], f"{r['rate']:.1f}", f"{r['capacity_rate']:.1f}",
                         fmt(r["ratio"], 3), fmt(r["p95_ratio"], 2), f"{r['refused']} ({r['refused_all']})",
                         r["charged"], fmt(r["limit_mean"], 2), fmt(r["in_service"], 2), r["served"]])
    return ("**Targets 1–2: fixed concurrency against the adaptive limit**, one service per run, "
            f"{a['plan']['window_s']:g} s settled.\n\n"
            + table(["service", "`--adaptive`", "documents/s", "capacity, documents/s", "/ capacity",
                     "p95 / service time", "503 settled (whole run)", "attempts charged", "limit (mean)",
                     "requests in the service (mean)", "answers counted"], rows))


def halving_text(h: dict) -> str:
    b, s = h["before"], h["after_settled"]
    trace = ", ".join(f"{t:+.1f} s: {v:.0f}" for t, v in h["limit_trace"] if -1 <= t <= 6)
    phases = [["before, settled", b], ["from 10 s after the halving", s]]
    return (f"\n**Target 3: capacity 4 halved to 2** (SIGUSR1 to the service {h['halved_after_s']:.0f} s "
            "after the workers were up; adaptive, queue limit 8). The limit was "
            f"{fmt(h['limit_at_halving'], 0)} at the halving and ≤ 3 after "
            f"{seconds(h['limit_followed_s'])}; the rolling p95 (answers finished in the last 2 s among "
            "those that arrived after the halving, every 0.25 s, once 5 are there) was back ≤ 1.5 × the "
            f"service time after {seconds(h['p95_back_s'])}, and "
            f"{fmt(100 * h['rolling_over_after_back'], 0)}% of the later rolling windows were over it "
            f"again. {h['charged']} attempts charged. The limit around the halving: {trace}.\n\n"
            + table(["phase", "documents/s", "/ capacity", "p95 / service time", "503", "limit (mean)"],
                    [[label, f"{x['rate']:.1f}", fmt(x["ratio"], 3), fmt(x["p95_ratio"], 2), x["refused"],
                      fmt(x["limit_mean"], 2)] for label, x in phases]))


def budget_text(b: dict) -> str:
    return (f"\n**Target 4: a token budget** `KG_TOKEN_BUDGET_TPM={b['tpm']}` against a fast service "
            "(`--capacity 64 --service-time-per-kchar 0.01`: ~10 ms a document, so the budget, not the "
            f"service, sets the pace), {b['run_s']:.0f} s. Tokens sent are estimated from the log as "
            "ceil(characters / 4) for every request that reached the service; the windows are every 60 s "
            "window that starts at a request's arrival (where a window's count peaks). Throughput is over "
            "the whole 60 s windows after the first (a sliding-window budget lets a window's worth through "
            "whenever the one sent a window earlier leaves it, so part of a window measures the burst, not "
            "the rate).\n\n"
            + table(["requests", "tokens a document", "most tokens in a 60 s window", "/ T", "its start",
                     "whole windows after the first", "tokens/s", "/ (T / 60)", "budget_used max (/metrics)",
                     "refused", "charged"],
                    [[b["requests"], f"{b['tokens_per_document']:.0f}", f"{b['max_window_tokens']:,}",
                      fmt(b["max_window_ratio"], 3), f"{b['max_window_at_s']:.1f} s",
                      b["whole_windows_after_first"], fmt(b["tokens_per_s"], 1),
                      fmt(b["throughput_ratio"], 3),
                      fmt(b["metrics_used_max"], 0), b["refused"], b["charged"]]]))


def pair_text(p: dict, workers: int) -> str:
    t = p["total"]
    rows = [[e["label"], f"{e['started_s']:.1f} s", f"{e['rate']:.1f}", fmt(e["share"], 2),
             fmt(e["limit_median"], 0), fmt(e["in_service"], 1), fmt(e["settled_mean_ratio"], 2),
             fmt(e["settled_p95_ratio"], 2), f"{e['refused']} ({e['refused_all']})", e["charged"]]
            for e in p["each"]]
    spans = "; ".join(f"{e['label']} " + ", ".join(fmt(x, 2) for x in e["shares_by_10s"]) for e in p["each"])
    return (f"\n**Target 5: two supervisors**, each on its own queue database with {workers} workers, "
            "adaptive, sharing one service of capacity 6 (queue limit 12); B starts as soon as A's workers "
            "are up. The log tells them apart by the parity of a document's characters (A's chunk texts "
            f"have even length, B's odd). Settled: {t['window_s']:.0f} s from 10 s after B's start. Capacity "
            f"{t['capacity_rate']:.1f} documents/s, fair share {t['capacity_rate'] / 2:.1f}; together "
            f"{t['rate']:.1f}/s ({fmt(p['sum_ratio'], 3)} × capacity), p95 {fmt(t['p95_ratio'], 2)} × "
            "service time.\n\n"
            + table(["supervisor", "started after A", "documents/s", "/ fair share", "limit (median)",
                     "requests in the service (mean)", "latency / service time (mean)", "p95 / service time",
                     "503 settled (whole run)", "charged"], rows)
            + f"\nShare of a fair share in each 10 s of the settled window: {spans}.\n")


def shortfall_text(label: str, run: dict) -> str:
    """Why an adaptive run fell short of capacity, by Little's law from the log: throughput / capacity
    = (requests in the service / C) / (mean latency / unloaded service time)."""
    kept = run["in_service"] / 4
    outside = (run["limit_mean"] - run["in_service"]) / run["rate"]
    return (f"Adaptive on the {label} service: {run['ratio']:.3f} × capacity = the service kept "
            f"{run['in_service']:.2f} requests in it on average ({kept:.3f} of its capacity of 4) / each "
            f"took {run['mean_ratio']:.3f} × its unloaded service time (Little's law, from the log). The "
            f"limit averaged {run['limit_mean']:.2f}; a permit spent {1000 * outside:.1f} ms a document "
            "outside the service (claim, payload read, answer parse). "
            + ("Requests slower than unloaded with no more than 4 in service are the service process itself "
               "running late (a Python process sharing 2 cores; see the other processes' CPU below). "
               if run["mean_ratio"] > 1.05 and run["in_service"] <= 4.05 else "")
            + ("On the thrashing service a fifth permit cannot help: 5 in service run (5/4)^1.5 = 1.40 × "
               "slower each, 5 / 1.40 / 4 = 0.89 × capacity." if label == "thrashing" else ""))


# -- findings --------------------------------------------------------------------------------------

def findings(results: dict) -> list[str]:
    a = results.get("adaptive")
    if not a:
        return []
    q, t = by_mode(a["queueing"]), by_mode(a["thrash"])
    out = [f"Against a service of capacity 4 with a queue limit of 8, 16 workers at fixed concurrency draw "
           f"{q['off']['refused_all']} 503s and a p95 of {q['off']['p95_ratio']:.1f} × the service time for "
           f"{q['off']['ratio']:.2f} × capacity; the adaptive limit (mean {fmt(q['on']['limit_mean'], 2)}) "
           f"gets {q['on']['ratio']:.2f} × with {q['on']['refused_all']} 503s and a p95 of "
           f"{q['on']['p95_ratio']:.2f} ×. On a thrashing service fixed concurrency gets "
           f"{t['off']['ratio']:.2f} × capacity and the adaptive limit {t['on']['ratio']:.2f} ×."]
    for label, run, need in (("capacity 4, queue limit 8", q["on"], 0.95), ("thrashing", t["on"], 0.9)):
        if run["ratio"] < need and run.get("mean_ratio"):
            out.append(shortfall_text(label, run))
    p = a["pair"]
    if p["fair_spans"] < p["spans"]:
        lo_hi = ", ".join(f"{e['label']} {min(e['shares_by_10s']):.2f}–{max(e['shares_by_10s']):.2f}"
                          for e in p["each"])
        out.append(f"Two adaptive supervisors on one capacity-6 service split it fairly in "
                   f"{p['fair_spans']} of {p['spans']} spans of 10 s (shares of a fair share {lo_hi}; over "
                   "the window "
                   + ", ".join(f"{e['share']:.2f}" for e in p["each"])
                   + "), while both see the same latency ("
                   + " and ".join(f"{e['settled_mean_ratio']:.2f}" for e in p["each"])
                   + " × the service time on average)"
                   + (": one holds most permits and the other sits near its floor."
                      if max(max(e["shares_by_10s"]) for e in p["each"]) >= 1.5 else "."))
    return out
