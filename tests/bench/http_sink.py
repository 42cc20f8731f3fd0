"""The local endpoint ``bench_worker.py``'s ``http`` runs call: answers every request at once.

Run as ``python -m tests.bench.http_sink --port P [--kind asyncio|threading]``. Every request,
whatever its method and path, gets ``200`` and the JSON ``{"requestId": "sink", "ok": true}`` (so
a worker reads an answer and keeps its ``requestId``, as it does for a real endpoint).

``asyncio`` (the default): one asyncio protocol per connection, HTTP/1.1 keep-alive, the socket
bound with ``SO_REUSEPORT`` so that several of these processes share one port and the kernel
spreads the connections among them. ``threading``: ``http.server.ThreadingHTTPServer`` (HTTP/1.0,
a thread and a connection per request, a listen backlog of 5), what the bench used before; kept to
show what the sink itself cost.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ANSWER = b'{"requestId": "sink", "ok": true}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(ANSWER)).encode()
    + b"\r\n\r\n"
    + ANSWER
)
# Longer than any request the bench sends: a head this long without its end is not HTTP.
MAX_HEAD = 64 * 1024


def content_length(head: bytes) -> int:
    """The ``Content-Length`` of a request head (0 when it has none)."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


class Sink(asyncio.Protocol):
    """One keep-alive connection: each complete request (head and ``Content-Length`` body) gets
    ``RESPONSE``; pipelined requests are answered in order."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self.transport.close()
                return
            whole = end + 4 + content_length(bytes(self.buffer[:end]))
            if len(self.buffer) < whole:
                return
            del self.buffer[:whole]
            self.transport.write(RESPONSE)


def reuse_port_socket(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:``port`` that other processes may bind too."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def serve_asyncio(port: int) -> None:
    """Serve ``Sink`` on ``port`` until killed."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Sink, sock=reuse_port_socket(port))
    await server.serve_forever()


class Handler(BaseHTTPRequestHandler):
    """The threading sink: the same answer, one request per connection (HTTP/1.0)."""

    def answer(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(ANSWER)))
        self.end_headers()
        self.wfile.write(ANSWER)

    do_GET = do_POST = do_PUT = answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--kind", choices=["asyncio", "threading"], default="asyncio")
    args = parser.parse_args(argv)
    if args.kind == "threading":
        ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()
    else:
        asyncio.run(serve_asyncio(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
