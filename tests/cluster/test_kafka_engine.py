"""What is particular to the Kafka engine: topic settings in Kafka, bounded queues, timeouts."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

from tests.cluster.conftest import Replicas
from tests.conformance.conftest import PRODUCE, TOPICS, unique


def topic_config(bootstrap: str, topic: str) -> dict[str, str]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    res = ConfigResource(ConfigResource.Type.TOPIC, topic)
    entries = admin.describe_configs([res])[res].result(timeout=10)
    return {k: v.value for k, v in entries.items()}


def test_topic_settings_are_kafka_settings(replicas: Replicas, cluster_env: dict[str, str]) -> None:
    [gw] = replicas(1)
    name = unique("cfg")
    body = {"name": name, "partitions": 3, "retention": "1h", "max_size": 3_000_000}
    assert gw.call("POST", TOPICS, body).status == 201
    cfg = topic_config(cluster_env["KAFKA_BROKERS"], name)
    assert cfg["retention.ms"] == "3600000"
    assert cfg["retention.bytes"] == "1000000"  # Kafka counts it per partition
    info = gw.describe(name)
    assert info["partitions"] == 3 and info["retention"] == 3600 * 10**9
    # creating it again with the same settings is idempotent, with others a conflict
    assert gw.call("POST", TOPICS, body).status == 200
    assert gw.call("POST", TOPICS, {**body, "partitions": 4}).status == 409


def test_more_replicas_than_brokers_is_a_400_naming_the_field(replicas: Replicas) -> None:
    [gw] = replicas(1)
    r = gw.call("POST", TOPICS, {"name": unique("rf"), "replication": 7})
    assert r.status == 400, r.body
    assert r.json()["error"]["field"] == "replication"


def test_headers_are_kafka_record_headers(replicas: Replicas, cluster_env: dict[str, str]) -> None:
    [gw] = replicas(1)
    t = gw.topic()
    out = gw.produce(t, "hi", key="k1", headers={"trace-id": "abc"}, priority=7)
    c = Consumer({"bootstrap.servers": cluster_env["KAFKA_BROKERS"], "group.id": "interop"})
    try:
        c.assign([TopicPartition(t, 0, 0)])
        msg = c.poll(10)
        assert msg is not None and msg.error() is None
        headers = dict(msg.headers() or [])
        assert headers["trace-id"] == b"abc"
        assert headers["mqfast-id"] == out["message_id"].encode()
        assert headers["mqfast-priority"] == b"7"
        assert msg.key() == b"k1" and msg.value() == b"hi"
    finally:
        c.close()


def test_a_full_local_queue_answers_503_and_stores_what_it_accepted(replicas: Replicas) -> None:
    [gw] = replicas(1, KAFKA_OPT_QUEUE_BUFFERING_MAX_MESSAGES="10")
    t = gw.topic()
    r = gw.call("POST", f"{PRODUCE}/batch", {"messages": [{"topic": t, "content": "x"}] * 200})
    out = r.json()
    assert out["failed"] > 0, out
    codes = {x["error"]["code"] for x in out["results"] if "error" in x}
    assert codes == {"engine_unavailable"}
    stored = [x for x in out["results"] if "error" not in x]
    assert gw.describe(t)["messages"] == len(stored) == out["succeeded"]


def test_a_broker_that_stops_answering_gives_503_with_an_unknown_outcome(
    replicas: Replicas, kafka: Any, postgres: Any, redis: Any, services: Any
) -> None:
    env = services.env_for(kafka, postgres, redis)  # this very broker, whatever cluster_env is
    [gw] = replicas(1, KAFKA_OPT_MESSAGE_TIMEOUT_MS="1500", **env)
    t = gw.topic()
    gw.produce(t, "before")
    pid = kafka.nodes[0].pid
    os.kill(pid, signal.SIGSTOP)  # the broker hangs: connections open, no answers
    try:
        started = time.monotonic()
        r = gw.call("POST", PRODUCE, {"topic": t, "content": "lost?"}, timeout=30)
        took = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    assert r.status == 503, r.body
    assert r.headers.get("x-mqfast-outcome") == "unknown"
    assert "retry-after" in r.headers
    assert took < 10
    assert gw.call("POST", PRODUCE, {"topic": t, "content": "after"}, timeout=30).status == 200


def test_group_state_left_by_the_per_message_layout_delivers_again(
    replicas: Replicas, cluster_env: dict[str, str]
) -> None:
    # Redis state of an earlier version (a hash entry per message, no runs): its leases are
    # unknown to the run layout, so the group goes on from its committed position and delivers
    # what was in flight again (at least once), rather than skipping it.
    import redis

    [gw] = replicas(1)
    t = gw.topic()
    ids = {x["message_id"] for x in gw.produce_many(t, 3)}
    assert len(gw.consume(t, "g", "c1", max_messages=3, timeout="5s")) == 3
    r = redis.Redis(host=cluster_env["REDIS_HOST"], port=int(cluster_env["REDIS_PORT"]))
    try:
        r.delete(f"mq:{{g}}:run:{t}")
        r.hset(f"mq:{{g}}:st:{t}", "0:0", '{"s": 1, "n": 1, "c": "c1"}')
    finally:
        r.close()
    again = gw.consume_until(t, "g", "c2", 3)
    assert {m["message_id"] for m in again} == ids
