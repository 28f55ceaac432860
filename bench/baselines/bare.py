"""Ceiling reference: a bare uvloop + httptools server answering a constant 200 JSON.

What it measures
    The most requests/s one CPython process can answer on this machine with the same parser and
    event loop mqfast uses: it parses each request with httptools, reads the body (kept as bytes,
    never decoded or validated), stores nothing, and writes one constant response. Keep-alive and
    pipelining work. Every path and method gets the same answer.

How to read the result
    No gateway can beat this figure on the same core; mqfast's goals are stated as fractions of it
    (durable produce >= 0.45x, fire-and-forget >= 0.55x). If a run's bare figure is far below the
    ~120,000 req/s of TARGETS.md, the machine (or the load generator) was the limit in that run.

Run::

    taskset -c 0 .venv/bin/python bench/baselines/bare.py --port 8087
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket

import httptools
import uvloop

BODY = (
    b'{"message_id":"00000000-0000-4000-8000-000000000000","topic":"bench","partition":0,'
    b'"offset":0,"timestamp":1730000000000}'
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)


class BareProtocol(asyncio.Protocol):
    __slots__ = ("body", "parser", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.body = []  # read, not decoded
        assert self.transport is not None
        self.transport.write(RESPONSE)
        if not self.parser.should_keep_alive():
            self.transport.close()


async def serve(port: int, host: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(BareProtocol, host, port, backlog=4096, reuse_address=True)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    print(f"bare listening on http://{host}:{port}", flush=True)
    await stop
    server.close()


def main() -> None:
    p = argparse.ArgumentParser(description="bare uvloop + httptools constant-200 server")
    p.add_argument("--port", type=int, default=8087)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--data-dir", help="accepted for symmetry with the other baselines; unused")
    p.add_argument("--store", default="none", help="accepted for symmetry; always none")
    args = p.parse_args()
    uvloop.run(serve(args.port, args.host))


if __name__ == "__main__":
    main()
