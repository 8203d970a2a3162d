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
