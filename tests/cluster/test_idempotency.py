"""Idempotent produce on the Kafka engine across replicas and faults.

Keys live in Redis, so any replica answers a retry; a key whose first attempt never finished
(its replica killed, its delivery timed out) is settled by looking for the message in Kafka.
The fault test: a client that retries every unknown outcome, 409 and lost connection with its
key ends with exactly one copy of each message, counted from Kafka with a plain consumer.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import redis as redis_lib
from confluent_kafka import Consumer, TopicPartition

from tests.cluster.conftest import Replicas
from tests.conformance.conftest import FAST_ENV, PRODUCE, Gateway, wait_for
from tests.conftest import MakeServer, Reply
from tests.integration.test_openapi import check

BATCH = "/api/v1/messages/batch"
IDEM_PREFIX = b"mqfast:idem:"


def send(gw: Gateway, key: str, body: dict[str, Any], path: str = PRODUCE) -> Reply:
    return gw.proc.request("POST", path, body, headers={"Idempotency-Key": key}, timeout=40)


def stored(gw: Gateway, topic: str) -> int:
    return int(gw.describe(topic)["messages"])


def test_a_retry_through_another_replica_answers_the_original(replicas: Replicas) -> None:
    a, b = replicas(2)
    t = a.topic(partitions=3)
    body = {"topic": t, "content": "once"}
    first = send(a, "k1", body)
    assert first.status == 200, first.body
    again = send(b, "k1", body)
    assert again.status == 200 and again.json() == first.json()
    assert send(b, "k1", {"topic": t, "content": "other"}).status == 422
    # retries racing through both replicas at once: one message
    out: list[Reply] = []
    threads = [
        threading.Thread(target=lambda gw=gw: out.append(send(gw, "k2", body)))
        for gw in (a, b, a, b)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(out) == 4 and all(r.status == 200 for r in out), [r.body for r in out]
    assert len({r.json()["message_id"] for r in out}) == 1
    assert stored(a, t) == 2


def _redis(env: dict[str, str]) -> redis_lib.Redis:
    return redis_lib.Redis(host=env["REDIS_HOST"], port=int(env["REDIS_PORT"]))


def _make_pending(r: redis_lib.Redis, deadline_ms: int) -> int:
    """Turn every key into a pending one (its message kept) with ``deadline_ms``."""
    n = 0
    for name in r.scan_iter(match=IDEM_PREFIX + b"*"):
        v = r.get(name)
        if v is None:
            continue
        parts = v.decode().split("|")
        fp, part = parts[1], parts[2]
        mid, ts = (parts[4], parts[5]) if parts[0] == "D" else (parts[3], parts[4])
        r.set(name, f"P|{fp}|{part}|{mid}|{ts}|{deadline_ms}", px=60_000)
        n += 1
    return n


def test_a_retry_in_flight_elsewhere_waits_then_409_and_an_abandoned_one_is_found_in_kafka(
    replicas: Replicas, cluster_env: dict[str, str]
) -> None:
    [gw] = replicas(1)
    t = gw.topic(partitions=2)
    single = {"topic": t, "content": "single"}
    batch = {"topic": t, "messages": [{"content": "b0"}, {"content": "b1"}]}
    r1 = send(gw, "in-flight-1", single)
    r2 = send(gw, "in-flight-2", batch, BATCH)
    assert r1.status == r2.status == 200, (r1.body, r2.body)
    r = _redis(cluster_env)
    try:
        # as if another replica were still producing them
        assert _make_pending(r, int(time.time() * 1000) + 600_000) >= 3
        busy = send(gw, "in-flight-1", single)
        check(busy, PRODUCE, "POST", 409)
        assert busy.json()["error"]["code"] == "idempotency_key_in_flight"
        check(send(gw, "in-flight-2", batch, BATCH), BATCH, "POST", 409)
        # ... as if that replica died: the retry finds the messages in Kafka, stores nothing
        _make_pending(r, int(time.time() * 1000) - 1)
        again1 = send(gw, "in-flight-1", single)
        again2 = send(gw, "in-flight-2", batch, BATCH)
        assert again1.status == 200 and again1.json() == r1.json(), again1.body
        assert again2.status == 200 and again2.json() == r2.json(), again2.body
        assert stored(gw, t) == 3
    finally:
        r.close()


def _copies(bootstrap: str, topic: str, partitions: int) -> dict[str, int]:
    """How many records of each content ``topic`` holds (a plain Kafka consumer)."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "idem-count",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        highs = [c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in
                 range(partitions)]  # fmt: skip
        c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        counts: dict[str, int] = {}
        done = [h == 0 for h in highs]
        deadline = time.monotonic() + 60
        while not all(done) and time.monotonic() < deadline:
            for msg in c.consume(1000, 1.0):
                if msg.error() is not None:
                    continue
                content = msg.value().decode()
                counts[content] = counts.get(content, 0) + 1
                if msg.offset() >= highs[msg.partition()] - 1:
                    done[msg.partition()] = True
        assert all(done), "could not read the topic back"
        return counts
    finally:
        c.close()


def test_retrying_with_keys_through_replica_kill9_and_broker_stop_stores_each_message_once(
    make_server: MakeServer, kafka3: Any, postgres: Any, redis: Any, services: Any
) -> None:
    env = {"MESSAGE_QUEUE_ENGINE": "kafka", **services.env_for(kafka3, postgres, redis), **FAST_ENV}
    gws = [Gateway(make_server(**env), "kafka") for _ in range(2)]
    t = gws[0].topic(partitions=3, replication=3)
    n = 400
    answered: dict[int, str] = {}
    retries = itertools.count()
    stop = threading.Event()

    def client(lo: int, hi: int) -> None:
        turn = lo
        for i in range(lo, hi):
            body = {"topic": t, "content": f"m{i}"}
            while not stop.is_set():
                gw = gws[turn % len(gws)]
                try:
                    r = send(gw, f"key-{i}", body)
                except OSError:  # the replica died under the request: outcome unknown
                    r = None
                if r is not None and r.status == 200:
                    answered[i] = r.json()["message_id"]
                    break
                assert r is None or r.status in (409, 503), (r.status, r.body)
                next(retries)
                turn += 1  # another replica, as a load balancer would
                time.sleep(0.05)

    clients = [threading.Thread(target=client, args=(k * 100, k * 100 + 100)) for k in range(4)]
    for c in clients:
        c.start()
    try:
        wait_for(lambda: len(answered) >= 60, timeout=60, what="produce under way")
        gws[0].proc.kill9()  # a replica dies with requests in flight
        gws[0] = Gateway(make_server(**env), "kafka")
        wait_for(lambda: len(answered) >= 160, timeout=90, what="produce after the kill")
        victim = kafka3.nodes[2].node_id
        kafka3.stop_node(victim)
        wait_for(lambda: len(answered) >= 260, timeout=90, what="produce without a broker")
        kafka3.start_node(victim)
        for c in clients:
            c.join(120)
        assert not any(c.is_alive() for c in clients), "clients did not finish in time"
    finally:
        stop.set()
        kafka3.ensure_running()
    assert len(answered) == n
    assert next(retries) > 0, "the faults caused no retry: the test proved nothing"
    copies = _copies(kafka3.bootstrap, t, 3)
    assert {f"m{i}" for i in range(n)} == set(copies), "a message is missing from Kafka"
    dupes = {k: v for k, v in copies.items() if v != 1}
    assert not dupes, f"{len(dupes)} messages stored more than once: {list(dupes.items())[:5]}"
    assert len(set(answered.values())) == n
