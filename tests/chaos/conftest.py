"""Fault-suite fixtures: each scenario's wall time starts when its test does."""
from __future__ import annotations

import time

import pytest

from .harness import TEST_CLOCK


@pytest.fixture(autouse=True)
def scenario_clock():
    TEST_CLOCK["started"] = time.monotonic()
    yield
    TEST_CLOCK["started"] = 0.0


def pytest_collection_modifyitems(config, items) -> None:
    """Under --soak, every scenario may take up to an hour: a marker closer than the module's
    timeout wins in pytest-timeout, so the longer one is put in front."""
    if config.getoption("--soak"):
        for item in items:
            item.add_marker(pytest.mark.timeout(3600), append=False)
