"""Fault-suite fixtures: each scenario's wall time starts when its test does, and its rows of
docs/reliability.md are written only if the whole test passed."""
from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from ..faultserver import FaultServer
from ..processes import kill_groups
from .harness import RECORDED, STARTED, TEST_CLOCK, write_recorded


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep the call phase's report on the item, for the teardown of `scenario` below."""
    report = (yield).get_result()
    if report.when == "call":
        item.rep_call = report


@pytest.fixture(autouse=True)
def scenario(request) -> Iterator[None]:
    """Time the scenario from here; write the rows it recorded only if its test passed; kill
    whatever supervisor it left running."""
    TEST_CLOCK["started"] = time.monotonic()
    RECORDED.clear()
    yield
    TEST_CLOCK["started"] = 0.0
    kill_groups(STARTED)
    STARTED.clear()
    call = getattr(request.node, "rep_call", None)
    write_recorded(passed=call is not None and call.passed)


@pytest.fixture
def reference_service() -> Iterator[FaultServer]:
    """A fault server that answers every ingest like the reference service, its journal kept
    for check_invariants()."""
    server = FaultServer()
    yield server
    server.close()


def pytest_collection_modifyitems(config, items) -> None:
    """Under --soak, every scenario may take up to an hour: a marker closer than the module's
    timeout wins in pytest-timeout, so the longer one is put in front."""
    if config.getoption("--soak"):
        for item in items:
            item.add_marker(pytest.mark.timeout(3600), append=False)
