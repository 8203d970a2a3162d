"""The shipped monitoring (conf/prometheus, conf/grafana) against the real thing: promtool checks the
rules and runs their unit tests, and a real Prometheus on 127.0.0.1 scrapes a real `kgsupervisor run`
every second with the rules loaded. Every rule and dashboard query returns data through its HTTP API,
every metric they name is one /metrics serves, and the KG-down alert goes pending, fires and resolves
as the real KG service goes down and comes back."""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Iterator
from contextlib import closing

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from kgsupervisor.store.schema import init_db
from kgsupervisor.store.sqlite import connect

from .conftest import seed, wait_for
from .processes import Process, Processes, free_port
from .promserver import JOB, PrometheusServer, promtool

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

ROOT = pathlib.Path(__file__).resolve().parent.parent
RULES = ROOT / "conf" / "prometheus" / "kgsupervisor-rules.yml"
RULE_TESTS = ROOT / "conf" / "prometheus" / "kgsupervisor-rules.test.yml"
DASHBOARD = ROOT / "conf" / "grafana" / "kgsupervisor-dashboard.json"
TEST_FOR = "2s"  # every alert's `for:` on the live server: long enough to be seen pending
# What Grafana puts in place of the dashboard's variables when every host and endpoint is selected.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": JOB, "$host": ".*", "$endpoint": ".*"}
# A document takes the dev service 0.2 s: two workers send ten a second, so the queue outlasts the module.
SERVICE_LATENCY = "0.2"
DOCUMENTS = 1500

IN_BRACES = re.compile(r"\{[^}]*\}")  # label matchers, with their strings
IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
# Metric names: the served families', recording rules' level:metric:operation, and Prometheus's `up`.
METRIC_NAME = re.compile(r"kgsupervisor_\w+|\w+:\w+:\w+|up")
COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(?!\s*bool\b)")
LABEL_VALUES = re.compile(r"label_values\((.*),\s*(\w+)\)$")
# Issue 20's list: KG service down, one endpoint's breaker open, no progress, failure ratio, workers
# missing, crash loop, supervisor absent, queue growing, lease expiries (hosts vanishing).
ISSUE_ALERTS = {"KGServiceDown", "KGEndpointBreakerOpen", "KGSupervisorNoProgress",
                "KGSupervisorFailureRatioHigh", "KGSupervisorWorkersMissing", "KGSupervisorCrashLoop",
                "KGSupervisorAbsent", "KGSupervisorQueueGrowing", "KGSupervisorHostVanishedHoldingLeases"}


# -- reading the shipped files --------------------------------------------------------------------

def with_test_sized_for(rules: str) -> str:
    """The rules with every alert's `for:` cut to TEST_FOR (the shipped file is never changed)."""
    return re.sub(r"^([ \t]+for:[ \t]*)\S+[ \t]*$", rf"\g<1>{TEST_FOR}", rules, flags=re.M)


def alert_names() -> set[str]:
    """The names of the alerts the shipped rules define."""
    return set(re.findall(r"^\s*- alert:\s*(\S+)\s*$", RULES.read_text(), re.M))


def unit_tested_alerts() -> tuple[set[str], set[str]]:
    """The alerts the promtool tests expect to fire, and those they expect to stay silent."""
    cases = re.findall(r"alertname:\s*(\S+)\s*\n\s*exp_alerts:(.*)", RULE_TESTS.read_text())
    firing = {name for name, rest in cases if rest.strip() != "[]"}
    return firing, {name for name, rest in cases if rest.strip() == "[]"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    """Every panel, those inside collapsed rows too."""
    panels = dashboard()["panels"]
    return [p for panel in panels for p in [panel, *panel.get("panels", [])]]


def panel_queries() -> list[str]:
    return [target["expr"] for panel in dashboard_panels() for target in panel.get("targets", [])]


def variable_queries() -> list[str]:
    return [v["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]


def as_grafana_sends_it(query: str) -> str:
    """`query` with the dashboard's variables replaced as Grafana does with all hosts and endpoints."""
    for name, value in GRAFANA_VARIABLES.items():
        query = query.replace(name, value)
    return query


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label matchers and their strings left out)."""
    return {word for word in IDENTIFIER.findall(IN_BRACES.sub("", expr)) if METRIC_NAME.fullmatch(word)}


def with_bool_comparisons(expr: str) -> str:
    """`expr` with each comparison turned into its `bool` form: 0 or 1 for every series instead of a
    filter, so the expression returns data whenever every series and join it relies on exists."""
    parts = re.split(r"(\{[^}]*\})", expr)
    return "".join(part if part.startswith("{") else COMPARISON.sub(r" \1 bool ", part) for part in parts)


def served_names(metrics_text: str) -> set[str]:
    """The sample names a /metrics text holds (`_total`, `_bucket`, `_sum`, `_count` included)."""
    families = text_string_to_metric_families(metrics_text)
    return {sample.name for family in families for sample in family.samples}


# -- the live stack: a dev KG service, `kgsupervisor run`, Prometheus -----------------------------

@dataclasses.dataclass
class Stack:
    """The running KG service, supervisor and Prometheus the live tests share."""

    processes: Processes
    service: Process
    service_port: int
    status_url: str
    prometheus: PrometheusServer

    def take_service_down(self) -> None:
        """SIGKILL the KG service: connections refused from now on."""
        self.service.kill()

    def bring_service_back(self) -> None:
        """Start the KG service again on the port the supervisor sends to."""
        self.service = start_service(self.processes, self.service_port)[0]


def start_service(processes: Processes, port: int = 0) -> tuple[Process, int]:
    """The reference KG service as a real process; returns it and the port it listens on."""
    service = processes.kgsupervisor(["dev-service", "--port", str(port), "--latency", SERVICE_LATENCY],
                                     name="dev-service")
    log = service.wait_for_log("dev-service listening on")
    return service, int(re.search(r"listening on http://127\.0\.0\.1:(\d+)", log).group(1))


def metric_value(status_url: str, name: str) -> float | None:
    """The value of an unlabelled sample in the supervisor's /metrics right now."""
    text = requests.get(f"{status_url}/metrics", timeout=5).text
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


def ready_to_scrape(status_url: str) -> bool:
    """Both workers run and have heard the KG service answer (before that kg_up is 0, unknown)."""
    try:
        return (metric_value(status_url, "kgsupervisor_workers_running") == 2
                and metric_value(status_url, "kgsupervisor_kg_up") == 1)
    except requests.RequestException:
        return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    """One shared stack for the module: starting it takes seconds, every test reads it."""
    root = tmp_path_factory.mktemp("monitoring")
    processes = Processes(root / "processes")
    db_path = str(root / "kg.db")
    init_db(db_path)
    with closing(connect(db_path)) as conn:
        seed(conn, DOCUMENTS)
    prometheus = None
    try:
        service, port = start_service(processes)
        status_url = f"http://127.0.0.1:{free_port()}"
        processes.supervisor(db_path, f"http://127.0.0.1:{port}", "--workers", "2",
                             "--status-addr", status_url.removeprefix("http://"))
        wait_for(lambda: ready_to_scrape(status_url), 30, interval=0.1,
                 message="two workers sending documents")
        rules = root / "rules" / RULES.name
        rules.parent.mkdir()
        rules.write_text(with_test_sized_for(RULES.read_text()))
        prometheus = PrometheusServer([status_url.removeprefix("http://")], [str(rules)]).start()
        yield Stack(processes, service, port, status_url, prometheus)
    finally:
        if prometheus is not None:
            prometheus.stop()
        processes.kill_all()


# -- promtool ---------------------------------------------------------------------------------------

def test_promtool_accepts_the_rules():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("cwd", [RULE_TESTS.parent, ROOT],
                         ids=["as docs/monitoring.md runs them", "as README runs them"])
def test_the_promtool_unit_tests_of_the_rules_pass(cwd):
    result = promtool("test", "rules", str(RULE_TESTS.relative_to(cwd)), cwd=str(cwd))
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_where_it_fires_and_one_where_it_stays_silent():
    firing, silent = unit_tested_alerts()
    assert alert_names() == ISSUE_ALERTS
    assert (firing, silent) == (alert_names(), alert_names())


# -- the dashboard ----------------------------------------------------------------------------------

def test_every_dashboard_query_reads_the_data_source_job_host_and_endpoint_variables():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    assert all(variables[name]["includeAll"] and variables[name]["multi"] for name in ("host", "endpoint"))
    panels = [p for p in dashboard_panels() if p["type"] != "row"]
    assert len({p["id"] for p in panels}) == len(panels) >= 10
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for expr in [t["expr"] for t in panel["targets"]]:
            job_level = all(name.startswith("job:") for name in metric_names(expr))
            where = (panel["title"], expr)
            assert 'job=~"$job"' in expr and (job_level or 'instance=~"$host"' in expr), where
            assert "kgsupervisor_kg_endpoint_" not in expr or 'url=~"$endpoint"' in expr, where


# -- against a real /metrics and a real Prometheus --------------------------------------------------

def test_every_metric_the_rules_and_the_dashboard_read_is_one_a_real_supervisor_serves(stack):
    served = served_names(requests.get(f"{stack.status_url}/metrics", timeout=5).text)
    rules = stack.prometheus.rules()
    recorded = {rule["name"] for rule in rules if rule["type"] == "recording"}
    queries = [rule["query"] for rule in rules] + panel_queries() + variable_queries()
    used = set().union(*map(metric_names, queries))

    assert len(rules) == len(alert_names()) + len(recorded)
    assert used - served - recorded - {"up"} == set()
    assert {"kgsupervisor_kg_up", "kgsupervisor_kg_request_duration_seconds_bucket"} <= used & served


def test_every_rule_and_dashboard_query_returns_data_from_a_real_prometheus(stack):
    rules = stack.prometheus.rules()
    queries = [as_grafana_sends_it(q) for q in panel_queries()]
    queries += [rule["name"] for rule in rules if rule["type"] == "recording"]
    queries += [rule["query"] for rule in rules if rule["type"] == "recording"]
    queries += [with_bool_comparisons(rule["query"]) for rule in rules if rule["type"] == "alerting"]
    queries += sorted(set().union(*map(metric_names, queries)))  # each metric on its own
    labelled = [LABEL_VALUES.match(as_grafana_sends_it(q)).groups() for q in variable_queries()]

    missing: list[str] = []

    def every_query_returns_data() -> bool:
        missing[:] = [q for q in queries if not stack.prometheus.query(q)]
        missing.extend(f"{series} with a {label} label" for series, label in labelled
                       if not any(label in r["metric"] for r in stack.prometheus.query(series)))
        return not missing

    try:
        wait_for(every_query_returns_data, 30, interval=0.5)
    except AssertionError:
        pytest.fail(f"no data from Prometheus for: {missing}", pytrace=False)
    assert stack.prometheus.alerts() == []  # a healthy supervisor raises no alert


def test_the_kg_down_alert_goes_pending_then_firing_and_resolves_when_the_service_is_back(stack):
    states: list[str] = []

    def kg_down_state() -> str | None:
        found = [a["state"] for a in stack.prometheus.alerts() if a["labels"]["alertname"] == "KGServiceDown"]
        state = found[0] if found else None
        if state is not None and state not in states:
            states.append(state)
        return state

    assert kg_down_state() is None
    stack.take_service_down()
    wait_for(lambda: kg_down_state() == "firing", 30, interval=0.05, message="KGServiceDown firing")
    stack.bring_service_back()
    wait_for(lambda: kg_down_state() is None, 45, interval=0.1, message="KGServiceDown resolved")

    assert states == ["pending", "firing"]
    assert [float(s["value"][1]) for s in stack.prometheus.query("kgsupervisor_kg_up")] == [1.0]
