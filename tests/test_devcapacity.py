"""`dev-service --capacity`: a KG service that behaves like a GPU box, driven over real HTTP on
127.0.0.1 from real threads, and as the real `kgsupervisor dev-service` process for its signals.

Requests are held in service by a service time of an hour per 1,000 characters and let go by
setting it to 0: the test reads the service's own counters while they are held."""
from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests
from click.testing import CliRunner

from kgsupervisor.kg.devcapacity import CapacityModel, is_loopback, parse_schedule
from kgsupervisor.kg.devservice import make_server
from kgsupervisor.ops.cli import main

from .conftest import wait_for

pytestmark = pytest.mark.timeout(60)

HOLD = 3600.0  # seconds per 1,000 characters: nothing in service finishes until released
SENTENCE = "Jane Doe met Acme Corp in Paris. "


def document(content_id: int, chars: int = 1000) -> dict:
    """A valid ingest request whose one chunk holds `chars` characters of text."""
    text = (SENTENCE * (chars // len(SENTENCE) + 1))[:chars]
    return {"content_id": content_id, "url": f"https://example.org/{content_id}", "title": "t",
            "markdown": text, "chunks": [{"vector_rowid": content_id, "chunk_index": 0, "char_start": 0,
                                          "char_end": chars, "text": text}], "metadata": {}}


class Service:
    """A dev service with a capacity model, serving in a thread; `send` fires an ingest from a
    thread of its own and keeps its answer with the times it was sent and answered."""

    def __init__(self, model: CapacityModel | None) -> None:
        self.model = model
        self.server = make_server("127.0.0.1", 0, capacity=model)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.answers: dict[int, tuple[requests.Response, float, float]] = {}
        self.senders: list[threading.Thread] = []

    def send(self, content_id: int, chars: int = 1000) -> None:
        def post() -> None:
            started = time.monotonic()
            answer = requests.post(f"{self.url}/api/v1/ingest", json=document(content_id, chars), timeout=30)
            self.answers[content_id] = (answer, started, time.monotonic())
        self.senders.append(threading.Thread(target=post, daemon=True))
        self.senders[-1].start()

    def health(self) -> dict:
        return requests.get(f"{self.url}/health", timeout=5).json()

    def wait_for_counts(self, **counts: int) -> dict:
        """Wait until /health shows these counts (in_service=2, waiting=1 ...); returns it."""
        def matching() -> dict | None:
            body = self.health()
            return body if all(body[key] == value for key, value in counts.items()) else None
        return wait_for(matching, message=f"/health showing {counts}")

    def answered(self) -> dict[int, tuple[requests.Response, float, float]]:
        """Every answer, once every ingest sent has been answered."""
        for sender in self.senders:
            sender.join(timeout=30)
        assert not any(sender.is_alive() for sender in self.senders)
        return self.answers

    def close(self) -> None:
        if self.model is not None:
            self.model.set_service_time(0)  # let anything still held go
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def start() -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def start_service(capacity: int | None = None, **options) -> Service:
        model = CapacityModel(capacity, **options) if capacity is not None else None
        started.append(Service(model))
        return started[-1]

    yield start_service
    for service in started:
        service.close()


# ---------------------------------------------------------------- capacity, queue, refusals


@pytest.mark.parametrize("overload, error, retry_after", [
    (503, "Service at capacity: too many requests waiting", None),
    (429, "Too many requests: service at capacity", "1"),
])
def test_capacity_requests_are_served_the_queue_limit_wait_and_the_rest_are_refused_at_once(
        start, overload, error, retry_after):
    service = start(2, queue_limit=2, service_time_per_kchar=HOLD, overload=overload)
    for content_id in range(1, 7):
        service.send(content_id)
    wait_for(lambda: len(service.answers) == 2, message="two refusals while four are held")
    held = service.wait_for_counts(in_service=2, waiting=2)
    assert (held["capacity"], held["work"]["refused"], held["work"]["served"]) == (2, 2, 0)
    for answer, *_ in service.answers.values():
        body = answer.json()
        assert answer.status_code == overload and answer.headers.get("Retry-After") == retry_after
        assert (body["success"], body["error"], body["error_type"]) == (False, error, "HTTPException")
    service.model.set_service_time(0)
    answers = service.answered()
    served = [answer for answer, *_ in answers.values() if answer.status_code == 200]
    assert sorted(int(answer.headers["X-Dev-Admission"]) for answer in served) == [1, 2, 3, 4]
    done = service.wait_for_counts(in_service=0, waiting=0)
    assert done["work"] == {**done["work"], "served": 4, "refused": 2}


def test_waiting_requests_are_admitted_in_the_order_they_came(start):
    service = start(1, service_time_per_kchar=HOLD)
    service.send(10)
    service.wait_for_counts(in_service=1)
    for waiting, content_id in enumerate((11, 12, 13), start=1):
        service.send(content_id)
        service.wait_for_counts(waiting=waiting)
    service.model.set_service_time(0)
    answers = service.answered()
    admitted = {cid: int(answer.headers["X-Dev-Admission"]) for cid, (answer, *_) in answers.items()}
    assert admitted == {10: 1, 11: 2, 12: 3, 13: 4}


def test_service_time_is_proportional_to_the_documents_text(start):
    service = start(1, service_time_per_kchar=0.1)
    for content_id, chars in ((1, 500), (2, 4000)):
        service.send(content_id, chars)
        service.answered()
    small, big = (finished - sent for _, sent, finished in service.answers.values())
    assert big > 3 * small, (small, big)  # 8 times the text
    assert service.health()["work"]["chars_served"] == 4500


# ---------------------------------------------------------------- thrashing


def test_thrashing_slows_every_request_once_more_than_the_capacity_are_in_service(start):
    service = start(1, thrash=True, service_time_per_kchar=HOLD)
    durations, cost = {}, {}
    for phase, content_ids in (("alone", [1]), ("together", [2, 3])):
        before = service.health()["work"]
        for content_id in content_ids:
            service.send(content_id)
        service.wait_for_counts(in_service=len(content_ids), waiting=0)  # both admitted at once
        released = time.monotonic()
        service.model.set_service_time(0.2)
        answers = service.answered()
        durations[phase] = [answers[cid][2] - released for cid in content_ids]
        after = service.health()["work"]
        cost[phase] = (after["service_seconds"] - before["service_seconds"]) / (
            after["chars_served"] - before["chars_served"])
        service.model.set_service_time(HOLD)
    assert all(answer.status_code == 200 for answer, *_ in service.answers.values())
    # Two in service at capacity 1 run 2 ** 1.5 = 2.8 times slower each: their work costs more.
    assert min(durations["together"]) > 1.5 * max(durations["alone"]), durations
    assert cost["together"] > 1.5 * cost["alone"], cost


# ---------------------------------------------------------------- changing the capacity


def test_an_admin_call_on_loopback_changes_the_capacity_and_admits_those_waiting(start):
    service = start(1, service_time_per_kchar=HOLD)
    for content_id in (1, 2, 3):
        service.send(content_id)
    service.wait_for_counts(in_service=1, waiting=2)
    answer = requests.post(f"{service.url}/admin/capacity", json={"capacity": 3}, timeout=5)
    assert answer.status_code == 200 and answer.json()["capacity"] == 3
    service.wait_for_counts(capacity=3, in_service=3, waiting=0)
    assert service.model.changes[-1][1:] == (1, 3, "admin call from 127.0.0.1")
    for body in ({"capacity": 0}, {"capacity": "2"}, {"capacity": True}, [3], {}):
        refused = requests.post(f"{service.url}/admin/capacity", json=body, timeout=5)
        assert refused.status_code == 400 and refused.json()["error_type"] == "HTTPException", body
    assert requests.get(f"{service.url}/admin/capacity", timeout=5).status_code == 405
    # Lowered below those in service: they go on, and a newcomer waits until fewer are in.
    assert requests.post(f"{service.url}/admin/capacity", json={"capacity": 1}, timeout=5).status_code == 200
    service.send(4)
    service.wait_for_counts(capacity=1, in_service=3, waiting=1)


def test_without_a_capacity_there_is_no_admin_call_and_health_adds_nothing(start):
    service = start()
    answer = requests.post(f"{service.url}/admin/capacity", json={"capacity": 3}, timeout=5)
    assert answer.status_code == 404
    assert "X-Dev-Admission" not in requests.post(f"{service.url}/api/v1/ingest", json=document(1),
                                                  timeout=5).headers
    assert set(service.health()) == {"status", "services", "version", "uptime_seconds", "timestamp"}


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.7", False), ("::ffff:10.0.0.7", False), ("2001:db8::1", False), ("localhost", False),
])
def test_admin_calls_are_answered_on_loopback_only(host, loopback):
    assert is_loopback(host) is loopback


def test_a_capacity_schedule_changes_the_capacity_at_its_times(start):
    service = start(4, schedule=parse_schedule("0:3, 0.05:1"))
    wait_for(lambda: len(service.model.changes) == 2, message="both steps of the schedule")
    assert [change[1:] for change in service.model.changes] == [
        (4, 3, "schedule, at 0 s"), (3, 1, "schedule, at 0.05 s")]
    assert service.health()["capacity"] == 1


@pytest.mark.parametrize("text, message", [
    ("30", "'30' is not SECONDS:CAPACITY"), ("30:0", "'30:0' is not"), ("-1:2", "'-1:2' is not"),
    ("nan:2", "'nan:2' is not"), ("30:2,10:4", "'10:4' comes before the step ahead of it"),
])
def test_a_schedule_that_cannot_be_followed_is_refused_in_one_line(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_schedule(text)
    assert parse_schedule("30:2,60:4") == ((30.0, 2), (60.0, 4))


@pytest.mark.parametrize("args, message", [
    (["--thrash"], "Error: --thrash needs --capacity"),
    (["--queue-limit", "3"], "Error: --queue-limit needs --capacity"),
    (["--capacity", "2", "--thrash", "--queue-limit", "3"], "Error: --thrash admits every ingest"),
    (["--capacity", "0"], "Error: Invalid value for '--capacity': 0 is not in the range x>=1."),
    (["--capacity", "2", "--capacity-schedule", "30:2,x"],
     "Error: Invalid value for '--capacity-schedule': 'x' is not SECONDS:CAPACITY"),
    (["--capacity", "2", "--overload", "500"], "Error: Invalid value for '--overload': '500' is not one of"),
    (["--request-log", "requests.jsonl"], "Error: --request-log needs --capacity"),
])
def test_dev_service_refuses_capacity_options_that_do_not_fit_in_one_line(args, message):
    result = CliRunner().invoke(main, ["dev-service", "--port", "0", *args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and lines[-1].startswith(message), result.output


def test_sigusr1_halves_the_capacity_of_the_dev_service_command_and_sigusr2_restores_it(processes):
    service = processes.kgsupervisor(["dev-service", "--port", "0", "--capacity", "4"], name="dev-service")
    port = re.search(r"listening on http://127\.0\.0\.1:(\d+)", service.wait_for_log("listening on")).group(1)
    url = f"http://127.0.0.1:{port}"

    def capacity_becomes(expected: int) -> None:
        wait_for(lambda: requests.get(f"{url}/health", timeout=5).json()["capacity"] == expected,
                 message=f"capacity {expected}")

    capacity_becomes(4)
    steps = ((signal.SIGUSR1, 2), (signal.SIGUSR1, 1), (signal.SIGUSR1, 1), (signal.SIGUSR2, 4))
    for signum, expected in steps:
        service.send_signal(signum)
        capacity_becomes(expected)
    log = service.wait_for_log("capacity 1 -> 4 (SIGUSR2)")
    assert "capacity 4 -> 2 (SIGUSR1)" in log and "capacity 2 -> 1 (SIGUSR1)" in log
    assert requests.post(f"{url}/api/v1/ingest", json=document(1), timeout=10).status_code == 200
    assert service.stop(signal.SIGTERM) and service.returncode == 0


def test_the_request_log_appends_a_line_per_ingest_served_or_refused(processes, tmp_path):
    log = tmp_path / "requests.jsonl"
    log.write_text('{"kept": "a line of an earlier run"}\n')
    service = processes.kgsupervisor(["dev-service", "--port", "0", "--capacity", "1", "--queue-limit", "0",
                                      "--service-time-per-kchar", "0.5", "--request-log", str(log)],
                                     name="dev-service")
    port = re.search(r"listening on http://127\.0\.0\.1:(\d+)", service.wait_for_log("listening on")).group(1)
    url = f"http://127.0.0.1:{port}"
    before = time.time()
    first: list[requests.Response] = []
    sender = threading.Thread(target=lambda: first.append(
        requests.post(f"{url}/api/v1/ingest", json=document(1), timeout=30)))
    sender.start()
    wait_for(lambda: requests.get(f"{url}/health", timeout=5).json()["in_service"] == 1, message="one in service")
    assert requests.post(f"{url}/api/v1/ingest", json=document(2, 500), timeout=10).status_code == 503
    sender.join(30)
    assert first[0].status_code == 200
    assert service.stop(signal.SIGTERM) and service.returncode == 0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[0] == {"kept": "a line of an earlier run"}  # appended to, never truncated
    assert [(entry["status"], entry["chars"]) for entry in lines[1:]] == [(503, 500), (200, 1000)]
    assert all(before <= entry["arrived"] <= entry["finished"] <= time.time() for entry in lines[1:])
    assert lines[2]["finished"] - lines[2]["arrived"] >= 0.5  # its service time, 0.5 s per 1,000 characters
