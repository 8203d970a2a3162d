"""kgsupervisor.compat: the asyncio KG manager's calls, run as its users run them, in real host processes."""
from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from kgsupervisor import compat
from kgsupervisor.errors import ConfigError
from kgsupervisor.ops.compat import database_of
from kgsupervisor.store.schema import init_db
from kgsupervisor.store.sqlite import connect

from .conftest import seed, status_counts, wait_for

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

# The snippet as the upstream's users wrote it; only the import line is kgsupervisor's.
SNIPPET = """
from kgsupervisor.compat import start_kg_workers, stop_kg_workers, get_worker_stats, get_kg_manager

await start_kg_workers(db_manager=GLOBAL_DB, num_workers=2, poll_interval=5.0)
health = await get_kg_manager().check_worker_health()
stats = get_worker_stats()                      # sync
await get_kg_manager().restart_workers(GLOBAL_DB, 5.0)
await stop_kg_workers()
"""

# A web app's shape without the web framework: a lifespan starts and stops the workers, the app
# in between waits for its crawl to be processed, then asks what its admin endpoints would.
# With `die` it stops after the start and waits to be killed.
HOST = """
import asyncio, json, sys
from contextlib import asynccontextmanager

import psutil

from kgsupervisor import logs
from kgsupervisor.compat import start_kg_workers, stop_kg_workers, get_worker_stats, get_kg_manager

logs.setup("text")


class CrawlerDatabase:
    \"\"\"The crawler's database object: the workers need only its db_path.\"\"\"

    def __init__(self, db_path):
        self.db_path = db_path


GLOBAL_DB = CrawlerDatabase(sys.argv[1])
DOCUMENTS = int(sys.argv[2])


@asynccontextmanager
async def lifespan(app):
    await start_kg_workers(db_manager=GLOBAL_DB, num_workers=2, poll_interval=5.0)
    yield
    await stop_kg_workers()


async def crawl_processed():
    for _ in range(600):
        if get_worker_stats()["total_processed"] >= DOCUMENTS:
            return
        await asyncio.sleep(0.05)


async def serve(app):
    await crawl_processed()
    health = await get_kg_manager().check_worker_health()
    stats = get_worker_stats()                      # sync
    await get_kg_manager().restart_workers(GLOBAL_DB, 5.0)
    app.update(health=health, stats=stats, after=await get_kg_manager().check_worker_health(),
               after_stats=get_worker_stats())


async def main():
    app = {}
    async with lifespan(app):
        if sys.argv[3] == "die":
            print(json.dumps({"started": True}), flush=True)
            await asyncio.Event().wait()
        await serve(app)
    app["left"] = [p.pid for p in psutil.Process().children(recursive=True)]
    print(json.dumps(app))


asyncio.run(main())
"""

# The calls the issue leaves to the upstream's behaviour, in one host run: stop before start,
# start twice, restart on another database, restart when stopped.
EDGES = """
import asyncio, json, sys
from types import SimpleNamespace

import psutil

from kgsupervisor import logs
from kgsupervisor.compat import get_kg_manager, get_worker_stats, start_kg_workers, stop_kg_workers

logs.setup("text")
FIRST, SECOND = SimpleNamespace(db_path=sys.argv[1]), SimpleNamespace(db_path=sys.argv[2])
DOCUMENTS = int(sys.argv[3])


async def processed(count):
    for _ in range(600):
        if get_worker_stats()["total_processed"] >= count:
            return
        await asyncio.sleep(0.05)


async def main():
    out = {}
    await stop_kg_workers()
    out["children_after_early_stop"] = len(psutil.Process().children())
    await start_kg_workers(FIRST, poll_interval=0.2)
    await start_kg_workers(FIRST, num_workers=3, poll_interval=0.2)
    out["supervisors"] = len(psutil.Process().children())
    out["first"] = await get_kg_manager().check_worker_health()
    await processed(DOCUMENTS)
    await get_kg_manager().restart_workers(SECOND, 0.2)
    await processed(DOCUMENTS)
    out["second"] = await get_kg_manager().check_worker_health()
    await stop_kg_workers()
    await get_kg_manager().restart_workers(FIRST, 0.2)
    out["restarted_when_stopped"] = await get_kg_manager().check_worker_health()
    await stop_kg_workers()
    out["left"] = len(psutil.Process().children(recursive=True))
    print(json.dumps(out))


asyncio.run(main())
"""

# A restart's flags reach the reloading supervisor: compat's restart keeps what an earlier start
# of kgsupervisor's own API was given (batch_size=3), the API's restart(flags) changes it.
FLAGS = """
import asyncio, json, sys

import kgsupervisor
from kgsupervisor import logs
from kgsupervisor.compat import get_kg_manager

logs.setup("text")


def pids(manager):
    return {d["pid"] for d in manager.check_worker_health()["worker_details"] if d["running"]}


async def main():
    manager = await kgsupervisor.start_kg_workers_async(sys.argv[1], num_workers=1, poll_interval=5.0,
                                                        batch_size=3)
    await get_kg_manager().restart_workers(sys.argv[1], 0.2)
    flags, old = dict(manager.flags), pids(manager)
    await asyncio.to_thread(manager.restart, {**manager.flags, "batch_size": 4})
    for _ in range(600):
        if pids(manager) and not pids(manager) & old:
            break
        await asyncio.sleep(0.05)
    await kgsupervisor.stop_kg_workers_async()
    print(json.dumps({"flags": flags}))


asyncio.run(main())
"""


def host_env(url: str) -> dict[str, str]:
    """The test's environment, the reference service as the KG service."""
    return {**os.environ, "KG_SERVICE_URL": url}


def run_host(code: str, url: str, *args: str) -> tuple[dict, str]:
    """Run `code` as a host program; the JSON it printed last and its log."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=90, env=host_env(url))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def running_pids(health: dict) -> set[int]:
    """The pids of the running workers in a check_worker_health() dict."""
    return {d["pid"] for d in health["worker_details"] if d["running"]}


def test_the_host_program_holds_the_snippet_verbatim():
    # Run in the snippet's order: start (lifespan), health, stats, restart (serve), stop (lifespan).
    lines = [line.strip() for line in SNIPPET.strip().splitlines() if line.strip()]
    assert [line for line in lines if line not in HOST] == []


def test_the_upstream_snippet_in_an_asyncio_lifespan(conn, db_path, kg_service):
    seed(conn, 10)
    out, log = run_host(HOST, kg_service, db_path, "10", "serve")
    health, stats, after = out["health"], out["stats"], out["after"]
    assert status_counts(conn) == {"completed": 10}
    assert health["manager_running"] and health["total_workers"] == health["healthy_workers"] == 2, health
    assert stats["total_processed"] == stats["total_success"] == 10 and stats["total_failed"] == 0
    assert stats["kg_service_status"]["url"] == kg_service
    # The restart is a rolling one on the same database: new workers in both slots, one reload.
    assert after["healthy_workers"] == 2 and not running_pids(after) & running_pids(health), (health, after)
    assert out["after_stats"]["workers_restarted"] == 1
    assert out["left"] == [], "processes left after stop_kg_workers()"
    # Every worker, the retired ones and the last ones, drained and exited 0.
    exited = {int(pid) for pid in re.findall(r"\(pid (\d+)\) exited with status 0", log)}
    assert exited == running_pids(health) | running_pids(after), log
    assert " ERROR " not in log and not re.search(r"exited with status [1-9]|killed by", log), log


def test_no_orphans_when_the_host_program_is_killed(db_path, kg_service):
    host = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOST), db_path, "0", "die"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=host_env(kg_service))
    try:
        assert json.loads(host.stdout.readline()) == {"started": True}

        def the_tree() -> list[psutil.Process] | None:
            supervisors = psutil.Process(host.pid).children()
            below = [p for s in supervisors for p in s.children(recursive=True)]
            names = sorted(p.name() for p in below)
            return supervisors + below if names == ["kgs-stats", "kgs-worker-0", "kgs-worker-1"] else None
        tree = wait_for(the_tree, 30, message="the supervisor, two workers and the stats manager")
        os.kill(host.pid, signal.SIGKILL)
        host.communicate(timeout=10)
        gone, alive = psutil.wait_procs(tree, timeout=15)
        assert alive == [], f"left behind: {alive}"
    finally:
        if host.poll() is None:
            host.kill()
            host.communicate()


def test_start_twice_stop_early_and_restart_elsewhere_behave_as_upstream(conn, db_path, kg_service,
                                                                          tmp_path, request):
    second_path = str(tmp_path / "second.db")
    init_db(second_path)
    second = connect(second_path)
    request.addfinalizer(second.close)
    seed(conn, 5)
    seed(second, 5)
    out, log = run_host(EDGES, kg_service, db_path, second_path, "5")
    assert out["children_after_early_stop"] == 0
    # The second start warned and forked nothing; the first used the upstream default of one worker.
    assert log.count("KG workers already running") == 1 and out["supervisors"] == 1, log
    assert out["first"]["total_workers"] == 1 and out["first"]["database"]["name"] == db_path
    # Another database: the workers moved there, as many as before, and drained it.
    assert out["second"]["database"]["name"] == second_path and out["second"]["total_workers"] == 1
    assert status_counts(conn) == {"completed": 5} and status_counts(second) == {"completed": 5}
    assert out["restarted_when_stopped"]["healthy_workers"] == 1
    assert out["restarted_when_stopped"]["database"]["name"] == db_path
    assert out["left"] == 0 and " ERROR " not in log, log


def test_a_restart_sends_its_flags_to_the_reloading_supervisor(db_path, kg_service):
    out, log = run_host(FLAGS, kg_service, db_path)
    assert out["flags"] == {"db_path": db_path, "num_workers": 1, "poll_interval": 0.2, "batch_size": 3}
    assert re.findall(r"worker started: .* batch=(\d+)", log) == ["3", "3", "4"], log
    assert " ERROR " not in log, log


def test_a_bad_db_manager_is_one_clear_error_before_any_fork():
    children = psutil.Process().children()
    expected = "an object with a db_path attribute, a database path or a postgresql:// URL"
    with pytest.raises(ConfigError, match=re.escape(f"db_manager='dict': expected {expected}")):
        asyncio.run(compat.start_kg_workers(db_manager={"db_path": "crawl.db"}))
    no_path = re.escape("db_manager.db_path='NoneType': expected a database path")
    with pytest.raises(ConfigError, match=no_path):
        asyncio.run(compat.get_kg_manager().restart_workers(SimpleNamespace(db_path=None)))
    assert psutil.Process().children() == children, "nothing was forked"


def test_a_db_manager_is_an_object_with_db_path_a_path_or_a_url():
    url = "postgresql://kg:secret@127.0.0.1:5432/crawl"
    assert database_of(SimpleNamespace(db_path=Path("/var/lib/crawl.db"))) == "/var/lib/crawl.db"
    assert database_of(Path("crawl.db")) == "crawl.db" and database_of(url) == url


def shape(call) -> tuple[bool, str]:
    """(is a coroutine function, the signature without annotations)."""
    signature = inspect.signature(call)
    bare = signature.replace(return_annotation=inspect.Signature.empty,
                             parameters=[p.replace(annotation=inspect.Parameter.empty)
                                         for p in signature.parameters.values()])
    return inspect.iscoroutinefunction(call), str(bare)


def test_the_signatures_and_kinds_are_the_upstreams():
    manager = compat.KGWorkerManager()
    assert isinstance(compat.get_kg_manager(), compat.KGWorkerManager)
    assert {name: shape(call) for name, call in [
        ("start_kg_workers", compat.start_kg_workers), ("stop_kg_workers", compat.stop_kg_workers),
        ("get_worker_stats", compat.get_worker_stats), ("get_kg_manager", compat.get_kg_manager),
        ("KGWorkerManager", compat.KGWorkerManager), ("start_workers", manager.start_workers),
        ("stop_workers", manager.stop_workers), ("restart_workers", manager.restart_workers),
        ("check_worker_health", manager.check_worker_health),
        ("get_aggregate_stats", manager.get_aggregate_stats)]} == {
        "start_kg_workers": (True, "(db_manager, num_workers=1, poll_interval=5.0)"),
        "stop_kg_workers": (True, "()"),
        "get_worker_stats": (False, "()"),
        "get_kg_manager": (False, "()"),
        "KGWorkerManager": (False, "()"),
        "start_workers": (True, "(db_manager, num_workers=1, poll_interval=5.0)"),
        "stop_workers": (True, "()"),
        "restart_workers": (True, "(db_manager, poll_interval=5.0)"),
        "check_worker_health": (True, "()"),
        "get_aggregate_stats": (False, "()"),
    }
