"""Stateless replicas: any replica serves any produce, consume or acknowledgement.

Three gateways share one Kafka (messages), Redis (leases, positions) and PostgreSQL (metadata).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from tests.cluster.conftest import Replicas
from tests.conformance.conftest import (
    CONSUME,
    FAST_ENV,
    LONG_LEASE,
    TOPICS,
    Gateway,
    unique,
    wait_for,
)
from tests.conftest import MakeServer


def test_a_message_consumed_through_one_replica_is_acknowledged_through_another(
    replicas: Replicas,
) -> None:
    a, b, c = replicas(3)
    t = a.topic(partitions=3)
    produced = {b.produce(t, f"m{i}", key=f"k{i}")["message_id"] for i in range(30)}
    got = a.consume_until(t, "g", "c1", 30, visibility=LONG_LEASE)
    assert {m["message_id"] for m in got} == produced
    for m in got:
        assert b.ack(m["message_id"], "g", consumer="c1")["status"] == "acknowledged"
    # acknowledging again through a third replica is harmless
    assert c.ack(got[0]["message_id"], "g")["status"] == "already_acknowledged"
    assert c.consume(t, "g", "c2", timeout="1s") == []
    wait_for(lambda: c.lag(t, "g") == 0, what="lag 0 seen through replica C")


def test_a_topic_created_through_one_replica_is_served_by_the_others(replicas: Replicas) -> None:
    a, b = replicas(2)
    t = unique("auto")
    assert a.produce(t, "first")["offset"] == 0  # auto-created through A
    assert b.produce(t, "second")["offset"] == 1
    [m1, m2] = b.consume_until(t, "g", "c", 2, visibility=LONG_LEASE)
    assert [m1["content"], m2["content"]] == ["first", "second"]


def test_each_message_is_leased_to_one_consumer_at_a_time_across_replicas(
    replicas: Replicas,
) -> None:
    gws = replicas(3)
    t = gws[0].topic(partitions=4)
    for gw in gws:  # every replica starts reading the topic before the messages arrive
        assert gw.consume(t, "g", "warm-up", timeout="0s") == []
    n = 300
    batch = [{"topic": t, "content": f"m{i}", "key": f"k{i}"} for i in range(n)]
    r = gws[1].call("POST", "/api/v1/messages/batch", {"messages": batch})
    assert r.status == 200, r.body
    seen: list[list[str]] = [[] for _ in gws]

    def drain(i: int) -> None:
        idle = 0
        while idle < 3:
            r = gws[i].call(
                "POST",
                CONSUME,
                {
                    "topic": t,
                    "group_id": "g",
                    "consumer_id": f"c{i}",
                    "max_messages": 7,
                    "timeout": "300ms",
                    "visibility_timeout": LONG_LEASE,
                },
            )
            assert r.status == 200, r.body
            got = r.json()["messages"]
            idle = 0 if got else idle + 1
            seen[i].extend(m["message_id"] for m in got)
            time.sleep(0.02)  # processing time: gives every replica its turn

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    everything = [mid for part in seen for mid in part]
    assert len(everything) == len(set(everything)), "a message was leased twice at once"
    assert len(everything) == n
    assert sum(1 for s in seen if s) >= 2, f"served per replica: {[len(s) for s in seen]}"


def test_kill9_of_a_replica_redelivers_its_leased_messages_through_the_others(
    replicas: Replicas,
) -> None:
    a, b, c = replicas(3, MESSAGE_QUEUE_VISIBILITY_TIMEOUT="2s")
    t = a.topic(partitions=2)
    for i in range(10):
        a.produce(t, f"m{i}", key=f"k{i}")
    got = a.consume_until(t, "g", "worker", 10, visibility="2s")
    acked = {m["message_id"] for m in got[:4]}
    for mid in acked:
        assert a.ack(mid, "g", consumer="worker")["status"] == "acknowledged"
    a.proc.kill9()
    leased = {m["message_id"] for m in got[4:]}

    again: dict[str, Any] = {}

    def redelivered() -> bool:
        for gw in (b, c):
            for m in gw.consume(t, "g", "other", max_messages=10, timeout="500ms"):
                again[m["message_id"]] = m
                gw.ack(m["message_id"], "g", consumer="other")
        return set(again) >= leased

    wait_for(redelivered, timeout=30, what="leased messages delivered again through B or C")
    assert set(again) == leased, "acknowledged messages must never come back"
    assert all(m["delivery_count"] == 2 for m in again.values())
    assert b.consume(t, "g", "other", timeout="2500ms") == []


def test_a_subject_quota_holds_across_three_replicas(replicas: Replicas) -> None:
    from mqfast.auth import make_token
    from mqfast.config import Settings

    secret = {"MESSAGE_QUEUE_JWT_SECRET": "replica-quota-secret-0123456789-0123456789"}
    rate = 40
    gws = replicas(
        3, **secret, MESSAGE_QUEUE_QUOTA_MESSAGES=str(rate), MESSAGE_QUEUE_QUOTA_BURST="1s"
    )
    settings = Settings.from_env(secret)
    admin = {"Authorization": "Bearer " + make_token(settings, "ops", ["admin"])}
    producer = {"Authorization": "Bearer " + make_token(settings, "svc-a", ["producer"])}
    t = unique("quota")
    r = gws[0].proc.request("POST", "/api/v1/topics", {"name": t}, headers=admin)
    assert r.status == 201, r.body
    accepted = [0, 0, 0]
    limited = [0, 0, 0]
    window_s = 3.0

    def hammer(i: int, deadline: float) -> None:
        while time.monotonic() < deadline:
            r = gws[i].proc.request(
                "POST", "/api/v1/messages", {"topic": t, "content": "x"}, headers=producer
            )
            assert r.status in (200, 429), r.body
            if r.status == 200:
                accepted[i] += 1
            else:
                limited[i] += 1
                assert int(r.headers["retry-after"]) >= 1

    started = time.monotonic()
    threads = [
        threading.Thread(target=hammer, args=(i, started + window_s)) for i in range(len(gws))
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    elapsed = time.monotonic() - started
    total = sum(accepted)
    # rate over the window, plus one burst, plus one allowance chunk per replica (quota.py)
    bound = rate * elapsed + rate * 1 + len(gws) * max(1, rate // 20) + 3
    assert total <= bound, (accepted, limited, elapsed)
    assert total >= rate * window_s * 0.5, (accepted, limited)  # not starved
    assert sum(limited) > 0


def test_a_topic_just_created_is_known_at_once_to_replicas_on_a_three_broker_cluster(
    make_server: MakeServer, kafka3: Any, postgres: Any, redis: Any, services: Any
) -> None:
    # Each broker learns of a new topic from the controller on its own time: the broker that
    # replica B asks may not know yet of the topic replica A has just created.
    env = {"MESSAGE_QUEUE_ENGINE": "kafka", **services.env_for(kafka3, postgres, redis)}
    a, b, c = (Gateway(make_server(**env, **FAST_ENV), "kafka") for _ in range(3))
    for _ in range(5):
        t = a.topic(partitions=3, replication=3)
        for gw in (b, c):
            r = gw.consume_reply(t, "g", "c", timeout="0s")
            assert r.status == 200, r.body
            assert gw.call("GET", f"{TOPICS}/{t}").status == 200
