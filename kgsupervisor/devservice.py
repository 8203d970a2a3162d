"""The reference KG service behind `kgsupervisor dev-service`: deterministic extraction over HTTP."""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import queue
import re
import signal
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from typing import Callable
from typing import Iterator
from urllib.parse import urlsplit

SERVICE_NAME = "kgsupervisor-dev-service"
PREDICATE = "co_occurs_with"

# A capitalised run of at most six words: longer runs are headings or shouting, not names,
# and the bound keeps one entity from swallowing a whole capitalised megabyte.
PHRASE_RE = re.compile(r"\b[A-Z][\w'-]*(?:[ \t]+[A-Z][\w'-]*){0,5}")
# One terminator char, never a run: `[.!?]+\s+` backtracks quadratically over "......".
SENTENCE_END_RE = re.compile(r"[.!?]\s+")
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
# 10 MB of text can grow sixfold as JSON \u escapes.
MAX_BODY_BYTES = 256 * 1024 * 1024
IDLE_CONNECTION_TIMEOUT_S = 120.0

ROUTES = {"/health": ("GET", "answer_health"), "/api/v1/ingest": ("POST", "answer_ingest")}


# ---------------------------------------------------------------- extraction


def extract(payload: dict) -> dict:
    """Answer an ingest payload with its entities and co-occurrence relationships (contract §3)."""
    document = _Document()
    for chunk in payload.get("chunks") or []:
        if isinstance(chunk, dict) and isinstance(chunk.get("text"), str):
            document.add_chunk(chunk.get("vector_rowid"), chunk["text"])
    content_id = payload.get("content_id")
    return {
        "success": True,
        "content_id": content_id,
        "neo4j_document_id": document_id(content_id),
        "entities_extracted": len(document.entities),
        "relationships_extracted": len(document.relations),
        "entities": list(document.entities.values()),
        "relationships": document.finished_relations(),
    }


def document_id(content_id: object) -> str:
    """Name the document node deterministically, so a retried document maps to the same node."""
    return "doc-" + hashlib.sha1(str(content_id).encode("utf-8", "surrogatepass")).hexdigest()[:16]


class _Document:
    """The entities and relationships of one document, accumulated chunk by chunk."""

    def __init__(self) -> None:
        self.entities: dict[str, dict] = {}  # normalized -> answer entity, first appearance first
        self.rank: dict[str, int] = {}       # normalized -> position of its first appearance
        self.relations: dict[tuple[str, str], dict] = {}

    def add_chunk(self, rowid: object, text: str) -> None:
        for start, end in _sentence_spans(text):
            found = self.record_mentions(text, start, end, rowid)
            if len(found) > 1:
                self.relate(found, _context(text, start, end), rowid)

    def record_mentions(self, text: str, start: int, end: int, rowid: object) -> list[str]:
        """Add each mention's appearance to its entity; return the sentence's entities in order."""
        seen: dict[str, None] = {}
        for offset_start, offset_end in _mentions(text, start, end):
            surface = text[offset_start:offset_end]
            normalized = " ".join(surface.lower().split())
            if normalized not in self.entities:
                self.rank[normalized] = len(self.entities)
                self.entities[normalized] = _new_entity(surface, normalized)
            self.entities[normalized]["chunk_appearances"].append(
                {"vector_rowid": rowid, "offset_start": offset_start, "offset_end": offset_end})
            seen[normalized] = None
        return list(seen)

    def relate(self, found: list[str], context: str, rowid: object) -> None:
        # Ordering by first appearance in the document makes the earlier entity the subject,
        # whichever order the pair shows up in this sentence, so the dedup key is stable.
        ranked = sorted(found[:MAX_ENTITIES_PER_SENTENCE], key=self.rank.__getitem__)
        for i, subject in enumerate(ranked):
            for obj in ranked[i + 1:]:
                self.add_relation(self.entities[subject], self.entities[obj], context, rowid)

    def add_relation(self, subject: dict, obj: dict, context: str, rowid: object) -> None:
        key = (subject["normalized"], obj["normalized"])
        relation = self.relations.get(key)
        if relation is None:
            if len(self.relations) >= MAX_RELATIONSHIPS_PER_DOCUMENT:
                return
            relation = self.relations[key] = {
                "subject_text": subject["text"],
                "predicate": PREDICATE,
                "object_text": obj["text"],
                "confidence": min(subject["confidence"], obj["confidence"]),
                "context": context,
                "chunk_rowids": set(),
            }
        relation["chunk_rowids"].add(rowid)

    def finished_relations(self) -> list[dict]:
        return [{**r, "chunk_rowids": sorted(r["chunk_rowids"])} for r in self.relations.values()]


def _sentence_spans(text: str) -> Iterator[tuple[int, int]]:
    start = 0
    for match in SENTENCE_END_RE.finditer(text):
        yield start, match.start() + 1
        start = match.end()
    if start < len(text):
        yield start, len(text)


def _context(text: str, start: int, end: int) -> str:
    return text[start:min(end, start + MAX_CONTEXT_CHARS)].strip()


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


def _new_entity(surface: str, normalized: str) -> dict:
    type_primary, type_sub1 = classify(surface, normalized)
    return {
        "text": surface,
        "normalized": normalized,
        "type_primary": type_primary,
        "type_sub1": type_sub1,
        "type_sub2": None,
        "type_sub3": None,
        "confidence": confidence(normalized),
        "chunk_appearances": [],
    }


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


# ---------------------------------------------------------------- validation


def validate_ingest_request(payload: object) -> str | None:
    """Return None when the payload can be ingested, else a short reason to send back."""
    if not isinstance(payload, dict):
        return "payload must be a JSON object"
    if "content_id" not in payload:
        return "content_id is required"
    if not _is_int(payload["content_id"]):
        return "content_id must be an integer"
    chunks = payload.get("chunks")
    if not isinstance(chunks, list):
        return "chunks must be a list"
    for index, chunk in enumerate(chunks):
        reason = _validate_chunk(chunk)
        if reason is not None:
            return f"chunks[{index}]: {reason}"
    return None


def _validate_chunk(chunk: object) -> str | None:
    if not isinstance(chunk, dict):
        return "must be an object"
    if not _is_int(chunk.get("vector_rowid")):
        return "vector_rowid must be an integer"
    if not isinstance(chunk.get("text"), str):
        return "text must be a string"
    return None


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `true` is never a row id.
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_ingest(body: bytes) -> tuple[dict | None, str | None]:
    try:
        payload = json.loads(body)
    except RecursionError:
        return None, "invalid JSON: nested too deeply"
    except ValueError as exc:
        return None, f"invalid JSON: {exc}"
    reason = validate_ingest_request(payload)
    return (None, reason) if reason else (payload, None)


# ---------------------------------------------------------------- HTTP


class DevServiceServer(ThreadingHTTPServer):
    """The HTTP server plus the state its handlers share: settings and counters."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], *, latency: float, fail_rate: float,
                 token: str | None, verbose: bool) -> None:
        self.latency = latency
        self.fail_rate = fail_rate
        self.token = token
        self.verbose = verbose
        self._lock = threading.Lock()
        self._requests_served = 0
        self._ingests_seen = 0
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can stall
        # for seconds on hosts with broken resolvers; the dev service has no use for the name.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def count_request(self) -> None:
        with self._lock:
            self._requests_served += 1

    @property
    def requests_served(self) -> int:
        with self._lock:
            return self._requests_served

    def next_ingest_fails(self) -> bool:
        """Spread failures evenly: request n fails when floor((n+1)*rate) > floor(n*rate)."""
        with self._lock:
            n = self._ingests_seen
            self._ingests_seen += 1
        return math.floor((n + 1) * self.fail_rate) > math.floor(n * self.fail_rate)

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        expected = f"Bearer {self.token}".encode("utf-8", "surrogatepass")
        given = (header or "").encode("utf-8", "surrogatepass")
        return hmac.compare_digest(expected, given)

    def handle_error(self, request: object, client_address: object) -> None:
        # A client hanging up mid-answer is routine for a test double; stay quiet about it.
        if self.verbose:
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Routes GET /health and POST /api/v1/ingest; every answer is JSON with a Content-Length."""

    protocol_version = "HTTP/1.1"
    server_version = SERVICE_NAME
    timeout = IDLE_CONNECTION_TIMEOUT_S
    # Headers and body go out in two writes; with Nagle on, a keep-alive client waits ~40 ms
    # for the delayed ACK before it sees the body.
    disable_nagle_algorithm = True
    server: DevServiceServer

    def route(self) -> None:
        """Answer one request: read its body, then pick the handler by path and method."""
        self.server.count_request()
        body = self.read_body()
        if body is None:
            return
        route = ROUTES.get(urlsplit(self.path).path)
        if route is None:
            self.send_json(404, {"success": False, "error": f"no such path: {self.path}"})
        elif self.command != route[0]:
            self.send_json(405, {"success": False, "error": f"use {route[0]}"},
                           {"Allow": route[0]})
        else:
            getattr(self, route[1])(body)

    # Every method goes through one router, so a known path with the wrong verb gets 405.
    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = route

    def read_body(self) -> bytes | None:
        """Read exactly Content-Length bytes, or answer the error and return None."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self.refuse(411, "Content-Length required")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return self.refuse(400, "bad Content-Length")
        if length < 0:
            return self.refuse(400, "bad Content-Length")
        if length > MAX_BODY_BYTES:
            return self.refuse(413, "request body too large")
        return self.rfile.read(length) if length else b""

    def refuse(self, status: int, reason: str) -> None:
        # The body was not read, so the connection cannot carry another request.
        self.send_json(status, {"success": False, "error": reason}, {"Connection": "close"})

    def answer_health(self, body: bytes) -> None:
        self.send_json(200, {"status": "healthy", "service": SERVICE_NAME,
                             "requests_served": self.server.requests_served})

    def answer_ingest(self, body: bytes) -> None:
        # Authentication comes before parsing so an unauthenticated caller learns nothing.
        if not self.server.authorized(self.headers.get("Authorization")):
            self.send_json(401, {"success": False, "error": "unauthorized"},
                           {"WWW-Authenticate": "Bearer"})
            return
        payload, reason = _parse_ingest(body)
        if payload is None:
            self.send_json(400, {"success": False, "error": reason})
            return
        if self.server.latency > 0:
            time.sleep(self.server.latency)
        if self.server.next_ingest_fails():
            self.send_json(500, {"success": False, "error": "injected failure"})
            return
        self.send_json(*_extract_answer(payload))

    def send_json(self, status: int, answer: dict, headers: dict[str, str] | None = None) -> None:
        # ensure_ascii keeps lone surrogates from the request encodable on the way back.
        body = json.dumps(answer).encode("ascii")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        if self.server.verbose:
            super().log_message(format, *args)


def _extract_answer(payload: dict) -> tuple[int, dict]:
    try:
        return 200, extract(payload)
    except Exception as exc:  # noqa: BLE001 - a reference server answers rather than hanging up
        return 500, {"success": False, "error": f"internal error: {type(exc).__name__}"}


def make_server(host: str = "127.0.0.1", port: int = 8088, *, latency: float = 0.0,
                fail_rate: float = 0.0, token: str | None = None,
                verbose: bool = False) -> DevServiceServer:
    """Bind the dev service to (host, port) without serving; port 0 picks a free port."""
    if latency < 0:
        raise ValueError(f"latency must be >= 0, got {latency!r}")
    if not 0.0 <= fail_rate <= 1.0:
        raise ValueError(f"fail_rate must be within [0, 1], got {fail_rate!r}")
    return DevServiceServer((host, port), latency=latency, fail_rate=fail_rate,
                            token=token, verbose=verbose)


def serve(host: str, port: int, *, latency: float = 0.0, fail_rate: float = 0.0,
          token: str | None = None, ready: Callable[[int], None] | None = None,
          verbose: bool = False) -> None:
    """Serve until SIGTERM or SIGINT, then close the socket and return; main thread only."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("serve() installs signal handlers and must run in the main thread; "
                           "use make_server() elsewhere")
    server = make_server(host, port, latency=latency, fail_rate=fail_rate, token=token,
                         verbose=verbose)
    stop: queue.SimpleQueue[int] = queue.SimpleQueue()
    previous = _install_stop_handlers(stop)
    worker = threading.Thread(target=server.serve_forever, name="devservice", daemon=True)
    worker.start()
    try:
        if ready is not None:
            ready(server.server_address[1])
        stop.get()
    finally:
        _restore_handlers(previous)
        server.shutdown()
        server.server_close()
        worker.join()


def _install_stop_handlers(stop: queue.SimpleQueue) -> dict[int, object]:
    # SimpleQueue.put is reentrant-safe; an Event's lock could deadlock inside a handler.
    def handler(signum: int, frame: object) -> None:
        stop.put_nowait(signum)

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore_handlers(previous: dict[int, object]) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)
