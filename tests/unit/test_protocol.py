"""Protocol tests: raw bytes through HttpProtocol over a fake transport, no sockets.

The engine is an in-memory stand-in that completes each batch on the next loop iteration, the
way a real engine completes from its own thread; the point here is HTTP framing, routing,
ordering and limits, not storage.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop

from mqfast._core import HttpProtocol, Router, Server, debug_counters
from mqfast.api import ROUTES, App
from mqfast.config import Settings
from mqfast.messages import StoredMessage, TopicConfig, TopicInfo


class MemorySink:
    """Keeps deliveries in lists; completes batches on the next loop iteration."""

    name = "memory"

    def __init__(self) -> None:
        self.topics: dict[str, TopicConfig] = {}
        self.log: dict[tuple[str, int], list[Any]] = {}
        self.batches = 0
        self.hold = False
        self.held: list[list[Any]] = []

    def bind(self, loop: asyncio.AbstractEventLoop, on_done: Any) -> None:
        self.loop = loop
        self.on_done = on_done

    async def start(self) -> None:
        pass

    def submit(self, batch: list[Any]) -> None:
        self.batches += 1
        if self.hold:
            self.held.append(batch)
            return
        self.loop.call_soon(self._write, batch)

    def release(self) -> None:
        self.hold = False
        for b in self.held:
            self.loop.call_soon(self._write, b)
        self.held = []

    def _write(self, batch: list[Any]) -> None:
        for d in batch:
            part = self.log.setdefault((d.topic, d.partition), [])
            d.offset = len(part)
            part.append(d)
        self.on_done(batch)

    async def close(self, timeout: float) -> None:
        pass

    async def create_topic(self, config: TopicConfig) -> tuple[TopicConfig, bool]:
        if config.name in self.topics:
            return self.topics[config.name], False
        self.topics[config.name] = config
        return config, True

    async def get_topic(self, name: str) -> TopicConfig | None:
        return self.topics.get(name)

    async def list_topics(self) -> list[TopicConfig]:
        return sorted(self.topics.values(), key=lambda t: t.name)

    async def delete_topic(self, name: str) -> None:
        self.topics.pop(name)

    async def describe_topic(self, name: str) -> TopicInfo:
        raise NotImplementedError

    async def read(
        self, topic: str, partition: int, offset: int, limit: int
    ) -> list[StoredMessage]:
        return []

    def health(self) -> dict[str, object]:
        return {"status": "up", "engine": self.name}


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()
        self.closed = False
        self.paused = False
        self.proto: asyncio.Protocol | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.data += data

    def close(self) -> None:
        # like a real transport: connection_lost follows on the next loop iteration
        if not self.closed and self.proto is not None:
            asyncio.get_event_loop().call_soon(self.proto.connection_lost, None)
        self.closed = True

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return False  # as TLS: an answer that ends the connection closes it at once

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class Harness:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, sink: MemorySink | None = None, **overrides: Any
    ) -> None:
        self.loop = loop
        settings = Settings.from_env({}, **overrides)
        self.sink = sink or MemorySink()
        self.app = App(settings, self.sink)  # type: ignore[arg-type]
        self.core = Server(loop, self.sink, self.app, ROUTES, settings)  # type: ignore[arg-type]
        self.app.attach(self.core)
        self.app.ready = True
        self.core.set_topic("t", 1)
        self.sink.topics["t"] = TopicConfig("t", 1, 1, 0, 0)
        self.core.set_topic("p4", 4)
        self.sink.topics["p4"] = TopicConfig("p4", 4, 1, 0, 0)

    def connect(self) -> tuple[HttpProtocol, FakeTransport]:
        proto = self.core.protocol()
        tr = FakeTransport()
        tr.proto = proto
        proto.connection_made(tr)
        return proto, tr

    async def settle(self, rounds: int = 5) -> None:
        for _ in range(rounds):
            await asyncio.sleep(0)


def responses(data: bytes | bytearray) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a byte stream of HTTP/1.1 responses (Content-Length framed)."""
    out = []
    buf = bytes(data)
    while buf:
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        if status == 100:
            buf = rest
            continue
        n = int(headers["content-length"])
        out.append((status, headers, rest[:n]))
        buf = rest[n:]
    return out


def post(path: str, body: bytes | dict[str, Any], extra: str = "") -> bytes:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(raw)}\r\n{extra}\r\n"
    ).encode() + raw


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = uvloop.new_event_loop()
    yield lp
    lp.close()
    gc.collect()
    # every pooled request slot and delivery was released: nothing leaks per request
    assert debug_counters() == {"pending": 0, "deliveries": 0}


def run(loop: asyncio.AbstractEventLoop, coro: Any) -> Any:
    return loop.run_until_complete(coro)


def test_produce_answers_after_the_engine_completes(loop: asyncio.AbstractEventLoop) -> None:
    async def go() -> None:
        h = Harness(loop)
        proto, tr = h.connect()
        proto.data_received(post("/api/v1/messages", {"topic": "t", "content": "hi"}))
        assert tr.data == b"", "answered before the engine made the message durable"
        await h.settle()
        [(status, headers, body)] = responses(tr.data)
        assert status == 200
        msg = json.loads(body)
        assert msg["topic"] == "t" and msg["offset"] == 0 and msg["partition"] == 0
        assert msg["message_id"][14] == "7"  # UUIDv7
        assert "date" in headers and headers["content-type"] == "application/json"
        assert h.core.inflight == 0

    run(loop, go())


def test_pipelined_requests_are_answered_in_order(loop: asyncio.AbstractEventLoop) -> None:
    async def go() -> None:
        h = Harness(loop)
        proto, tr = h.connect()
        reqs = b"".join(
            post("/api/v1/messages", {"topic": "t", "content": f"m{i}"}) for i in range(5)
        )
        reqs += b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
        reqs += post("/api/v1/messages", {"topic": "t", "content": "last"})
        proto.data_received(reqs)
        # the GET runs after the produces before it, and the produce after it waits for it
        assert tr.data == b""
        await h.settle()
        rs = responses(tr.data)
        assert [r[0] for r in rs] == [200] * 5 + [200, 200]
        offsets = [json.loads(r[2]).get("offset") for r in rs]
        assert offsets == [0, 1, 2, 3, 4, None, 5]
        assert h.sink.batches == 2, "the five produces of one tick make one engine batch"

    run(loop, go())


def test_request_split_across_packets(loop: asyncio.AbstractEventLoop) -> None:
    async def go() -> None:
        h = Harness(loop)
        proto, tr = h.connect()
        raw = post("/api/v1/messages", {"topic": "t", "content": "x" * 100})
        for i in range(0, len(raw), 7):
            proto.data_received(raw[i : i + 7])
        await h.settle()
        assert [r[0] for r in responses(tr.data)] == [200]

    run(loop, go())


def test_chunked_body(loop: asyncio.AbstractEventLoop) -> None:
    async def go() -> None:
        h = Harness(loop)
        proto, tr = h.connect()
        body = json.dumps({"topic": "t", "content": "chunked"}).encode()
        parts = (body[:10], body[10:])
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in parts) + b"0\r\n\r\n"
        proto.data_received(
            b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunks
        )
        await h.settle()
        assert [r[0] for r in responses(tr.data)] == [200]

    run(loop, go())


def test_fire_and_forget_is_202_before_durability(loop: asyncio.AbstractEventLoop) -> None:
    async def go() -> None:
        h = Harness(loop)
        proto, tr = h.connect()
        h.sink.hold = True
        proto.data_received(
            post("/api/v1/messages", {"topic": "t", "content": "x"}, "Prefer: respond-async\r\n")
        )
        [(status, _, body)] = responses(tr.data)
        assert status == 202 and json.loads(body)["offset"] is None
        assert debug_counters()["deliveries"] == 1  # held by the engine until it is stored
        h.sink.release()
        await h.settle()
        assert len(h.sink.log[("t", 0)]) == 1
        assert h.core.inflight == 0

    run(loop, go())


def test_same_key_same_partition(loop: asyncio.AbstractEventLoop) -> None:
    async def go() -> None:
        h = Harness(loop)
        proto, tr = h.connect()
        for i in range(12):
            key = "user-123" if i % 2 == 0 else f"other-{i}"
            proto.data_received(
                post("/api/v1/messages", {"topic": "p4", "key": key, "content": "x"})
            )
        await h.settle()
        parts = [json.loads(r[2])["partition"] for r in responses(tr.data)]
        assert len({parts[i] for i in range(0, 12, 2)}) == 1
        assert len(set(parts)) > 1

    run(loop, go())


def test_unknown_topic_goes_through_the_slow_path(loop: asyncio.AbstractEventLoop) -> None:
    async def go() -> None:
        h = Harness(loop)
        proto, tr = h.connect()
        proto.data_received(post("/api/v1/messages", {"topic": "fresh", "content": "x"}))
        await h.settle(20)
        [(status, _, body)] = responses(tr.data)
        assert status == 200 and json.loads(body)["topic"] == "fresh"
        assert "fresh" in h.sink.topics

    run(loop, go())


@pytest.mark.parametrize(
    ("raw", "status", "code", "closes"),
    [
        (post("/api/v1/messages", b"{nope"), 400, "malformed_json", False),
        (post("/api/v1/messages", {"topic": "t", "content": 5}), 400, "invalid_field", False),
        (post("/api/v1/messages", {"topic": "t"}), 400, "invalid_field", False),
        (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404, "not_found", False),
        (b"DELETE /api/v1/messages HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed", False),
        (b"GET /health HTTP/1.1\r\n\r\n", 400, "malformed_http", True),
        (
            b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Content-Length: 5\r\n\r\nhello",
            400,
            "malformed_http",
            True,
        ),
        (
            b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            "malformed_http",
            True,
        ),
        (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", 400, "malformed_http", True),
        (
            b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n",
            413,
            "payload_too_large",
            True,
        ),
        (
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
            431,
            "headers_too_large",
            True,
        ),
    ],
)
def test_bad_requests(
    loop: asyncio.AbstractEventLoop, raw: bytes, status: int, code: str, closes: bool
) -> None:
    async def go() -> None:
        h = Harness(loop)
        proto, tr = h.connect()
        proto.data_received(raw)
        await h.settle()
        [(got, headers, body)] = responses(tr.data)
        assert got == status, body
        err = json.loads(body)["error"]
        assert err["code"] == code and err["message"]
        assert tr.closed == closes
        assert (headers.get("connection") == "close") == closes
        if status == 405:
            assert headers["allow"] == "POST"
        assert h.sink.log == {}, "a rejected request must leave no record"

    run(loop, go())


def test_error_names_the_field(loop: asyncio.AbstractEventLoop) -> None:
    async def go() -> None:
        h = Harness(loop)
        proto, tr = h.connect()
        bad = [
            ({"topic": "t", "content": "x", "priority": 10}, "priority"),
            ({"topic": "t", "content": "x", "ttl": "-5s"}, "ttl"),
            ({"topic": "t", "content": "x", "ttl": "soon"}, "ttl"),
            ({"topic": "t", "content": "x", "priorty": 1}, "priorty"),
            ({"topic": "t"}, "content"),
        ]
        for body, _ in bad:
            proto.data_received(post("/api/v1/messages", body))
        await h.settle()
        rs = responses(tr.data)
        assert [json.loads(r[2])["error"]["field"] for r in rs] == [f for _, f in bad]
        assert all(r[0] == 400 for r in rs)

    run(loop, go())


def test_batch_is_validated_whole_before_anything_is_written(
    loop: asyncio.AbstractEventLoop,
) -> None:
    async def go() -> None:
        h = Harness(loop)
        proto, tr = h.connect()
        msgs: list[dict[str, Any]] = [{"content": f"m{i}"} for i in range(5)]
        msgs[3]["priority"] = 42
        proto.data_received(post("/api/v1/messages/batch", {"topic": "t", "messages": msgs}))
        msgs[3]["priority"] = 1
        proto.data_received(post("/api/v1/messages/batch", {"topic": "t", "messages": msgs}))
        await h.settle()
        (s1, _, b1), (s2, _, b2) = responses(tr.data)
        assert s1 == 400 and json.loads(b1)["error"]["field"] == "messages[3].priority"
        assert s2 == 200
        result = json.loads(b2)
        assert result["succeeded"] == 5 and result["failed"] == 0
        assert [r["offset"] for r in result["results"]] == [0, 1, 2, 3, 4]

    run(loop, go())


def test_engine_errors_become_503_with_retry_after(loop: asyncio.AbstractEventLoop) -> None:
    async def go() -> None:
        from mqfast.errors import Unavailable

        h = Harness(loop)

        def failing(batch: list[Any]) -> None:
            for d in batch:
                d.error = Unavailable("disk full")
            loop.call_soon(h.sink.on_done, batch)

        h.sink.submit = failing  # type: ignore[method-assign]
        proto, tr = h.connect()
        proto.data_received(post("/api/v1/messages", {"topic": "t", "content": "x"}))
        await h.settle()
        [(status, headers, body)] = responses(tr.data)
        assert status == 503 and headers["retry-after"] == "1"
        assert json.loads(body)["error"]["code"] == "engine_unavailable"
        assert not tr.closed

    run(loop, go())


def test_client_gone_before_the_engine_answers(loop: asyncio.AbstractEventLoop) -> None:
    async def go() -> None:
        h = Harness(loop)
        proto, tr = h.connect()
        proto.data_received(post("/api/v1/messages", {"topic": "t", "content": "x"}))
        proto.connection_lost(None)
        await h.settle()
        assert tr.data == b""
        assert len(h.sink.log[("t", 0)]) == 1  # still stored: the 2xx was simply not delivered
        assert h.core.inflight == 0

    run(loop, go())


def test_half_close_answers_what_was_sent_then_closes(loop: asyncio.AbstractEventLoop) -> None:
    # Found by the fuzz target (fuzz_http.py): a client that shut down its sending side right
    # after its requests got no answer to those answered later (produce, every slow route).
    async def go() -> None:
        h = Harness(loop)
        proto, tr = h.connect()
        proto.data_received(
            post("/api/v1/messages", {"topic": "t", "content": "x"})
            + b"GET /api/v1/topics HTTP/1.1\r\nHost: x\r\n\r\n"
            + b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert proto.eof_received(), "the transport must stay open for the answers"
        assert not tr.closed
        await h.settle()
        assert [r[0] for r in responses(tr.data)] == [200, 200, 200]
        assert tr.closed

    run(loop, go())


def test_half_close_with_nothing_owed_closes_at_once(loop: asyncio.AbstractEventLoop) -> None:
    async def go() -> None:
        h = Harness(loop)
        proto, tr = h.connect()
        proto.data_received(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\nGET /hea")
        await h.settle()
        assert not proto.eof_received()  # asyncio closes the transport
        assert [r[0] for r in responses(tr.data)] == [200]

    run(loop, go())


def test_http10_closes_unless_keep_alive(loop: asyncio.AbstractEventLoop) -> None:
    async def go() -> None:
        h = Harness(loop)
        proto, tr = h.connect()
        proto.data_received(b"GET /health/live HTTP/1.0\r\n\r\n")
        [(status, headers, _)] = responses(tr.data)
        assert status == 200 and headers["connection"] == "close" and tr.closed
        proto2, tr2 = h.connect()
        proto2.data_received(b"GET /health/live HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        [(status, headers, _)] = responses(tr2.data)
        assert headers["connection"] == "keep-alive" and not tr2.closed

    run(loop, go())


def test_pipelining_abuse_pauses_reading(loop: asyncio.AbstractEventLoop) -> None:
    async def go() -> None:
        h = Harness(loop)
        h.sink.hold = True
        proto, tr = h.connect()
        one = post("/api/v1/messages", {"topic": "t", "content": "x"})
        proto.data_received(one * 300)
        assert tr.paused
        h.sink.release()
        await h.settle()
        assert not tr.paused
        assert len(responses(tr.data)) == 300

    run(loop, go())


def test_shutdown_closes_idle_and_finishes_busy(loop: asyncio.AbstractEventLoop) -> None:
    async def go() -> None:
        h = Harness(loop)
        _idle, idle_tr = h.connect()
        busy, busy_tr = h.connect()
        busy.data_received(post("/api/v1/messages", {"topic": "t", "content": "x"}))
        h.core.begin_shutdown()
        assert idle_tr.closed and not busy_tr.closed
        await h.settle()
        [(status, _, _)] = responses(busy_tr.data)
        assert status == 200 and busy_tr.closed
        await h.settle()
        assert h.core.busy() == 0

    run(loop, go())


def test_router() -> None:
    r = Router(ROUTES)
    assert r.lookup(b"/api/v1/messages")[0] == r.produce_route
    assert r.lookup(b"/api/v1/messages/")[0] == r.produce_route
    route, params = r.lookup(b"/api/v1/topics/user-events")
    assert r.template(route) == "/api/v1/topics/{name}" and params == [b"user-events"]
    assert r.lookup(b"/api/v1/topics/a/b")[0] == -1
    assert r.lookup(b"/nope")[0] == -1


# ---- HTTP conformance (issue 10) ---------------------------------------------------------------


def raw_post(path: str, body: bytes, headers: str) -> bytes:
    """A POST with exactly ``headers`` (each line ending in CRLF) besides Host and framing."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


PRODUCE_BODY = json.dumps({"topic": "t", "content": "x"}).encode()


Answers = list[tuple[int, dict[str, str], bytes]]


async def feed(h: Harness, *raws: bytes, rounds: int = 5) -> tuple[Answers, FakeTransport]:
    """Feed ``raws`` on a new connection; the answers once the loop has settled, the transport."""
    proto, tr = h.connect()
    for raw in raws:
        proto.data_received(raw)
    await h.settle(rounds)
    return responses(tr.data), tr


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        None,
        "application/jsonx",
        "application/json-seq",
        "text/json",
        "",
    ],
)
@pytest.mark.parametrize(
    "path",
    ["/api/v1/messages", "/api/v1/messages/batch", "/api/v1/messages/consume", "/api/v1/topics"],
)
def test_a_body_that_is_not_declared_json_is_415(
    loop: asyncio.AbstractEventLoop, content_type: str | None, path: str
) -> None:
    async def go() -> None:
        h = Harness(loop)
        header = "" if content_type is None else f"Content-Type: {content_type}\r\n"
        [(status, headers, body), (after, _, _)], tr = await feed(
            h,
            raw_post(path, PRODUCE_BODY, header),
            post("/api/v1/messages", {"topic": "t", "content": "after"}),
        )
        err = json.loads(body)["error"]
        assert status == 415 and err["code"] == "unsupported_media_type"
        assert "Content-Type" in err["message"] and headers["content-type"] == "application/json"
        # the body was read and dropped: the connection stays usable
        assert after == 200 and not tr.closed
        assert [d.value for d in h.sink.log[("t", 0)]] == [b"after"]

    run(loop, go())


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON;charset=UTF-8",
        "  application/json  ",
        "application/vnd.mqfast+json",
    ],
)
def test_json_media_types_are_accepted(loop: asyncio.AbstractEventLoop, content_type: str) -> None:
    async def go() -> None:
        h = Harness(loop)
        answers, _ = await feed(
            h, raw_post("/api/v1/messages", PRODUCE_BODY, f"Content-Type: {content_type}\r\n")
        )
        assert [r[0] for r in answers] == [200]

    run(loop, go())


def test_a_post_without_a_body_needs_no_content_type(loop: asyncio.AbstractEventLoop) -> None:
    async def go() -> None:
        h = Harness(loop)
        # the route's own answer (an empty body is not JSON), not 415
        [(status, _, body)], _ = await feed(h, b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 400 and json.loads(body)["error"]["code"] == "malformed_json"

    run(loop, go())


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "gzip, identity"])
def test_a_content_coded_body_is_415(loop: asyncio.AbstractEventLoop, coding: str) -> None:
    async def go() -> None:
        h = Harness(loop)
        [(status, _, body), (after, _, _)], tr = await feed(
            h,
            raw_post(
                "/api/v1/messages",
                PRODUCE_BODY,
                f"Content-Type: application/json\r\nContent-Encoding: {coding}\r\n",
            ),
            raw_post(
                "/api/v1/messages",
                PRODUCE_BODY,
                "Content-Type: application/json\r\nContent-Encoding: identity\r\n",
            ),
        )
        err = json.loads(body)["error"]
        assert status == 415 and "Content-Encoding" in err["message"] and after == 200
        assert len(h.sink.log[("t", 0)]) == 1 and not tr.closed

    run(loop, go())


def chunked_post(path: str, body: bytes, transfer_encoding: str = "chunked") -> bytes:
    return (
        (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Transfer-Encoding: {transfer_encoding}\r\n\r\n%x\r\n"
        ).encode()
        % len(body)
        + body
        + b"\r\n0\r\n\r\n"
    )


@pytest.mark.parametrize("coding", ["gzip, chunked", "gzip", "deflate, chunked", "identity"])
def test_an_unknown_transfer_coding_is_501(loop: asyncio.AbstractEventLoop, coding: str) -> None:
    async def go() -> None:
        h = Harness(loop)
        [(status, headers, body)], tr = await feed(
            h, chunked_post("/api/v1/messages", PRODUCE_BODY, coding)
        )
        err = json.loads(body)["error"]
        assert status == 501 and err["code"] == "not_implemented"
        assert "Transfer-Encoding" in err["message"]
        assert headers["connection"] == "close" and tr.closed
        assert h.sink.log == {}

    run(loop, go())


def test_chunked_in_any_case_is_accepted(loop: asyncio.AbstractEventLoop) -> None:
    async def go() -> None:
        h = Harness(loop)
        answers, _ = await feed(h, chunked_post("/api/v1/messages", PRODUCE_BODY, "Chunked"))
        assert [r[0] for r in answers] == [200]

    run(loop, go())


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n", 505, "http_version_not_supported"),
        (b"GET /health HTTP/1.2\r\nHost: x\r\n\r\n", 400, "malformed_http"),  # llhttp
        (b"GET /health HTTP/0.9\r\nHost: x\r\n\r\n", 505, "http_version_not_supported"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400, "malformed_http"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nhost: x\r\n\r\n", 400, "malformed_http"),
        (
            b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 2\r\n\r\n{}",
            400,
            "malformed_http",
        ),
    ],
)
def test_unsupported_versions_and_duplicate_hosts(
    loop: asyncio.AbstractEventLoop, raw: bytes, status: int, code: str
) -> None:
    async def go() -> None:
        h = Harness(loop)
        [(got, headers, body)], tr = await feed(h, raw)
        assert got == status and json.loads(body)["error"]["code"] == code, body
        assert headers["connection"] == "close" and tr.closed

    run(loop, go())


def test_a_chunk_over_the_body_limit_is_413_at_once(loop: asyncio.AbstractEventLoop) -> None:
    async def go() -> None:
        h = Harness(loop)
        # the size line only: the answer must not wait for the chunk's bytes
        [(status, headers, body)], tr = await feed(
            h,
            b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n{" % (100 * 1_048_576),
        )
        assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"
        assert headers["connection"] == "close" and tr.closed

    run(loop, go())


def test_chunks_within_the_limit_add_up_against_it(loop: asyncio.AbstractEventLoop) -> None:
    async def go() -> None:
        h = Harness(loop, max_size=1024)
        limit = 6 * 1024 + 65536
        head = (
            b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n%s\r\n" % (limit // 2, b" " * (limit // 2))
        # the third chunk passes the limit
        [(status, _, _)], tr = await feed(h, head + chunk + chunk + b"2\r\n")
        assert status == 413 and tr.closed

    run(loop, go())


def split_answers(
    data: bytes | bytearray, heads: set[int]
) -> list[tuple[int, dict[str, str], bytes]]:
    """Like ``responses``, but the answers at the indexes ``heads`` (to HEAD) carry no body."""
    out = []
    buf = bytes(data)
    while buf:
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        n = 0 if len(out) in heads else int(headers["content-length"])
        out.append((int(lines[0].split()[1]), headers, rest[:n]))
        buf = rest[n:]
    return out


def test_head_answers_like_get_without_a_body(loop: asyncio.AbstractEventLoop) -> None:
    async def go() -> None:
        h = Harness(loop)
        proto, tr = h.connect()
        for path in ("/health", "/health/live", "/health/ready"):
            proto.data_received(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            proto.data_received(f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            await h.settle(20)
        proto.data_received(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        await h.settle(20)
        rs = split_answers(tr.data, {1, 3, 5})
        assert [r[0] for r in rs] == [200] * 7
        for (_, get_headers, get_body), (_, head_headers, head_body) in zip(
            rs[0:6:2], rs[1:6:2], strict=True
        ):
            assert head_body == b"" and get_body
            assert head_headers["content-type"] == get_headers["content-type"]
        assert int(rs[3][1]["content-length"]) == len(rs[2][2])  # /health/live: a fixed body
        assert json.loads(rs[6][2])["status"], "the keep-alive stream stays in sync after HEAD"
        assert not tr.closed

    run(loop, go())


@pytest.mark.parametrize("path", ["/api/v1/messages", "/api/v1/messages/batch", "/nope"])
def test_head_errors_have_no_body(loop: asyncio.AbstractEventLoop, path: str) -> None:
    async def go() -> None:
        h = Harness(loop)
        proto, tr = h.connect()
        proto.data_received(f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        proto.data_received(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        await h.settle(20)
        (status, headers, body), (after, _, after_body) = split_answers(tr.data, {0})
        assert status == (404 if path == "/nope" else 405) and body == b""
        assert int(headers["content-length"]) > 0 and headers["content-type"] == "application/json"
        if status == 405:
            assert headers["allow"] == "POST"
        assert after == 200 and json.loads(after_body)
        assert not tr.closed

    run(loop, go())


def test_a_trickled_body_has_one_deadline(loop: asyncio.AbstractEventLoop) -> None:
    async def go() -> None:
        h = Harness(loop, header_timeout_s=5.0)
        proto, tr = h.connect()
        proto.data_received(
            b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        headers_done = time.monotonic_ns()
        await asyncio.sleep(0.01)
        proto.data_received(b'"')  # a byte later: it must not move the deadline
        proto._check_timeout(headers_done + 5 * 10**9 + 10**6)
        [(status, headers, body)] = responses(tr.data)
        assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
        assert headers["connection"] == "close" and tr.closed
        assert h.sink.log == {}

    run(loop, go())


class LingeringTransport(FakeTransport):
    """A TCP-like transport: writing can be shut down while reading goes on."""

    def __init__(self) -> None:
        super().__init__()
        self.eof = False

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True


def lingering(h: Harness) -> tuple[HttpProtocol, LingeringTransport]:
    proto = h.core.protocol()
    tr = LingeringTransport()
    tr.proto = proto
    proto.connection_made(tr)
    return proto, tr


def test_an_answer_that_closes_lingers_then_closes(loop: asyncio.AbstractEventLoop) -> None:
    async def go() -> None:
        h = Harness(loop)
        proto, tr = lingering(h)
        proto._pause_reading()  # as under pipelining: the drain must resume reading
        proto.data_received(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000)
        proto.data_received(b"a" * 20_000)
        [(status, headers, _)] = responses(tr.data)
        assert status == 431 and headers["connection"] == "close"
        assert tr.eof and not tr.closed and not tr.paused
        answered = len(tr.data)
        proto.data_received(b"a" * 500_000)  # what the client still sends is dropped
        assert len(tr.data) == answered and not tr.closed
        proto.data_received(b"a" * 600_000)  # ... up to a bound
        assert tr.closed

    run(loop, go())


def test_lingering_ends_at_eof_or_after_two_seconds(loop: asyncio.AbstractEventLoop) -> None:
    async def go() -> None:
        h = Harness(loop)
        proto, tr = lingering(h)
        proto.data_received(b"GET /health HTTP/1.0\r\n\r\n")
        await h.settle(20)
        assert tr.eof and not tr.closed
        assert not proto.eof_received()  # falsy: the transport closes itself
        proto2, tr2 = lingering(h)
        proto2.data_received(b"\x16\x03\x01garbage\r\n\r\n")
        start = time.monotonic_ns()
        proto2._check_timeout(start + 10**9)
        assert tr2.eof and not tr2.closed
        proto2._check_timeout(start + 3 * 10**9)
        assert tr2.closed

    run(loop, go())


@pytest.mark.parametrize("content", [rb"\ud800", rb"\udbff x", rb"\ud800\u0041", rb"ok \\\ud83d"])
def test_a_lone_surrogate_is_named(loop: asyncio.AbstractEventLoop, content: bytes) -> None:
    async def go() -> None:
        h = Harness(loop)
        [(status, _, body)], _ = await feed(
            h, post("/api/v1/messages", b'{"topic":"t","content":"' + content + b'"}')
        )
        err = json.loads(body)["error"]
        assert status == 400 and err["code"] == "malformed_json"
        assert "surrogate" in err["message"] and "truncated" not in err["message"], err

    run(loop, go())


def test_a_truncated_body_is_still_called_truncated(loop: asyncio.AbstractEventLoop) -> None:
    async def go() -> None:
        h = Harness(loop)
        [(status, _, body)], _ = await feed(
            h, post("/api/v1/messages", b'{"topic":"t","content":"\\\\ud800')
        )
        assert status == 400 and "truncated" in json.loads(body)["error"]["message"]

    run(loop, go())


@pytest.mark.parametrize("char", ["\x01", '"', "\n"])
def test_the_size_limit_is_on_the_decoded_content(
    loop: asyncio.AbstractEventLoop, char: str
) -> None:
    async def go() -> None:
        h = Harness(loop, max_size=65_536)
        # escaped to two or six times the limit, yet the content is within it
        [(ok, _, _), (too_big, _, body)], tr = await feed(
            h,
            post("/api/v1/messages", {"topic": "t", "content": char * 65_536}),
            post("/api/v1/messages", {"topic": "t", "content": char * 65_537}),
        )
        assert ok == 200 and h.sink.log[("t", 0)][0].value == char.encode() * 65_536
        err = json.loads(body)["error"]
        assert too_big == 413 and err["field"] == "content", err
        assert not tr.closed

    run(loop, go())


def test_a_principal_verified_before_its_grants_changed_is_not_kept(
    loop: asyncio.AbstractEventLoop,
) -> None:
    # The token is verified, then the subject's stored grants change before the core has been
    # handed the principal: that request goes on with what it was verified with, but the core
    # must not keep the principal for the next ones (they would never see the change).
    from mqfast.access import PUBLIC_ROUTES
    from mqfast.auth import Authenticator, Grant, make_token

    async def go() -> None:
        secret = {"jwt_secret": "protocol-grants-secret-0123456789-0123456"}
        h = Harness(loop, **secret)
        auth = Authenticator(Settings.from_env({}, **secret))
        stored: dict[str, tuple[Grant, ...]] = {}
        auth.stored_grants = lambda subject: stored.get(subject, ())
        h.app.auth = auth
        h.core.set_auth(auth, PUBLIC_ROUTES)
        bearer = f"Authorization: Bearer {make_token(auth.settings, 'svc')}\r\n"

        def grant() -> None:
            stored["svc"] = (Grant("t", frozenset({"produce"})),)
            auth.forget_subject("svc")
            h.core.forget_subject("svc")

        proto, tr = h.connect()
        proto.data_received(post("/api/v1/messages", {"topic": "t", "content": "x"}, bearer))
        # after the verification task's step, before its answer is handed to the core
        loop.call_soon(grant)
        await h.settle(20)
        proto.data_received(post("/api/v1/messages", {"topic": "t", "content": "y"}, bearer))
        await h.settle(20)
        assert [r[0] for r in responses(tr.data)] == [403, 200]


class FakeStream:
    """What a streaming handler answers (``mqfast.stream.EventStream``): records the calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.conn: Any = None

    def start(self, conn: Any) -> None:
        self.calls.append("start")
        self.conn = conn

    def pause_writing(self) -> None:
        self.calls.append("pause")

    def resume_writing(self) -> None:
        self.calls.append("resume")

    def connection_lost(self) -> None:
        self.calls.append("lost")

    def shutdown(self) -> None:
        self.calls.append("shutdown")


STREAM_GET = b"GET /api/v1/messages/stream?topic=t HTTP/1.1\r\nHost: x\r\n\r\n"


def test_a_streaming_answer_stays_open_under_flow_control(
    loop: asyncio.AbstractEventLoop,
) -> None:
    async def go() -> None:
        h = Harness(loop)
        stream = FakeStream()
        h.app.handle = lambda *a, **k: stream  # type: ignore[method-assign]
        proto, tr = lingering(h)
        proto.data_received(STREAM_GET)
        await h.settle()
        head = bytes(tr.data)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
        assert b"content-type: text/event-stream\r\n" in head
        assert b"transfer-encoding: chunked\r\n" in head
        assert stream.calls == ["start"] and stream.conn is proto
        # no idle or request timeout applies to an open stream
        proto._check_timeout(time.monotonic_ns() + 3600 * 10**9)
        assert not tr.closed and not tr.eof
        # a slow reader: the stream is told to wait; reading goes on, to see the client leave
        proto.pause_writing()
        assert stream.calls[-1] == "pause" and not tr.paused
        proto.resume_writing()
        assert stream.calls[-1] == "resume"
        proto.data_received(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # discarded
        await h.settle()
        assert bytes(tr.data) == head
        proto.stream_send(b"data: {}\n\n")
        assert bytes(tr.data) == head + b"a\r\ndata: {}\n\n\r\n"
        # at shutdown the stream is told, and it ends the answer: the last chunk, then close
        h.core.begin_shutdown()
        assert stream.calls[-1] == "shutdown" and not tr.eof
        proto.stream_end()
        assert bytes(tr.data).endswith(b"\r\n0\r\n\r\n") and tr.eof
        proto.stream_send(b"late")
        assert bytes(tr.data).endswith(b"\r\n0\r\n\r\n")
        # a client that leaves: the stream learns it at once
        stream2 = FakeStream()
        h.app.handle = lambda *a, **k: stream2  # type: ignore[method-assign]
        proto2, _ = lingering(h)
        proto2.data_received(STREAM_GET)
        await h.settle()
        assert stream2.calls == ["start", "shutdown"]  # started during shutdown: ends at once
        proto2.connection_lost(None)
        assert stream2.calls[-1] == "lost"
        proto.connection_lost(None)

    run(loop, go())
