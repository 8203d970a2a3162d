"""sd_notify over a real unix datagram socket of our own, standing in for systemd's."""
from __future__ import annotations

import socket

import pytest

from kgsupervisor.pool.systemd import Notifier

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def listener(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    yield sock, path
    sock.close()


def test_a_notification_arrives_as_one_datagram(listener):
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.notify("READY=1", "STATUS=running")
    assert sock.recv(4096) == b"READY=1\nSTATUS=running"
    notifier.close()


def test_a_listener_that_never_reads_never_stalls_the_sender(listener):
    # The socket's queue holds a few datagrams; the send after that would block for ever if it
    # waited. It is dropped instead (False), and what was queued is still there to read.
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    sent = [notifier.notify(f"STATUS=turn {n}") for n in range(5000)]
    assert sent[0] and not all(sent), "the queue filled and later statuses were dropped, not waited on"
    assert sock.recv(4096) == b"STATUS=turn 0"
    notifier.close()


def test_without_notify_socket_nothing_is_sent():
    notifier = Notifier({})
    assert not notifier.enabled and not notifier.notify("READY=1")
