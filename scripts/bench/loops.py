"""The bare loops the supervisor is measured against; one process each, started N times.

    python -m bench.loops bare     --db DB --url URL          claim a batch, POST, write back
    python -m bench.loops upstream --db DB --url URL          the upstream schedule: claim 5,
                                                               process them, always sleep 5 s
    python -m bench.loops nohttp   --db DB --answers PKL      claim + read + write back, no HTTP
    python -m bench.loops post     --url URL --payloads PKL --index I --of N --start-at T [--limit K]
                                                               POST only, no database

They are built from the product's own pieces (SQLiteQueue.claim: one UPDATE ... RETURNING under
a lease token; documents.build_payload; answer.parse_answer; writeback.write_back: one fenced
transaction) with nothing around them: no lease renewal thread, no stats, no heartbeat, no
supervisor, no retry policy. What the supervisor costs is the difference.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import sys
import time
import uuid

import requests

from kgsupervisor.kg.answer import parse_answer
from kgsupervisor.queue.documents import build_payload
from kgsupervisor.queue.leased import SQLiteQueue
from kgsupervisor.queue.writeback import write_back
from kgsupervisor.store.sqlite import connect

INGEST = "/api/v1/ingest"


# The mark a kgsupervisor worker wrote before each document until issue 18 (the row in flight
# is now in its shared memory): kept as the what-if of one more commit a document.
MARK_STARTED = ("UPDATE kg_processing_queue SET started_at = CASE WHEN id = ? THEN ? END "
                "WHERE lease_token = ? AND status = 'processing' AND (id = ? OR started_at IS NOT NULL)")


def mark_started(conn, claim, now: float) -> None:
    """The old per-document mark of the row in flight, its own transaction."""
    conn.execute(MARK_STARTED, (claim.id, now, claim.token, claim.id))


def claim_loop(args: argparse.Namespace, answer_of) -> int:
    """Claim a batch, process each document, again; exit when a claim comes back empty."""
    conn = connect(args.db)
    queue = SQLiteQueue(conn)
    owner = f"bench:{os.getpid()}"
    done = 0
    while True:
        claims = queue.claim(owner, uuid.uuid4().hex, args.batch, 600.0, time.time())
        if not claims and not args.forever:
            break
        for claim in claims:
            if args.mark_started:  # what the worker added until issue 18: one more commit per document
                mark_started(conn, claim, time.time())
            payload, notes = build_payload(conn, claim.content_id)
            rowids = {c["vector_rowid"] for c in payload["chunks"]}
            result = parse_answer(answer_of(payload), content_id=claim.content_id, chunk_rowids=rowids)
            write_back(conn, claim, result, time.time(), notes)
            done += 1
        if args.sleep:
            time.sleep(args.sleep)
    conn.close()
    return done


def post_loop(args: argparse.Namespace) -> None:
    with open(args.payloads, "rb") as f:
        payloads = pickle.load(f)
    mine = [payloads[cid] for cid in sorted(payloads)[args.index::args.of]]
    if args.limit:
        mine = mine[:args.limit]
    session = requests.Session()
    session.get(args.url + "/health").content  # connect before the start line
    time.sleep(max(0.0, args.start_at - time.time()))
    started = time.time()
    for payload in mine:
        resp = session.post(args.url + INGEST, json=payload)
        resp.content  # noqa: B018 - read the whole answer, as a worker does
        if resp.status_code != 200:
            raise SystemExit(f"service answered {resp.status_code}")
    print(json.dumps({"done": len(mine), "start": started, "end": time.time()}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["bare", "upstream", "nohttp", "post"])
    parser.add_argument("--db")
    parser.add_argument("--url")
    parser.add_argument("--answers")
    parser.add_argument("--payloads")
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--poll-interval", type=float, default=5.0)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--of", type=int, default=1)
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--limit", type=int, default=0, help="post: at most this many documents per process")
    parser.add_argument("--mark-started", action="store_true",
                        help="bare: also stamp started_at before each document, as a kgsupervisor worker did")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    args.forever, args.sleep = False, 0.0
    if args.mode == "post":
        post_loop(args)
        return 0
    if args.mode == "nohttp":
        with open(args.answers, "rb") as f:
            answers = pickle.load(f)
        claim_loop(args, lambda payload: answers[payload["content_id"]])
        return 0
    session = requests.Session()

    def answer_of(payload: dict) -> bytes:
        resp = session.post(args.url + INGEST, json=payload)
        if resp.status_code != 200:
            raise SystemExit(f"service answered {resp.status_code}")
        return resp.content

    if args.mode == "upstream":
        # The loop kgsupervisor replaces: claim 5, process them, then sleep poll_interval always.
        args.batch, args.forever, args.sleep = 5, True, args.poll_interval
    claim_loop(args, answer_of)
    return 0


if __name__ == "__main__":
    sys.exit(main())
