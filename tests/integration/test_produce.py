"""Produce (single, async, batch) against a real server, as the API contract describes it."""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MqfastProcess

PRODUCE = "/api/v1/messages"
BATCH = "/api/v1/messages/batch"
NS = 1_000_000_000


@pytest.fixture(scope="module")
def srv(module_server: MqfastProcess) -> MqfastProcess:
    """One default server shared by the module (embedded engine, auto-created topics)."""
    return module_server


def db_rows(data_dir: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the embedded engine's SQLite file (read-only) while the server runs."""
    conn = sqlite3.connect(f"file:{data_dir / 'mqfast.db'}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def create_topic(srv: MqfastProcess, name: str, partitions: int = 1) -> None:
    r = srv.request("POST", "/api/v1/topics", {"name": name, "partitions": partitions})
    assert r.status in (200, 201), r.body


def topic_count(srv: MqfastProcess, name: str) -> int:
    r = srv.request("GET", f"/api/v1/topics/{name}")
    assert r.status == 200, r.body
    return int(r.json()["messages"])


def assert_uuid7(mid: str) -> uuid.UUID:
    u = uuid.UUID(mid)
    assert str(u) == mid, "message_id must be the canonical lowercase 8-4-4-4-12 form"
    assert u.version == 7, mid
    assert u.variant == uuid.RFC_4122, mid
    return u


def uuid7_ms(mid: str) -> int:
    return uuid.UUID(mid).int >> 80


def kafka_murmur2(data: bytes) -> int:
    """Kafka's Java ``Utils.murmur2`` (as a signed 32-bit int)."""
    m, r = 0x5BD1E995, 24
    mask = 0xFFFFFFFF
    h = (0x9747B28C ^ len(data)) & mask
    n4 = len(data) // 4
    for i in range(n4):
        k = int.from_bytes(data[i * 4 : i * 4 + 4], "little")
        k = (k * m) & mask
        k ^= k >> r
        k = (k * m) & mask
        h = (h * m) & mask
        h ^= k
    rest, base = len(data) & 3, len(data) & ~3
    if rest == 3:
        h ^= data[base + 2] << 16
    if rest >= 2:
        h ^= data[base + 1] << 8
    if rest >= 1:
        h ^= data[base]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def kafka_partition(key: str, partitions: int) -> int:
    return (kafka_murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def test_reference_murmur2_matches_kafka_vectors() -> None:
    # Vectors from Kafka's UtilsTest, so the partition check below compares against Kafka.
    assert kafka_murmur2(b"21") == -973932308
    assert kafka_murmur2(b"foobar") == -790332482
    assert kafka_murmur2(b"a-little-bit-long-string") == -985981536
    assert kafka_murmur2(b"a-little-bit-longer-string") == -1486304829
    assert kafka_murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") == -58897971
    assert kafka_murmur2(b"abc") == 479470107


def test_produce_contract_example(srv: MqfastProcess) -> None:
    before_ms = int(time.time() * 1000)
    body = {
        "topic": "user-events",
        "key": "user-123",
        "content": '{"event":"login","user_id":"123"}',
        "headers": {"source": "auth-service"},
        "priority": 1,
        "ttl": "3600000000000",
    }
    r = srv.request("POST", PRODUCE, body)
    after_ms = int(time.time() * 1000)
    assert r.status == 200, r.body
    assert r.headers["content-type"].startswith("application/json")
    out = r.json()
    assert set(out) == {"message_id", "topic", "partition", "offset", "timestamp"}
    assert_uuid7(out["message_id"])
    assert out["topic"] == "user-events"
    assert out["partition"] == 0
    assert out["offset"] == 0
    assert before_ms - 1000 <= out["timestamp"] <= after_ms + 1000
    assert abs(uuid7_ms(out["message_id"]) - out["timestamp"]) <= 1000

    rows = db_rows(
        srv.data_dir,
        "SELECT message_id, key, value, headers, priority, timestamp_ms, expires_ms"
        " FROM messages WHERE topic = ? AND partition = ? AND offset = ?",
        ("user-events", out["partition"], out["offset"]),
    )
    assert len(rows) == 1
    mid, key, value, headers, priority, ts, expires = rows[0]
    assert mid == out["message_id"]
    assert bytes(key) == b"user-123"
    assert bytes(value) == body["content"].encode()
    assert headers is not None and b"auth-service" in bytes(headers)
    assert priority == 1
    assert ts == out["timestamp"]
    assert expires - ts == 3600 * 1000


@pytest.mark.parametrize(
    ("ttl", "expected_ms"),
    [
        (30 * NS, 30_000),
        (str(30 * NS), 30_000),
        ("30s", 30_000),
        ("1h30m", 5_400_000),
        ("250ms", 250),
        ("24h", 86_400_000),
        (None, 86_400_000),  # MESSAGE_QUEUE_TTL default: 24h
    ],
)
def test_ttl_forms(srv: MqfastProcess, ttl: int | str | None, expected_ms: int) -> None:
    body: dict[str, Any] = {"topic": "ttl-forms", "content": "x"}
    if ttl is not None:
        body["ttl"] = ttl
    r = srv.request("POST", PRODUCE, body)
    assert r.status == 200, r.body
    out = r.json()
    [(ts, expires)] = db_rows(
        srv.data_dir,
        "SELECT timestamp_ms, expires_ms FROM messages"
        " WHERE topic = ? AND partition = ? AND offset = ?",
        ("ttl-forms", out["partition"], out["offset"]),
    )
    assert expires - ts == expected_ms


def test_message_ids_are_time_ordered_and_offsets_consecutive(srv: MqfastProcess) -> None:
    create_topic(srv, "ordered", 1)
    outs = []
    for i in range(20):
        r = srv.request("POST", PRODUCE, {"topic": "ordered", "content": f"m{i}"})
        assert r.status == 200, r.body
        outs.append(r.json())
    ids = [o["message_id"] for o in outs]
    for mid in ids:
        assert_uuid7(mid)
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids), "UUIDv7 ids of one producer must increase"
    assert [uuid.UUID(m).int for m in ids] == sorted(uuid.UUID(m).int for m in ids)
    stamps = [o["timestamp"] for o in outs]
    assert stamps == sorted(stamps)
    offsets = [o["offset"] for o in outs]
    assert offsets == list(range(offsets[0], offsets[0] + 20))
    assert all(o["partition"] == 0 and o["topic"] == "ordered" for o in outs)
    assert topic_count(srv, "ordered") == 20


def test_respond_async_returns_202_and_the_message_is_stored(srv: MqfastProcess) -> None:
    create_topic(srv, "async-one", 1)
    r = srv.request(
        "POST",
        PRODUCE,
        {"topic": "async-one", "content": "later"},
        headers={"Prefer": "respond-async"},
    )
    assert r.status == 202, r.body
    out = r.json()
    assert set(out) == {"message_id", "topic", "partition", "offset", "timestamp"}
    assert out["offset"] is None
    assert out["topic"] == "async-one" and out["partition"] == 0
    assert_uuid7(out["message_id"])
    deadline = time.monotonic() + 5
    while topic_count(srv, "async-one") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert topic_count(srv, "async-one") == 1
    rows = db_rows(srv.data_dir, "SELECT message_id FROM messages WHERE topic = 'async-one'")
    assert rows == [(out["message_id"],)]


def test_same_key_same_partition_kafka_compatible(srv: MqfastProcess) -> None:
    partitions = 8
    create_topic(srv, "keyed", partitions)
    seen: dict[str, int] = {}
    for round_ in range(2):
        for i in range(24):
            key = f"user-{i}"
            r = srv.request("POST", PRODUCE, {"topic": "keyed", "key": key, "content": "c"})
            assert r.status == 200, r.body
            p = r.json()["partition"]
            assert 0 <= p < partitions
            if round_ == 0:
                seen[key] = p
            else:
                assert p == seen[key], f"key {key!r} moved from {seen[key]} to {p}"
    assert len(set(seen.values())) > 1, "24 distinct keys all landed in one partition"
    for key, p in seen.items():
        assert p == kafka_partition(key, partitions), key
    info = srv.request("GET", "/api/v1/topics/keyed").json()
    assert info["messages"] == 48
    assert len(info["partition_stats"]) == partitions


def test_unkeyed_messages_use_valid_partitions(srv: MqfastProcess) -> None:
    create_topic(srv, "unkeyed", 4)
    parts = set()
    for i in range(12):
        r = srv.request("POST", PRODUCE, {"topic": "unkeyed", "content": f"{i}"})
        assert r.status == 200, r.body
        parts.add(r.json()["partition"])
    assert parts <= {0, 1, 2, 3}
    assert topic_count(srv, "unkeyed") == 12


def test_unicode_content_is_stored_as_utf8(srv: MqfastProcess) -> None:
    content = "héllo ✓ 日本"
    r = srv.request("POST", PRODUCE, {"topic": "utf8", "content": content, "key": "ключ"})
    assert r.status == 200, r.body
    out = r.json()
    [(key, value)] = db_rows(
        srv.data_dir,
        "SELECT key, value FROM messages WHERE message_id = ?",
        (out["message_id"],),
    )
    assert bytes(value).decode("utf-8") == content
    assert bytes(key).decode("utf-8") == "ключ"


def test_longest_valid_topic_name(srv: MqfastProcess) -> None:
    name = "t" * 249
    r = srv.request("POST", PRODUCE, {"topic": name, "content": "x"})
    assert r.status == 200, r.body
    assert r.json()["topic"] == name


def test_batch_offsets_consecutive(srv: MqfastProcess) -> None:
    create_topic(srv, "batch-a", 1)
    msgs = [{"content": f"b{i}"} for i in range(10)]
    r = srv.request("POST", BATCH, {"topic": "batch-a", "messages": msgs})
    assert r.status == 200, r.body
    out = r.json()
    assert out["succeeded"] == 10 and out["failed"] == 0
    results = out["results"]
    assert len(results) == 10
    offsets = [x["offset"] for x in results]
    assert offsets == list(range(offsets[0], offsets[0] + 10))
    ids = [x["message_id"] for x in results]
    for mid in ids:
        assert_uuid7(mid)
    assert len(set(ids)) == 10
    assert ids == sorted(ids)
    assert all(x["topic"] == "batch-a" and x["partition"] == 0 for x in results)
    assert all(isinstance(x["timestamp"], int) for x in results)
    stored = db_rows(
        srv.data_dir,
        "SELECT offset, message_id, value FROM messages WHERE topic = 'batch-a' ORDER BY offset",
    )
    assert [(o, m) for o, m, _ in stored] == list(zip(offsets, ids, strict=True))
    assert [bytes(v) for _, _, v in stored] == [f"b{i}".encode() for i in range(10)]


def test_batch_per_message_topic_override(srv: MqfastProcess) -> None:
    msgs = [
        {"content": "1"},
        {"content": "2", "topic": "batch-other"},
        {"content": "3", "key": "k", "priority": 9, "ttl": "30s", "headers": {"h": "v"}},
    ]
    r = srv.request("POST", BATCH, {"topic": "batch-default", "messages": msgs})
    assert r.status == 200, r.body
    results = r.json()["results"]
    assert [x["topic"] for x in results] == ["batch-default", "batch-other", "batch-default"]
    assert results[0]["offset"] + 1 == results[2]["offset"]
    assert topic_count(srv, "batch-default") == 2
    assert topic_count(srv, "batch-other") == 1


def test_batch_without_default_topic_when_every_message_names_one(srv: MqfastProcess) -> None:
    msgs = [{"content": "1", "topic": "batch-nodef"}, {"content": "2", "topic": "batch-nodef"}]
    r = srv.request("POST", BATCH, {"messages": msgs})
    assert r.status == 200, r.body
    assert r.json()["succeeded"] == 2


def test_batch_at_the_default_limit(srv: MqfastProcess) -> None:
    create_topic(srv, "batch-max", 1)
    msgs = [{"content": f"{i}"} for i in range(1000)]
    r = srv.request("POST", BATCH, {"topic": "batch-max", "messages": msgs})
    assert r.status == 200, r.body
    out = r.json()
    assert out["succeeded"] == 1000 and len(out["results"]) == 1000
    offsets = [x["offset"] for x in out["results"]]
    assert offsets == list(range(offsets[0], offsets[0] + 1000))
    assert topic_count(srv, "batch-max") == 1000


def test_batch_respond_async(srv: MqfastProcess) -> None:
    create_topic(srv, "batch-async", 1)
    msgs = [{"content": f"{i}"} for i in range(5)]
    r = srv.request(
        "POST",
        BATCH,
        {"topic": "batch-async", "messages": msgs},
        headers={"Prefer": "respond-async"},
    )
    assert r.status == 202, r.body
    results = r.json()["results"]
    assert len(results) == 5
    assert all(x["offset"] is None for x in results)
    deadline = time.monotonic() + 5
    while topic_count(srv, "batch-async") < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert topic_count(srv, "batch-async") == 5
