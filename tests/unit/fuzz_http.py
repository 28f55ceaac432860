"""Atheris fuzz target: raw HTTP bytes, split at random points, through the compiled protocol.

Each input is one client connection: the first two bytes seed where the rest is cut into
packets, the rest is what the client sends (pipelined requests, valid or not). The packets go
to ``HttpProtocol.data_received`` over the fake transport of ``test_protocol``, with an
in-memory engine that stores whatever it is given, then the client half-closes. The
properties, checked after every input (any failure is an exception, which atheris reports
with the input that caused it):

- no exception escapes the protocol;
- the bytes written are a sequence of well-formed HTTP/1.1 responses (status line, headers,
  ``Content-Length`` framing), nothing is written after the connection closed;
- no status >= 500, but those of ``ALLOWED_5XX``: the 503 of the routes that need consumer
  groups or a metadata store, which this fake engine does not have (the engine is at fault
  there), and the 501/505 of a transfer coding or HTTP version the server does not support;
- every 4xx and 5xx carries a JSON error body with a code and a message;
- once the client has half-closed and the loop settled, the connection is closed, and the
  answers are the same as when the client waited for them before half-closing;
- the pooled request slots and deliveries are all released (``debug_counters``).

Run by ``test_fuzz_http.py`` (a bounded, seeded run); by hand::

    .venv/bin/python -m tests.unit.fuzz_http -runs=100000 CORPUS_DIR
"""

from __future__ import annotations

import sys

import atheris

# Instrument the Python layers behind the protocol (handlers, request structs, settings,
# errors) before anything imports them; the compiled core itself is not instrumented.
with atheris.instrument_imports(include=["mqfast"]):
    import mqfast.api
    import mqfast.config
    import mqfast.errors
    import mqfast.messages

import asyncio
import gc
import itertools
import json
import random
from pathlib import Path
from typing import Any

import uvloop

from mqfast._core import debug_counters
from mqfast.messages import PartitionStats, TopicInfo
from tests.unit.test_protocol import Harness, MemorySink, post

# Small limits, so that the size checks are within reach of short inputs.
LIMITS = {"max_size": 2048, "max_header_bytes": 1024, "max_batch_bytes": 8192}
# The 5xx a request may get by no fault of the server: the routes this fake engine cannot
# serve (App._groups/_meta), a transfer coding the server does not decode (issue 10 item 7),
# an HTTP version it does not speak (item 8).
ALLOWED_5XX = {
    503: "engine_unavailable",
    501: "not_implemented",
    505: "http_version_not_supported",
}


class FuzzSink(MemorySink):
    """The protocol tests' engine, plus the describe call that ``GET /topics/{name}`` makes."""

    async def delete_topic(self, name: str) -> None:
        if self.topics.pop(name, None) is None:  # as the real engines do
            raise mqfast.errors.UnknownTopic(f"topic {name!r} does not exist", field="name")

    async def describe_topic(self, name: str) -> TopicInfo:
        cfg = self.topics.get(name)
        if cfg is None:
            raise mqfast.errors.UnknownTopic(f"topic {name!r} does not exist", field="name")
        stats = [
            PartitionStats(p, len(self.log.get((name, p), [])), 0, 0, 0)
            for p in range(cfg.partitions)
        ]
        return TopicInfo(
            cfg.name, cfg.partitions, cfg.replication, cfg.retention, cfg.max_size,
            cfg.created_at, cfg.dead_letter_expired, sum(s.messages for s in stats), 0,
            stats, [],
        )  # fmt: skip


def split(data: bytes, seed: int) -> list[bytes]:
    """``data`` cut at up to 8 random points (seeded, so an input always splits the same)."""
    rng = random.Random(seed)
    cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 8)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def parse_responses(out: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The responses in ``out``; AssertionError on anything that is not well-formed."""
    found = []
    buf = out
    while buf:
        head, sep, rest = buf.partition(b"\r\n\r\n")
        assert sep, f"response head not terminated: {buf[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        version, _, tail = lines[0].partition(" ")
        code, _, reason = tail.partition(" ")
        assert version == "HTTP/1.1" and code.isdigit() and len(code) == 3 and reason, lines[0]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            assert colon and name and name == name.strip(), f"bad header line {line!r}"
            assert name.lower() not in headers, f"header {name} twice"
            headers[name.lower()] = value.strip()
        status = int(code)
        if status == 100:
            buf = rest
            continue
        length = headers.get("content-length")
        assert length is not None and length.isdigit(), f"no Content-Length: {lines}"
        n = int(length)
        if n and rest.startswith(b"HTTP/1.1 ") and len(rest) > n:
            # an answer to HEAD: its Content-Length describes the body a GET would have
            n = 0
        assert len(rest) >= n, f"body shorter than Content-Length {n}: {rest!r}"
        found.append((status, headers, rest[:n]))
        buf = rest[n:]
    return found


def check_response(status: int, headers: dict[str, str], body: bytes) -> None:
    assert 200 <= status < 600, status
    if status < 400:
        return
    assert headers.get("content-type", "").startswith("application/json"), headers
    if not body:  # HEAD
        return
    err = json.loads(body)["error"]
    assert isinstance(err["code"], str) and err["code"], body
    assert isinstance(err["message"], str) and err["message"], body
    if status >= 500:
        assert ALLOWED_5XX.get(status) == err["code"], f"{status} {body!r}"


async def _settle(rounds: int = 8) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


# Loop iterations that the slowest route of the fake engine needs to answer (an unknown topic
# is created on the way) with room to spare: the fake completes everything on the next ones.
QUIET_ROUNDS = 200


async def _exchange(
    loop: asyncio.AbstractEventLoop, packets: list[bytes], settle_before_eof: bool
) -> list[int]:
    """One connection: the packets, then the client's half-close; the statuses answered."""
    proto, tr = Harness(loop, FuzzSink(), **LIMITS).connect()
    for packet in packets:
        if tr.closed:  # a closed transport delivers nothing more
            break
        proto.data_received(packet)
        await _settle(2)
    if settle_before_eof:
        await _settle(QUIET_ROUNDS)
    # The client half-closes; asyncio closes the transport unless eof_received says keep.
    if not tr.closed and not proto.eof_received():
        tr.close()
    for _ in range(QUIET_ROUNDS):
        if tr.closed:
            break
        await asyncio.sleep(0)
    await _settle(2)  # connection_lost follows close on the next iteration
    assert tr.closed, "connection neither answered to the end nor closed"
    answers = parse_responses(bytes(tr.data))
    for status, headers, body in answers:
        check_response(status, headers, body)
    return [status for status, _, _ in answers]


def _run(packets: list[bytes], settle_before_eof: bool) -> list[int]:
    loop = uvloop.new_event_loop()
    # An exception in a callback (an answer written after close, say) reaches the loop's
    # handler, not the caller: collect them.
    escaped: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: escaped.append(context))
    try:
        statuses = loop.run_until_complete(_exchange(loop, packets, settle_before_eof))
    finally:
        loop.close()
    assert not escaped, f"exception in a callback: {escaped[0]}"
    return statuses


def one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    packets = split(data[2:], int.from_bytes(data[:2], "big"))
    # A half-close right after the last byte loses no answer: the same as when the client
    # waits for the answers before it half-closes.
    at_once, after = _run(packets, False), _run(packets, True)
    assert at_once == after, f"answers lost to the half-close: {at_once} != {after}"
    counters = debug_counters()
    if counters != {"pending": 0, "deliveries": 0}:
        gc.collect()  # a request and its connection may be a cycle
        counters = debug_counters()
    assert counters == {"pending": 0, "deliveries": 0}, f"pooled objects leaked: {counters}"


def seed_corpus(directory: Path) -> None:
    """Valid requests of every route (and a few pipelined), for the fuzzer to mutate."""

    reqs = [
        post("/api/v1/messages", {"topic": "t", "content": "hi", "key": "k", "priority": 3,
                                  "ttl": "1h", "headers": {"a": "b"}}),
        post("/api/v1/messages/batch", {"topic": "p4", "messages": [{"content": "a"},
                                        {"content": "b", "topic": "t", "ttl": 5}]}),
        post("/api/v1/messages/consume", {"topic": "t", "group_id": "g", "consumer_id": "c",
                                          "max_messages": 5, "timeout": "0s"}),
        post("/api/v1/messages/acknowledge", {"message_id": "m", "group_id": "g",
                                              "success": False, "requeue_delay": "1s"}),
        post("/api/v1/messages/acknowledge/batch", {"group_id": "g",
                                                    "acks": [{"message_id": "m"}]}),
        post("/api/v1/messages/extend", {"message_id": "m", "group_id": "g",
                                         "visibility_timeout": "30s"}),
        post("/api/v1/topics", {"name": "n", "partitions": 2, "retention": "7d",
                                "max_size": "1024"}),
        post("/api/v1/consumers", {"consumer_id": "c", "group_id": "g", "topics": ["t"],
                                   "max_concurrency": 2, "rate_limit": 1.5}),
        post("/api/v1/topics/t/redrive", {"max_messages": 3}),
        b"GET /api/v1/topics HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /api/v1/topics/t HTTP/1.1\r\nHost: x\r\n\r\n",
        b"DELETE /api/v1/topics/p4 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /api/v1/consumers?group_id=g HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /api/v1/metrics?start_time=2024-01-01T00:00:00Z&topic=t HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /health/ready HTTP/1.0\r\n\r\n",
        b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"a\r\n{\"topic\":\"\r\n11\r\nt\",\"content\":\"x\"}\r\n0\r\n\r\n",
        b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 27\r\n\r\n{\"topic\":\"t\",\"content\":\"x\"}",
    ]  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    for i, req in enumerate(reqs):
        (directory / f"seed-{i:02d}").write_bytes(bytes([0, i]) + req)
    (directory / "seed-pipelined").write_bytes(b"\x01\x02" + b"".join(reqs[:3] + reqs[9:12]))


# Tokens for the mutator: header names and values, framing, JSON fields and values.
DICTIONARY = [
    "\r\n", "\r\n\r\n", "HTTP/1.1", "HTTP/1.0", "GET ", "POST ", "DELETE ", "HEAD ", "PUT ",
    "Content-Length: ", "Transfer-Encoding: chunked", "Connection: close",
    "Connection: keep-alive", "Expect: 100-continue", "Prefer: respond-async",
    "Content-Type: application/json", "Host: x", "Authorization: Bearer ", "0\r\n\r\n",
    "/api/v1/messages", "/batch", "/consume", "/acknowledge", "/extend", "/api/v1/topics/",
    "/redrive", "/api/v1/consumers/", "/heartbeat", "/api/v1/metrics?", "/health", "?",
    "&", "%", "%2F", "%00", '"topic"', '"content"', '"messages"', '"key"', '"headers"',
    '"priority"', '"ttl"', '"group_id"', '"consumer_id"', '"message_id"', '"acks"',
    '"success"', '"requeue_delay"', '"visibility_timeout"', '"timeout"', '"max_messages"',
    '"name"', '"partitions"', '"retention"', '"max_size"', '"topics"', '"max_concurrency"',
    '"rate_limit"', "null", "true", "false", "-1", "1e309", "18446744073709551616", "\\u0000",
    "\\ud800", "\\\"", "{}", "[]", '""', "start_time=", "end_time=", "topic=", "group_id=",
]  # fmt: skip


def write_dictionary(path: Path) -> None:
    """``DICTIONARY`` in libFuzzer's format (one quoted token a line)."""
    lines = []
    for token in DICTIONARY:
        raw = token.encode()
        lines.append('"' + "".join(f"\\x{b:02x}" for b in raw) + '"')
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> None:
    gc.freeze()  # what is loaded now lives on; collections then only walk what an input made
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
