"""The console as a real `kgsupervisor run` serves it, beside /health, /stats and /metrics in its
status process, and as a real `kgsupervisor console` serves it alone: real processes, real
requests, real signals; the database and the logs are the oracle."""
from __future__ import annotations

import re
import subprocess
import sys
from contextlib import closing

import pytest
import requests

from kgsupervisor.ops import metrics
from kgsupervisor.ops.statusclient import HEALTH_KEYS, STATS_KEYS
from kgsupervisor.queue.audit import recent_actions
from kgsupervisor.queue.control import paused_state
from kgsupervisor.store.sqlite import connect

from .conftest import seed, wait_for
from .consoleclient import ConsoleClient, element_text
from .processes import free_port, run_to_exit

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

TOKEN = "run-console-token-5d1e88c4"


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


def test_run_beyond_loopback_keeps_the_status_paths_open_and_the_console_behind_its_login(
        db_path, kg_service, processes):
    port = free_port()
    proc = processes.supervisor(db_path, kg_service, "--workers", "1", "--status-addr", f"0.0.0.0:{port}",
                                env={"KG_CONSOLE_TOKEN": TOKEN})
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: answers(f"{base}/health"), 30, interval=0.1, message="a healthy supervisor")

    for path, keys, content_type in (("/health", HEALTH_KEYS, "application/json"),
                                     ("/stats", STATS_KEYS, "application/json"),
                                     ("/metrics", None, metrics.CONTENT_TYPE)):
        answer = requests.get(base + path, timeout=5)
        assert (answer.status_code, answer.headers["Content-Type"]) == (200, content_type), path
        assert answer.headers["Server"].startswith("kgsupervisor-status"), path
        assert keys is None or set(keys) <= set(answer.json()), path
    assert "kgsupervisor_queue_rows" in requests.get(base + "/metrics", timeout=5).text
    overview = requests.get(base + "/", allow_redirects=False, timeout=5)
    assert overview.status_code == 302 and overview.headers["Location"].endswith("/login?next=/")

    client = ConsoleClient(base)
    assert client.login(TOKEN, "ops").status_code == 303
    assert client.post("/workers/add", {}).status_code == 200
    proc.wait_for_log("SIGTTIN: now 2 worker(s)")
    pages = [client.get(path).text for path in ("/", "/audit", "/documents", "/login")]
    assert client.post("/drain", {}, follow=False).status_code == 303
    log = proc.stop(None)

    assert proc.returncode == 0, log
    assert "console: ops@127.0.0.1 add-worker (SIGTTIN to supervisor pid" in log
    assert "console: ops@127.0.0.1 drain (SIGTERM to supervisor pid" in log
    assert not any(TOKEN in text for text in (log, *pages))
    with closing(connect(db_path)) as conn:
        actions = [(e.who, e.action) for e in recent_actions(conn)]
    assert actions == [("ops@127.0.0.1", action) for action in ("drain", "add-worker", "login")]
    shown = run_to_exit("run", "--db", db_path, "--print-config", env={"KG_CONSOLE_TOKEN": TOKEN})
    assert TOKEN not in shown.stdout and re.search(r"^console_token +\*{8} +\(env; KG_CONSOLE_TOKEN\)$",
                                                   shown.stdout, re.M), shown.stdout


@pytest.mark.parametrize("command", [["run", "--status-addr", "0.0.0.0:0"],
                                     ["console", "--bind", "0.0.0.0:0"]])
def test_a_console_beyond_loopback_without_a_token_is_refused_in_one_line(db_path, command):
    result = run_to_exit(*command, "--db", db_path, env={"KG_CONSOLE_TOKEN": "", "KG_CONSOLE_TOKEN_FILE": ""})
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("Error: KG_CONSOLE_TOKEN=None: expected an operator token (KG_CONSOLE_TOKEN or "
                             "KG_CONSOLE_TOKEN_FILE) for a console at 0.0.0.0:0, beyond this host "
                             "(or listen on 127.0.0.1)\n")


def test_an_unreadable_token_file_is_refused_in_one_line_before_the_console_starts(db_path, tmp_path):
    missing = tmp_path / "no-such-token"
    result = run_to_exit("console", "--db", db_path, env={"KG_CONSOLE_TOKEN_FILE": str(missing)})
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (f"Error: console_token_file='{missing}': expected a readable file holding the "
                             "operator token (No such file or directory)\n")


def test_the_console_on_its_own_shows_the_database_and_has_no_pool_to_act_on(db_path, conn, processes):
    seed(conn, 4)
    proc = processes.kgsupervisor(["console", "--db", db_path, "--bind", "127.0.0.1:0"],
                                  env={"KG_CONSOLE_TOKEN": TOKEN}, name="console")
    base = re.search(r"console on (http://\S+)/ ", proc.wait_for_log("console on http://")).group(1)
    client = ConsoleClient(base)

    overview = client.get("/")
    assert overview.status_code == 200 and element_text(overview.text, "queue-counts") is not None
    assert 'data-status="pending">4<' in overview.text and 'id="add-worker"' not in overview.text
    assert client.get("/health").status_code == 404  # no supervisor here: no status document
    assert client.login(TOKEN).status_code == 303
    assert client.post("/workers/add", {}).status_code == 404
    assert client.post("/pause", {"reason": "from the ops host"}).status_code == 200
    log = proc.stop()

    assert proc.returncode == 0, log
    assert paused_state(conn).reason == "from the ops host"
    assert "console: alice@127.0.0.1 pause (from the ops host)" in log and TOKEN not in log


def test_the_supervisor_imports_no_web_library_before_it_forks(db_path):
    """Flask and waitress are the status child's: imported there, after the fork, never before."""
    code = ("import sys\n"
            "from kgsupervisor import config\n"
            "from kgsupervisor.ops import cli, reporting, statusd\n"
            "from kgsupervisor.pool import supervisor\n"
            f"settings, _ = config.load({{'db_path': {db_path!r}, 'console_token': 'x' * 20}}, {{}})\n"
            "statusd.StatusEndpoint(('127.0.0.1', 0), settings).bind()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('flask', 'waitress', 'jinja2', 'werkzeug', 'markupsafe', 'itsdangerous')))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "[]\n", "")


def test_the_console_on_its_own_shows_the_workers_of_every_running_supervisor(db_path, kg_service, processes):
    """Workers of other hosts come from the registry (each supervisor writes its workers with
    its row): a console that runs no pool lists them, and drops them once their supervisor stops."""
    port = free_port()
    supervisor = processes.supervisor(db_path, kg_service, "--workers", "2", "--status-addr", f"127.0.0.1:{port}")
    wait_for(lambda: answers(f"http://127.0.0.1:{port}/health"), 30, interval=0.1, message="a healthy supervisor")
    health = requests.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
    pids = {d["pid"] for d in health["worker_details"]}
    console = processes.kgsupervisor(["console", "--db", db_path, "--bind", "127.0.0.1:0"], name="console")
    base = re.search(r"console on (http://\S+)/ ", console.wait_for_log("console on http://")).group(1)

    def shown() -> set[int]:
        return {int(pid) for pid in re.findall(r'<tr data-pid="(\d+)"', requests.get(base + "/live", timeout=5).text)}
    wait_for(lambda: shown() == pids, 30, interval=0.2, message=f"the workers {pids} in the console")
    assert f'data-host="{health["host"]}"' in requests.get(base + "/live", timeout=5).text

    supervisor.stop()
    wait_for(lambda: not shown(), 30, interval=0.2, message="no workers once the supervisor stopped")
    console.stop()
