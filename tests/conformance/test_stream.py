"""Streaming consume (``GET /api/v1/messages/stream``, Server-Sent Events) on every engine:
order and credit-based flow control, leases released when a stream closes, idle streams that
cost no CPU, a slow reader that makes the server pause, a clean end at shutdown, bad queries.

Every test uses consumer ids of its own: on the Kafka engine consumer registrations outlive a
test (PostgreSQL is shared by the session), and a name registered in another group is a 409."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any
from urllib.parse import urlencode

from tests.conformance.conftest import Gateway, GatewayFactory, unique, wait_for

STREAM = "/api/v1/messages/stream"


class SseClient:
    """One stream over a raw socket: the chunked body decoded, events and comments parsed."""

    def __init__(self, gw: Gateway, rcvbuf: int | None = None, **query: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connecting: the window is agreed at the handshake
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(20.0)
        self.sock.connect(("127.0.0.1", gw.proc.port))
        self.sock.sendall(
            f"GET {STREAM}?{urlencode(query)} HTTP/1.1\r\nHost: x\r\n\r\n".encode("latin-1")
        )
        self.raw = bytearray()
        self.body = bytearray()
        self.head: bytes | None = None
        self.ended = False  # the last chunk arrived: a clean end
        self.closed = False
        self.items: list[tuple[str, str]] = []  # ("message", json) | ("end", ...) | (":", text)

    def close(self) -> None:
        self.sock.close()

    def _read(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            self.closed = True
            return
        self.raw += data
        if self.head is None:
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head = bytes(self.raw[:end])
            del self.raw[: end + 4]
        pos = 0
        while not self.ended:  # chunked framing; the buffer is cut once per read
            line_end = self.raw.find(b"\r\n", pos)
            if line_end < 0:
                break
            size = int(self.raw[pos:line_end], 16)
            if len(self.raw) < line_end + 2 + size + 2:
                break
            self.body += self.raw[line_end + 2 : line_end + 2 + size]
            pos = line_end + 2 + size + 2
            self.ended = size == 0
        del self.raw[:pos]
        start = 0
        while (end := self.body.find(b"\n\n", start)) >= 0:
            text = self.body[start:end].decode()
            start = end + 2
            if text.startswith(":"):
                self.items.append((":", text[1:].strip()))
                continue
            fields = dict(line.split(": ", 1) for line in text.split("\n"))
            self.items.append((fields.get("event", "message"), fields["data"]))
        del self.body[:start]

    def status(self) -> int:
        while self.head is None and not self.closed:
            self._read()
        assert self.head is not None, self.raw
        return int(self.head.split(b" ", 2)[1])

    def until(self, check: Any, what: str) -> None:
        """Read until ``check()`` holds (the socket's timeout bounds each read)."""
        while not check():
            assert not self.closed, f"closed before {what}: {self.items}"
            self._read()

    def count(self) -> int:
        return sum(1 for kind, _ in self.items if kind == "message")

    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(d) for kind, d in self.items if kind == "message"]

    def heartbeats(self) -> int:
        return sum(1 for kind, _ in self.items if kind == ":")

    def next_heartbeat(self) -> list[dict[str, Any]]:
        """The messages received until one more heartbeat (the stream found nothing to send)."""
        n = self.heartbeats()
        self.until(lambda: self.heartbeats() > n, "a heartbeat")
        return self.messages()


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_order_and_flow_control(engine_server: Gateway) -> None:
    gw = engine_server
    topic, group = gw.topic(), unique("g")
    c1 = unique("c")
    for i in range(6):
        gw.produce(topic, f"m{i}")
    s = SseClient(gw, topic=topic, group_id=group, consumer_id=c1, max_inflight=2,
                  heartbeat="1s", visibility_timeout="30s")  # fmt: skip
    try:
        assert s.status() == 200
        assert b"content-type: text/event-stream" in s.head.lower()  # type: ignore[union-attr]
        # No more than max_inflight unacknowledged: two, then heartbeats only.
        got = s.next_heartbeat()
        got = s.next_heartbeat()
        assert [m["content"] for m in got] == ["m0", "m1"]
        assert all(m["topic"] == topic and m["delivery_count"] == 1 for m in got)
        # An acknowledgement frees exactly one credit.
        gw.ack(got[0]["message_id"], group, topic=topic, consumer=c1)
        s.until(lambda: s.count() == 3, "a third message")
        got = s.next_heartbeat()
        assert [m["content"] for m in got] == ["m0", "m1", "m2"]
        # A negative acknowledgement frees one too; the rest follow in order.
        gw.nack(got[1]["message_id"], group, topic=topic, consumer=c1,
                requeue_delay="40s")  # fmt: skip
        gw.ack(got[2]["message_id"], group, topic=topic, consumer=c1)
        s.until(lambda: s.count() == 5, "two more messages")
        got = s.next_heartbeat()
        assert [m["content"] for m in got] == ["m0", "m1", "m2", "m3", "m4"]
    finally:
        s.close()


def test_disconnect_releases_leases_at_once(engine_server: Gateway) -> None:
    gw = engine_server
    topic, group = gw.topic(), unique("g")
    c1, c2 = unique("c"), unique("c")
    ids = [gw.produce(topic, f"m{i}")["message_id"] for i in range(3)]
    s = SseClient(gw, topic=topic, group_id=group, consumer_id=c1, max_inflight=3,
                  visibility_timeout="1h")  # fmt: skip
    s.until(lambda: s.count() == 3, "three messages")
    s.close()
    # Leased for an hour, yet another consumer gets them now: the close released them.
    got: list[dict[str, Any]] = []
    wait_for(
        lambda: got.extend(gw.consume(topic, group, c2, timeout="1s")) or len(got) >= 3,
        what="the released messages",
    )
    assert sorted(m["message_id"] for m in got) == sorted(ids)


def test_many_idle_streams_cost_no_cpu(engine_server: Gateway) -> None:
    gw = engine_server
    topic, group = gw.topic(), unique("g")
    c1 = unique("c")
    assert gw.proc.proc is not None
    pid = gw.proc.proc.pid
    streams = [
        SseClient(gw, topic=topic, group_id=group, consumer_id=f"{c1}-{i}", max_inflight=5)
        for i in range(200)
    ]
    try:
        for s in streams:
            assert s.status() == 200
        time.sleep(1.0)  # let every stream make its first (empty) lease and wait
        before = _cpu_s(pid)
        time.sleep(3.0)
        used = _cpu_s(pid) - before
        # Waiting streams have no timer but their heartbeat (15 s): what the server uses is
        # its own background work. A poll per stream would take a core at this count.
        assert used < 0.5, f"{used:.2f} CPU seconds in 3 s with 200 idle streams"
        # They are alive all the same: a message reaches exactly one of them.
        gw.produce(topic, "wake")
        deadline = time.monotonic() + 15
        got: list[dict[str, Any]] = []
        for s in streams:
            s.sock.setblocking(False)
        while not got and time.monotonic() < deadline:
            for s in streams:
                try:
                    s._read()
                except BlockingIOError:
                    continue
                got += s.messages()
            time.sleep(0.01)
        assert [m["content"] for m in got] == ["wake"]
    finally:
        for s in streams:
            s.close()


def test_slow_reader_makes_the_server_pause(engine_server: Gateway) -> None:
    gw = engine_server
    topic, group = gw.topic(), unique("g")
    c1 = unique("c")
    s = SseClient(gw, rcvbuf=4096, topic=topic, group_id=group, consumer_id=c1,
                  max_inflight=1000, visibility_timeout="1h")  # fmt: skip
    try:
        assert s.status() == 200
        size = 20_000
        # What may be leased while the client reads nothing: what the kernel's socket buffers
        # take (the server's send buffer grows up to tcp_wmem's maximum), the transport's
        # high-water mark, and the one lease of at most 100 that filled them.
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            wmem_max = int(f.read().split()[2])
        bound = (wmem_max + (1 << 20)) // size + 100
        n = (2 * bound // 50 + 1) * 50  # a burst of more than twice that, in batches of 50
        for _ in range(n // 50):
            gw.produce_many(topic, 50, content="x" * size)

        def consumed() -> float:
            return gw.metric("message_queue_messages_consumed_total", topic=topic, group=group)

        wait_for(lambda: consumed() >= 1, what="the first lease")
        time.sleep(2.0)
        held = consumed()
        assert held <= bound, f"{held} of {n} leased to a stream whose client reads nothing"
        # Reading again resumes the stream: every message arrives.
        s.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        s.until(lambda: s.count() >= n, f"all {n} messages")
        assert len({m["message_id"] for m in s.messages()}) == n
    finally:
        s.close()


def test_shutdown_ends_the_stream_cleanly(gateway: GatewayFactory) -> None:
    gw = gateway.start()
    topic, group = gw.topic(), unique("g")
    c1, c2 = unique("c"), unique("c")
    mid = gw.produce(topic, "m0")["message_id"]
    s = SseClient(gw, topic=topic, group_id=group, consumer_id=c1, visibility_timeout="1h")
    try:
        s.until(lambda: s.count() == 1, "the message")
        assert gw.proc.stop() == 0
        s.until(lambda: s.ended, "the last chunk")
        assert s.items[-1][0] == "end"
    finally:
        s.close()
    # Leased for an hour, but released at the shutdown: the next gateway delivers it now.
    gw2 = gateway.restart(gw)
    got = gw2.consume(topic, group, c2, timeout="10s")
    assert [m["message_id"] for m in got] == [mid]


def test_bad_query_is_400_naming_the_field(engine_server: Gateway) -> None:
    gw = engine_server
    t = gw.topic()
    ok = {"topic": t, "group_id": "g", "consumer_id": "c"}
    cases: list[tuple[dict[str, str], str]] = [
        ({"group_id": "g", "consumer_id": "c"}, "topic"),
        ({"topic": t, "consumer_id": "c"}, "group_id"),
        ({"topic": t, "group_id": "g"}, "consumer_id"),
        ({**ok, "max_inflight": "0"}, "max_inflight"),
        ({**ok, "max_inflight": "x"}, "max_inflight"),
        ({**ok, "max_inflight": "1001"}, "max_inflight"),
        ({**ok, "heartbeat": "10ms"}, "heartbeat"),
        ({**ok, "heartbeat": "soon"}, "heartbeat"),
        ({**ok, "visibility_timeout": "-1s"}, "visibility_timeout"),
        ({**ok, "max_messages": "1"}, "max_messages"),
        ({**ok, "group_id": "g\x01"}, "group_id"),
        ({**ok, "consumer_id": ""}, "consumer_id"),
        ({**ok, "topic": "bad name"}, "topic"),
    ]
    for query, field in cases:
        r = gw.call("GET", f"{STREAM}?{urlencode(query)}")
        assert r.status == 400, (query, r.body)
        assert r.json()["error"]["field"] == field, (query, r.body)


def test_unknown_topic_is_404(engine_server: Gateway) -> None:
    r = engine_server.call("GET", f"{STREAM}?topic=nope&group_id=g&consumer_id=c")
    assert r.status == 404
    assert r.json()["error"]["field"] == "topic"


def test_an_ack_on_another_replica_frees_credit(gateway: GatewayFactory) -> None:
    # Kafka: two gateways on the same backends; embedded: two workers of one database (the
    # kernel spreads connections over both, so acknowledgements land on either).
    if gateway.engine == "kafka":
        a, b = gateway.start(), gateway.start()
    else:
        a = b = gateway.start(MESSAGE_QUEUE_WORKERS="2")
    topic, group = a.topic(), unique("g")
    c1 = unique("c")
    for i in range(5):
        a.produce(topic, f"m{i}")
    s = SseClient(a, topic=topic, group_id=group, consumer_id=c1, max_inflight=1,
                  heartbeat="1s", visibility_timeout="1h")  # fmt: skip
    try:
        for i in range(5):
            s.until(lambda i=i: s.count() == i + 1, f"message {i}")
            # a heartbeat after it: the stream waits for credit, not for messages
            assert len(s.next_heartbeat()) == i + 1
            b.ack(s.messages()[i]["message_id"], group, topic=topic, consumer=c1)
        assert [m["content"] for m in s.messages()] == [f"m{i}" for i in range(5)]
    finally:
        s.close()


def test_http10_head_and_a_request_pipelined_behind(engine_server: Gateway) -> None:
    gw = engine_server
    topic = gw.topic()
    gw.produce(topic, "m0")
    c1, c2 = unique("c"), unique("c")
    url = f"{STREAM}?topic={topic}&group_id={unique('g')}&consumer_id={c1}&visibility_timeout=1h"

    def exchange(request: bytes, until: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", gw.proc.port), timeout=20) as sock:
            sock.sendall(request)
            data = b""
            while until not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data

    # HTTP/1.0 has no chunked coding: the events are the body until the connection closes.
    data = exchange(f"GET {url} HTTP/1.0\r\n\r\n".encode(), b"\n\n")
    head, body = data.split(b"\r\n\r\n", 1)
    assert b"transfer-encoding" not in head.lower() and b"connection: close" in head
    assert body.startswith(b'data: {"message_id":')
    # HEAD: the head of the stream, then the connection closes; nothing is leased.
    data = exchange(f"HEAD {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), b"\0")
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n\r\n")
    assert b"content-type: text/event-stream" in data
    # A request pipelined behind a stream is not answered: the connection is the stream's
    # (the first heartbeat comes after what would have been the answer).
    data = exchange(
        f"GET {url.replace(c1, c2)}&heartbeat=1s HTTP/1.1\r\nHost: x\r\n\r\n"
        "GET /health HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        b": heartbeat",
    )
    assert data.count(b"HTTP/1.1 ") == 1 and b": heartbeat" in data


def test_a_registered_consumer_stays_active_while_its_stream_is_open(
    engine_server: Gateway,
) -> None:
    gw = engine_server  # MESSAGE_QUEUE_CONSUMER_TIMEOUT is 2 s here
    # Registrations outlive a test on the Kafka engine (PostgreSQL is shared): a name of its own.
    topic, group, c = gw.topic(), unique("g"), unique("c")
    gw.ok("POST", "/api/v1/consumers",
          {"consumer_id": c, "group_id": group, "topics": [topic]}, status=201)  # fmt: skip
    mid = gw.produce(topic, "m0")["message_id"]
    s = SseClient(gw, topic=topic, group_id=group, consumer_id=c, visibility_timeout="1h")
    try:
        s.until(lambda: s.count() == 1, "the message")
        # Three consumer timeouts without a request of its own: the stream's heartbeats (at
        # least every quarter of the timeout) keep the consumer active and its lease held.
        s.until(lambda: s.heartbeats() >= 12, "twelve heartbeats")
        assert gw.ok("GET", f"/api/v1/consumers/{c}")["active"] is True
        assert gw.ack(mid, group, topic=topic, consumer=c)["status"] == "acknowledged"
    finally:
        s.close()
