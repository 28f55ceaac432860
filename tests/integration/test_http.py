"""HTTP/1.x behaviour: keep-alive, pipelining, HTTP/1.0, chunked bodies, 100-continue, timeouts."""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any, BinaryIO

import pytest

from tests.conftest import MakeServer, MqfastProcess, Reply

PRODUCE = "/api/v1/messages"
BATCH = "/api/v1/messages/batch"


@pytest.fixture(scope="module")
def srv(module_server: MqfastProcess) -> MqfastProcess:
    """One default server shared by the module (embedded engine, auto-created topics)."""
    return module_server


def read_reply(f: BinaryIO) -> Reply:
    """One response from a buffered socket file (content-length framed)."""
    status_line = f.readline()
    assert status_line, "connection closed before a response"
    parts = status_line.split()
    assert parts[0] in (b"HTTP/1.1", b"HTTP/1.0"), status_line
    status = int(parts[1])
    headers: dict[str, str] = {}
    while True:
        line = f.readline()
        assert line, "connection closed inside a response head"
        if line in (b"\r\n", b"\n"):
            break
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    n = 0 if 100 <= status < 200 else int(headers.get("content-length", "0"))
    body = f.read(n) if n else b""
    assert len(body) == n, "truncated body"
    return Reply(status, headers, body)


def req(
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    version: str = "HTTP/1.1",
) -> bytes:
    raw = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"Host": "localhost"}
    if body is not None:
        hdrs["Content-Type"] = "application/json"
        hdrs["Content-Length"] = str(len(raw))
    hdrs.update(headers or {})
    head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
    return head.encode() + b"\r\n" + raw


def is_closed(s: socket.socket, wait: float = 2.0) -> bool:
    """True when the server has closed ``s`` (EOF or reset) within ``wait`` seconds."""
    s.settimeout(wait)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_keep_alive_several_requests_on_one_connection(srv: MqfastProcess) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        conn.connect()
        sock = conn.sock
        offsets = []
        for i in range(5):
            conn.request(
                "POST",
                PRODUCE,
                json.dumps({"topic": "keepalive", "content": f"{i}"}),
                {"Content-Type": "application/json"},
            )
            r = conn.getresponse()
            body = json.loads(r.read())
            assert r.status == 200, body
            assert (r.getheader("connection") or "").lower() != "close"
            offsets.append(body["offset"])
            conn.request("GET", "/health")
            r = conn.getresponse()
            assert r.status == 200
            r.read()
        assert conn.sock is sock, "http.client had to reconnect: keep-alive was not honoured"
        assert offsets == sorted(offsets) and len(set(offsets)) == 5
    finally:
        conn.close()


def test_pipelining_answers_in_order(srv: MqfastProcess) -> None:
    data = b"".join(
        req("POST", PRODUCE, {"topic": "pipelined", "content": f"m{i}"}) for i in range(10)
    )
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s, s.makefile("rb") as f:
        s.sendall(data)
        replies = [read_reply(f) for _ in range(10)]
        assert all(r.status == 200 for r in replies), [r.body for r in replies]
        offsets = [r.json()["offset"] for r in replies]
        assert offsets == list(range(offsets[0], offsets[0] + 10)), offsets
        # The connection stays usable after the pipeline drained.
        s.sendall(req("GET", "/health/live"))
        assert read_reply(f).status == 200


def test_pipelining_mixes_fast_and_slow_routes_in_order(srv: MqfastProcess) -> None:
    seq = [
        req("POST", PRODUCE, {"topic": "pipe-mixed", "content": "a"}),
        req("GET", "/health"),
        req("POST", "/api/v1/topics", {"name": "pipe-mixed-2", "partitions": 2}),
        req("POST", PRODUCE, {"topic": "pipe-mixed", "content": "b"}),
        req("GET", "/nope"),
        req("POST", BATCH, {"topic": "pipe-mixed", "messages": [{"content": "c"}]}),
        req("GET", "/api/v1/topics/pipe-mixed-2"),
        req("POST", PRODUCE, {"topic": "pipe-mixed", "content": "bad", "priority": 42}),
        req("POST", PRODUCE, {"topic": "pipe-mixed-new", "content": "new topic"}),
        req("GET", "/health/live"),
    ]
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s, s.makefile("rb") as f:
        s.sendall(b"".join(seq))
        replies = [read_reply(f) for _ in seq]
    assert [r.status for r in replies] == [200, 200, 201, 200, 404, 200, 200, 400, 200, 200]
    assert "checks" in replies[1].json()
    assert replies[2].json()["name"] == "pipe-mixed-2"
    assert replies[3].json()["offset"] == replies[0].json()["offset"] + 1
    assert replies[5].json()["results"][0]["offset"] == replies[3].json()["offset"] + 1
    assert replies[6].json()["partitions"] == 2
    assert replies[7].json()["error"]["field"] == "priority"
    assert replies[8].json()["topic"] == "pipe-mixed-new"


def test_pipelined_read_sees_earlier_writes(srv: MqfastProcess) -> None:
    # RFC 9112 9.3.2: pipelined requests may run in parallel only when all are safe; a GET
    # pipelined after a produce must see the produce (here: its auto-created topic, its count).
    seq = [
        req("POST", PRODUCE, {"topic": "pipe-rw", "content": "a"}),
        req("POST", PRODUCE, {"topic": "pipe-rw", "content": "b"}),
        req("GET", "/api/v1/topics/pipe-rw"),
    ]
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s, s.makefile("rb") as f:
        s.sendall(b"".join(seq))
        replies = [read_reply(f) for _ in seq]
    assert [r.status for r in replies[:2]] == [200, 200]
    assert replies[2].status == 200, replies[2].body
    assert replies[2].json()["messages"] == 2, replies[2].body


def test_half_closed_client_gets_every_answer_then_the_close(srv: MqfastProcess) -> None:
    # Found by the fuzz target (tests/unit/fuzz_http.py): a client that shuts down its sending
    # side after its requests (`printf ... | nc -N`) got no answer from the routes answered
    # later (produce, topics), the connection was closed at once.
    seq = [
        req("POST", PRODUCE, {"topic": "half-closed", "content": "a"}),
        req("GET", "/api/v1/topics/half-closed"),
        req("GET", "/health/live"),
    ]
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s, s.makefile("rb") as f:
        s.sendall(b"".join(seq))
        s.shutdown(socket.SHUT_WR)
        replies = [read_reply(f) for _ in seq]
        assert f.read() == b"", "the server closes after the last answer"
    assert [r.status for r in replies] == [200, 200, 200], [r.body for r in replies]
    assert replies[1].json()["messages"] == 1


def test_http10_closes_by_default(srv: MqfastProcess) -> None:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s, s.makefile("rb") as f:
        s.sendall(req("POST", PRODUCE, {"topic": "h10", "content": "x"}, version="HTTP/1.0"))
        r = read_reply(f)
        assert r.status == 200, r.body
        assert r.headers.get("connection", "").lower() == "close"
        assert f.read() == b"", "HTTP/1.0 without keep-alive must be closed after the answer"


def test_http10_keep_alive_when_asked(srv: MqfastProcess) -> None:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s, s.makefile("rb") as f:
        for i in range(3):
            s.sendall(
                req(
                    "POST",
                    PRODUCE,
                    {"topic": "h10ka", "content": f"{i}"},
                    headers={"Connection": "keep-alive"},
                    version="HTTP/1.0",
                )
            )
            r = read_reply(f)
            assert r.status == 200, r.body
            assert r.headers.get("connection", "").lower() == "keep-alive"
        s.sendall(req("GET", "/health", version="HTTP/1.0"))
        r = read_reply(f)
        assert r.status == 200
        assert f.read() == b""


def test_http11_connection_close_is_honoured(srv: MqfastProcess) -> None:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s, s.makefile("rb") as f:
        s.sendall(req("GET", "/health", headers={"Connection": "close"}))
        r = read_reply(f)
        assert r.status == 200
        assert r.headers.get("connection", "").lower() == "close"
        assert f.read() == b""


def test_chunked_request_body(srv: MqfastProcess) -> None:
    body = json.dumps({"topic": "chunked", "content": "x" * 3000}).encode()
    pieces = [body[i : i + 700] for i in range(0, len(body), 700)]
    chunked = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"
    head = (
        f"POST {PRODUCE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s, s.makefile("rb") as f:
        s.sendall(head)
        for i in range(0, len(chunked), 500):  # dribbled over several packets
            s.sendall(chunked[i : i + 500])
            time.sleep(0.01)
        r = read_reply(f)
        assert r.status == 200, r.body
        # A second chunked request on the same connection.
        s.sendall(head + chunked)
        r2 = read_reply(f)
        assert r2.status == 200, r2.body
        assert r2.json()["offset"] == r.json()["offset"] + 1
    info = srv.request("GET", "/api/v1/topics/chunked").json()
    assert info["messages"] == 2
    assert info["bytes"] == 6000


def test_chunked_batch_body(srv: MqfastProcess) -> None:
    body = json.dumps({"topic": "chunked-batch", "messages": [{"content": "a"}] * 3}).encode()
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    head = (
        f"POST {BATCH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(head + chunked)
        with s.makefile("rb") as f:
            r = read_reply(f)
    assert r.status == 200, r.body
    assert r.json()["succeeded"] == 3


def test_expect_100_continue(srv: MqfastProcess) -> None:
    body = json.dumps({"topic": "expect", "content": "y" * 2048}).encode()
    head = (
        f"POST {PRODUCE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s, s.makefile("rb") as f:
        s.sendall(head)
        interim = read_reply(f)  # must come before we send the body (we wait for it)
        assert interim.status == 100
        s.sendall(body)
        r = read_reply(f)
        assert r.status == 200, r.body
        assert r.json()["topic"] == "expect"
        # The connection is still in step: another request works.
        s.sendall(req("GET", "/health/live"))
        assert read_reply(f).status == 200


def test_expect_100_continue_is_ordered_after_earlier_pipelined_answers(
    srv: MqfastProcess,
) -> None:
    # The interim 100 belongs to the second request: it must not overtake the first's answer.
    body = json.dumps({"topic": "expect-order", "content": "second"}).encode()
    second = (
        f"POST {PRODUCE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Expect: 100-continue\r\n\r\n"
    ).encode()
    first = req("POST", PRODUCE, {"topic": "expect-order", "content": "first"})
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s, s.makefile("rb") as f:
        s.sendall(first + second)
        r1 = read_reply(f)
        assert r1.status == 200, (r1.status, r1.body)
        interim = read_reply(f)
        assert interim.status == 100
        s.sendall(body)
        r2 = read_reply(f)
        assert r2.status == 200, r2.body
        assert r2.json()["offset"] == r1.json()["offset"] + 1


def test_deep_pipeline_is_answered_completely_in_order(srv: MqfastProcess) -> None:
    # More requests than the per-connection pipeline high-water mark: reading pauses, resumes.
    n = 600
    data = b"".join(
        req("POST", PRODUCE, {"topic": "deep-pipe", "content": f"{i}"}) for i in range(n)
    )
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s, s.makefile("rb") as f:
        s.sendall(data)
        replies = [read_reply(f) for _ in range(n)]
    assert all(r.status == 200 for r in replies)
    offsets = [r.json()["offset"] for r in replies]
    assert offsets == list(range(offsets[0], offsets[0] + n))


def test_expect_100_continue_with_body_sent_anyway(srv: MqfastProcess) -> None:
    # curl sends the body after a short wait even without the interim answer.
    body = json.dumps({"topic": "expect", "content": "z" * 1500}).encode()
    head = (
        f"POST {PRODUCE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Expect: 100-continue\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s, s.makefile("rb") as f:
        s.sendall(head + body)
        r = read_reply(f)
        if r.status == 100:
            r = read_reply(f)
        assert r.status == 200, r.body


def test_expect_100_continue_over_limit_gets_413_not_100(srv: MqfastProcess) -> None:
    head = (
        f"POST {PRODUCE} HTTP/1.1\r\nHost: x\r\nContent-Length: {10**9}\r\n"
        "Expect: 100-continue\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(head)
        with s.makefile("rb") as f:
            r = read_reply(f)
    assert r.status == 413, r.body
    assert r.json()["error"]["code"] == "payload_too_large"


def test_trailing_slash_and_query_string(srv: MqfastProcess) -> None:
    r = srv.request("POST", PRODUCE + "?x=1", {"topic": "qs", "content": "x"})
    assert r.status == 200, r.body
    assert srv.request("GET", "/health/").status == 200


def test_url_encoded_topic_name_in_path(srv: MqfastProcess) -> None:
    assert srv.request("POST", PRODUCE, {"topic": "enc.topic_1-x", "content": "x"}).status == 200
    r = srv.request("GET", "/api/v1/topics/enc%2Etopic_1-x")
    assert r.status == 200, r.body
    assert r.json()["name"] == "enc.topic_1-x"


# ---- timeouts (their own server: 1 s header and idle timeouts) ------------------------------


@pytest.fixture
def quick(make_server: MakeServer) -> MqfastProcess:
    return make_server(MESSAGE_QUEUE_HEADER_TIMEOUT="1s", MESSAGE_QUEUE_IDLE_TIMEOUT="1s")


def _read_until_close(s: socket.socket, limit: float) -> tuple[bytes, float | None]:
    """Read until EOF/reset or ``limit`` seconds; returns data and when the close came."""
    t0 = time.monotonic()
    buf = b""
    s.settimeout(0.2)
    while time.monotonic() - t0 < limit:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return buf, time.monotonic() - t0
        if not chunk:
            return buf, time.monotonic() - t0
        buf += chunk
    return buf, None


def test_timeouts(quick: MqfastProcess) -> None:
    # All three connections are opened together, so the module waits ~3 s once, not three times.
    slowloris = socket.create_connection(("127.0.0.1", quick.port), timeout=5)
    trickle = socket.create_connection(("127.0.0.1", quick.port), timeout=5)
    stalled_body = socket.create_connection(("127.0.0.1", quick.port), timeout=5)
    idle = socket.create_connection(("127.0.0.1", quick.port), timeout=5)
    idle_f = idle.makefile("rb")
    try:
        slowloris.sendall(b"POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        stalled_body.sendall(
            b'POST /api/v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"to'
        )
        idle.sendall(req("GET", "/health/live"))
        assert read_reply(idle_f).status == 200
        # The trickling client sends a header byte every 0.25 s: activity must not reset the
        # header deadline.
        trickle.sendall(b"GET /health HTTP/1.1\r\n")
        t0 = time.monotonic()
        trickle_closed = None
        while time.monotonic() - t0 < 4.0:
            try:
                trickle.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                trickle_closed = time.monotonic() - t0
                break
            trickle.settimeout(0.25)
            try:
                data = trickle.recv(65536)
                if not data:
                    trickle_closed = time.monotonic() - t0
                    break
                assert data.startswith(b"HTTP/1.1 408"), data
            except TimeoutError:
                pass
            except ConnectionResetError:
                trickle_closed = time.monotonic() - t0
                break
        for name, s in (("slowloris", slowloris), ("stalled body", stalled_body)):
            data, closed_after = _read_until_close(s, 3.5)
            assert closed_after is not None, f"{name} connection still open"
            if data:
                status_line = data.split(b"\r\n", 1)[0]
                assert status_line.startswith(b"HTTP/1.1 408"), data
                body = data.split(b"\r\n\r\n", 1)[1]
                assert "error" in json.loads(body)
        assert trickle_closed is not None, "a trickling header was never timed out"
        assert is_closed(idle, 3.5), "a silent keep-alive connection was not closed"
    finally:
        idle_f.close()
        for s in (slowloris, trickle, stalled_body, idle):
            s.close()
    # The server is fine afterwards.
    assert quick.request("GET", "/health").status == 200


def test_busy_connection_is_not_idle_timed_out(quick: MqfastProcess) -> None:
    # Requests every 0.4 s for ~2.5 s on one connection: never idle for the 1 s timeout.
    with socket.create_connection(("127.0.0.1", quick.port), timeout=5) as s, s.makefile("rb") as f:
        for _ in range(6):
            s.sendall(req("GET", "/health/live"))
            assert read_reply(f).status == 200
            time.sleep(0.4)
