"""The peer: the same job as a Huey task, run by `huey_consumer bench.hueytask.huey -k process -w N`.

Huey keeps its own queue (SqliteHuey, a file next to the benchmark database, named by
BENCH_HUEY_DB); the task does what a kgsupervisor worker does for one document: read it
(documents.build_payload), POST it (requests), validate the answer (answer.parse_answer) and
write it back in one transaction, completing our queue row with a plain UPDATE.
"""
from __future__ import annotations

import os
import time

import requests
from huey import SqliteHuey

from bench.common import write_plain
from kgsupervisor.kg.answer import parse_answer
from kgsupervisor.queue.documents import build_payload
from kgsupervisor.store.sqlite import connect

huey = SqliteHuey("kgbench", filename=os.environ.get("BENCH_HUEY_DB", "huey-bench.db"))
_state: dict = {}


def _per_process() -> tuple:
    """A connection and an HTTP session per worker process, opened after the fork."""
    if _state.get("pid") != os.getpid():
        _state.update(pid=os.getpid(), conn=connect(os.environ["BENCH_DB"]),
                      session=requests.Session(), url=os.environ["BENCH_URL"] + "/api/v1/ingest")
    return _state["conn"], _state["session"], _state["url"]


@huey.task()
def ingest(queue_id: int, content_id: int) -> None:
    conn, session, url = _per_process()
    payload, _ = build_payload(conn, content_id)
    resp = session.post(url, json=payload)
    resp.raise_for_status()
    rowids = {c["vector_rowid"] for c in payload["chunks"]}
    result = parse_answer(resp.content, content_id=content_id, chunk_rowids=rowids)
    write_plain(conn, queue_id, content_id, result, time.time())
