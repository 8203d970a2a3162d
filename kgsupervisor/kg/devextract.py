"""The dev service's deterministic extraction: entities, co-occurrences and summary (CONTRACT §3)."""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from typing import Any, Iterator, NamedTuple

PREDICATE = "co_occurs_with"

# A capitalised run of at most six words: longer runs are headings or shouting, not names,
# and the bound keeps one entity from swallowing a whole capitalised megabyte.
PHRASE_RE = re.compile(r"\b[A-Z][\w'-]*(?:[ \t]+[A-Z][\w'-]*){0,5}")
# One terminator char, never a run: `[.!?]+\s+` backtracks quadratically over "......".
SENTENCE_END_RE = re.compile(r"[.!?]\s+")
SENTENCE_TERMINATORS = frozenset(".!?")
LEADING_WORD_RE = re.compile(r"\S+[ \t]+")

STOPWORDS = frozenset({
    "a", "an", "the", "this", "that", "these", "those", "it", "its", "in", "on", "at", "of",
    "for", "to", "by", "with", "from", "as", "and", "or", "but", "if", "so", "we", "they",
    "he", "she", "i", "you", "our", "their", "his", "her", "there", "here", "when", "while",
    "after", "before", "then", "also", "however", "is", "are", "was", "were", "be", "no", "yes",
    "can", "don", "didn", "doesn", "isn", "won", "later", "today", "yesterday", "meanwhile",
    "finally", "first", "next", "now", "although", "because", "since", "what", "who", "how",
    "why", "where", "some", "many", "all", "most", "each", "every", "not",
})
ORGANIZATION_SUFFIXES = {
    "inc": "Company", "corp": "Company", "ltd": "Company", "llc": "Company",
    "university": "Academic", "institute": "Academic", "foundation": "Nonprofit",
}
LOCATION_SUFFIXES = {"city": "City", "river": "River", "mountain": "Mountain", "county": "County"}
KNOWN_PLACES = frozenset({
    "africa", "america", "asia", "australia", "berlin", "california", "canada", "china",
    "europe", "france", "germany", "india", "italy", "japan", "london", "los angeles",
    "new york", "paris", "san francisco", "spain", "texas", "tokyo", "united kingdom",
    "united states",
})

MAX_ENTITIES_PER_SENTENCE = 20
MAX_RELATIONSHIPS_PER_DOCUMENT = 10_000
MAX_CONTEXT_CHARS = 300
# The real service gives an entity ~200 characters of text on either side of it.
ENTITY_CONTEXT_CHARS = 200
# The real service gives the whole sentence; a bound keeps an answer about a huge sentence
# with many entities from holding a copy of it per entity.
MAX_SENTENCE_CHARS = 1_000


def extract(payload: dict) -> dict:
    """Answer an ingest payload with its entities and co-occurrence relationships (contract §3).

    Deterministic: processing_time_ms is 0 here; the HTTP service fills in the time it took.
    """
    document = _Document()
    for position, chunk in enumerate(payload.get("chunks") or []):
        if isinstance(chunk, dict) and isinstance(chunk.get("text"), str):
            document.add_chunk(_Chunk(chunk["text"], chunk.get("vector_rowid"),
                                      _chunk_index(chunk, position)))
    document.end()
    entities, relationships = document.answer_entities(), document.answer_relationships()
    content_id = payload.get("content_id")
    return {
        "success": True,
        "content_id": content_id,
        "neo4j_document_id": document_id(content_id),
        "entities_extracted": len(entities),
        "relationships_extracted": len(relationships),
        "processing_time_ms": 0,
        "entities": entities,
        "relationships": relationships,
        "summary": summarize(entities, relationships),
    }


def document_id(content_id: object) -> str:
    """Name the document node deterministically, so a retried document maps to the same node."""
    return "doc-" + hashlib.sha1(str(content_id).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def summarize(entities: list[dict], relationships: list[dict]) -> dict:
    """The answer's `summary`: counts by type and predicate, and how entities spread over chunks."""
    appearances = sum(len(e["chunk_appearances"]) for e in entities)
    chunks = len({a["vector_rowid"] for e in entities for a in e["chunk_appearances"]})
    return {
        "entities_by_type": dict(Counter(e["type_primary"] for e in entities)),
        "relationships_by_predicate": dict(Counter(r["predicate"] for r in relationships)),
        "chunks_with_entities": chunks,
        "avg_entities_per_chunk": round(appearances / chunks, 2) if chunks else 0.0,
    }


class _Chunk(NamedTuple):
    text: str
    rowid: Any
    index: int


def _chunk_index(chunk: dict, position: int) -> int:
    index = chunk.get("chunk_index")
    return index if _is_int(index) else position


class _Sentence(NamedTuple):
    """The entities one sentence mentions (normalized -> rowids of the chunks it was seen in)."""

    found: dict[str, set]
    context: str

    def continued_by(self, rest: _Sentence) -> _Sentence:
        """This sentence, cut by a chunk boundary, joined with its rest from the next chunk.

        Grows `found` in place: a sentence can run on through thousands of chunks, and copying
        what it holds at every chunk would cost the square of their number.
        """
        for name, rowids in rest.found.items():
            if name in self.found:
                self.found[name].update(rowids)
            elif len(self.found) < MAX_ENTITIES_PER_SENTENCE:  # relate() reads no further
                self.found[name] = set(rowids)
        return _Sentence(self.found, (self.context + " " + rest.context)[:MAX_CONTEXT_CHARS].strip())

    def owned(self) -> _Sentence:
        """A copy whose rowid sets are its own: record_mentions shares one set per sentence."""
        return _Sentence({name: set(rowids) for name, rowids in self.found.items()}, self.context)


class _Document:
    """The entities and relationships of one document, accumulated chunk by chunk."""

    def __init__(self) -> None:
        self.entities: dict[str, dict] = {}  # normalized -> answer entity, first appearance first
        self.rank: dict[str, int] = {}       # normalized -> position of its first appearance
        self.chunks: dict[str, set] = {}     # normalized -> rowids of the chunks it appears in
        self.relations: dict[tuple[str, str], dict] = {}
        # The last sentence of the previous chunk when the chunk ended in the middle of it: a
        # chunker cuts sentences, so its rest opens the next chunk.
        self.unfinished: _Sentence | None = None

    def add_chunk(self, chunk: _Chunk) -> None:
        spans = list(_sentence_spans(chunk.text))
        if not spans:
            self.end()
        last = len(spans) - 1
        for number, (start, end) in enumerate(spans):
            found = self.record_mentions(chunk, start, end)
            joins = number == 0 and self.unfinished is not None
            unfinished = number == last and not _ends_sentence(chunk.text, start, end)
            if len(found) < 2 and not joins and not unfinished:
                continue  # nothing to relate: spare building its context
            sentence = _Sentence(found, _context(chunk.text, start, end))
            if joins:
                sentence, self.unfinished = self.unfinished.continued_by(sentence), None
            if unfinished:
                self.unfinished = sentence if joins else sentence.owned()
            else:
                self.relate(sentence)

    def end(self) -> None:
        """Relate what the last unfinished sentence holds: no chunk continues it."""
        if self.unfinished is not None:
            self.relate(self.unfinished)
            self.unfinished = None

    def record_mentions(self, chunk: _Chunk, start: int, end: int) -> dict[str, set]:
        """Add each mention's appearance to its entity; return the sentence's entities in order."""
        text, rowid, index = chunk  # locals: this loop runs once per mention of a document
        seen: dict[str, set] = {}
        here = {rowid}  # shared by the sentence's entities; relate() relies on that
        for offset_start, offset_end in _mentions(text, start, end):
            surface = text[offset_start:offset_end]
            normalized = " ".join(surface.lower().split())
            entity = self.entities.get(normalized)
            if entity is None:
                context = _entity_context(text, (offset_start, offset_end), (start, end))
                entity = self.add_entity(surface, normalized, context)
            entity["chunk_appearances"].append({"vector_rowid": rowid, "chunk_index": index,
                                                "offset_start": offset_start, "offset_end": offset_end})
            self.chunks[normalized].add(rowid)
            seen[normalized] = here
        return seen

    def add_entity(self, surface: str, normalized: str, context: dict) -> dict:
        self.rank[normalized] = len(self.entities)
        self.chunks[normalized] = set()
        entity = self.entities[normalized] = _new_entity(surface, normalized, context)
        return entity

    def relate(self, sentence: _Sentence) -> None:
        # Ordering by first appearance in the document makes the earlier entity the subject,
        # whichever order the pair shows up in this sentence, so the dedup key is stable.
        found = sentence.found
        ranked = sorted(list(found)[:MAX_ENTITIES_PER_SENTENCE], key=self.rank.__getitem__)
        for i, subject in enumerate(ranked):
            for obj in ranked[i + 1:]:
                # Within one chunk both name the same set: no union to build.
                same = found[subject] is found[obj]
                rowids = found[subject] if same else found[subject] | found[obj]
                self.add_relation(subject, obj, sentence.context, rowids)

    def add_relation(self, subject: str, obj: str, context: str, rowids: set) -> None:
        relation = self.relations.get((subject, obj))
        if relation is None:
            if len(self.relations) >= MAX_RELATIONSHIPS_PER_DOCUMENT:
                return
            relation = self.relations[(subject, obj)] = {"context": context, "chunk_rowids": set()}
        relation["chunk_rowids"].update(rowids)

    def answer_entities(self) -> list[dict]:
        for name, rowids in self.chunks.items():
            self.entities[name]["spans_multiple_chunks"] = len(rowids) > 1
        return list(self.entities.values())

    def answer_relationships(self) -> list[dict]:
        return [_answer_relationship(self.entities[subject], self.entities[obj], relation,
                                     spans_chunks=not self.chunks[subject] & self.chunks[obj])
                for (subject, obj), relation in self.relations.items()]


def _answer_relationship(subject: dict, obj: dict, relation: dict, *, spans_chunks: bool) -> dict:
    # spans_chunks is the real service's meaning: subject and object share no chunk.
    return {
        "subject_text": subject["text"],
        "subject_neo4j_id": None,
        "predicate": PREDICATE,
        "object_text": obj["text"],
        "object_neo4j_id": None,
        "confidence": min(subject["confidence"], obj["confidence"]),
        "context": relation["context"],
        "neo4j_relationship_id": None,
        "spans_chunks": spans_chunks,
        "chunk_rowids": sorted(relation["chunk_rowids"]),
    }


def _sentence_spans(text: str) -> Iterator[tuple[int, int]]:
    start = 0
    for match in SENTENCE_END_RE.finditer(text):
        yield start, match.start() + 1
        start = match.end()
    if start < len(text):
        yield start, len(text)


def _ends_sentence(text: str, start: int, end: int) -> bool:
    return text[start:end].rstrip()[-1:] in SENTENCE_TERMINATORS


def _context(text: str, start: int, end: int) -> str:
    return text[start:min(end, start + MAX_CONTEXT_CHARS)].strip()


def _entity_context(text: str, mention: tuple[int, int], sentence: tuple[int, int]) -> dict:
    return {
        "context_before": text[max(0, mention[0] - ENTITY_CONTEXT_CHARS):mention[0]].strip(),
        "context_after": text[mention[1]:mention[1] + ENTITY_CONTEXT_CHARS].strip(),
        "sentence": text[sentence[0]:min(sentence[1], sentence[0] + MAX_SENTENCE_CHARS)].strip(),
    }


def _mentions(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    for match in PHRASE_RE.finditer(text, start, end):
        span = _trim_mention(text, match.start(), match.end())
        if span is not None:
            yield span


def _trim_mention(text: str, start: int, end: int) -> tuple[int, int] | None:
    """Cut a possessive tail ("Acme's") and leading stopwords ("The Acme"); None if none left."""
    if text.endswith("'s", start, end) and end - start > 2:
        end -= 2
    while end > start and text[end - 1] in "'-":
        end -= 1
    while start < end:
        leading = LEADING_WORD_RE.match(text, start, end)
        word_end = leading.end() if leading else end
        if not _is_stopword(text[start:word_end]):
            return start, end
        if leading is None:
            return None
        start = word_end
    return None


def _is_stopword(word: str) -> bool:
    # Judge a contraction by its stem: "It's" and "I'm" open sentences, "O'Brien" is a name.
    return word.rstrip().split("'", 1)[0].lower() in STOPWORDS


def _new_entity(surface: str, normalized: str, context: dict) -> dict:
    type_primary, type_sub1 = classify(surface, normalized)
    return {
        "text": surface,
        "normalized": normalized,
        "type_primary": type_primary,
        "type_sub1": type_sub1,
        "type_sub2": None,
        "type_sub3": None,
        "type_full": type_full(type_primary, type_sub1),
        "confidence": confidence(normalized),
        "neo4j_node_id": None,
        **context,
        "chunk_appearances": [],
        "spans_multiple_chunks": False,  # known once every chunk is read
    }


def type_full(type_primary: str, *subtypes: str | None) -> str:
    """The real service's full type name: "Technology::Software"."""
    return "::".join([type_primary, *(sub for sub in subtypes if sub is not None)])


def classify(surface: str, normalized: str) -> tuple[str, str | None]:
    """Guess (type_primary, type_sub1) from the phrase's shape alone."""
    words = normalized.split()
    last = words[-1] if words else ""
    if last in ORGANIZATION_SUFFIXES:
        return "Organization", ORGANIZATION_SUFFIXES[last]
    if last in LOCATION_SUFFIXES:
        return "Location", LOCATION_SUFFIXES[last]
    if normalized in KNOWN_PLACES:
        return "Location", "Place"
    if len(words) >= 2:
        return "Person", None
    return "Concept", "Acronym" if len(surface) > 1 and surface.isupper() else None


def confidence(normalized: str) -> float:
    """Map a normalized phrase to a stable score in [0.5, 1.0]."""
    digest = hashlib.sha1(normalized.encode("utf-8", "surrogatepass")).digest()
    return round(0.5 + 0.5 * int.from_bytes(digest[:4], "big") / 0xFFFFFFFF, 3)


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `true` is never a row id.
    return isinstance(value, int) and not isinstance(value, bool)
