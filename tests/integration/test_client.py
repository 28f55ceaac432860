"""mqfast.client against a real server: batching, per-message results, retries, errors, leases.

Faults are injected by :class:`FaultProxy`, a small HTTP/1.1 proxy in front of the server that
records every request and can answer one with a 503 or drop its connection after the server
has answered (so the client cannot know whether the request was applied).
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import pytest
import uvloop

from mqfast.client import (
    AckItem,
    ApiError,
    AsyncClient,
    Client,
    ConnectionFailed,
    ItemError,
    Message,
    OutgoingMessage,
    ProduceResult,
    Retry,
)
from tests.conftest import MakeServer, MqfastProcess, free_port

T = TypeVar("T")
FAST_RETRY = Retry(attempts=4, backoff=0.01, backoff_max=0.05, deadline=10.0)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int = 0  # of the answer the client got; 0: none

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


class FaultProxy:
    """Forwards HTTP/1.1 requests to ``upstream``; ``faults`` says what to do with the next ones.

    A fault is ``"503"`` (answer 503 with ``Retry-After: 0`` without forwarding; with
    ``"503-unknown"`` also ``X-Mqfast-Outcome: unknown``, as the Kafka engine) or ``"drop"``
    (forward, then close the client's connection without answering). Every request is kept in
    :attr:`seen`.
    """

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.faults: list[str] = []
        self.seen: list[Seen] = []
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while proxy.serve_one(self.rfile, self.wfile):
                    pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", free_port(1)), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def posts(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.method == "POST" and s.path == path]

    def batches(self) -> list[Seen]:
        """The batch produce requests, without those a server refused for a per-message
        ``idempotency_key`` it does not know (the client then sends the batch without them)."""
        return [
            s
            for s in self.posts("/api/v1/messages/batch")
            if not (s.status == 400 and b"idempotency_key" in s.body)
        ]

    def serve_one(self, rfile: Any, wfile: Any) -> bool:
        line = rfile.readline()
        if not line:
            return False
        method, path, _ = line.decode().split(" ", 2)
        headers: dict[str, str] = {}
        while (h := rfile.readline()) not in (b"\r\n", b""):
            name, _, value = h.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = rfile.read(int(headers.get("content-length", 0)))
        seen = Seen(method, path, headers, body)
        self.seen.append(seen)
        fault = self.faults.pop(0) if self.faults else None
        if fault in ("503", "503-unknown"):
            seen.status = 503
            err = b'{"error":{"code":"engine_unavailable","message":"injected"}}'
            unknown = b"X-Mqfast-Outcome: unknown\r\n" if fault == "503-unknown" else b""
            wfile.write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                b"Retry-After: 0\r\n%sContent-Length: %d\r\n\r\n%s" % (unknown, len(err), err)
            )
            return True
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream, timeout=60)
        fwd = {k: v for k, v in headers.items() if k not in ("host", "content-length")}
        conn.request(method, path, body=body, headers=fwd)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        if fault == "drop":
            return False  # the server applied it; the client hears nothing
        seen.status = r.status
        wfile.write(b"HTTP/1.1 %d %s\r\n" % (r.status, r.reason.encode()))
        for k, v in r.getheaders():
            if k.lower() not in ("content-length", "connection"):
                wfile.write(f"{k}: {v}\r\n".encode())
        wfile.write(b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        return True

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(module_server: MqfastProcess) -> Iterator[FaultProxy]:
    p = FaultProxy(module_server.port)
    yield p
    p.close()


def run(make: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await make()

    return uvloop.run(main())


def topic() -> str:
    return f"client-{uuid.uuid4().hex[:10]}"


def batch_sizes(proxy: FaultProxy) -> list[int]:
    return [len(s.json()["messages"]) for s in proxy.batches()]


def contents(request: Seen) -> list[str]:
    return [m["content"] for m in request.json()["messages"]]


def test_producer_sends_a_batch_once_it_is_full_without_waiting_for_the_linger(
    proxy: FaultProxy,
) -> None:
    t = topic()

    async def body() -> tuple[list[int], list[int]]:
        async with AsyncClient(proxy.url) as client:
            producer = client.producer(t, batch_size=10, linger=3600)
            futures = [await producer.send(f"m{i}") for i in range(25)]
            await asyncio.gather(*futures[:20])  # only a full batch can have sent these
            before_flush = batch_sizes(proxy)
            await producer.close()
            return before_flush, batch_sizes(proxy)

    before, after = run(body)
    assert before == [10, 10]
    assert after == [10, 10, 5]


def test_blocking_producer_batches_by_size_and_by_linger(proxy: FaultProxy) -> None:
    with Client(proxy.url) as client:
        with client.producer(topic(), batch_size=10, linger=3600) as producer:
            futures = [producer.send(f"m{i}") for i in range(25)]
            for f in futures[:20]:
                f.result(timeout=30)  # only a full batch can have sent these
            assert batch_sizes(proxy) == [10, 10]
        assert batch_sizes(proxy) == [10, 10, 5]
        with client.producer(topic(), batch_size=1000, linger=0.05) as producer:
            futures = [producer.send(f"m{i}") for i in range(3)]
            assert [f.result(timeout=30).offset for f in futures] == [0, 1, 2]
        assert batch_sizes(proxy) == [10, 10, 5, 3]


def test_producer_sends_a_partial_batch_after_the_linger(proxy: FaultProxy) -> None:
    t = topic()

    async def body() -> list[ProduceResult]:
        async with AsyncClient(proxy.url) as client:
            producer = client.producer(t, batch_size=1000, linger=0.05)
            futures = [await producer.send(f"m{i}") for i in range(3)]
            results = await asyncio.gather(*futures)  # no flush, no close: the linger sent them
            await producer.close()
            return results

    results = run(body)
    assert batch_sizes(proxy) == [3]
    assert [r.offset for r in results] == [0, 1, 2]


def test_producer_reports_each_message_and_refuses_only_the_bad_one(
    module_server: MqfastProcess,
) -> None:
    t = topic()
    with Client(module_server.base_url) as client:
        client.create_topic(t, partitions=2)
        with client.producer(t, linger=0.01) as producer:
            futures = [
                producer.send(f"m{i}", key="same", priority=12 if i == 3 else None)
                for i in range(6)
            ]
        error = futures[3].exception()
        assert isinstance(error, ApiError)
        assert (error.status, error.code) == (400, "invalid_field")
        assert error.field == "messages[3].priority"
        stored = [f.result() for i, f in enumerate(futures) if i != 3]
        assert {r.partition for r in stored} == {stored[0].partition}  # one key, one partition
        assert [r.offset for r in stored] == [0, 1, 2, 3, 4]
        assert [r.topic for r in stored] == [t] * 5
        assert client.get_topic(t)["messages"] == 5


def test_a_503_is_retried_with_the_same_idempotency_key(proxy: FaultProxy) -> None:
    t = topic()
    proxy.faults = ["503"]
    with Client(proxy.url, retry=FAST_RETRY) as client:
        with client.producer(t) as producer:
            fut = producer.send("once")
        assert fut.result().topic == t
        first, *retries = proxy.batches()
        assert (first.status, [r.status for r in retries]) == (503, [200])
        key = first.headers["idempotency-key"]
        assert [m["idempotency_key"] for m in first.json()["messages"]] == [f"{key}-0"]
        for r in retries:  # the same keys (a server without per-message keys gets none)
            assert [m.get("idempotency_key", f"{key}-0") for m in r.json()["messages"]] == [
                f"{key}-0"
            ]
            assert r.headers["idempotency-key"] == first.headers["idempotency-key"]
            assert contents(r) == contents(first) == ["once"]
        assert client.get_topic(t)["messages"] == 1


def test_a_dropped_connection_is_retried_with_the_same_idempotency_key(
    proxy: FaultProxy,
) -> None:
    t = topic()
    proxy.faults = ["drop"]
    with Client(proxy.url, retry=FAST_RETRY) as client:
        result = client.produce_batch([OutgoingMessage("a"), OutgoingMessage("b")], t)
        assert [(r.topic, type(r)) for r in result] == [(t, ProduceResult)] * 2
        first, *retries = proxy.batches()
        assert (first.status, [r.status for r in retries]) == (0, [200])
        for r in retries:
            assert r.headers["idempotency-key"] == first.headers["idempotency-key"]
            assert contents(r) == contents(first) == ["a", "b"]


def test_messages_are_stored_in_the_order_sent_even_when_a_batch_is_retried(
    proxy: FaultProxy,
) -> None:
    t = topic()
    proxy.faults = ["503"]  # the first batch; the ones after it must wait for its retry
    with Client(proxy.url, retry=FAST_RETRY) as client:
        with client.producer(t, batch_size=10) as producer:
            futures = [producer.send(f"m{i}") for i in range(50)]
        assert [f.result().offset for f in futures] == list(range(50))
        got = client.consume(t, "g", "c", max_messages=100)
        assert [m.content for m in got] == [f"m{i}" for i in range(50)]


def test_retries_stop_at_the_limit_with_the_last_error(proxy: FaultProxy) -> None:
    proxy.faults = ["503"] * 10
    with Client(proxy.url, retry=FAST_RETRY) as client:
        with pytest.raises(ApiError) as caught:
            client.produce("x", topic())
    assert (caught.value.status, caught.value.code) == (503, "engine_unavailable")
    assert len(proxy.posts("/api/v1/messages")) == FAST_RETRY.attempts


def test_an_answer_of_unknown_outcome_is_retried_and_says_so(proxy: FaultProxy) -> None:
    t = topic()
    proxy.faults = ["503-unknown"]
    with Client(proxy.url, retry=FAST_RETRY) as client:
        assert client.produce("x", t).topic == t
        keys = {s.headers["idempotency-key"] for s in proxy.posts("/api/v1/messages")}
        assert len(proxy.posts("/api/v1/messages")) == 2 and len(keys) == 1
        proxy.faults = ["503-unknown"] * FAST_RETRY.attempts
        with pytest.raises(ApiError) as caught:
            client.produce("y", t)
    assert caught.value.outcome_unknown and caught.value.status == 503
    proxy.faults = ["503"] * FAST_RETRY.attempts
    with Client(proxy.url, retry=FAST_RETRY) as client, pytest.raises(ApiError) as plain:
        client.produce("z", t)
    assert not plain.value.outcome_unknown


def test_a_client_error_is_not_retried(proxy: FaultProxy) -> None:
    with Client(proxy.url, retry=FAST_RETRY) as client:
        with pytest.raises(ApiError) as caught:
            client.produce("x", topic(), priority=12)
    e = caught.value
    assert (e.status, e.code, e.field) == (400, "invalid_field", "priority")
    assert "<= 9" in e.message
    assert len(proxy.posts("/api/v1/messages")) == 1


def test_errors_carry_the_servers_status_code_and_field(module_server: MqfastProcess) -> None:
    with Client(module_server.base_url) as client:
        with pytest.raises(ApiError) as missing:
            client.get_topic(topic())
        assert (missing.value.status, missing.value.code, missing.value.field) == (
            404,
            "unknown_topic",
            None,
        )
        with pytest.raises(ApiError) as bad:
            client.consume(topic(), "", "c")
        assert (bad.value.status, bad.value.code) == (400, "invalid_field")
        assert bad.value.field == "group_id"


def test_no_server_is_a_connection_failure_after_the_retries() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        with Client(f"http://127.0.0.1:{port}", retry=FAST_RETRY) as client:
            with pytest.raises(ConnectionFailed, match="GET /api/v1/topics"):
                client.list_topics()


def test_token_and_url_come_from_the_environment(
    make_server: MakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mqfast.auth import make_token
    from mqfast.config import Settings

    secret = "client-" * 8
    srv = make_server(MESSAGE_QUEUE_JWT_SECRET=secret)
    monkeypatch.setenv("MQFAST_URL", srv.base_url)
    monkeypatch.delenv("MQFAST_TOKEN", raising=False)
    with Client() as client:
        with pytest.raises(ApiError) as caught:
            client.list_topics()
        assert (caught.value.status, caught.value.code) == (401, "unauthorized")
    monkeypatch.setenv("MQFAST_TOKEN", make_token(Settings(jwt_secret=secret), "t", ["admin"]))
    with Client() as client:
        assert client.list_topics() == []
    with Client(token="not-a-token") as client, pytest.raises(ApiError, match="401"):
        client.list_topics()


def fill(client: Client, t: str, n: int) -> None:
    results = client.produce_batch([OutgoingMessage(f"m{i}") for i in range(n)], t)
    assert all(isinstance(r, ProduceResult) for r in results)


def test_consumer_acks_and_nacks_in_one_batch_before_the_next_poll(
    module_server: MqfastProcess,
) -> None:
    t = topic()
    with Client(module_server.base_url) as client:
        fill(client, t, 3)
        with client.consumer(t, "g", poll_timeout=5) as consumer:
            a, b, c = consumer.poll()
            consumer.ack(a)
            consumer.ack(b)
            consumer.nack(c, error="boom", requeue_delay=0)
            results = consumer.commit()
            assert [(r.message_id, getattr(r, "status", None)) for r in results] == [
                (a.message_id, "acknowledged"),
                (b.message_id, "acknowledged"),
                (c.message_id, "requeued"),
            ]
            [again] = consumer.poll()
            assert (again.message_id, again.delivery_count, again.content) == (
                c.message_id,
                2,
                "m2",
            )
            consumer.ack(again)
        assert client.get_topic(t)["consumer_groups"] == [{"group_id": "g", "lag": 0}]


def test_settlements_the_server_refuses_go_to_on_error(module_server: MqfastProcess) -> None:
    t = topic()
    refused: list[ItemError] = []
    with Client(module_server.base_url) as client:
        fill(client, t, 1)
        with client.consumer(t, "g", poll_timeout=5, on_error=refused.append) as consumer:
            [m] = consumer.poll()
            consumer.ack(m)
            consumer.ack(m)
            results = consumer.commit()
    assert [getattr(r, "status", None) for r in results] == ["acknowledged", "already_acknowledged"]
    assert refused == []
    forged = Message(**{**msgspec.structs.asdict(m), "message_id": str(uuid.uuid4())})
    with Client(module_server.base_url) as client:
        with client.consumer(t, "g", on_error=refused.append) as consumer:
            consumer.ack(forged)
            consumer.commit()
    assert [(e.code, e.message_id) for e in refused] == [("not_found", forged.message_id)]


def hold(client: Client, t: str, auto_extend: bool, seconds: float) -> list[Any]:
    fill(client, t, 1)
    with client.consumer(
        t, "g", poll_timeout=5, visibility_timeout=3.0, auto_extend=auto_extend, on_error=print
    ) as consumer:
        [m] = consumer.poll()
        time.sleep(seconds)  # slow work, longer than the lease
        consumer.ack(m)
        return list(consumer.commit())


def test_consumer_extends_the_lease_of_slow_work(module_server: MqfastProcess) -> None:
    with Client(module_server.base_url) as client:
        [result] = hold(client, topic(), auto_extend=True, seconds=7)
    assert getattr(result, "status", None) == "acknowledged"


def test_without_auto_extend_slow_work_loses_its_lease(module_server: MqfastProcess) -> None:
    with Client(module_server.base_url) as client:
        [result] = hold(client, topic(), auto_extend=False, seconds=4)
    assert isinstance(result, ItemError) and result.code == "conflict"


def test_close_sends_acks_and_releases_every_message_still_held(
    module_server: MqfastProcess,
) -> None:
    t = topic()
    with Client(module_server.base_url) as client:
        fill(client, t, 10)
        seen = []
        with client.consumer(t, "g", batch_size=10, visibility_timeout=600) as consumer:
            for m in consumer:
                seen.append(m)
                if len(seen) == 1:
                    consumer.ack(m)
                if len(seen) == 3:
                    break  # two taken and not settled, seven fetched and never handed out
        # Released, not left to a 10-minute lease: another consumer gets the nine at once.
        again = client.consume(t, "g", "other", max_messages=100, timeout=5)
        assert sorted(m.content for m in again) == [f"m{i}" for i in range(1, 10)]
        assert {m.delivery_count for m in again} == {2}


def test_async_consumer_iterates_and_close_from_another_task_ends_the_iteration(
    module_server: MqfastProcess,
) -> None:
    t = topic()

    async def body() -> tuple[list[str], list[str]]:
        async with AsyncClient(module_server.base_url) as client:
            async with client.producer(t) as producer:
                for i in range(5):
                    await producer.send(f"m{i}")
            got: list[str] = []
            consumer = client.consumer(t, "g", poll_timeout=30)

            async def loop() -> None:
                async for m in consumer:
                    got.append(m.content)
                    consumer.ack(m)

            task = asyncio.get_running_loop().create_task(loop())
            while len(got) < 5:
                await asyncio.sleep(0.01)
            await consumer.close()  # the loop is waiting in a 30 s long-poll
            await asyncio.wait_for(task, 10)
            left = await client.consume(t, "g", "c2", timeout=0)
            return got, [m.content for m in left]

    got, left = run(body)
    assert got == [f"m{i}" for i in range(5)]
    assert left == []


def test_sync_client_settles_by_batch_and_extends_by_message(
    module_server: MqfastProcess,
) -> None:
    t = topic()
    with Client(module_server.base_url) as client:
        fill(client, t, 2)
        a, b = client.consume(t, "g", "c", max_messages=10)
        extended = client.extend(a.message_id, "g", "2m", consumer_id="c")
        assert extended.status == "extended" and extended.lease_deadline is not None
        assert extended.lease_deadline > a.lease_deadline
        results = client.settle(
            "g", [AckItem(a.message_id), AckItem(b.message_id, False, "x", 0)], consumer_id="c"
        )
        assert [getattr(r, "status", None) for r in results] == ["acknowledged", "requeued"]


def test_topics_and_redrive(make_server: MakeServer) -> None:
    srv = make_server(MESSAGE_QUEUE_DELIVERY_LIMIT="1")
    t = topic()
    with Client(srv.base_url) as client:
        created = client.create_topic(t, partitions=2, retention="1h")
        assert (created["name"], created["partitions"], created["retention"]) == (
            t,
            2,
            3600 * 10**9,
        )
        assert t in [x["name"] for x in client.list_topics()]
        fill(client, t, 1)
        with client.consumer(t, "g", poll_timeout=5) as consumer:
            [m] = consumer.poll()
            consumer.nack(m, "bad")
            [result] = consumer.commit()
        assert getattr(result, "status", None) == "dead_lettered"
        assert client.redrive(t) == {"topic": t, "moved": 1}
        assert client.get_topic(t)["messages"] == 2
        assert client.delete_topic(t)["deleted"] is True
        with pytest.raises(ApiError, match="unknown_topic"):
            client.get_topic(t)


def test_settlements_are_kept_when_sending_them_fails(proxy: FaultProxy) -> None:
    t = topic()
    with Client(proxy.url, retry=Retry(attempts=1)) as client:
        fill(client, t, 1)
        with client.consumer(t, "g", poll_timeout=5) as consumer:
            [m] = consumer.poll()
            consumer.ack(m)
            proxy.faults = ["503"]
            with pytest.raises(ApiError, match="503"):
                consumer.commit()
            [result] = consumer.commit()
            assert (result.message_id, getattr(result, "status", None)) == (
                m.message_id,
                "acknowledged",
            )


def test_a_closed_producer_refuses_new_messages(module_server: MqfastProcess) -> None:
    from mqfast.client import ClientError

    with Client(module_server.base_url) as client:
        producer = client.producer(topic())
        producer.send("a").result()
        producer.close()
        with pytest.raises(ClientError, match="closed"):
            producer.send("b")
