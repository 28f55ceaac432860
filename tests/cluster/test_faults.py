"""Faults of the services under the Kafka engine: brokers, PostgreSQL and Redis going away.

The promises: a 2xx is never given for a message Kafka did not take; while a dependency is down
the answers are prompt 503s (produce without Kafka, consume without Redis) or the service goes on
(without PostgreSQL); everything recovers by itself when the dependency returns.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from tests.cluster.test_kafka_encryption import K1
from tests.conformance.conftest import (
    CONSUMERS,
    FAST_ENV,
    LONG_LEASE,
    PRODUCE,
    Gateway,
    wait_for,
)
from tests.conftest import MakeServer

# Produce waits at most librdkafka's message.timeout.ms (10 s) for a delivery report.
PRODUCE_BOUND_S = 15.0


def gateway(make_server: MakeServer, env: dict[str, str], **extra: str) -> Gateway:
    return Gateway(make_server(MESSAGE_QUEUE_ENGINE="kafka", **env, **FAST_ENV, **extra), "kafka")


def wait_healthy(gw: Gateway, returned: str) -> None:
    wait_for(
        lambda: gw.call("GET", "/health").json()["status"] == "ok",
        timeout=60,
        what=f"health ok after {returned} returns",
    )


@dataclass
class Load:
    """Produces one message after another on its own thread, recording every answer."""

    gw: Gateway
    topic: str
    acked: dict[str, int] = field(default_factory=dict)  # message id -> sequence number
    answers: list[tuple[int, float, dict[str, str], bytes]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                r = self.gw.call("POST", PRODUCE, {"topic": self.topic, "content": f"m{i}"}, 30)
            except OSError as e:  # the gateway itself must not fail; record it as a 0
                self.answers.append((0, time.monotonic() - t0, {}, str(e).encode()))
                continue
            self.answers.append((r.status, time.monotonic() - t0, r.headers, r.body))
            if r.status == 200:
                self.acked[r.json()["message_id"]] = i
            i += 1
            time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(60)

    def count(self, status: int) -> int:
        return sum(1 for a in self.answers if a[0] == status)


def read_back(bootstrap: str, topic: str, partitions: int, header: str = "mqfast-id") -> set[str]:
    """Every value of ``header`` (the message id) in ``topic``, read with a plain Kafka consumer."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "read-back",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        highs = []
        for p in range(partitions):
            _, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            highs.append(hi)
        c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        ids: set[str] = set()
        done = [highs[p] == 0 for p in range(partitions)]
        deadline = time.monotonic() + 60
        while not all(done) and time.monotonic() < deadline:
            for msg in c.consume(1000, 1.0):
                if msg.error() is not None:
                    continue
                for k, v in msg.headers() or ():
                    if k == header:
                        ids.add(v.decode())
                if msg.offset() >= highs[msg.partition()] - 1:
                    done[msg.partition()] = True
        assert all(done), "could not read the topic back"
        return ids
    finally:
        c.close()


def check_answers(load: Load) -> None:
    for status, took, headers, body in load.answers:
        assert status in (200, 503), (status, body)
        assert took < PRODUCE_BOUND_S, f"an answer took {took:.1f}s"
        if status == 503:
            assert "retry-after" in headers, headers


@pytest.fixture
def kafka_env(kafka: Any, postgres: Any, redis: Any, services: Any) -> Iterator[dict[str, str]]:
    yield services.env_for(kafka, postgres, redis)
    kafka.ensure_running()


def test_broker_stopped_under_load_gives_503s_never_a_false_2xx_then_recovers(
    make_server: MakeServer, kafka: Any, kafka_env: dict[str, str]
) -> None:
    gw = gateway(make_server, kafka_env)
    t = gw.topic(partitions=2)
    load = Load(gw, t).start()
    try:
        wait_for(lambda: len(load.acked) >= 50, timeout=30, what="produce under load")
        kafka.stop()
        wait_for(lambda: load.count(503) >= 5, timeout=30, what="503s without a broker")
        health = gw.call("GET", "/health")
        assert health.status == 503 and health.json()["status"] == "down", health.body
        before = len(load.answers)
        kafka.start()
        wait_for(
            lambda: any(a[0] == 200 for a in load.answers[before:]),
            timeout=60,
            what="produce recovering after the broker returns",
        )
    finally:
        load.stop()
    check_answers(load)
    wait_for(lambda: gw.call("GET", "/health").status == 200, what="health recovering")
    missing = set(load.acked) - read_back(kafka.bootstrap, t, 2)
    assert not missing, f"{len(missing)} acknowledged messages are not in Kafka"


def test_kill9_of_one_of_three_brokers_loses_no_acknowledged_message(
    make_server: MakeServer, kafka3: Any, postgres: Any, redis: Any, services: Any
) -> None:
    gw = gateway(make_server, services.env_for(kafka3, postgres, redis))
    t = gw.topic(partitions=3, replication=3)
    load = Load(gw, t).start()
    try:
        wait_for(lambda: len(load.acked) >= 200, timeout=60, what="produce under load")
        victim = kafka3.nodes[1].node_id
        kafka3.kill_node(victim)
        after = len(load.acked)
        wait_for(
            lambda: len(load.acked) >= after + 200,
            timeout=90,
            what="produce going on with two of three brokers",
        )
    finally:
        load.stop()
        kafka3.ensure_running()
    check_answers(load)
    missing = set(load.acked) - read_back(kafka3.bootstrap, t, 3)
    assert not missing, f"{len(missing)} acknowledged messages are not in Kafka"


def test_postgres_stopped_produce_and_consume_go_on_then_recover(
    make_server: MakeServer, postgres: Any, kafka_env: dict[str, str]
) -> None:
    gw = gateway(make_server, kafka_env)
    t = gw.topic()
    gw.produce(t, "before")
    postgres.stop()
    try:
        gw.produce(t, "during")
        got = gw.consume_until(t, "g", "c", 2, visibility=LONG_LEASE)
        assert [m["content"] for m in got] == ["before", "during"]
        for m in got:
            assert gw.ack(m["message_id"], "g")["status"] == "acknowledged"
        h = gw.call("GET", "/health")
        assert h.status == 200, h.body
        assert h.json()["status"] == "degraded"
        assert h.json()["checks"]["postgres"]["status"] == "down"
        r = gw.call("POST", CONSUMERS, {"consumer_id": "c9", "group_id": "g", "topics": [t]})
        assert r.status == 503 and "retry-after" in r.headers, r.body
    finally:
        postgres.start()
    wait_healthy(gw, "PostgreSQL")
    r = gw.call("POST", CONSUMERS, {"consumer_id": "c9", "group_id": "g", "topics": [t]})
    assert r.status == 201, r.body


def test_postgres_stopped_encrypted_topics_need_it_only_for_keys_not_yet_in_memory(
    make_server: MakeServer, postgres: Any, kafka_env: dict[str, str]
) -> None:
    key = K1  # the key of test_kafka_encryption: one keyring for the shared key store
    a = gateway(make_server, kafka_env, **key)
    b = gateway(make_server, kafka_env, **key)
    warm = a.topic(encrypted=True)
    cold = a.topic(encrypted=True)
    a.produce(warm, "before")  # A has stored warm's data key and keeps it in memory
    assert b.describe(warm)["encrypted"] is True  # B knows the topics, not the key
    postgres.stop()
    try:
        a.produce(warm, "during")
        r = a.call("POST", PRODUCE, {"topic": cold, "content": "needs a new data key"})
        assert r.status == 503 and "data key" in r.json()["error"]["message"], r.body
        r = b.consume_reply(warm, "gb", "c")
        assert r.status == 503 and "metadata store" in r.json()["error"]["message"], r.body
        got = a.consume_until(warm, "ga", "c", 2)
        assert [m["content"] for m in got] == ["before", "during"]
    finally:
        postgres.start()
    wait_healthy(a, "PostgreSQL")
    # nothing was dead-lettered meanwhile: the messages were not at fault
    got = b.consume_until(warm, "gb", "c", 2)
    assert [m["content"] for m in got] == ["before", "during"]
    a.produce(cold, "after")
    assert [m["content"] for m in b.consume_until(cold, "gb", "c", 1)] == ["after"]


def test_redis_stopped_consume_answers_503_produce_goes_on_then_recovers(
    make_server: MakeServer, redis: Any, kafka_env: dict[str, str]
) -> None:
    gw = gateway(make_server, kafka_env)
    t = gw.topic()
    gw.produce(t, "one")
    [held] = gw.consume_until(t, "g", "c", 1, visibility=LONG_LEASE)
    time.sleep(1.2)  # Redis writes its append-only file every second
    redis.stop()
    try:
        assert gw.produce(t, "two")["offset"] == 1
        r = gw.consume_reply(t, "g", "c", timeout="0s")
        assert r.status == 503 and "retry-after" in r.headers, r.body
        assert "redis" in r.json()["error"]["message"]
        r = gw.ack_reply(held["message_id"], "g")
        assert r.status == 503, r.body
        h = gw.call("GET", "/health")
        assert h.status == 200 and h.json()["status"] == "degraded", h.body
        assert h.json()["checks"]["redis"]["status"] == "down"
    finally:
        redis.start()
    # The lease taken before the outage is still there: acknowledged, not delivered again.
    wait_for(lambda: gw.ack_reply(held["message_id"], "g").status == 200, timeout=30)
    [two] = gw.consume_until(t, "g", "c", 1, visibility=LONG_LEASE)
    assert two["content"] == "two"
    wait_for(lambda: gw.call("GET", "/health").json()["status"] == "ok", timeout=30)
