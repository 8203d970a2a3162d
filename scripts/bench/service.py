"""The benchmark's KG service: precomputed reference answers over a minimal asyncio HTTP/1.1 server.

Every contender of the benchmark talks to this one service. Its answers are exactly what
`kgsupervisor dev-service` answers (devservice.extract, computed once per document at setup),
but serving one costs a dict lookup instead of a regex extraction, so on a 2-core machine the
service does not eat the CPU the contenders are measured on. The latency (`--latency S`) is a
timer, not a sleeping thread: any number of requests wait concurrently.

    python -m bench.service --answers answers.pkl --latency 0.05 [--port 0]

prints `listening PORT` on stdout once it accepts connections; SIGTERM or SIGINT stops it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import selectors
import signal
import socket
import sys

from kgsupervisor.kg import devservice

HEALTH = json.dumps({"status": "healthy", "service": "kgsupervisor-bench-service"}).encode()


def response(status: int, body: bytes) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 411: "Length Required"}.get(status, "Error")
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class Service:
    def __init__(self, answers: dict[int, bytes], latency: float) -> None:
        self.answers = answers
        self.latency = latency
        self.served = 0

    def answer(self, method: str, path: str, body: bytes) -> bytes:
        self.served += 1
        if path == "/health":
            return response(200, HEALTH)
        if path != "/api/v1/ingest" or method != "POST":
            return response(404, b'{"success": false, "error": "no such path"}')
        try:
            payload = json.loads(body)
            content_id = payload["content_id"]
        except (ValueError, KeyError, TypeError):
            return response(400, b'{"success": false, "error": "bad payload"}')
        answer = self.answers.get(content_id)
        if answer is None:  # not precomputed: compute it the reference way, once
            answer = self.answers[content_id] = json.dumps(devservice.extract(payload)).encode()
        return response(200, answer)


class Connection(asyncio.Protocol):
    """One keep-alive connection: requests are answered in order, one at a time."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.buffer = bytearray()
        self.waiting = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.serve_buffered()

    def serve_buffered(self) -> None:
        while not self.waiting and self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            method, path = (head[0].split(" ") + ["", ""])[:2]
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip() or 0)
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4:end + 4 + length])
            del self.buffer[:end + 4 + length]
            reply = self.service.answer(method, path.split("?", 1)[0], body)
            if self.service.latency > 0 and path.startswith("/api/"):
                self.waiting = True
                asyncio.get_running_loop().call_later(self.service.latency, self.send_later, reply)
                return
            self.transport.write(reply)

    def send_later(self, reply: bytes) -> None:
        self.waiting = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply)
            self.serve_buffered()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(answers: dict[int, bytes], latency: float, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    service = Service(answers, latency)
    server = await loop.create_server(lambda: Connection(service), host, port, backlog=512,
                                      reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", required=True, help="pickle of {content_id: answer JSON bytes}")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with open(args.answers, "rb") as f:
        answers = pickle.load(f)
    # select(2) takes its timeout in microseconds; epoll (the default) rounds it up to the next
    # millisecond, which would add ~0.5 ms to every delayed answer. A benchmark has few sockets.
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    try:
        loop.run_until_complete(serve(answers, args.latency, args.host, args.port))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
