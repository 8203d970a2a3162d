"""The supervisor's decisions, one turn at a time, on a fake clock: how an exit is classified,
when a slot is respawned, which worker is recycled, when a drain gives up. The processes are
our own stand-ins (no fork, no signal sent); the database is a real SQLite file."""
from __future__ import annotations

import dataclasses
import logging
import signal
import time
from contextlib import closing

import pytest

from kgsupervisor.pool.slots import BACKOFF_FIRST, SlotState, WorkerProcess
from kgsupervisor.pool.snapshot import PoolSnapshot
from kgsupervisor.pool.stacks import CapturedStack
from kgsupervisor.pool.supervisor import SECOND_SIGNAL_GRACE, Supervisor
from kgsupervisor.pool.workers import BOOT_ERROR_BACKOFF
from kgsupervisor.queue.leased import Claim, queue_for
from kgsupervisor.states import EXIT_BOOT_ERROR, EXIT_ERROR, EXIT_OK, SupervisorState
from kgsupervisor.store.sqlite import connect
from kgsupervisor.worker.counters import SharedCounters
from kgsupervisor.worker.kgworker import owner_name

from .conftest import make_settings, seed

T0 = 1000.0  # the fake clock's start: any monotonic value will do
FIRST_PID = 4_000_000  # above any pid this test process could have forked


class FakeProcess:
    """What the supervisor reads of a multiprocessing.Process; it exits when the test says."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.exitcode: int | None = None
        self.sentinel = None

    def is_alive(self) -> bool:
        return self.exitcode is None

    def join(self, timeout: float | None = None) -> None:
        pass

    def exit(self, code: int) -> None:
        self.exitcode = code


@dataclasses.dataclass
class FakeWorker(WorkerProcess):
    """A worker whose signals are recorded (SIGKILL ends it) and whose memory the test sets."""

    received: list[int] = dataclasses.field(default_factory=list)

    def sample(self) -> bool:
        return self.process.is_alive()

    def signal(self, signum: int) -> None:
        self.received.append(signum)
        if signum == signal.SIGKILL:
            self.process.exit(-signal.SIGKILL)

    def capture_stack(self, timeout: float) -> CapturedStack:
        return CapturedStack("none", f"no stack: pid {self.pid} is a stand-in")


class FakeLauncher:
    """Launch for the supervisor: a FakeWorker per start, kept in order."""

    def __init__(self) -> None:
        self.started: list[FakeWorker] = []

    def __call__(self, worker_id: int, max_documents: int | None, now: float) -> FakeWorker:
        pid = FIRST_PID + len(self.started)
        worker = FakeWorker(FakeProcess(pid), SharedCounters(), owner_name(pid), started_mono=now)
        self.started.append(worker)
        return worker


class LocalStats:
    """A stats store in this process: a plain dict that never dies."""

    def __init__(self) -> None:
        self.map: dict = {}
        self.restarts = 0

    def ensure_running(self, on_restart) -> None:
        pass

    def snapshot(self) -> dict:
        return dict(self.map)

    def shutdown(self) -> None:
        pass


class RecordingReporter:
    """Wants every snapshot and keeps it, with every notice."""

    def __init__(self) -> None:
        self.controls: list = []
        self.snapshots: list[PoolSnapshot] = []
        self.notices: list[tuple[str, ...]] = []

    def start(self) -> None:
        pass

    def wants_snapshot(self, now: float) -> bool:
        return True

    def due_in(self, now: float) -> float:
        return 0.0

    def publish(self, snapshot: PoolSnapshot) -> None:
        self.snapshots.append(snapshot)

    def notify(self, *states: str) -> None:
        self.notices.append(states)

    def finish(self) -> None:
        pass


@pytest.fixture
def pool(db_path, caplog):
    """A factory of started supervisors (2 workers unless told) on fake processes, at T0."""
    caplog.set_level(logging.INFO, logger="kgsupervisor")

    def make(**overrides) -> tuple[Supervisor, FakeLauncher, RecordingReporter]:
        settings = make_settings(db_path, "http://127.0.0.1:9", **{"num_workers": 2, **overrides})
        launcher, reporter = FakeLauncher(), RecordingReporter()
        sup = Supervisor(settings, reporter, stats=LocalStats(), launch=launcher)
        sup.start(T0)
        return sup, launcher, reporter
    return make


def messages(caplog, level: int) -> list[str]:
    """What the supervisor logged at `level`."""
    return [r.getMessage() for r in caplog.records
            if r.levelno == level and r.name == "kgsupervisor.supervisor"]


def test_start_fills_every_slot(pool):
    sup, launcher, reporter = pool()
    assert sup.state is SupervisorState.RUNNING
    assert [w.pid for w in launcher.started] == [FIRST_PID, FIRST_PID + 1]
    assert {slot.state for slot in sup.pool.slots.values()} == {SlotState.RUNNING}


def test_a_crash_soon_after_start_backs_off_and_respawns_when_due(pool, caplog):
    sup, launcher, reporter = pool()
    launcher.started[0].process.exit(EXIT_ERROR)
    sup.loop_once([], T0 + 0.5)
    slot = sup.pool.slots[0]
    assert slot.state is SlotState.BACKOFF and slot.backoff == BACKOFF_FIRST and slot.restarts == 1
    assert (f"worker 0 (pid {FIRST_PID}) exited with status 1; respawn in 0.5s"
            in messages(caplog, logging.ERROR))
    assert reporter.snapshots[-1].workers[0]["state"] == "backoff"
    sup.loop_once([], T0 + 0.5 + BACKOFF_FIRST - 0.01)
    assert len(launcher.started) == 2, "respawned before its backoff was over"
    sup.loop_once([], T0 + 0.5 + BACKOFF_FIRST)
    assert len(launcher.started) == 3 and slot.current is launcher.started[2]
    assert slot.state is SlotState.RUNNING


def test_crash_looping_doubles_the_backoff(pool):
    sup, launcher, _ = pool(num_workers=1)
    now = T0
    for expected in (BACKOFF_FIRST, 2 * BACKOFF_FIRST, 4 * BACKOFF_FIRST):
        launcher.started[-1].process.exit(EXIT_ERROR)
        sup.loop_once([], now)
        assert sup.pool.slots[0].backoff == expected
        now += expected
        sup.loop_once([], now)  # respawned: it dies at once again
    assert len(launcher.started) == 4


def test_a_clean_exit_is_respawned_in_the_same_turn(pool, caplog):
    sup, launcher, _ = pool()
    launcher.started[1].process.exit(EXIT_OK)  # recycled after its max documents
    sup.loop_once([], T0 + 0.1)
    assert sup.pool.slots[1].current is launcher.started[2] and sup.pool.slots[1].backoff == 0.0
    assert f"worker 1 (pid {FIRST_PID + 1}) exited with status 0" in messages(caplog, logging.INFO)


def test_a_crash_after_a_long_life_is_respawned_at_once(pool):
    sup, launcher, _ = pool()
    launcher.started[0].process.exit(-signal.SIGSEGV)
    sup.loop_once([], T0 + 60)
    assert sup.pool.slots[0].backoff == 0.0 and sup.pool.slots[0].current is launcher.started[2]


def test_a_boot_error_waits_at_least_a_second_even_after_a_long_life(pool, caplog):
    sup, launcher, _ = pool()
    launcher.started[0].process.exit(EXIT_BOOT_ERROR)
    sup.loop_once([], T0 + 60)
    assert sup.pool.slots[0].state is SlotState.BACKOFF and sup.pool.slots[0].backoff == BOOT_ERROR_BACKOFF
    assert (f"worker 0 (pid {FIRST_PID}) exited with status 3; respawn in 1.0s"
            in messages(caplog, logging.WARNING))


def claim_one(db_path: str, owner: str) -> Claim:
    """Claim one document for `owner`, as a worker does."""
    with closing(connect(db_path)) as conn:
        seed(conn, 1)
        [claim] = queue_for(conn).claim(owner, "token-1", 1, 60.0, time.time())
        return claim


def crash_count(db_path: str, content_id: int) -> tuple[str, int]:
    with closing(connect(db_path)) as conn:
        return conn.execute("SELECT status, COALESCE(crash_count, 0) FROM kg_processing_queue "
                            "WHERE content_id = ?", (content_id,)).fetchone()


def test_a_kill_while_sending_a_document_charges_that_document(pool, db_path, caplog):
    sup, launcher, _ = pool()
    worker = launcher.started[0]
    claim = claim_one(db_path, worker.owner)
    with worker.counters.sending(claim.id, claim.token):  # what its shared memory says it sends
        worker.process.exit(-signal.SIGKILL)
        sup.loop_once([], T0 + 5)
    assert crash_count(db_path, claim.content_id) == ("pending", 1)
    assert (f"worker 0 (pid {FIRST_PID}) killed by SIGKILL (perhaps out of memory?)"
            in messages(caplog, logging.ERROR))


def test_a_kill_with_an_answer_in_hand_but_nothing_in_flight_charges_nothing(pool, db_path):
    sup, launcher, _ = pool()
    worker = launcher.started[0]
    claim = claim_one(db_path, worker.owner)  # its answer waits for the write-back...
    worker.counters.set_current(claim.content_id)  # ...in hand, but no longer being sent
    worker.process.exit(-signal.SIGKILL)
    sup.loop_once([], T0 + 5)
    assert crash_count(db_path, claim.content_id) == ("pending", 0)


def test_a_sigbus_is_the_disk_not_the_document(pool, db_path):
    sup, launcher, _ = pool()
    worker = launcher.started[0]
    claim = claim_one(db_path, worker.owner)
    with worker.counters.sending(claim.id, claim.token):
        worker.process.exit(-signal.SIGBUS)
        sup.loop_once([], T0 + 5)
    assert crash_count(db_path, claim.content_id) == ("pending", 0)


def test_a_worker_without_a_heartbeat_is_killed_as_hung(pool, caplog):
    sup, launcher, _ = pool(hang_timeout=30.0)
    launcher.started[1].counters.beat(time.time() - 100)
    sup.loop_once([], T0 + 1)
    assert launcher.started[1].received == [signal.SIGKILL] and launcher.started[0].received == []
    sup.loop_once([], T0 + 2)
    assert any(m.startswith(f"worker 1 (pid {FIRST_PID + 1}) hung: no heartbeat for 100s")
               for m in messages(caplog, logging.ERROR))


def test_the_oldest_worker_over_the_memory_limit_is_recycled_one_at_a_time(pool):
    sup, launcher, _ = pool(max_worker_rss_mb=100)
    old, young = launcher.started
    old.started_mono = T0 - 50
    for worker in (old, young):
        worker.rss_bytes = 200 * 2**20
    sup.loop_once([], T0 + 1)
    assert old.received == [signal.SIGTERM] and young.received == []
    assert sup.pool.slots[0].current is launcher.started[2], "the slot is refilled at once"
    sup.loop_once([], T0 + 2)
    assert young.received == [], "a second recycle while the first worker is still leaving"
    old.process.exit(EXIT_OK)
    sup.loop_once([], T0 + 3)
    assert young.received == [signal.SIGTERM]


def test_a_drain_waits_for_the_workers_then_stops(pool):
    sup, launcher, reporter = pool()
    sup.loop_once([signal.SIGTERM], T0 + 1)
    assert sup.state is SupervisorState.STOPPING and ("STOPPING=1",) in reporter.notices
    assert all(w.received == [signal.SIGTERM] for w in launcher.started)
    for worker in launcher.started:
        worker.process.exit(EXIT_OK)
    sup.loop_once([], T0 + 2)
    assert sup.state is SupervisorState.STOPPED and len(launcher.started) == 2
    assert {slot.state for slot in sup.pool.slots.values()} == {SlotState.STOPPED}


def test_a_drain_kills_what_is_left_at_its_deadline(pool, caplog):
    sup, launcher, _ = pool(drain_timeout=5.0)
    sup.loop_once([signal.SIGTERM], T0 + 1)
    sup.loop_once([], T0 + 5.99)
    assert sup.state is SupervisorState.STOPPING
    assert all(signal.SIGKILL not in w.received for w in launcher.started)
    sup.loop_once([], T0 + 6)
    assert sup.state is SupervisorState.STOPPED
    assert all(w.received == [signal.SIGTERM, signal.SIGKILL] for w in launcher.started)
    assert ("drain timeout: killing 2 worker(s); their documents go back to pending"
            in messages(caplog, logging.WARNING))
    # Killed by us for the deadline: an expected end, not a crash.
    assert f"worker 0 (pid {FIRST_PID}) drain timeout" in messages(caplog, logging.INFO)


def test_a_second_stop_signal_stops_at_once_only_after_the_grace(pool):
    sup, _, _ = pool()
    sup.loop_once([signal.SIGTERM], T0 + 1)
    sup.loop_once([signal.SIGINT], T0 + 1 + SECOND_SIGNAL_GRACE / 2)
    assert sup.state is SupervisorState.STOPPING
    sup.loop_once([signal.SIGTERM], T0 + 1 + SECOND_SIGNAL_GRACE)
    assert sup.state is SupervisorState.STOPPED


def test_sigttou_retires_the_last_slot_and_leaves_it_empty(pool):
    sup, launcher, reporter = pool()
    sup.loop_once([signal.SIGTTOU], T0 + 1)
    assert launcher.started[1].received == [signal.SIGTERM]
    assert sup.pool.slots[1].state is SlotState.STOPPED and len(launcher.started) == 2
    assert [d["worker_id"] for d in reporter.snapshots[-1].workers] == [0, 1], "shown while it leaves"
    launcher.started[1].process.exit(EXIT_OK)
    sup.loop_once([], T0 + 2)
    assert [d["worker_id"] for d in reporter.snapshots[-1].workers] == [0]
    assert len(launcher.started) == 2


def test_the_snapshot_is_a_value(pool, db_path):
    with closing(connect(db_path)) as conn:
        seed(conn, 2)
    sup, launcher, reporter = pool()
    launcher.started[0].counters.add("processed", 3)
    sup.loop_once([], T0 + 1)
    snapshot = reporter.snapshots[-1]
    assert snapshot.totals["processed"] == 3 and snapshot.state is SupervisorState.RUNNING
    assert snapshot.clock == T0 + 1 and snapshot.queue_size["pending"] == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.state = SupervisorState.STOPPED


def test_a_worker_reports_how_long_it_has_held_its_document():
    """held_seconds in the worker details counts from when the document was taken: naming it
    again (a nested block) keeps the time, a new document restarts it, none clears it."""
    counters = SharedCounters()
    assert counters.held_for(100.0) is None
    counters.set_current(7, now=100.0)
    counters.set_current(7, now=105.0)
    assert counters.held_for(112.5) == 12.5
    counters.set_current(8, now=120.0)
    assert counters.held_for(121.0) == 1.0
    counters.set_current(None, now=122.0)
    assert counters.held_for(130.0) is None
