"""The validated answer to an ingest: IngestResult and the entities and relationships in it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Appearance:
    """One place (a chunk, optionally a character span in it) where an entity occurs."""

    vector_rowid: int
    offset_start: int | None
    offset_end: int | None


@dataclass(frozen=True, slots=True)
class Entity:
    """An entity the service extracted, with every chunk it appears in."""

    text: str
    normalized: str
    type_primary: str | None
    type_sub1: str | None
    type_sub2: str | None
    type_sub3: str | None
    confidence: float | None
    appearances: tuple[Appearance, ...]
    spans_multiple_chunks: bool | None = None  # as the service said; None: it did not say


@dataclass(frozen=True, slots=True)
class Relationship:
    """A subject-predicate-object triple, with the chunks it was found in."""

    subject_text: str
    predicate: str
    object_text: str
    confidence: float | None
    context: str | None
    chunk_rowids: tuple[int, ...]
    # The service's meaning: subject and object share no chunk. None: the service did not say.
    spans_chunks: bool | None = None
    neo4j_relationship_id: str | None = None


@dataclass(frozen=True, slots=True)
class IngestResult:
    """A validated answer: everything the write-back needs and nothing it must re-check."""

    content_id: int
    neo4j_document_id: str | None
    entities: tuple[Entity, ...]
    relationships: tuple[Relationship, ...]
    entities_extracted: int
    relationships_extracted: int

    def summary(self) -> dict:
        """Counts for logs and stats; entity_rows is what the write-back will insert."""
        return {
            "neo4j_document_id": self.neo4j_document_id,
            "entities": len(self.entities),
            "entity_rows": sum(len(entity.appearances) for entity in self.entities),
            "relationships": len(self.relationships),
            "entities_extracted": self.entities_extracted,
            "relationships_extracted": self.relationships_extracted,
        }
