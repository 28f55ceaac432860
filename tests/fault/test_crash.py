"""kill -9 under load loses no acknowledged message (default and MESSAGE_QUEUE_FSYNC=1)."""

from __future__ import annotations

import http.client
import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import MakeServer, MqfastProcess

PRODUCE = "/api/v1/messages"
BATCH = "/api/v1/messages/batch"
TOPIC = "crash"
PARTITIONS = 4


@dataclass
class Acks:
    """Everything the server acknowledged with a 200, as (message_id, partition, offset)."""

    single: list[tuple[str, int, int]] = field(default_factory=list)
    batch: list[tuple[str, int, int]] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def all(self) -> list[tuple[str, int, int]]:
        return self.single + self.batch


def produce_until_killed(srv: MqfastProcess, acks: Acks, stop: threading.Event, n: int) -> None:
    """One keep-alive producer; every 5th request is a batch of 10 (keyed, so partitions mix)."""
    conn: http.client.HTTPConnection | None = None
    i = 0
    while not stop.is_set():
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        is_batch = i % 5 == 4
        if is_batch:
            path = BATCH
            body = {
                "topic": TOPIC,
                "messages": [
                    {"key": f"{n}-{i}-{j}", "content": f"b{n}-{i}-{j}"} for j in range(10)
                ],
            }
        else:
            path = PRODUCE
            body = {"topic": TOPIC, "key": f"{n}-{i}", "content": f"s{n}-{i}"}
        i += 1
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            r = conn.getresponse()
            data = r.read()
        except (OSError, http.client.HTTPException):
            # The server died (or is dying): nothing was acknowledged for this request.
            conn.close()
            conn = None
            if stop.is_set():
                break
            time.sleep(0.01)
            continue
        if r.status != 200:
            with acks.lock:
                acks.bad.append(f"{r.status} {data[:200]!r}")
            continue
        out = json.loads(data)
        with acks.lock:
            if is_batch:
                for x in out["results"]:
                    if "error" not in x:
                        acks.batch.append((x["message_id"], x["partition"], x["offset"]))
            else:
                acks.single.append((out["message_id"], out["partition"], out["offset"]))
    if conn is not None:
        conn.close()


def stored(data_dir: Path) -> dict[str, tuple[int, int]]:
    db = data_dir / "mqfast.db"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute(
            "SELECT message_id, partition, offset FROM messages WHERE topic = ?", (TOPIC,)
        ).fetchall()
    finally:
        conn.close()
    return {mid: (p, off) for mid, p, off in rows}


def crash_and_check(make_server: MakeServer, **env: str) -> MqfastProcess:
    srv = make_server(**env)
    r = srv.request("POST", "/api/v1/topics", {"name": TOPIC, "partitions": PARTITIONS})
    assert r.status == 201, r.body

    acks = Acks()
    stop = threading.Event()
    threads = [
        threading.Thread(target=produce_until_killed, args=(srv, acks, stop, n), daemon=True)
        for n in range(8)
    ]
    for t in threads:
        t.start()
    time.sleep(2.0)
    srv.kill9()  # mid-load: requests are in flight on every connection
    stop.set()
    for t in threads:
        t.join(15)
    assert not any(t.is_alive() for t in threads)
    assert not acks.bad, acks.bad[:5]
    acked = acks.all()
    assert len(acks.single) > 50 and len(acks.batch) > 50, (len(acks.single), len(acks.batch))

    # Acknowledged offsets are unique per partition.
    assert len({(p, off) for _, p, off in acked}) == len(acked)

    again = make_server(data_dir=srv.data_dir, **env)
    rows = stored(again.data_dir)
    missing = [a for a in acked if a[0] not in rows]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged messages lost: {missing[:5]}"
    moved = [a for a in acked if rows[a[0]] != (a[1], a[2])]
    assert not moved, f"acknowledged messages stored at another place: {moved[:5]}"

    # The API agrees with the file, and the log continues after the highest offsets.
    info = again.request("GET", f"/api/v1/topics/{TOPIC}").json()
    assert info["messages"] == len(rows)
    for s in info["partition_stats"]:
        in_p = [off for p, off in rows.values() if p == s["partition"]]
        assert s["messages"] == len(in_p)
        if in_p:
            assert s["high_offset"] == max(in_p) + 1
    r = again.request("POST", PRODUCE, {"topic": TOPIC, "key": "after", "content": "after"})
    assert r.status == 200, r.body
    out = r.json()
    highest = max((off for p, off in rows.values() if p == out["partition"]), default=-1)
    assert out["offset"] == highest + 1
    assert out["message_id"] not in rows
    return again


def test_kill9_under_load_loses_no_acknowledged_message(make_server: MakeServer) -> None:
    crash_and_check(make_server)


def test_kill9_with_fsync_loses_no_acknowledged_message(make_server: MakeServer) -> None:
    again = crash_and_check(make_server, MESSAGE_QUEUE_FSYNC="1")
    engine = again.request("GET", "/health").json()["checks"]["engine"]
    assert engine["fsync"] is True, engine
