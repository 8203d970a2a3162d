"""The run's sizes, its work directory, the benchmark database and the services it starts once."""
from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from contextlib import closing
from dataclasses import dataclass, field

from kgsupervisor.queue.documents import build_payload
from kgsupervisor.store.sqlite import connect

from .common import Service, build_database, log, precompute_answers


@dataclass(frozen=True)
class Sizes:
    documents: int
    workers: tuple[int, ...]
    latencies: tuple[float, ...]
    repeats_0ms: int            # drains per contender and worker count at 0 ms (median taken)
    upstream_window: float      # seconds the upstream schedule runs (it cannot drain in time)
    noindex_window: float       # seconds the no-index write path runs
    idle_window: float
    pickup_idle_samples: int
    pickup_trickle_samples: int
    growth_levels: tuple[int, ...]
    growth_claims: int
    growth_writebacks: int
    kills: int
    sigterms: int
    pg_scale_rows: int          # queue rows (and documents) of the PostgreSQL scale section
    console_rows: int           # queue rows (and documents) of the console section
    console_repeats: int        # requests a page and backend (after one warm-up)


FULL = Sizes(documents=3000, workers=(1, 2, 4, 8), latencies=(0.0, 0.05), repeats_0ms=3,
             upstream_window=30.0, noindex_window=60.0, idle_window=30.0, pickup_idle_samples=30,
             pickup_trickle_samples=40, growth_levels=(1_000, 100_000, 1_000_000), growth_claims=300,
             growth_writebacks=100, kills=20, sigterms=5, pg_scale_rows=1_000_000,
             console_rows=1_000_000, console_repeats=30)
QUICK = Sizes(documents=300, workers=(1, 2, 4, 8), latencies=(0.0, 0.05), repeats_0ms=1,
              upstream_window=10.0, noindex_window=15.0, idle_window=5.0, pickup_idle_samples=5,
              pickup_trickle_samples=10, growth_levels=(1_000, 10_000), growth_claims=100,
              growth_writebacks=30, kills=5, sigterms=2, pg_scale_rows=20_000,
              console_rows=100_000, console_repeats=10)


@dataclass
class Context:
    quick: bool
    workdir: str
    keep: bool = False
    sizes: Sizes = field(init=False)
    db: str = field(init=False)
    answers: str = field(init=False)
    payloads: str = field(init=False)
    expected_entities: int = 0
    expected_relationships: int = 0
    services: dict[tuple[str, float], Service] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sizes = QUICK if self.quick else FULL
        self.db = self.path("bench.db")
        self.answers = self.path("answers.pkl")
        self.payloads = self.path("payloads.pkl")

    @classmethod
    def create(cls, quick: bool, workdir: str | None, keep: bool) -> "Context":
        made = workdir or tempfile.mkdtemp(prefix="kgbench-")
        os.makedirs(made, exist_ok=True)
        ctx = cls(quick=quick, workdir=made, keep=keep or bool(workdir))
        ctx.prepare()
        return ctx

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def prepare(self) -> None:
        """One database for every contender, and the reference answers computed once."""
        n = self.sizes.documents
        log(f"building the benchmark database: {n} documents x 3 chunks in {self.db}")
        build_database(self.db, n)
        answers = precompute_answers(self.db, self.answers)
        payloads = {}
        with closing(connect(self.db)) as conn:
            for cid in answers:
                payloads[cid] = build_payload(conn, cid)[0]
        with open(self.payloads, "wb") as f:
            pickle.dump(payloads, f)
        from kgsupervisor.kg.answer import parse_answer
        for cid, body in answers.items():
            rowids = {c["vector_rowid"] for c in payloads[cid]["chunks"]}
            result = parse_answer(body, content_id=cid, chunk_rowids=rowids)
            self.expected_entities += sum(len(e.appearances) for e in result.entities)
            self.expected_relationships += len(result.relationships)
        log(f"reference answers: {self.expected_entities / n:.0f} entity rows and "
            f"{self.expected_relationships / n:.0f} relationship rows per document")

    def service(self, latency: float, kind: str = "bench") -> Service:
        key = (kind, latency)
        if key not in self.services:
            self.services[key] = Service(self.answers, latency, kind).start()
        return self.services[key]

    def close(self) -> None:
        for service in self.services.values():
            service.stop()
        self.services.clear()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
