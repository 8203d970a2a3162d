"""The targets of the issue as PASS/MISS rows, and what the numbers say about the product."""
from __future__ import annotations

import math

from .common import median, percentile


def fmt(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:,.{digits}f}"


def ms(x: float | None, digits: int = 0) -> str:
    return fmt(None if x is None else 1000 * x, digits) + (" ms" if x is not None and not math.isnan(x) else "")


def rates(results: dict) -> dict[tuple[str, int, int], float]:
    summary = results.get("throughput", {}).get("summary", [])
    return {(r["contender"], r["workers"], r["latency_ms"]): r["rate"] for r in summary}


def verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("**PASS**" if ok else "**MISS**")


def shortfall(measured: float, required: float, higher_is_better: bool = True) -> str:
    if measured is None or math.isnan(measured):
        return "not measured"
    if higher_is_better:
        return "met" if measured >= required else f"short by {100 * (1 - measured / required):.0f}%"
    return "met" if measured <= required else f"over by {100 * (measured / required - 1):.0f}%"


# -- targets ---------------------------------------------------------------------------------

def targets(results: dict) -> list[list]:
    rows = []
    r = rates(results)
    thr = results.get("throughput")
    if thr:
        workers = sorted({k[1] for k in r})
        for peer, need, label in (("huey", 1.2, "0 ms: kgsupervisor ≥ 1.2 × Huey"),
                                  ("bare", 1.0, "0 ms: kgsupervisor ≥ 1.0 × bare claim + POST + write-back loop")):
            ratios = {w: r.get(("ours", w, 0), math.nan) / r.get((peer, w, 0), math.nan) for w in workers}
            worst = min(ratios, key=lambda w: ratios[w])
            detail = ", ".join(f"{w}w {ratios[w]:.2f}" for w in workers)
            rows.append([label, f"{detail} (worst {ratios[worst]:.2f} at {worst})", f"≥ {need}",
                         verdict(ratios[worst] >= need), shortfall(ratios[worst], need)])
        lat = [k[2] for k in r if k[2] > 0]
        if lat:
            L = max(lat)
            ratios = {w: r.get(("ours", w, L), math.nan) / (w / (L / 1000)) for w in workers}
            # Issue 18: 0.95 up to 4 workers; at 8, 0.9 (8 requests' client work shares 2 cores).
            for few, need in ((True, 0.95), (False, 0.9)):
                group = [w for w in workers if (w <= 4) == few]
                if not group:
                    continue
                worst = min(group, key=lambda w: ratios[w])
                detail = ", ".join(f"{w}w {ratios[w]:.2f}" for w in group)
                rows.append([f"{L} ms: kgsupervisor ≥ {need} × workers / latency at "
                             f"{', '.join(map(str, group))} worker(s)", f"{detail} (worst {ratios[worst]:.2f})",
                             f"≥ {need}", verdict(ratios[worst] >= need), shortfall(ratios[worst], need)])
    idle = results.get("idle")
    if idle:
        pickups = [x["pickup_s"] for x in idle["pickup_idle"]]
        for label, value, limit in (("p50", median(pickups), 0.010), ("p95", percentile(pickups, 95), 0.025)):
            rows.append([f"pickup latency {label}, idle supervisor, default settings (SQLite)", ms(value, 1),
                         f"≤ {1000 * limit:.0f} ms", verdict(value <= limit), shortfall(value, limit, False)])
        cpu = idle["cost"]["total"]["cpu_pct"]
        rows.append([f"idle CPU, supervisor + {idle['workers']} workers (whole tree)", f"{cpu:.2f}% of a core",
                     "≤ 0.2%", verdict(cpu <= 0.2), shortfall(cpu, 0.2, False)])
    growth = results.get("growth")
    if growth:
        levels = growth["levels"]
        first, last = levels[0], levels[-1]
        ratio = last["claim"]["p50_ms"] / first["claim"]["p50_ms"]
        rows.append([f"claim cost at {last['rows']:,} rows vs {first['rows']:,}",
                     f"{ratio:.2f} × ({fmt(first['claim']['p50_ms'], 3)} → {fmt(last['claim']['p50_ms'], 3)} ms)",
                     "≤ 1.5 ×", verdict(ratio <= 1.5), shortfall(ratio, 1.5, False)])
        counts = last["queue_cmd_inproc"]["p50_ms"]
        rows.append([f"`queue --json` at {last['rows']:,} rows (the command's own work, without interpreter start-up)",
                     f"{counts:.1f} ms", "≤ 50 ms", verdict(counts <= 50), shortfall(counts, 50, False)])
        st = growth["status_endpoint"]
        rows.append([f"status endpoint /stats at {last['rows']:,} rows, p95 (max)",
                     f"{st['p95_ms']:.1f} ms ({st['max_ms']:.0f} ms)", "≤ 50 ms",
                     verdict(st["p95_ms"] <= 50), shortfall(st["p95_ms"], 50, False)])
    rec = results.get("recovery")
    if rec:
        rs = [k["recovered_s"] for k in rec["kills"] if k["recovered_s"] is not None]
        p95 = percentile(rs, 95)
        rows.append(["kill -9 of a worker → replaced and its claims released, p95", ms(p95), "≤ 1 s",
                     verdict(p95 <= 1.0), shortfall(p95, 1.0, False)])
    if results.get("pgscale"):
        rows += pgscale_targets(results["pgscale"])
    if results.get("console"):
        rows += console_targets(results["console"])
    return rows


def console_targets(c: dict) -> list[list]:
    """Every console page p95 ≤ 100 ms (section 10), per backend: the bounded pages, and apart
    the bulk confirmation, whose exact count is not bounded."""
    rows = []
    for b in c["backends"]:
        for bounded, label in ((True, "every page"), (False, "bulk confirmation (exact count, not bounded)")):
            pages = [p for p in b["pages"] if p["bounded"] == bounded]
            worst = max(pages, key=lambda p: p["p95_ms"])
            rows.append([f"console at {c['rows']:,} rows, {b['backend']}: {label}, p95",
                         f"worst {worst['p95_ms']:.1f} ms ({worst['page']})", f"≤ {c['target_ms']:.0f} ms",
                         verdict(worst["p95_ms"] <= c["target_ms"]),
                         shortfall(worst["p95_ms"], c["target_ms"], False)])
    return rows


def pgscale_targets(pg: dict) -> list[list]:
    """The targets of PostgreSQL at a million queue rows (section 9)."""
    rows = []
    worst = max(pg["inserts"], key=lambda x: x["ratio"])
    detail = ", ".join(f"{x['rows']:,} {x['ratio']:.2f}" for x in pg["inserts"])
    rows.append(["PostgreSQL: one INSERT of N rows ≤ 1.5 × N rows in INSERTs of 1,000",
                 f"{detail} (worst {worst['ratio']:.2f})", "≤ 1.5 ×", verdict(worst["ratio"] <= 1.5),
                 shortfall(worst["ratio"], 1.5, False)])
    for label, seconds in ((f"`enqueue --all-unprocessed` of {pg['rows']:,} documents", pg["enqueue_all"]["s"]),
                           (f"`retry --failed` of {pg['retry_failed']['rows']:,} rows", pg["retry_failed"]["s"])):
        rows.append([f"PostgreSQL: {label}", f"{seconds:.1f} s", "< 60 s", verdict(seconds < 60),
                     shortfall(seconds, 60, False)])
    small, big = pg["claim_small"]["p50_ms"], pg["claim_big"]["p50_ms"]
    rows.append([f"PostgreSQL: claim p50 at {pg['rows']:,} pending rows vs 1,000",
                 f"{big / small:.2f} × ({small:.3f} → {big:.3f} ms)", "≤ 1.5 ×", verdict(big / small <= 1.5),
                 shortfall(big / small, 1.5, False)])
    counts = max(pg["queue_cmd_inproc"]["p50_ms"], pg["counts"]["p95_ms"])
    rows.append([f"PostgreSQL: queue counts at {pg['rows']:,} rows (`queue --json` in-process p50, counts() p95)",
                 f"{pg['queue_cmd_inproc']['p50_ms']:.1f} ms, {pg['counts']['p95_ms']:.2f} ms", "≤ 50 ms",
                 verdict(counts <= 50), shortfall(counts, 50, False)])
    st = pg["status_endpoint"]
    rows.append([f"PostgreSQL: status endpoint /stats at {pg['rows']:,} rows, p95 (max)",
                 f"{st['p95_ms']:.1f} ms ({st['max_ms']:.0f} ms)", "≤ 50 ms", verdict(st["p95_ms"] <= 50),
                 shortfall(st["p95_ms"], 50, False)])
    exact = sum(x["exact"] for x in pg["steps"])
    rows.append(["PostgreSQL: counts exact after every step (vs a full GROUP BY)", f"{exact} of {len(pg['steps'])} steps",
                 "all", verdict(exact == len(pg["steps"])), "met" if exact == len(pg["steps"]) else
                 f"{len(pg['steps']) - exact} step(s) wrong"])
    return rows


def findings(results: dict) -> list[str]:
    """What the numbers say about the product, computed from them."""
    out = []
    r = rates(results)
    summary = {(x["contender"], x["workers"]): x for x in results.get("throughput", {}).get("summary", [])
               if x["latency_ms"] == 0}
    for w in sorted({k[1] for k in r}):
        ours, bare = r.get(("ours", w, 0)), r.get(("bare", w, 0))
        if ours and bare and ours < bare:
            text = (f"At 0 ms with {w} worker(s) a document takes {1000 / ours - 1000 / bare:.2f} ms more of the "
                    f"drain's time with kgsupervisor than with the bare loop ({fmt(ours)} vs {fmt(bare)} documents/s)")
            if "cpu_ms_per_doc" in summary.get(("ours", w), {}) and "cpu_ms_per_doc" in summary.get(("bare", w), {}):
                text += (f"; its processes use {summary['ours', w]['cpu_ms_per_doc']:.2f} ms of CPU per document "
                         f"against {summary['bare', w]['cpu_ms_per_doc']:.2f} ms")
            out.append(text + ".")
    lat = sorted({k[2] for k in r if k[2] > 0})
    if lat:
        L = lat[-1]
        allowed = (L / 0.95 - L)
        slow = [w for w in sorted({k[1] for k in r if k[2] == L})
                if r.get(("ours", w, L), 0) < 0.95 * w / (L / 1000)]
        if slow:
            per_doc = {c: median([1000 * w / r[(c, w, L)] - L for w in slow if (c, w, L) in r])
                       for c in ("ours", "bare", "huey")}
            floor = [x for x in results.get("ceiling", {}).get("rows", []) if x.get("latency_ms") == L]
            note = ""
            if floor:
                note = (f" A bare POST alone, with no database work, already takes "
                        f"{min(x['per_request_ms'] for x in floor):.2f} ms a request at {L} ms on this machine.")
            out.append(f"At {L} ms the target leaves {allowed:.1f} ms per document for everything but the "
                       f"service's latency (claim, read, POST, parse, write-back). Here a document costs the "
                       f"latency plus {fmt(per_doc['ours'], 1)} ms with kgsupervisor, {fmt(per_doc['bare'], 1)} ms "
                       f"with the bare loop and {fmt(per_doc['huey'], 1)} ms with Huey (median over "
                       f"{', '.join(map(str, slow))} worker(s)), so where the bare loop misses too, the machine's "
                       "per-document work, not the supervisor, sets the limit." + note)
    whatif = {w: r[("ours_analyzed", w, 0)] / r[("ours", w, 0)] for w in sorted({k[1] for k in r})
              if ("ours_analyzed", w, 0) in r and ("ours", w, 0) in r}
    if whatif:
        out.append("With the queue's statistics present (ANALYZE after enqueueing, see the claim plan below) "
                   "kgsupervisor drains " + ", ".join(f"{v:.2f}×" for v in whatif.values()) +
                   f" as fast at {', '.join(map(str, whatif))} worker(s): what the claim plan costs the drain.")
    g = results.get("growth")
    if g:
        first, last = g["levels"][0], g["levels"][-1]
        grow = last["claim"]["p50_ms"] / first["claim"]["p50_ms"]
        flat = last["claim_analyzed"]["p50_ms"] / max(first["claim_analyzed"]["p50_ms"], 1e-9)
        if grow > 1.5 and "TEMP B-TREE" not in last["claim_plan"]:
            out.append(f"The claim grows with the queue ({grow:.1f}× from {first['rows']:,} to {last['rows']:,} "
                       f"rows) with the plan `{last['claim_plan']}`.")
        elif grow > 1.5:
            out.append(f"The claim grows with the queue ({grow:.1f}× from {first['rows']:,} to {last['rows']:,} rows) "
                       f"while the same claim after ANALYZE stays flat ({flat:.1f}×): without statistics "
                       f"SQLite plans it as `{last['claim_plan']}`, i.e. it sorts every claimable row, "
                       f"instead of `{last['claim_plan_analyzed']}`. A database where `init-db` ran on an "
                       "empty queue has no statistics for it. Pinning the plan (`INDEXED BY "
                       "idx_kgq_claim_order`, or `+status` to disqualify the status index) or running ANALYZE / "
                       "`PRAGMA optimize` would fix it.")
        if last["counts"]["p50_ms"] > 50:
            out.append(f"Counting the queue (`SELECT status, COUNT(*) … GROUP BY status`) scans it: "
                       f"{last['counts']['p50_ms']:.0f} ms at {last['rows']:,} rows. The supervisor runs it every "
                       "2 s in its own loop, so a status request that lands during a count waits for it.")
    idle = results.get("idle")
    if idle:
        a = percentile([x["pickup_s"] for x in idle["pickup_idle"]], 95)
        b = percentile([x["pickup_s"] for x in idle["pickup_trickle"]], 95)
        if b > max(3 * a, 0.5):
            out.append(f"Pickup p95 is {ms(b)} when documents trickle in, against {ms(a)} when the supervisor is "
                       "idle: a worker that has just finished a partial batch waits the whole poll interval "
                       "without watching `PRAGMA data_version` (it watches only in state IDLE, and it is still "
                       "BUSY after its batch), so once every worker has worked in the last poll interval a new "
                       "document waits for the first of them to wake up.")
    return out
