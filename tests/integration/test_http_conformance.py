"""HTTP conformance over loopback (issue 10): media types, codings, HEAD, versions, slow bodies,
oversized chunks, lingering close, and the side listeners' parser rules."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from tests.conftest import MakeServer, MqfastProcess, Reply

PRODUCE = "/api/v1/messages"


@pytest.fixture(scope="module")
def srv(module_server: MqfastProcess) -> MqfastProcess:
    return module_server


def parse(data: bytes) -> Reply:
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return Reply(int(lines[0].split(" ", 2)[1]), headers, rest[: int(headers["content-length"])])


def exchange(port: int, data: bytes, timeout: float = 20.0) -> tuple[bytes, bool]:
    """Send ``data`` (all of it, however the server answers), read until the server closes.

    Returns what was read and whether the connection was reset (an RST, not a clean close).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        reset = False
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            reset = True
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            reset = True
        return b"".join(chunks), reset


def test_a_cross_site_simple_post_is_refused(srv: MqfastProcess) -> None:
    body = json.dumps({"topic": "cross-site", "content": "x"})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        r = srv.request("POST", PRODUCE, body, headers={"Content-Type": content_type})
        assert r.status == 415, r.body
        err = r.json()["error"]
        assert err["code"] == "unsupported_media_type" and content_type in err["message"]
    r = srv.request("POST", PRODUCE, body, headers={"Content-Type": "application/json"})
    assert r.status == 200
    assert srv.request("GET", "/api/v1/topics/cross-site").json()["messages"] == 1


def test_a_gzip_body_is_refused_not_stored(srv: MqfastProcess) -> None:
    r = srv.request(
        "POST",
        PRODUCE,
        {"topic": "coded", "content": "x"},
        headers={"Content-Encoding": "gzip"},
    )
    assert r.status == 415 and "Content-Encoding" in r.json()["error"]["message"]
    data, _ = exchange(
        srv.port,
        b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    r = parse(data)
    assert r.status == 501 and r.json()["error"]["code"] == "not_implemented"
    assert srv.request("GET", "/api/v1/topics/coded").status == 404


def test_http2_request_line_and_two_hosts(srv: MqfastProcess) -> None:
    data, _ = exchange(srv.port, b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n")
    r = parse(data)
    assert r.status == 505 and r.headers["connection"] == "close"
    data, _ = exchange(srv.port, b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    r = parse(data)
    assert r.status == 400 and "Host" in r.json()["error"]["message"]


def test_head_keeps_the_connection_in_sync(srv: MqfastProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        for path in ("/health", "/health/live", "/health/ready"):
            conn.request("HEAD", path)
            r = conn.getresponse()
            assert r.status == 200 and r.read() == b""
            assert int(r.headers["content-length"]) > 0
        conn.request("HEAD", PRODUCE)
        r = conn.getresponse()
        assert r.status == 405 and r.read() == b"" and r.headers["allow"] == "POST"
        conn.request("GET", "/health/live")
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["status"]
    finally:
        conn.close()
    # read raw: nothing follows the head of a HEAD answer
    data, _ = exchange(
        srv.port, b"HEAD /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and rest == b""


def test_a_body_dribbled_byte_by_byte_times_out(make_server: MakeServer) -> None:
    srv = make_server(MESSAGE_QUEUE_HEADER_TIMEOUT="2s")
    body = json.dumps({"topic": "dribble", "content": "x" * 40}).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as s:
        s.sendall(
            b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        answer = b""
        for i in range(len(body)):  # a byte every 0.25 s: 16 s for the whole body
            try:
                s.sendall(body[i : i + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.25)
            s.setblocking(False)
            try:
                answer += s.recv(65536)
            except BlockingIOError:
                pass
            finally:
                s.setblocking(True)
            if answer:
                break
        s.settimeout(10)
        while chunk := s.recv(65536):
            answer += chunk
    r = parse(answer)
    assert r.status == 408 and r.json()["error"]["code"] == "request_timeout"
    assert srv.request("GET", "/api/v1/topics/dribble").status == 404


def test_an_oversized_chunk_is_413_without_waiting(make_server: MakeServer) -> None:
    # the body deadline is a minute: an answer that waited for it would hit the socket timeout
    srv = make_server(MESSAGE_QUEUE_HEADER_TIMEOUT="60s")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as s:
        s.sendall(
            b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n40000000\r\n{"
        )
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    r = parse(answer)
    assert r.status == 413 and r.headers["connection"] == "close"


def test_a_431_for_a_huge_head_reaches_the_client(srv: MqfastProcess) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 200_000 + b"\r\n\r\n"
    data, reset = exchange(srv.port, head)
    assert not reset, "the connection was reset instead of closed after the answer"
    r = parse(data)
    assert r.status == 431 and r.json()["error"]["code"] == "headers_too_large"


def test_a_refused_body_sent_anyway_does_not_reset(srv: MqfastProcess) -> None:
    body = b"x" * 300_000
    data, reset = exchange(
        srv.port,
        b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (10 * 1_048_576) + body,
    )
    assert not reset
    assert parse(data).status == 413


# ---- the side listeners ------------------------------------------------------------------------


@pytest.mark.parametrize("listener", ["metrics", "pprof"])
@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", 400),
        (b"GARBAGE\r\n\r\n", 400),
        (
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200_000 + b"\r\n\r\n", 431),
    ],
)
def test_side_listeners_follow_the_main_parser(
    srv: MqfastProcess, listener: str, raw: bytes, status: int
) -> None:
    port = srv.metrics_port if listener == "metrics" else srv.pprof_port
    data, reset = exchange(port, raw)
    assert not reset
    r = parse(data)
    assert r.status == status, r.body
    assert r.headers["connection"].lower() == "close"
    assert r.json()["error"]["code"]


@pytest.mark.parametrize("listener", ["metrics", "pprof"])
def test_side_listeners_answer_head_without_a_body(srv: MqfastProcess, listener: str) -> None:
    port, path = (
        (srv.metrics_port, "/metrics") if listener == "metrics" else (srv.pprof_port, "/debug/gc")
    )
    data, _ = exchange(port, f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and rest == b""
