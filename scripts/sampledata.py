"""Sample crawled documents for the demo, the benchmark and the tests (not part of the library)."""
from __future__ import annotations

import json
import random
import sqlite3

from kgsupervisor.store.sqlite import transaction

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

# The real KG service takes chunks of at most 10,000 characters and markdown of at most
# 1,000,000: documents are bounded by the longest sentence the templates can make.
MAX_CHUNK_CHARS = 10_000
MAX_MARKDOWN_CHARS = 1_000_000
LONGEST_SENTENCE = max(len(template.format(p=max(PEOPLE, key=len), o=max(ORGS, key=len), l=max(PLACES, key=len),
                                           t=max(TOPICS, key=len))) for template in SENTENCES)


def _sentence(rng: random.Random) -> str:
    return rng.choice(SENTENCES).format(p=rng.choice(PEOPLE), o=rng.choice(ORGS),
                                        l=rng.choice(PLACES), t=rng.choice(TOPICS))


def _chunk_texts(rng: random.Random, chunks: int, sentences: int) -> list[str]:
    return [" ".join(_sentence(rng) for _ in range(sentences)) for _ in range(chunks)]


def _check_shape(chunks: int, sentences: int) -> None:
    """Refuse a shape whose documents the real KG service could refuse."""
    longest_chunk = sentences * (LONGEST_SENTENCE + 1)
    if chunks < 1 or sentences < 1 or longest_chunk > MAX_CHUNK_CHARS \
            or chunks * (longest_chunk + 2) > MAX_MARKDOWN_CHARS:
        raise ValueError(f"sample documents of {chunks} chunk(s) of {sentences} sentence(s) could be refused "
                         f"by the KG service (chunks of 10..{MAX_CHUNK_CHARS} characters, markdown of at most "
                         f"{MAX_MARKDOWN_CHARS}); use 1 or more of each, fewer sentences or fewer chunks")


def add_documents(conn: sqlite3.Connection, count: int, *, chunks: int = 3, sentences: int = 4,
                  seed: int = 0, start_id: int | None = None) -> list[int]:
    """Insert `count` documents of `chunks` chunks each; returns their crawled_content ids.

    Every document is one the real KG service accepts (CONTRACT §3): each chunk holds whole
    sample sentences (each over 50 characters) and stays within 10,000 characters.
    """
    _check_shape(chunks, sentences)
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
