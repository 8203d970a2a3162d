"""Real-looking crawled documents with chunks, for the demo, the tests and the benchmark."""
from __future__ import annotations

import json
import random
import sqlite3

from .db import transaction

PEOPLE = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Claude Shannon", "Barbara Liskov",
          "Donald Knuth", "Margaret Hamilton", "Edsger Dijkstra", "Frances Allen", "John McCarthy"]
ORGS = ["Acme Robotics Inc", "Northwind Labs", "Stanford University", "Bell Labs",
        "Open Data Foundation", "Helix Genomics Corp", "Cambridge Institute"]
PLACES = ["Geneva", "Kyoto", "Nairobi", "Lisbon", "Montreal", "Oslo", "Santiago", "Mumbai"]
TOPICS = ["Graph Databases", "Entity Linking", "Vector Search", "Knowledge Graphs",
          "Language Models", "Distributed Systems", "Information Retrieval"]
SENTENCES = [
    "{p} joined {o} in {l} to work on {t}.",
    "In {l}, {o} published a report on {t} written with {p}.",
    "{p} said that {t} would change how {o} builds products.",
    "A workshop on {t} in {l} drew researchers from {o}.",
    "{o} announced a partnership with {p} focused on {t}.",
    "{t} may not be ready for production, say engineers in {l}.",
]


def _sentence(rng: random.Random) -> str:
    return rng.choice(SENTENCES).format(p=rng.choice(PEOPLE), o=rng.choice(ORGS),
                                        l=rng.choice(PLACES), t=rng.choice(TOPICS))


def _chunk_texts(rng: random.Random, chunks: int, sentences: int) -> list[str]:
    return [" ".join(_sentence(rng) for _ in range(sentences)) for _ in range(chunks)]


def add_documents(conn: sqlite3.Connection, count: int, *, chunks: int = 3, sentences: int = 4,
                  seed: int = 0, start_id: int | None = None) -> list[int]:
    """Insert `count` documents of `chunks` chunks each; returns their crawled_content ids."""
    rng = random.Random(seed)
    first = start_id or (conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM crawled_content").fetchone()[0])
    ids = list(range(first, first + count))
    with transaction(conn):
        for cid in ids:
            texts = _chunk_texts(rng, chunks, sentences)
            markdown = "\n\n".join(texts)
            topic = rng.choice(TOPICS)
            conn.execute(
                "INSERT INTO crawled_content (id, url, title, markdown, metadata, tags) VALUES (?, ?, ?, ?, ?, ?)",
                (cid, f"https://news.example.org/{topic.lower().replace(' ', '-')}/{cid}",
                 f"{topic}: notes from {rng.choice(PLACES)}", markdown,
                 json.dumps({"source": "sample", "language": "en", "crawl_depth": rng.randint(0, 3)}),
                 ",".join(rng.sample(["ai", "research", "industry", "events", "policy"], 2))))
            offset = 0
            for index, text in enumerate(texts):
                conn.execute(
                    "INSERT INTO content_chunks (content_id, chunk_index, chunk_text, char_start, "
                    "char_end, word_count) VALUES (?, ?, ?, ?, ?, ?)",
                    (cid, index, text, offset, offset + len(text), len(text.split())))
                offset += len(text) + 2
    return ids
