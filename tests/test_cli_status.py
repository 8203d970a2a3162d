"""`status --watch` run in-process: the stop handlers it installs go away with it."""
from __future__ import annotations

import signal

import pytest

from kgsupervisor.errors import NotReachable
from kgsupervisor.ops.cli_status import watch_status

from .conftest import free_port


def test_watch_status_puts_back_the_signal_handlers_it_replaced():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    # Nothing listens there: the first view fails after the handlers are in, and must undo them.
    with pytest.raises(NotReachable):
        watch_status(f"127.0.0.1:{free_port()}", 0.1)
    assert {sig: signal.getsignal(sig) for sig in before} == before
