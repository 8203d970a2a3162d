"""Section 10: the operator console's pages at a million queue rows, on SQLite and PostgreSQL,
through real HTTP: `kgsupervisor console` as a process, every page timed from a requests client."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from urllib.parse import quote

import requests

from kgsupervisor.store.postgres import PGConnection

from .common import KG, child_env, free_port, log, median, percentile, read_log_tail, stop_process, wait_for
from .consoledata import FAILED_ID, RARE_ERROR, RARE_URL, build
from .context import Context

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.consoleclient import CSRF, ConsoleClient  # noqa: E402  (a browser's session, as the tests use)
from tests.pgserver import PostgresServer  # noqa: E402  (the tests' throwaway server)

TOKEN = "bench-console-token-0123456789abcdef"
TARGET_MS = 100.0
SHOWN_ROWS = re.compile(r'data-queue-id="')
SEARCHED = re.compile(r"Searched down to queue id (\d+)")
COUNTED = re.compile(r'id="confirm-count">(\d+)<')


@dataclass(frozen=True)
class Request:
    """One page of the console as the benchmark asks for it: a GET of `path`, or a POST of `form`."""

    label: str
    path: str
    form: dict[str, str] | None = None
    bounded: bool = True  # False: the work grows with the rows the filter may take (the exact count)

    @property
    def shown(self) -> str:
        if self.form is None:
            return f"GET {self.path}"
        return f"POST {self.path} " + "&".join(f"{k}={v}" for k, v in self.form.items())


def requests_of(n: int) -> list[Request]:
    """Every page the section times at `n` queue rows."""
    confirm = "/documents/confirm"
    return [
        Request("overview", "/"), Request("overview, its live part (fetched every 2 s)", "/live"),
        Request("documents, no filter", "/documents"),
        Request("documents, status=failed", "/documents?status=failed"),
        Request("documents, status=pending", "/documents?status=pending"),
        Request("documents, rare error text", f"/documents?error={quote(RARE_ERROR)}"),
        Request("documents, rare url substring", f"/documents?url={RARE_URL}"),
        Request("documents, a deep page (keyset)", f"/documents?before={n // 2}"),
        Request("documents, one content id", f"/documents?content_id={n // 3}"),
        Request("document page (3 attempts)", f"/document/{FAILED_ID}"),
        Request("failures by error class", "/failures"), Request("audit log", "/audit"),
        Request("confirmation: retry status=failed", confirm, {"action": "retry", "status": "failed"}, False),
        Request("confirmation: retry, rare url", confirm, {"action": "retry", "url": RARE_URL}, False),
        Request("confirmation: fail, rare url", confirm, {"action": "fail", "url": RARE_URL}, False),
    ]


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


@contextmanager
def console_server(ctx: Context, target: str, label: str):
    """`kgsupervisor console --db target` on a free loopback port with an operator token; its URL."""
    log_path = ctx.path(f"console-{label}.log")
    addr = f"127.0.0.1:{free_port()}"
    with open(log_path, "w") as out:
        proc = subprocess.Popen(KG + ["console", "--db", target, "--bind", addr],
                                env=child_env(KG_CONSOLE_TOKEN=TOKEN), stdout=out, stderr=subprocess.STDOUT)
    base = f"http://{addr}"
    try:
        wait_for(lambda: proc.poll() is not None or answers(base + "/login"), 60)
        if proc.poll() is not None or not answers(base + "/login"):
            raise RuntimeError(f"the console did not answer at {base}: {read_log_tail(log_path)}")
        yield base
    finally:
        stop_process(proc)


def fetch(client: ConsoleClient, csrf: str, request: Request) -> tuple[float, requests.Response]:
    """One request as the logged-in browser sends it; the time until its whole body is read."""
    started = time.perf_counter()
    if request.form is None:
        response = client.http.get(client.base + request.path, timeout=60)
    else:
        response = client.http.post(client.base + request.path, data={**request.form, "csrf_token": csrf},
                                    headers={"Origin": client.base}, timeout=600, allow_redirects=False)
    took = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{request.shown}: HTTP {response.status_code}: {response.text[:300]}")
    return took, response


def what_it_showed(body: str) -> dict:
    """What a page answered: rows listed, where a bounded search stopped, the count confirmed."""
    found: dict = {"bytes": len(body.encode())}
    if "<table id=\"documents\"" in body:
        found["rows"] = len(SHOWN_ROWS.findall(body))
    for key, pattern in (("searched_to", SEARCHED), ("count", COUNTED)):
        match = pattern.search(body)
        if match:
            found[key] = int(match.group(1))
    return found


def time_pages(base: str, pages: list[Request], repeats: int) -> list[dict]:
    """Log in, then a warm-up round and `repeats` rounds, each asking every page once in turn
    (so noise from the machine falls on every page alike)."""
    client = ConsoleClient(base)
    if client.login(TOKEN, "bench").status_code != 303:
        raise RuntimeError("the benchmark's login was refused")
    csrf = CSRF.search(client.get("/documents").text).group(1)
    times: dict[str, list[float]] = {p.label: [] for p in pages}
    seen: dict[str, dict] = {}
    for round_no in range(repeats + 1):
        for page in pages:
            took, response = fetch(client, csrf, page)
            if round_no:
                times[page.label].append(took)
            seen[page.label] = what_it_showed(response.text)
    return [{"page": p.label, "request": p.shown, "bounded": p.bounded, **seen[p.label],
             "p50_ms": 1000 * median(times[p.label]), "p95_ms": 1000 * percentile(times[p.label], 95),
             "max_ms": 1000 * max(times[p.label]), "n": len(times[p.label])} for p in pages]


def measure(ctx: Context, backend: str, target: str) -> dict:
    """Build the database at `target`, serve it, time every page."""
    n, repeats = ctx.sizes.console_rows, ctx.sizes.console_repeats
    log(f"  {backend}: building {n:,} queue rows")
    built = build(target, n)
    log(f"  {backend}: built in {built['build_s']:.0f} s: {built['counts']}, {built['attempts']:,} attempts")
    load_before = os.getloadavg()[0]
    with console_server(ctx, target, backend.lower()) as base:
        pages = time_pages(base, requests_of(n), repeats)
    for p in pages:
        log(f"    {p['page']:<48} p50 {p['p50_ms']:7.1f} ms  p95 {p['p95_ms']:7.1f} ms  "
            f"max {p['max_ms']:7.1f} ms  {'ok' if p['p95_ms'] <= TARGET_MS else 'OVER'}")
    return {"backend": backend, **built, "pages": pages, "load": [load_before, os.getloadavg()[0]]}


def postgres_version(url: str) -> str:
    with closing(PGConnection(url)) as conn:
        return conn.execute("SHOW server_version").fetchone()[0]


def run_console(ctx: Context) -> dict:
    n, repeats = ctx.sizes.console_rows, ctx.sizes.console_repeats
    if ctx.quick:
        log(f"  QUICK: {n:,} queue rows (not the target's 1,000,000) and {repeats} requests a page")
    db = ctx.path("console.db")
    results = [measure(ctx, "SQLite", db)]
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix) and not ctx.keep:
            os.unlink(db + suffix)
    server = PostgresServer().start()
    try:
        url = server.create_database("console")
        results.append(measure(ctx, "PostgreSQL", url))
        version = postgres_version(url)
    finally:
        server.stop()
    return {"rows": n, "repeats": repeats, "target_ms": TARGET_MS, "backends": results,
            "postgres_version": version,
            "server_settings": "the tests' throwaway server (fsync=off, synchronous_commit=off, "
                               "full_page_writes=off), VACUUM ANALYZE after the build"}
