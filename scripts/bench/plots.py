"""The PNG plots of docs/benchmarks.md (matplotlib, Agg backend); each returns False if it had no data."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"ours": ("kgsupervisor", "C0", "o"), "bare": ("bare claim + POST + write-back loop", "C2", "s"),
         "huey": ("Huey (SqliteHuey, process workers)", "C1", "^"),
         "upstream": ("upstream schedule (claim 5, sleep 5 s)", "C7", "v"),
         "ours_analyzed": ("kgsupervisor, queue ANALYZEd (what-if)", "C0", "x"),
         "bare_marked": ("bare loop + mark_started (what-if)", "C2", "x")}


def _save(fig, path: str) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def throughput(path: str, rates: dict, latency_ms: int, ceiling: dict, post: dict) -> bool:
    workers = sorted({w for (_, w, L) in rates if L == latency_ms})
    if not workers:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for name, (label, color, marker) in STYLE.items():
        ys = [rates.get((name, w, latency_ms), math.nan) for w in workers]
        if all(math.isnan(y) for y in ys):
            continue
        ax.plot(workers, ys, marker=marker, color=color, label=label, ls=":" if "what-if" in label else "-")
    if latency_ms:
        ax.plot(workers, [w / (latency_ms / 1000) for w in workers], ":", color="k",
                label="workers / latency (ideal)")
    if ceiling:
        ax.axhline(max(ceiling.values()), ls="--", color="C3", label="bare claim + write-back, no HTTP (best)")
    if post:
        ax.axhline(max(post.values()), ls="-.", color="C4", label="bare POST loop, no database (best)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(workers, [str(w) for w in workers])
    ax.set_yscale("log")
    ax.set_xlabel("worker processes")
    ax.set_ylabel("documents / s (log)")
    ax.set_title(f"Drain throughput, service latency {latency_ms} ms")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5, loc="best")
    return _save(fig, path)


def pickup(path: str, idle: dict) -> bool:
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for key, label, color in (("pickup_idle", "idle", "C0"), ("pickup_trickle", "trickle", "C1")):
        xs = sorted(1000 * x["pickup_s"] for x in idle[key] if not math.isnan(x["pickup_s"]))
        if xs:
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", color=color, label=label)
    ax.axvline(100, ls="--", color="k", label="target p50 100 ms")
    ax.set_xscale("log")
    ax.set_xlabel("enqueue → claimed (ms, log)")
    ax.set_ylabel("fraction of documents")
    ax.set_title("Pickup latency, 4 workers, default settings")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def growth(path: str, g: dict) -> bool:
    levels = g["levels"]
    if not levels:
        return False
    xs = [lv["rows"] for lv in levels]
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for key, label, color in (("claim", "claim 5 (as shipped)", "C0"),
                              ("claim_analyzed", "claim 5 after ANALYZE", "C9"),
                              ("write_back", "write-back of one document", "C2"),
                              ("release_crashed", "release a dead worker's claims", "C4"),
                              ("counts", "queue counts", "C3")):
        ax.plot(xs, [lv[key]["p50_ms"] for lv in levels], marker="o", color=color, label=label)
    ax.axhline(50, ls=":", color="k", label="50 ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rows in kg_processing_queue (log)")
    ax.set_ylabel("ms, p50 (log)")
    ax.set_title("Cost of queue statements as the queue grows")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5)
    return _save(fig, path)


def recovery(path: str, rec: dict) -> bool:
    kills = rec["kills"]
    if not kills:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for i, (key, label) in enumerate((("released_s", "claims released"), ("replaced_s", "replacement running"),
                                      ("working_s", "replacement's first claim"))):
        ys = [1000 * k[key] for k in kills if k[key] is not None]
        ax.scatter([i] * len(ys), ys, alpha=0.6, label=label)
    ax.axhline(1000, ls="--", color="k", label="target p95 1 s")
    ax.set_xticks([0, 1, 2], ["released", "replaced", "working"])
    ax.set_yscale("log")
    ax.set_ylabel("ms after kill -9 (log)")
    ax.set_title("Recovery after kill -9 of a busy worker")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def ceiling(path: str, rows: list[dict], best: dict[str, float]) -> bool:
    """Horizontal bars: the machine's ceilings next to the best drain of each contender."""
    bars = [(f"{r['loop']}, {r['service']}, {r['workers']}p" if r["service"] != "—"
             else f"{r['loop']}, {r['workers']}p", r["rate"], "C3" if "HTTP" in r["loop"] else "C4")
            for r in rows if not r.get("latency_ms")]
    bars += [(f"{STYLE[name][0]} (best)", rate, STYLE[name][1]) for name, rate in best.items()
             if not math.isnan(rate)]
    if not bars:
        return False
    fig, ax = plt.subplots(figsize=(8.5, 0.32 * len(bars) + 1.2))
    ax.barh(range(len(bars)), [b[1] for b in bars], color=[b[2] for b in bars])
    ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("documents / s, service latency 0 ms")
    ax.set_title("Ceilings of this machine and the best drain of each contender")
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path)
