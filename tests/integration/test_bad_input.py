"""Every bad input answers its stated status with a JSON error and leaves no record behind."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import MqfastProcess, Reply, new_server, raw_exchange, stop_server

PRODUCE = "/api/v1/messages"
BATCH = "/api/v1/messages/batch"
MAX_SIZE = 1024  # MESSAGE_QUEUE_MAX_SIZE of the module's server
MAX_BATCH = 5  # MESSAGE_QUEUE_MAX_BATCH of the module's server
MAX_BATCH_BYTES = 4096
MAX_BODY = 6 * MAX_SIZE + 65536  # an escape may take six bytes per byte of content, + JSON
TWENTY_YEARS_NS = 20 * 365 * 24 * 3600 * 1_000_000_000


def _start(tmp_path_factory: pytest.TempPathFactory, name: str, **extra: str) -> MqfastProcess:
    return new_server(tmp_path_factory.mktemp(name), **extra).start()


_stop = stop_server


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MqfastProcess]:
    """Auto-creation on, small limits so that limit tests stay cheap."""
    s = _start(
        tmp_path_factory,
        "bad",
        MESSAGE_QUEUE_MAX_SIZE=str(MAX_SIZE),
        MESSAGE_QUEUE_MAX_BATCH=str(MAX_BATCH),
        MESSAGE_QUEUE_MAX_BATCH_BYTES=str(MAX_BATCH_BYTES),
    )
    yield s
    _stop(s)


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MqfastProcess]:
    """Automatic topic creation off."""
    s = _start(tmp_path_factory, "strict", MESSAGE_QUEUE_AUTO_CREATE_TOPICS="false")
    yield s
    _stop(s)


# ---- helpers -------------------------------------------------------------------------------


def parse_responses(data: bytes) -> list[Reply]:
    """Split raw bytes into HTTP/1.1 responses (content-length framed; 1xx have no body)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"truncated response head: {data[:300]!r}"
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        n = 0 if 100 <= status < 200 else int(headers.get("content-length", "0"))
        assert len(rest) >= n, f"truncated body: {data[:300]!r}"
        out.append(Reply(status, headers, rest[:n]))
        data = rest[n:]
    return out


def assert_error(r: Reply, status: int, code: str | None = None, field: str | None = None) -> dict:
    """``r`` is ``status`` with a JSON ``{"error": {"code", "message", "field"?}}`` body."""
    assert r.status == status, (r.status, r.body)
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = r.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err.get("code"), str) and err["code"], body
    assert isinstance(err.get("message"), str) and err["message"], body
    if code is not None:
        assert err["code"] == code, body
    if field is not None:
        assert err.get("field") == field, body
    return err


def raw_one(port: int, data: bytes, timeout: float = 5.0) -> tuple[Reply, bool]:
    """Send ``data``; return the (single, non-1xx) response and whether the server closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        buf = b""
        closed = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                closed = True
                break
            buf += chunk
            replies = [r for r in _try_parse(buf) if r.status >= 200]
            if replies:
                # Give the server a moment to close after its answer, then look.
                s.settimeout(1.0)
                try:
                    closed = s.recv(65536) == b""
                except (TimeoutError, ConnectionResetError) as e:
                    closed = isinstance(e, ConnectionResetError)
                return replies[0], closed
        replies = [r for r in _try_parse(buf) if r.status >= 200]
        assert replies, f"no response (closed={closed}): {buf[:300]!r}"
        return replies[0], closed


def _try_parse(buf: bytes) -> list[Reply]:
    try:
        return parse_responses(buf)
    except (AssertionError, ValueError, IndexError):
        return []


def http_req(
    method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    hdrs = {"Host": "localhost", "Content-Type": "application/json"}
    if body or method == "POST":
        hdrs["Content-Length"] = str(len(body))
    hdrs.update(headers or {})
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
    return head.encode() + b"\r\n" + body


def ensure_topic(s: MqfastProcess, name: str, partitions: int = 1) -> None:
    r = s.request("POST", "/api/v1/topics", {"name": name, "partitions": partitions})
    assert r.status in (200, 201), r.body


def count(s: MqfastProcess, name: str) -> int:
    r = s.request("GET", f"/api/v1/topics/{name}")
    assert r.status == 200, r.body
    return int(r.json()["messages"])


# ---- produce: JSON and fields --------------------------------------------------------------

T = "bad-target"

BAD_PRODUCE: list[tuple[str, Any, str | None, str | None]] = [
    # (test id, body, expected code, expected field)
    ("truncated-json", b'{"topic": "bad-target", "content": ', "malformed_json", None),
    ("not-json", b"this is not json", "malformed_json", None),
    ("trailing-garbage", b'{"topic": "bad-target", "content": "x"} x', "malformed_json", None),
    ("topic-int", {"topic": 5, "content": "x"}, "invalid_field", "topic"),
    ("topic-null", {"topic": None, "content": "x"}, "invalid_field", "topic"),
    ("content-int", {"topic": T, "content": 5}, "invalid_field", "content"),
    ("content-object", {"topic": T, "content": {"a": 1}}, "invalid_field", "content"),
    ("content-null", {"topic": T, "content": None}, "invalid_field", "content"),
    ("key-int", {"topic": T, "content": "x", "key": 5}, "invalid_field", "key"),
    ("headers-list", {"topic": T, "content": "x", "headers": ["a"]}, "invalid_field", "headers"),
    ("priority-str", {"topic": T, "content": "x", "priority": "1"}, "invalid_field", "priority"),
    ("priority-bool", {"topic": T, "content": "x", "priority": True}, "invalid_field", "priority"),
    ("priority-float", {"topic": T, "content": "x", "priority": 1.5}, "invalid_field", "priority"),
    ("priority-10", {"topic": T, "content": "x", "priority": 10}, "invalid_field", "priority"),
    ("priority-neg", {"topic": T, "content": "x", "priority": -1}, "invalid_field", "priority"),
    ("ttl-float", {"topic": T, "content": "x", "ttl": 1.5}, "invalid_field", "ttl"),
    ("ttl-bool", {"topic": T, "content": "x", "ttl": True}, "invalid_field", "ttl"),
    ("ttl-neg-int", {"topic": T, "content": "x", "ttl": -1}, "invalid_field", "ttl"),
    ("ttl-neg-str", {"topic": T, "content": "x", "ttl": "-5s"}, "invalid_field", "ttl"),
    ("ttl-neg-digits", {"topic": T, "content": "x", "ttl": "-5"}, "invalid_field", "ttl"),
    ("ttl-abc", {"topic": T, "content": "x", "ttl": "abc"}, "invalid_field", "ttl"),
    ("ttl-empty", {"topic": T, "content": "x", "ttl": ""}, "invalid_field", "ttl"),
    ("ttl-bad-unit", {"topic": T, "content": "x", "ttl": "10x"}, "invalid_field", "ttl"),
    ("ttl-superscript", {"topic": T, "content": "x", "ttl": "²"}, "invalid_field", "ttl"),
    ("ttl-20y-ns", {"topic": T, "content": "x", "ttl": TWENTY_YEARS_NS}, "invalid_field", "ttl"),
    ("ttl-20y-str", {"topic": T, "content": "x", "ttl": str(TWENTY_YEARS_NS)}, None, "ttl"),
    ("ttl-20y-go", {"topic": T, "content": "x", "ttl": "175200h"}, "invalid_field", "ttl"),
    ("missing-content", {"topic": T}, "invalid_field", "content"),
    ("missing-topic", {"content": "x"}, "invalid_field", "topic"),
    ("unknown-field", {"topic": T, "content": "x", "priorty": 1}, "invalid_field", "priorty"),
    ("unknown-field-2", {"topic": T, "content": "x", "partition": 1}, "invalid_field", "partition"),
]


@pytest.mark.parametrize(
    ("body", "code", "field"), [c[1:] for c in BAD_PRODUCE], ids=[c[0] for c in BAD_PRODUCE]
)
def test_bad_produce_body(
    srv: MqfastProcess, body: Any, code: str | None, field: str | None
) -> None:
    ensure_topic(srv, T)
    before = count(srv, T)
    r = srv.request("POST", PRODUCE, body)
    assert_error(r, 400, code, field)
    assert count(srv, T) == before


def test_headers_with_non_string_value(srv: MqfastProcess) -> None:
    ensure_topic(srv, T)
    before = count(srv, T)
    r = srv.request("POST", PRODUCE, {"topic": T, "content": "x", "headers": {"a": 1}})
    err = assert_error(r, 400, "invalid_field")
    assert str(err.get("field", "")).startswith("headers"), err
    assert count(srv, T) == before


@pytest.mark.parametrize("body", [b"", b"[]", b'"x"', b"null", b"42"])
def test_body_that_is_not_an_object(srv: MqfastProcess, body: bytes) -> None:
    ensure_topic(srv, T)
    before = count(srv, T)
    r = srv.request("POST", PRODUCE, body)
    err = assert_error(r, 400)
    assert err["code"] in ("malformed_json", "invalid_field"), err
    assert count(srv, T) == before


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (PRODUCE, b'{"topic": "bad-target", "content": "\xff"}'),
        (PRODUCE, b'{"topic": "bad-target", "content": "x", "key": "\xc3"}'),
        (PRODUCE, b'{"topic": "bad-target", "content": "x", "headers": {"a": "\xfe"}}'),
        (PRODUCE, b'{"topic": "bad-target", "content": "\xed\xa0\x80"}'),  # encoded surrogate
        (BATCH, b'{"topic": "bad-target", "messages": [{"content": "\xff"}]}'),
        ("/api/v1/topics", b'{"name": "\xff"}'),
    ],
    ids=["content", "key", "headers", "surrogate", "batch", "topics"],
)
def test_invalid_utf8_is_400_not_500(srv: MqfastProcess, path: str, body: bytes) -> None:
    ensure_topic(srv, T)
    before = count(srv, T)
    r = srv.request("POST", path, body)
    err = assert_error(r, 400)
    assert err["code"] in ("malformed_json", "invalid_field"), err
    assert count(srv, T) == before


@pytest.mark.parametrize(
    "name",
    ["bad name", "a/b", "x" * 250, ".", "..", "", "ümlaut", "a:b", "a\tb"],
    ids=["space", "slash", "250-chars", "dot", "dotdot", "empty", "non-ascii", "colon", "tab"],
)
def test_invalid_topic_name_on_produce(srv: MqfastProcess, name: str) -> None:
    r = srv.request("POST", PRODUCE, {"topic": name, "content": "x"})
    assert_error(r, 400, "invalid_field", "topic")
    names = [t["name"] for t in srv.request("GET", "/api/v1/topics").json()["topics"]]
    assert name not in names


def test_rejected_produce_does_not_create_its_topic(srv: MqfastProcess) -> None:
    # A rejected request leaves no record: not even the topic it would have auto-created.
    r = srv.request("POST", PRODUCE, {"topic": "never-created", "content": "x", "ttl": "abc"})
    assert_error(r, 400, "invalid_field", "ttl")
    assert_error(srv.request("GET", "/api/v1/topics/never-created"), 404, "unknown_topic")


def test_rejected_batch_does_not_create_its_topics(srv: MqfastProcess) -> None:
    msgs = [{"content": "a"}, {"content": "b", "topic": "never-created-2", "priority": 1}]
    msgs.append({"content": "c", "ttl": "-5s"})
    r = srv.request("POST", BATCH, {"topic": "never-created-1", "messages": msgs})
    assert_error(r, 400, "invalid_field", "messages[2].ttl")
    for name in ("never-created-1", "never-created-2"):
        assert_error(srv.request("GET", f"/api/v1/topics/{name}"), 404, "unknown_topic")


# ---- produce: sizes ------------------------------------------------------------------------


def test_content_at_the_limit_is_accepted(srv: MqfastProcess) -> None:
    r = srv.request("POST", PRODUCE, {"topic": "size-ok", "content": "a" * MAX_SIZE})
    assert r.status == 200, r.body
    # The limit is in bytes of UTF-8: 512 two-byte characters are exactly the limit.
    r = srv.request("POST", PRODUCE, {"topic": "size-ok", "content": "é" * (MAX_SIZE // 2)})
    assert r.status == 200, r.body


@pytest.mark.parametrize("content", ["a" * (MAX_SIZE + 1), "é" * (MAX_SIZE // 2 + 1)])
def test_content_over_max_size_is_413(srv: MqfastProcess, content: str) -> None:
    ensure_topic(srv, T)
    before = count(srv, T)
    r = srv.request("POST", PRODUCE, {"topic": T, "content": content})
    assert_error(r, 413, "payload_too_large", "content")
    assert count(srv, T) == before


def test_declared_body_over_limit_is_413_before_the_body_is_read(srv: MqfastProcess) -> None:
    head = (
        f"POST {PRODUCE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {MAX_BODY + 1}\r\n\r\n"
    ).encode()
    # Only the head is sent: the answer must come without waiting for the body.
    r, closed = raw_one(srv.port, head, timeout=5)
    assert_error(r, 413, "payload_too_large")
    assert closed, "the server must close a connection whose body it will not read"
    assert r.headers.get("connection", "").lower() == "close"


def test_declared_huge_body_is_413(srv: MqfastProcess) -> None:
    head = f"POST {PRODUCE} HTTP/1.1\r\nHost: x\r\nContent-Length: {10**15}\r\n\r\n".encode()
    r, closed = raw_one(srv.port, head)
    assert_error(r, 413, "payload_too_large")
    assert closed


def test_declared_batch_body_over_limit_is_413(srv: MqfastProcess) -> None:
    head = f"POST {BATCH} HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_BATCH_BYTES + 1}\r\n\r\n"
    r, closed = raw_one(srv.port, head.encode())
    assert_error(r, 413, "payload_too_large")
    assert closed


def test_chunked_body_over_limit_is_413(srv: MqfastProcess) -> None:
    ensure_topic(srv, T)
    before = count(srv, T)
    # A batch body (limit MAX_BATCH_BYTES) sent in 1 KiB chunks, one chunk past the limit.
    payload = b"x" * 1024
    chunks = b"".join(b"400\r\n" + payload + b"\r\n" for _ in range(MAX_BATCH_BYTES // 1024 + 1))
    head = (
        f"POST {BATCH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    r, closed = raw_one(srv.port, head + chunks)
    assert_error(r, 413, "payload_too_large")
    assert closed
    assert count(srv, T) == before


def test_chunked_produce_body_over_limit_is_413(srv: MqfastProcess) -> None:
    head = (
        f"POST {PRODUCE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    size = MAX_BODY + 10
    chunk = f"{size:x}\r\n".encode() + b"x" * size + b"\r\n0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(head)
        try:
            s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may stop reading as soon as the limit is passed
        buf = b""
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                buf += data
        except (TimeoutError, ConnectionResetError):
            pass
    assert buf, "no answer to an oversized chunked body"
    [r] = parse_responses(buf)
    assert_error(r, 413, "payload_too_large")


# ---- unknown topic with auto-creation off --------------------------------------------------


def test_unknown_topic_when_auto_create_is_off(strict: MqfastProcess) -> None:
    r = strict.request("POST", PRODUCE, {"topic": "nope", "content": "x"})
    assert_error(r, 404, "unknown_topic", "topic")
    assert_error(strict.request("GET", "/api/v1/topics/nope"), 404, "unknown_topic")


def test_unknown_topic_in_batch_when_auto_create_is_off(strict: MqfastProcess) -> None:
    ensure_topic(strict, "exists")
    msgs = [{"content": "a"}, {"content": "b", "topic": "nope-batch"}]
    r = strict.request("POST", BATCH, {"topic": "exists", "messages": msgs})
    err = assert_error(r, 404, "unknown_topic")
    assert err.get("field") in ("topic", "messages[1].topic"), err
    assert count(strict, "exists") == 0


def test_known_topic_works_when_auto_create_is_off(strict: MqfastProcess) -> None:
    ensure_topic(strict, "made")
    r = strict.request("POST", PRODUCE, {"topic": "made", "content": "x"})
    assert r.status == 200, r.body


# ---- batch ---------------------------------------------------------------------------------


def test_empty_batch(srv: MqfastProcess) -> None:
    r = srv.request("POST", BATCH, {"topic": T, "messages": []})
    assert_error(r, 400, "invalid_field", "messages")


def test_batch_over_the_limit(srv: MqfastProcess) -> None:
    ensure_topic(srv, T)
    before = count(srv, T)
    msgs = [{"content": str(i)} for i in range(MAX_BATCH + 1)]
    r = srv.request("POST", BATCH, {"topic": T, "messages": msgs})
    assert_error(r, 400, "invalid_field", "messages")
    assert count(srv, T) == before


def test_batch_at_the_limit(srv: MqfastProcess) -> None:
    msgs = [{"content": str(i)} for i in range(MAX_BATCH)]
    r = srv.request("POST", BATCH, {"topic": "batch-limit-ok", "messages": msgs})
    assert r.status == 200, r.body
    assert count(srv, "batch-limit-ok") == MAX_BATCH


BAD_BATCH: list[tuple[str, Any, int, str]] = [
    # (id, messages (or whole body), status, field)
    ("priority", [{"content": "a"}, {"content": "b"}, {"content": "c", "priority": 10}], 400,
     "messages[2].priority"),
    ("content-missing", [{"content": "a"}, {"key": "k"}], 400, "messages[1].content"),
    ("content-int", [{"content": "a"}, {"content": 1}], 400, "messages[1].content"),
    ("unknown-field", [{"content": "a", "bogus": 1}], 400, "messages[0].bogus"),
    ("ttl-abc", [{"content": "a"}, {"content": "b", "ttl": "abc"}], 400, "messages[1].ttl"),
    ("ttl-negative", [{"content": "a"}, {"content": "b", "ttl": -1}], 400, "messages[1].ttl"),
    ("ttl-20y", [{"content": "a"}, {"content": "b", "ttl": "175200h"}], 400, "messages[1].ttl"),
    ("too-large", [{"content": "a"}, {"content": "b" * (MAX_SIZE + 1)}], 413,
     "messages[1].content"),
    ("bad-topic", [{"content": "a"}, {"content": "b", "topic": "bad name"}], 400,
     "messages[1].topic"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("msgs", "status", "field"), [c[1:] for c in BAD_BATCH], ids=[c[0] for c in BAD_BATCH]
)
def test_batch_with_one_bad_message_writes_nothing(
    srv: MqfastProcess, msgs: list[dict[str, Any]], status: int, field: str
) -> None:
    ensure_topic(srv, T)
    before = count(srv, T)
    r = srv.request("POST", BATCH, {"topic": T, "messages": msgs})
    assert_error(r, status, None, field)
    time.sleep(0.05)  # nothing may trickle in after the answer either
    assert count(srv, T) == before


def test_batch_message_without_any_topic(srv: MqfastProcess) -> None:
    r = srv.request("POST", BATCH, {"messages": [{"content": "a"}]})
    assert_error(r, 400, "invalid_field", "messages[0].topic")


def test_batch_with_mixed_topics_and_one_bad_message_writes_nothing(srv: MqfastProcess) -> None:
    ensure_topic(srv, T)
    ensure_topic(srv, "bad-target-2")
    before = (count(srv, T), count(srv, "bad-target-2"))
    msgs = [
        {"content": "a"},
        {"content": "b", "topic": "bad-target-2"},
        {"content": "c", "topic": "bad-target-2", "ttl": "-5s"},
    ]
    r = srv.request("POST", BATCH, {"topic": T, "messages": msgs})
    assert_error(r, 400, "invalid_field", "messages[2].ttl")
    assert (count(srv, T), count(srv, "bad-target-2")) == before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"topic": T, "messages": {"content": "a"}}, "messages"),
        ({"topic": T, "messages": None}, "messages"),
        ({"topic": T}, "messages"),
        ({"topic": 1, "messages": [{"content": "a"}]}, "topic"),
        ({"topic": T, "messages": [{"content": "a"}], "extra": 1}, "extra"),
        ({"topic": T, "messages": ["a"]}, "messages[0]"),
    ],
)
def test_batch_shape_errors(srv: MqfastProcess, body: dict[str, Any], field: str) -> None:
    r = srv.request("POST", BATCH, body)
    assert_error(r, 400, "invalid_field", field)


def test_batch_malformed_json(srv: MqfastProcess) -> None:
    assert_error(srv.request("POST", BATCH, b'{"messages": ['), 400, "malformed_json")


# ---- HTTP framing --------------------------------------------------------------------------


def test_header_block_too_large_is_431(srv: MqfastProcess) -> None:
    data = http_req("GET", "/health", headers={"X-Big": "a" * 17000})
    r, closed = raw_one(srv.port, data)
    assert_error(r, 431, "headers_too_large")
    assert closed


def test_many_headers_too_large_is_431(srv: MqfastProcess) -> None:
    data = http_req("GET", "/health", headers={f"X-H{i}": "v" * 100 for i in range(200)})
    r, _ = raw_one(srv.port, data)
    assert_error(r, 431, "headers_too_large")


def test_header_block_under_the_limit_is_fine(srv: MqfastProcess) -> None:
    data = http_req("GET", "/health", headers={"X-Big": "a" * 8000, "Connection": "close"})
    r, _ = raw_one(srv.port, data)
    assert r.status == 200, r.body


def test_content_length_and_transfer_encoding(srv: MqfastProcess) -> None:
    ensure_topic(srv, T)
    before = count(srv, T)
    body = b'{"topic": "bad-target", "content": "x"}'
    data = (
        (
            f"POST {PRODUCE} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        ).encode()
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n"
    )
    r, closed = raw_one(srv.port, data)
    assert_error(r, 400)
    assert closed
    assert count(srv, T) == before


def test_transfer_encoding_then_content_length(srv: MqfastProcess) -> None:
    body = b'{"topic": "bad-target", "content": "x"}'
    data = (
        (
            f"POST {PRODUCE} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n"
    )
    r, closed = raw_one(srv.port, data)
    assert_error(r, 400)
    assert closed


@pytest.mark.parametrize("second", ["same", "different"])
def test_duplicate_content_length(srv: MqfastProcess, second: str) -> None:
    ensure_topic(srv, T)
    before = count(srv, T)
    body = b'{"topic": "bad-target", "content": "x"}'
    n2 = len(body) if second == "same" else len(body) + 5
    data = (
        f"POST {PRODUCE} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        f"Content-Length: {n2}\r\n\r\n"
    ).encode() + body
    r, closed = raw_one(srv.port, data)
    assert_error(r, 400)
    assert closed
    assert count(srv, T) == before


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "0x10"])
def test_invalid_content_length(srv: MqfastProcess, value: str) -> None:
    data = f"POST {PRODUCE} HTTP/1.1\r\nHost: x\r\nContent-Length: {value}\r\n\r\n".encode()
    r, closed = raw_one(srv.port, data)
    assert_error(r, 400)
    assert closed


def test_missing_host_on_http11(srv: MqfastProcess) -> None:
    r, _ = raw_one(srv.port, b"GET /health HTTP/1.1\r\n\r\n")
    assert_error(r, 400)


def test_missing_host_on_http10_is_fine(srv: MqfastProcess) -> None:
    r, _ = raw_one(srv.port, b"GET /health HTTP/1.0\r\n\r\n")
    assert r.status == 200, r.body
    body = b'{"topic": "http10", "content": "x"}'
    data = (
        f"POST {PRODUCE} HTTP/1.0\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    r, _ = raw_one(srv.port, data)
    assert r.status == 200, r.body


@pytest.mark.parametrize(
    "path",
    ["/nope", "/api/v1", "/api/v1/message", "/api/v2/messages", "/api/v1/topics/a/b", "/health/x"],
)
def test_unknown_path_is_404(srv: MqfastProcess, path: str) -> None:
    assert_error(srv.request("GET", path), 404, "not_found")
    assert_error(srv.request("POST", path, {"a": 1}), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", PRODUCE, {"POST"}),
        ("PUT", PRODUCE, {"POST"}),
        ("DELETE", BATCH, {"POST"}),
        ("GET", BATCH, {"POST"}),
        ("DELETE", "/api/v1/topics", {"GET", "HEAD", "POST"}),
        ("PATCH", "/api/v1/topics", {"GET", "HEAD", "POST"}),
        ("POST", "/api/v1/topics/some-topic", {"GET", "HEAD", "DELETE"}),
        ("PUT", "/api/v1/topics/some-topic", {"GET", "HEAD", "DELETE"}),
        ("POST", "/health", {"GET", "HEAD"}),
        ("DELETE", "/health/ready", {"GET", "HEAD"}),
    ],
)
def test_wrong_method_is_405_with_allow(
    srv: MqfastProcess, method: str, path: str, allowed: set[str]
) -> None:
    ensure_topic(srv, T)
    before = count(srv, T)
    body = {"topic": T, "content": "x"} if method in ("POST", "PUT", "PATCH") else None
    r = srv.request(method, path, body)
    assert_error(r, 405, "method_not_allowed")
    assert "allow" in r.headers, r.headers
    assert {m.strip() for m in r.headers["allow"].split(",")} == allowed
    assert count(srv, T) == before


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)),  # a TLS hello
        b"GARBAGE\r\n\r\n",
        b"\x00\x01\x02\x03\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost x\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHo st: x\r\n\r\n",
    ],
    ids=["tls", "word", "binary", "version", "header-no-colon", "header-space"],
)
def test_garbage_is_400_and_close(srv: MqfastProcess, data: bytes) -> None:
    r, closed = raw_one(srv.port, data)
    assert_error(r, 400)
    assert closed
    # The server is still fine afterwards.
    assert srv.request("GET", "/health/live").status == 200


def test_invalid_chunk_framing_is_400(srv: MqfastProcess) -> None:
    data = (
        f"POST {PRODUCE} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        "zz\r\nabc\r\n0\r\n\r\n"
    ).encode()
    r, closed = raw_one(srv.port, data)
    assert_error(r, 400)
    assert closed


def test_error_answers_keep_earlier_pipelined_answers(srv: MqfastProcess) -> None:
    # A good request followed by garbage on one connection: the good one is answered first.
    body = json.dumps({"topic": "pipe-then-garbage", "content": "x"}).encode()
    data = http_req("POST", PRODUCE, body) + b"GARBAGE\r\n\r\n"
    out = raw_exchange(srv.port, data, timeout=5)
    replies = parse_responses(out)
    assert [r.status for r in replies] == [200, 400], out[:500]
    assert_error(replies[1], 400)
