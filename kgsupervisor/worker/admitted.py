"""A worker's leave to send: a permit before it claims, room in the rate budget before each document."""
from __future__ import annotations

from kgsupervisor.kg.admission import endpoint_key
from kgsupervisor.kg.budgets import OverBudget
from kgsupervisor.queue.documents import document_chars
from kgsupervisor.queue.leased import Claim
from kgsupervisor.states import WorkerState


class AdmittedSending:
    """KGWorker's waits for its endpoints' permits and budgets (kg.admission), kept apart: uses the
    worker's admission, endpoints, db, documents, writer, progress, settings, alive, set_state and _woken."""

    def admit_batch(self, limit: int) -> int:
        """Take a permit of a healthy endpoint (waiting, holding nothing, while none is free) and
        size the claim to its budget's room; 0 when it waited instead, or must wait."""
        rotation = self.endpoints.rotation()
        keys = [endpoint_key(e.url) for e in rotation]
        endpoint = self.admission.take(keys, 0)
        if endpoint is None:
            self.set_state(WorkerState.WAITING)
            with self.progress.parked():  # bounded by the poll interval: waiting is not hung
                endpoint = self.admission.take(keys, self.settings.poll_interval)
            if endpoint is None:
                return 0
        self.endpoints.prefer(rotation[keys.index(endpoint)])
        if self.admission.one_document_a_permit(endpoint):
            limit = 1
        room = self.admission.room(endpoint, self.expected_chars)
        if room is None:
            return limit
        if room <= 0:
            self.admission.give_back()
            self.wait_for_budget(endpoint, self.expected_chars)
            return 0
        return min(limit, room)

    def wait_for_budget(self, endpoint: str, chars: int) -> None:
        """Sleep until the endpoint's budget has room for `chars` characters (or a stop signal)."""
        self.set_state(WorkerState.WAITING)
        wait = self.admission.seconds_until_room(endpoint, chars)
        with self.progress.parked():  # bounded by the budget's window
            self._woken(min(wait, self.settings.poll_interval))

    def spend_budget(self, claim: Claim) -> bool:
        """Spend the claimed document's request and tokens from its endpoint's budget, waiting for
        room (holding the claim, uncharged; the answers handed over written first) as long as needed;
        False when the worker stops first or the document can never fit (then it is failed, with
        the reason)."""
        admission = self.admission
        endpoint = admission.held[0] if admission.held else endpoint_key(self.endpoints.rotation()[0].url)
        chars = self.expected_chars = self.db.retrying(lambda _: document_chars(self.db.conn, claim.content_id))
        while self.alive:
            try:
                wait = admission.spend(endpoint, chars)
            except OverBudget as exc:
                self.documents.fail(claim, f"never fits the rate budget: {exc} (raise KG_TOKEN_BUDGET_TPM "
                                           f"or KG_CHARS_PER_TOKEN, then retry it)", self.documents.tried(claim))
                return False
            if not wait:
                return True
            self.writer.flush(self.progress)  # the answers handed over are written, not left to wait a minute
            self.set_state(WorkerState.WAITING)
            with self.progress.parked():  # bounded by the budget's window
                self._woken(min(wait, 1.0))
        return False

    def budgeted(self, claim: Claim) -> bool:
        """Does this document spend from a rate budget before it is sent?"""
        return self.admission is not None and self.admission.budgeted and not claim.problem
