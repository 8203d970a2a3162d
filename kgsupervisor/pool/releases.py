"""The supervisor's side of claims: a gone worker's back at once, retried while the database refuses."""
from __future__ import annotations

import dataclasses
import logging
import re
import time
from contextlib import closing

from kgsupervisor.lifeline import pid_alive
from kgsupervisor.queue.history import Attempt, InFlight, Outcome
from kgsupervisor.queue.leased import queue_for
from kgsupervisor.store.backend import connect_to

log = logging.getLogger("kgsupervisor.supervisor")

RETRY_EVERY = 2.0  # a refused release is tried again this often, until it goes through
# The kill reasons (WorkerProcess.kill_reason) of a worker the supervisor stopped, not lost: its
# claims were released on a drain or a shutdown ("" from kill_all, which stops them all).
DRAIN_KILLS = ("", "drain timeout", "supervisor stopping")


def death_outcome(cause: str) -> Outcome:
    """How a gone worker's claims ended: hung (killed for a missed heartbeat), drained (killed as
    a drain or shutdown ran out of time), or crashed."""
    if cause.startswith("hung"):
        return Outcome.HUNG
    return Outcome.DRAINED if cause in DRAIN_KILLS else Outcome.CRASHED


def death_class(cause: str) -> str:
    """The history's error_class of a worker's death: the signal that killed it, exit_N, or the reason."""
    if cause.startswith("hung"):
        return "no_heartbeat"
    signal_name = re.search(r"\bSIG[A-Z0-9]+\b", cause)
    if signal_name:
        return signal_name.group()
    status = re.search(r"exited with status (-?\d+)", cause)
    if status:
        return f"exit_{status.group(1)}"
    return cause.replace(" ", "_") if cause else "stopped"


def death_attempt(pid: int, cause: str, worker: int | None, stack: str | None) -> Attempt:
    """What the supervisor knows of the tries a dead worker's claims were on."""
    return Attempt(worker=worker, error_class=death_class(cause), stack=stack,
                   error_message=f"worker pid {pid}: {cause or 'stopped with the supervisor'}")


@dataclasses.dataclass
class RefusedRelease:
    """Claims of a gone worker that the database did not take back (read-only, full, locked)."""
    owner: str
    pid: int
    charge: bool
    cause: str
    attempt: Attempt
    in_flight: InFlight | None


class ClaimReleaser:
    """Gives the claims of exited workers back to pending; with `charge`, the claim in flight
    (read from the worker's shared memory) is charged a crash (a poison pill after `poison_after`).

    A release the database refuses is kept and retried every RETRY_EVERY seconds, so the
    documents come back as soon as it is writable, not a lease later.
    """

    def __init__(self, db_path: str, host: str) -> None:
        self.db_path = db_path
        self.host = host
        self.refused: dict[str, RefusedRelease] = {}
        self.next_retry = 0.0

    def release_gone_worker(self, owner: str, pid: int, charge: bool, cause: str, poison_after: int,
                            stack: str | None = None, worker: int | None = None,
                            in_flight: InFlight | None = None) -> None:
        """Give back the claims of worker `owner`, which is gone; each is recorded in the attempt
        history as crashed, hung (with `stack`, captured before the kill, on the claim `in_flight`
        if any) or drained, or as a poison pill; `worker` is its number in the pool."""
        attempt = death_attempt(pid, cause, worker, stack)
        try:
            released = self._release(owner, charge, cause, poison_after, attempt, in_flight)
        except Exception as exc:  # kept and retried; the lease expiry is the last backstop
            log.error("could not release claims of %s (%s); retrying every %.0fs while running (or "
                      "they return when their lease expires)", owner, exc, RETRY_EVERY)
            self.refused[owner] = RefusedRelease(owner, pid, charge, cause, attempt, in_flight)
            self.next_retry = time.monotonic() + RETRY_EVERY
            return
        if released:
            log.info("released %d claim(s) of worker pid %d back to pending", released, pid)

    def retry_refused(self, poison_after: int, live_pids: set[int]) -> None:
        """Try the refused releases again, when due. An owner whose pid is one of our live
        workers again (pid reuse) is dropped: its rows may be that worker's; leases settle them."""
        if not self.refused or time.monotonic() < self.next_retry:
            return
        self.next_retry = time.monotonic() + RETRY_EVERY
        for owner, refused in list(self.refused.items()):
            if refused.pid in live_pids:
                del self.refused[owner]
                continue
            try:
                released = self._release(owner, refused.charge, refused.cause, poison_after,
                                         refused.attempt, refused.in_flight)
            except Exception:  # still refused: the first failure was logged
                return
            del self.refused[owner]
            log.info("database writable again: released %d claim(s) of gone worker pid %d back to pending",
                     released, refused.pid)

    def release_orphans(self) -> None:
        """Claims of this host's dead processes (a supervisor killed with -9) go back to pending,
        uncharged: the shared memory that named their claims in flight died with that supervisor,
        and a tree killed whole was killed from outside, by no document of its own."""
        with closing(connect_to(self.db_path)) as conn:
            q = queue_for(conn)
            for owner in q.owners_with_claims(f"{self.host}:"):
                pid = int(owner.rsplit(":", 1)[1]) if owner.rsplit(":", 1)[1].isdigit() else 0
                if pid and not pid_alive(pid):
                    gone = Attempt(error_class="orphaned",
                                   error_message=f"{owner} was gone when the supervisor started")
                    n = q.release_owner(owner, outcome=Outcome.CRASHED, attempt=gone)
                    log.warning("released %d claim(s) of dead process %s left by an earlier run", n, owner)

    def _release(self, owner: str, charge: bool, cause: str, poison_after: int, attempt: Attempt,
                 in_flight: InFlight | None) -> int:
        outcome = death_outcome(cause)
        with closing(connect_to(self.db_path)) as conn:
            q = queue_for(conn)
            if not charge:
                return q.release_owner(owner, outcome=outcome, attempt=attempt, in_flight=in_flight)
            result = q.release_crashed(owner, in_flight, cause, poison_after, time.time(), outcome=outcome,
                                       attempt=attempt)
        for cid in result.poisoned:
            log.error("content_id %d failed as a poison pill: it killed %d worker(s)", cid, poison_after)
        return result.released

