"""Encryption at rest on the embedded engine: round trip, ciphertext on disk, tampering, rotation.

Encrypted topics are created through the engine itself (``EmbeddedSink.create_topic``) on the
server's data directory before the server starts, so these tests do not depend on the HTTP
field; ``test_create_over_http`` covers ``{"encrypted": true}`` on ``POST /api/v1/topics``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from mqfast.crypto import HEADER, Keyring
from mqfast.messages import TopicConfig
from mqfast.sinks.embedded import DB_FILENAME, EmbeddedSink
from tests.conftest import MakeServer, MqfastProcess

TOPICS = "/api/v1/topics"
PRODUCE = "/api/v1/messages"
CONSUME = "/api/v1/messages/consume"
ACK = "/api/v1/messages/acknowledge"

KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(100, 132))).decode()
ENV_A = {"MESSAGE_QUEUE_MASTER_KEYS": f"k1:{KEY_A}"}
ENV_AB = {"MESSAGE_QUEUE_MASTER_KEYS": f"k1:{KEY_A},k2:{KEY_B}"}  # k2 active (last)


def create_encrypted(data_dir: Path, name: str, partitions: int = 1) -> None:
    """Create an encrypted topic through the engine, with no server running."""

    async def run() -> None:
        sink = EmbeddedSink(
            str(data_dir), retention_interval_s=0, keyring=Keyring({"k1": bytes(range(32))})
        )
        await sink.start()
        try:
            cfg = TopicConfig(
                name=name, partitions=partitions, replication=1, retention=0, max_size=0,
                encrypted=True,
            )  # fmt: skip
            stored, _ = await sink.create_topic(cfg)
            assert stored.encrypted
        finally:
            await sink.close(5.0)

    data_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(run())


def start(make_server: MakeServer, data_dir: Path, **env: str) -> MqfastProcess:
    return make_server(data_dir=data_dir, **env)


def produce(srv: MqfastProcess, topic: str, content: str, **fields: Any) -> dict[str, Any]:
    r = srv.request("POST", PRODUCE, {"topic": topic, "content": content, **fields})
    assert r.status in (200, 201), r.body
    out: dict[str, Any] = r.json()
    return out


def consume(srv: MqfastProcess, topic: str, group: str = "g", n: int = 100) -> list[dict[str, Any]]:
    body = {"topic": topic, "group_id": group, "consumer_id": "c1", "max_messages": n,
            "timeout": "0s"}  # fmt: skip
    r = srv.request("POST", CONSUME, body)
    assert r.status == 200, r.body
    msgs: list[dict[str, Any]] = r.json()["messages"]
    for m in msgs:
        a = srv.request(
            "POST", ACK, {"message_id": m["message_id"], "group_id": group, "success": True}
        )
        assert a.status == 200, a.body
    return msgs


def stored_rows(data_dir: Path, topic: str) -> list[tuple[bytes, dict[str, str]]]:
    conn = sqlite3.connect(data_dir / DB_FILENAME)
    try:
        rows = conn.execute(
            "SELECT value, headers FROM messages WHERE topic = ? ORDER BY partition, offset",
            (topic,),
        ).fetchall()
    finally:
        conn.close()
    return [(bytes(v), json.loads(h) if h else {}) for v, h in rows]


def test_round_trip_and_ciphertext_on_disk(make_server: MakeServer, tmp_path: Path) -> None:
    data = tmp_path / "data"
    create_encrypted(data, "secret", partitions=2)
    srv = start(make_server, data, **ENV_A)
    sent = {f"card number {i} 4111-1111": f"k{i}" for i in range(6)}
    for content, key in sent.items():
        produce(srv, "secret", content, key=key, headers={"trace": "t1"})
    produce(srv, "secret", "no key here")
    info = srv.request("GET", f"{TOPICS}/secret").json()
    assert info["encrypted"] is True
    got = consume(srv, "secret")
    assert sorted(m["content"] for m in got) == sorted([*sent, "no key here"])
    for m in got:
        assert HEADER not in m["headers"]
        if m["key"] is not None:
            assert sent[m["content"]] == m["key"]
            assert m["headers"] == {"trace": "t1"}
    rows = stored_rows(data, "secret")
    assert len(rows) == 7
    for value, headers in rows:
        assert b"card number" not in value and b"no key here" not in value
        assert headers[HEADER].startswith("v1:k1:")
    # the engine's raw read decrypts too
    srv.stop()

    async def read() -> list[str]:
        sink = EmbeddedSink(
            str(data), retention_interval_s=0, keyring=Keyring({"k1": bytes(range(32))})
        )
        await sink.start()
        try:
            out = []
            for p in range(2):
                out += [m.content for m in await sink.read("secret", p, 0, 100)]
                assert all(HEADER not in m.headers for m in await sink.read("secret", p, 0, 100))
            return out
        finally:
            await sink.close(5.0)

    assert sorted(asyncio.run(read())) == sorted([*sent, "no key here"])


def test_plain_topic_is_stored_in_clear(make_server: MakeServer, tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = make_server(data_dir=data, **ENV_A)
    produce(srv, "plain", "hello in clear")
    assert srv.request("GET", f"{TOPICS}/plain").json()["encrypted"] is False
    [(value, headers)] = stored_rows(data, "plain")
    assert value == b"hello in clear" and HEADER not in headers
    assert [m["content"] for m in consume(srv, "plain")] == ["hello in clear"]


def test_tampered_message_goes_to_dlq(make_server: MakeServer, tmp_path: Path) -> None:
    data = tmp_path / "data"
    create_encrypted(data, "tamper")
    srv = start(make_server, data, **ENV_A)
    bad = produce(srv, "tamper", "will be altered")
    produce(srv, "tamper", "stays intact")
    conn = sqlite3.connect(data / DB_FILENAME)
    try:
        value = conn.execute(
            "SELECT value FROM messages WHERE topic = 'tamper' AND message_id = ?",
            (bad["message_id"],),
        ).fetchone()[0]
        flipped = bytearray(value)
        flipped[len(flipped) // 2] ^= 0x01
        conn.execute(
            "UPDATE messages SET value = ? WHERE topic = 'tamper' AND message_id = ?",
            (bytes(flipped), bad["message_id"]),
        )
        conn.commit()
    finally:
        conn.close()
    got = consume(srv, "tamper")
    assert [m["content"] for m in got] == ["stays intact"]
    assert consume(srv, "tamper") == []
    # dead-lettered as stored, with the reason; the DLQ copy is not decryptable either, so it
    # is delivered as stored (base64) for an operator
    [(dlq_value, h)] = stored_rows(data, "tamper.dlq")
    assert dlq_value == bytes(flipped)
    assert h["x-mqfast-dlq-reason"] == "decrypt_failed: tampered"
    assert h["x-mqfast-dlq-error"] == "decrypt_failed: tampered"
    assert h["x-mqfast-dlq-message-id"] == bad["message_id"]
    assert HEADER in h
    [d] = consume(srv, "tamper.dlq")
    assert d["headers"]["x-mqfast-dlq-content-encoding"] == "base64"
    assert base64.b64decode(d["content"]) == bytes(flipped)


def test_dlq_of_encrypted_topic_decrypts_and_redrives(
    make_server: MakeServer, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    create_encrypted(data, "nacked")
    srv = make_server(data_dir=data, MESSAGE_QUEUE_DELIVERY_LIMIT="1", **ENV_A)
    produce(srv, "nacked", "fails once", key="kk")
    body = {"topic": "nacked", "group_id": "g", "consumer_id": "c1", "timeout": "0s"}
    [m] = srv.request("POST", CONSUME, body).json()["messages"]
    r = srv.request("POST", ACK, {"message_id": m["message_id"], "group_id": "g", "success": False})
    assert r.status == 200 and r.json()["status"] == "dead_lettered", r.body
    [(value, _)] = stored_rows(data, "nacked.dlq")
    assert b"fails once" not in value
    [d] = consume(srv, "nacked.dlq")
    assert d["content"] == "fails once" and HEADER not in d["headers"]
    r = srv.request("POST", f"{TOPICS}/nacked/redrive", {})
    assert r.status == 200, r.body
    [again] = consume(srv, "nacked")  # group g completed the original: only the copy
    assert again["content"] == "fails once" and again["key"] == "kk"
    assert not any(k.startswith("mqfast-enc") for k in again["headers"])


def rewrap(data_dir: Path, keys: str) -> subprocess.CompletedProcess[str]:
    """``mqfast rewrap`` on ``data_dir`` with ``MESSAGE_QUEUE_MASTER_KEYS=keys``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESSAGE_QUEUE_")}
    env["MESSAGE_QUEUE_MASTER_KEYS"] = keys
    cmd = [sys.executable, "-m", "mqfast.cli", "rewrap", "--data-dir", str(data_dir)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def test_rotation_old_keys_still_decrypt_then_rewrap_retires_them(
    make_server: MakeServer, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    create_encrypted(data, "rotating")
    srv = start(make_server, data, **ENV_A)
    produce(srv, "rotating", "under key one")
    srv.stop()
    srv = start(make_server, data, **ENV_AB)
    produce(srv, "rotating", "under key two")
    got = consume(srv, "rotating")
    assert [m["content"] for m in got] == ["under key one", "under key two"]
    headers = [h[HEADER] for _, h in stored_rows(data, "rotating")]
    assert headers[0].startswith("v1:k1:") and headers[1].startswith("v1:k2:")

    # k1 retired: without it, a data key it wraps is unknown, and rewrap says so (exit 1)
    only_k2 = f"k2:{KEY_B}"
    r = rewrap(data, only_k2)
    assert r.returncode == 1 and "1 unknown_key" in r.stderr, r
    # with both, while the gateway runs: every data key is wrapped by k2 afterwards
    r = rewrap(data, ENV_AB["MESSAGE_QUEUE_MASTER_KEYS"])
    assert r.returncode == 0 and "re-wrapped 1 data key under master key 'k2'" in r.stdout, r
    assert "re-wrapped 0 data keys" in rewrap(data, only_k2).stdout
    srv.stop()
    srv = start(make_server, data, MESSAGE_QUEUE_MASTER_KEYS=only_k2)
    got = consume(srv, "rotating", group="after-rewrap")
    assert [m["content"] for m in got] == ["under key one", "under key two"]


def test_create_over_http(make_server: MakeServer) -> None:
    srv = make_server(**ENV_A)
    r = srv.request("POST", TOPICS, {"name": "via-http", "encrypted": True})
    assert r.status == 201, r.body
    assert r.json()["encrypted"] is True
    assert srv.request("GET", f"{TOPICS}/via-http").json()["encrypted"] is True
    produce(srv, "via-http", "over http")
    assert [m["content"] for m in consume(srv, "via-http")] == ["over http"]
    plain = make_server()
    r = plain.request("POST", TOPICS, {"name": "nope", "encrypted": True})
    assert r.status == 400, r.body
