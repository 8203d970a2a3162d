#!/usr/bin/env python3
"""The kgsupervisor benchmark: drain throughput against Huey, a bare loop and the upstream schedule,
the machine's ceilings, pickup latency, idle cost, growth and recovery; writes docs/benchmarks.md.

    make bench                                   # installs .[bench] into .venv, runs the full benchmark
    python scripts/bench.py [--quick] [--only SECTION ...] [--workdir DIR]

Sections: throughput (with the peers), ceiling, idle (pickup latency and idle cost), growth,
recovery, postgres (the drain on PostgreSQL with one and two supervisors, NOTIFY pickup), pgscale
(PostgreSQL at 1,000,000 queue rows: bulk statements and commands, claim, counts, status endpoint),
console (every page of the operator console at 1,000,000 queue rows, SQLite and PostgreSQL, over HTTP),
adaptive (in-flight limits and rate budgets against `dev-service --capacity`, from its request log).
--quick uses small sizes (minutes, for development; the document says so). With --only, the other
sections are taken from the last results of the same kind (docs/benchmarks/results*.json).
Run it on a quiet machine: every number is measured against the others in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

SECTIONS = ("throughput", "ceiling", "idle", "growth", "recovery", "postgres", "pgscale", "console",
            "adaptive")
ALIASES = {"peers": "throughput", "pickup": "idle", "idle-cost": "idle", "recovery-times": "recovery",
           "pg-scale": "pgscale", "console-pages": "console", "capacity": "adaptive", "budgets": "adaptive"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for development (minutes)")
    parser.add_argument("--only", nargs="+", metavar="SECTION", choices=SECTIONS + tuple(ALIASES),
                        help="run only these sections: " + ", ".join(SECTIONS))
    parser.add_argument("--workdir", help="keep databases and logs here (default: a temporary directory, removed)")
    parser.add_argument("--doc", default=os.path.join(ROOT, "docs", "benchmarks.md"), help="report to write")
    return parser.parse_args()


def check_requirements() -> None:
    missing = []
    for module in ("huey", "matplotlib", "psutil", "requests", "kgsupervisor", "psycopg"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        sys.exit(f"missing {', '.join(missing)}: install the benchmark extra with `pip install -e '.[bench]'` "
                 f"(or run `make bench`)")


def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def commit() -> str:
    try:  # read-only
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def results_path(doc: str, quick: bool) -> str:
    return os.path.join(os.path.dirname(doc), "benchmarks", "results-quick.json" if quick else "results.json")


def main() -> int:
    args = parse_args()
    check_requirements()
    from bench import adaptive, console, drain, growth, idle, pgscale, postgres, recovery, report
    from bench.common import log
    from bench.context import Context

    only = [ALIASES.get(s, s) for s in (args.only or SECTIONS)]
    path = results_path(args.doc, args.quick)
    results: dict = {}
    if args.only and os.path.exists(path):
        with open(path) as f:
            results = json.load(f).get("sections", {})
    load = os.getloadavg()
    if load[0] > 0.5:
        log(f"load average {load[0]:.2f}: the machine is not quiet, the numbers will be noisy")
    started = time.monotonic()
    ctx = Context.create(args.quick, args.workdir, keep=False)
    runners = {"throughput": drain.run_throughput, "ceiling": drain.run_ceiling, "idle": idle.run_idle,
               "growth": growth.run_growth, "recovery": recovery.run_recovery, "postgres": postgres.run_postgres,
               "pgscale": pgscale.run_pgscale, "console": console.run_console,
               "adaptive": adaptive.run_adaptive}
    try:
        for name in SECTIONS:
            if name in only:
                log(f"section {name}")
                results[name] = runners[name](ctx)
                results[name]["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
                save(path, args, results)  # a crash later keeps what was measured
    finally:
        ctx.close()
    meta = {"quick": args.quick, "documents": ctx.sizes.documents, "growth_max": ctx.sizes.growth_levels[-1],
            "command": "python scripts/bench.py" + (" --quick" if args.quick else "") +
                       (" --only " + " ".join(only) if args.only else ""),
            "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "host": socket.gethostname(),
            "cores": os.cpu_count(), "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "huey": version("huey"), "version": version("kgsupervisor"), "commit": commit(),
            "load": " / ".join(f"{x:.2f}" for x in load), "took_min": (time.monotonic() - started) / 60,
            "entity_rows": round(ctx.expected_entities / ctx.sizes.documents),
            "relationship_rows": round(ctx.expected_relationships / ctx.sizes.documents)}
    save(path, args, results, meta)
    report.write(results, args.doc, meta)
    log(f"wrote {os.path.relpath(args.doc, ROOT)} and {os.path.relpath(path, ROOT)}")
    for row in report.targets(results):
        log(f"  {row[3].strip('*'):<5} {row[0]}: {row[1]}")
    return 0


def save(path: str, args: argparse.Namespace, results: dict, meta: dict | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"quick": args.quick, "meta": meta, "sections": results}, f, indent=1, default=str)


if __name__ == "__main__":
    sys.exit(main())
