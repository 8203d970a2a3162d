"""A throwaway Prometheus server for the tests: Debian's `prometheus` on 127.0.0.1 at a free port,
its configuration and storage in a temp dir, scraping given targets every second with given rule
files loaded. It never reaches beyond loopback. It never skips: a machine without the programs fails
with how to install them (`make test` runs scripts/ensure-prometheus).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from typing import Any

import requests

from .processes import Process, free_port, wait_for

INSTALL_HINT = "install Prometheus (Debian: apt-get install prometheus), or run scripts/ensure-prometheus"
JOB = "kgsupervisor"  # the scrape job the shipped rules select


def program(name: str) -> str:
    """The path of `prometheus` or `promtool`; a RuntimeError saying how to install it if missing."""
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"no `{name}` program on this machine: {INSTALL_HINT}")
    return found


def scrape_config(targets: Sequence[str], rule_files: Sequence[str]) -> dict[str, Any]:
    """The server's configuration (JSON is YAML): one job scraping `targets`, rules evaluated each second."""
    return {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": list(rule_files),
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": list(targets)}]}]}


class PrometheusServer:
    """One private server; start() waits until it is ready, stop() kills it and deletes its files."""

    def __init__(self, targets: Sequence[str], rule_files: Sequence[str] = ()) -> None:
        self.binary = program("prometheus")
        self.root = tempfile.mkdtemp(prefix="kgsupervisor-prom-")
        self.config = os.path.join(self.root, "prometheus.yml")
        with open(self.config, "w") as f:
            json.dump(scrape_config(targets, rule_files), f, indent=2)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: Process | None = None

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        """Start the server and wait for /-/ready; returns self."""
        command = [self.binary, f"--config.file={self.config}", f"--web.listen-address=127.0.0.1:{self.port}",
                   f"--storage.tsdb.path={os.path.join(self.root, 'data')}", "--log.level=warn"]
        self.process = Process(command, os.path.join(self.root, "prometheus.log"), name="prometheus")
        wait_for(self.ready, timeout, interval=0.1, message=f"Prometheus ready at {self.url}")
        return self

    def ready(self) -> bool:
        """True once it answers /-/ready; an AssertionError with its log if it exited."""
        assert self.process is not None and self.process.poll() is None, \
            f"prometheus exited: {self.process.output if self.process else ''}"
        try:
            return requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def api(self, path: str, **params: str) -> Any:
        """The `data` of a GET on /api/v1/PATH; an AssertionError naming the query if it failed."""
        answer = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = answer.json()
        assert body.get("status") == "success", f"{path} {params}: {body.get('error', body)}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector `expr` evaluates to now (a scalar as one sample without labels)."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts pending or firing now."""
        return self.api("alerts")["alerts"]

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule, as the server parsed it (its `query` printed back by the PromQL parser)."""
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def stop(self) -> None:
        try:
            if self.process is not None:
                self.process.kill()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def promtool(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run `promtool ARGS` to its exit, its output captured."""
    return subprocess.run([program("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=cwd)
