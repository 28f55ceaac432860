"""EmbeddedSink against a real SQLite database in ``tmp_path`` (no mocks)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

from mqfast.crypto import HEADER, Keyring
from mqfast.errors import MqfastError, ShuttingDown, TopicExists, Unavailable, UnknownTopic
from mqfast.messages import TopicConfig
from mqfast.sinks import Delivery
from mqfast.sinks.embedded import EmbeddedSink

T = TypeVar("T")
NS_PER_MS = 1_000_000


@dataclass(eq=False)
class D:
    """Stands in for ``_core.Delivery``: the attributes of the ``sinks.Delivery`` protocol."""

    topic: str
    value: bytes = b"hello"
    partition: int = 0
    key: bytes | None = None
    headers: bytes | None = None
    priority: int = 0
    timestamp_ms: int = field(default_factory=lambda: time.time_ns() // NS_PER_MS)
    expires_ms: int = 0
    message_id: str = "m"
    offset: int = -1
    error: MqfastError | None = None


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))


class Harness:
    """One sink bound to the running loop, recording every ``on_done`` call."""

    def __init__(self, data_dir: Path, **kw: Any) -> None:
        kw.setdefault("retention_interval_s", 0)
        self.sink = EmbeddedSink(str(data_dir), **kw)
        self.done: list[list[Delivery]] = []
        self._changed = asyncio.Event()
        self.sink.bind(asyncio.get_running_loop(), self._on_done)

    def _on_done(self, batch: list[Delivery]) -> None:
        self.done.append(batch)
        self._changed.set()

    async def __aenter__(self) -> Harness:
        await self.sink.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sink.close(10)

    def submit(self, batch: list[D]) -> list[D]:
        self.sink.submit(batch)  # type: ignore[arg-type]
        return batch

    async def wait_done(self, n: int) -> None:
        """Wait until ``n`` batches have been completed."""
        while len(self.done) < n:
            self._changed.clear()
            await self._changed.wait()

    async def produce(self, batch: list[D]) -> list[D]:
        self.submit(batch)
        await self.wait_done(len(self.done) + 1)
        return batch


def cfg(name: str, partitions: int = 1, retention: int = 0, max_size: int = 0) -> TopicConfig:
    return TopicConfig(
        name=name, partitions=partitions, replication=1, retention=retention, max_size=max_size
    )


def with_sink(tmp_path: Path, body: Callable[[Harness], Awaitable[T]], **kw: Any) -> T:
    async def main() -> T:
        async with Harness(tmp_path, **kw) as h:
            return await body(h)

    return run(main())


# -- admin -------------------------------------------------------------------------------------


def test_create_get_list_delete(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        s = h.sink
        stored, created = await s.create_topic(cfg("b", partitions=3, retention=10**9))
        assert created and stored.partitions == 3 and stored.created_at > 0
        await s.create_topic(cfg("a"))
        assert await s.get_topic("b") == stored
        assert await s.get_topic("nope") is None
        assert [t.name for t in await s.list_topics()] == ["a", "b"]

        await s.delete_topic("b")
        assert await s.get_topic("b") is None
        assert [t.name for t in await s.list_topics()] == ["a"]
        with pytest.raises(UnknownTopic):
            await s.delete_topic("b")
        with pytest.raises(UnknownTopic):
            await s.describe_topic("b")
        with pytest.raises(UnknownTopic):
            await s.read("b", 0, 0, 10)

    with_sink(tmp_path, body)
    assert (tmp_path / "mqfast.db").exists()


def test_create_is_idempotent_and_conflicts_name_the_setting(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        first, created = await h.sink.create_topic(cfg("t", partitions=2))
        assert created
        again, created = await h.sink.create_topic(cfg("t", partitions=2))
        assert not created and again == first
        with pytest.raises(TopicExists) as ei:
            await h.sink.create_topic(cfg("t", partitions=4, max_size=100))
        assert ei.value.status == 409
        assert "partitions=2 (asked 4)" in ei.value.message
        assert "max_size=0 (asked 100)" in ei.value.message
        assert "retention" not in ei.value.message
        # The failed create left the topic as it was.
        assert (await h.sink.get_topic("t")) == first

    with_sink(tmp_path, body)


def test_describe_counts_per_partition(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.sink.create_topic(cfg("t", partitions=2))
        info = await h.sink.describe_topic("t")
        assert (info.messages, info.bytes, info.consumer_groups) == (0, 0, [])
        assert [(p.low_offset, p.high_offset) for p in info.partition_stats] == [(0, 0), (0, 0)]

        await h.produce(
            [D("t", b"abc"), D("t", b"de", key=b"k"), D("t", b"f", partition=1, headers=b"{}")]
        )
        info = await h.sink.describe_topic("t")
        assert (info.name, info.partitions, info.messages, info.bytes) == ("t", 2, 3, 3 + 3 + 3)
        p0, p1 = info.partition_stats
        assert (p0.partition, p0.messages, p0.bytes, p0.low_offset, p0.high_offset) == (
            0,
            2,
            6,
            0,
            2,
        )
        assert (p1.partition, p1.messages, p1.bytes, p1.low_offset, p1.high_offset) == (
            1,
            1,
            3,
            0,
            1,
        )

    with_sink(tmp_path, body)


# -- produce -----------------------------------------------------------------------------------


def test_offsets_consecutive_per_partition_and_on_done_once_per_batch(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.sink.create_topic(cfg("t", partitions=2))
        batches = [[D("t", partition=(i + j) % 2) for j in range(7)] for i in range(20)]
        for b in batches:  # all queued before the writer runs: exercises group commit
            h.submit(b)
        await h.wait_done(len(batches))
        await asyncio.sleep(0.05)  # a duplicate completion would show up by now
        assert len(h.done) == len(batches)
        assert {id(b) for b in h.done} == {id(b) for b in batches}
        per_part: dict[int, list[int]] = {0: [], 1: []}
        for b in batches:
            for d in b:
                assert d.error is None
                per_part[d.partition].append(d.offset)
        for offsets in per_part.values():
            assert offsets == list(range(len(offsets)))  # in submission order, from 0
        assert h.sink.health()["queued"] == 0

    with_sink(tmp_path, body)


def test_read_back_matches_written(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.sink.create_topic(cfg("t"))
        hdrs = msgspec.json.encode({"a": "1", "ü": "ß"})
        sent = await h.produce(
            [
                D("t", b"plain", message_id="m0", timestamp_ms=1000),
                D(
                    "t",
                    "ünïcode".encode(),
                    key=b"k1",
                    headers=hdrs,
                    priority=7,
                    timestamp_ms=2000,
                    expires_ms=3000,
                    message_id="m1",
                ),
                D("t", b"", key=b"", message_id="m2"),
            ]
        )
        got = await h.sink.read("t", 0, 0, 100)
        assert [m.offset for m in got] == [0, 1, 2]
        m0, m1, m2 = got
        assert (m0.message_id, m0.key, m0.content, m0.headers) == ("m0", None, "plain", {})
        assert (m0.priority, m0.timestamp, m0.expires_at, m0.topic, m0.partition) == (
            0,
            1000,
            0,
            "t",
            0,
        )
        assert (m1.key, m1.content, m1.headers) == ("k1", "ünïcode", {"a": "1", "ü": "ß"})
        assert (m1.priority, m1.timestamp, m1.expires_at) == (7, 2000, 3000)
        assert (m2.key, m2.content) == ("", "")  # empty key is not a missing key
        assert [d.offset for d in sent] == [0, 1, 2]

        assert [m.offset for m in await h.sink.read("t", 0, 1, 1)] == [1]
        assert await h.sink.read("t", 0, 3, 10) == []
        assert await h.sink.read("t", 0, 0, 0) == []

    with_sink(tmp_path, body)


def test_unknown_topic_fails_only_its_deliveries(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.sink.create_topic(cfg("keep"))
        await h.sink.create_topic(cfg("gone"))
        await h.produce([D("gone"), D("gone")])
        await h.sink.delete_topic("gone")

        batch = await h.produce(
            [D("keep"), D("gone"), D("never"), D("keep"), D("keep", partition=5)]
        )
        ok = [batch[0], batch[3]]
        assert [d.offset for d in ok] == [0, 1] and all(d.error is None for d in ok)
        for d in (batch[1], batch[2], batch[4]):
            assert isinstance(d.error, UnknownTopic) and d.offset == -1
        assert len(await h.sink.read("keep", 0, 0, 10)) == 2

        # A topic re-created under the same name starts a fresh log.
        await h.sink.create_topic(cfg("gone"))
        assert [d.offset for d in await h.produce([D("gone")])] == [0]

    with_sink(tmp_path, body)


def test_two_sinks_on_one_file_get_distinct_offsets(tmp_path: Path) -> None:
    """Two engines on one data_dir (like ``--workers 2``) share the offset sequence."""

    async def main() -> None:
        async with Harness(tmp_path) as a, Harness(tmp_path) as b:
            await a.sink.create_topic(cfg("t", partitions=2))
            sent: list[D] = []
            for i in range(200):
                batch = [D("t", partition=j % 2, message_id=f"{i}-{j}") for j in range(6)]
                (a if i % 2 else b).submit(batch)
                sent.extend(batch)
                if i % 10 == 0:
                    await asyncio.sleep(0)  # let both writers run interleaved
            await a.wait_done(100)
            await b.wait_done(100)
            for p in (0, 1):
                offsets = sorted(d.offset for d in sent if d.partition == p)
                assert offsets == list(range(600))  # no duplicates, no gaps
            assert all(d.error is None for d in sent)
            stored = await a.sink.read("t", 0, 0, 1000)
            assert [m.offset for m in stored] == list(range(600))
            by_id = {d.message_id: d.offset for d in sent if d.partition == 0}
            assert all(by_id[m.message_id] == m.offset for m in stored)

    run(main())


def test_a_topic_recreated_by_another_worker_with_encryption_is_written_encrypted(
    tmp_path: Path,
) -> None:
    """Worker A knows ``t`` as plain; worker B deletes it and creates it encrypted: A's next
    write is encrypted (the transaction checks the flag A assumed), and the other way round."""

    def stored(path: Path) -> list[tuple[bytes, dict[str, str]]]:
        conn = sqlite3.connect(path / "mqfast.db")
        try:
            rows = conn.execute("SELECT value, headers FROM messages ORDER BY offset").fetchall()
        finally:
            conn.close()
        return [(bytes(v), msgspec.json.decode(h) if h else {}) for v, h in rows]

    async def main() -> None:
        keyring = Keyring({"k1": bytes(range(32))})
        async with Harness(tmp_path, keyring=keyring) as a, Harness(tmp_path, keyring=keyring) as b:
            await a.sink.create_topic(cfg("t"))
            [d] = await a.produce([D("t", value=b"plain one", message_id="m1")])
            assert d.error is None
            await b.sink.delete_topic("t")
            await b.sink.create_topic(msgspec.structs.replace(cfg("t"), encrypted=True))
            [d] = await a.produce([D("t", value=b"secret two", message_id="m2")])
            assert d.error is None
            [(value, headers)] = stored(tmp_path)
            assert b"secret" not in value and HEADER in headers
            await b.sink.delete_topic("t")
            await b.sink.create_topic(cfg("t"))
            [d] = await a.produce([D("t", value=b"plain three", message_id="m3")])
            assert d.error is None
            assert stored(tmp_path) == [(b"plain three", {})]

    run(main())


# -- lifecycle ---------------------------------------------------------------------------------


def test_close_flushes_queued_batches_and_reopen_sees_them(tmp_path: Path) -> None:
    async def first() -> list[D]:
        h = Harness(tmp_path)
        await h.sink.start()
        await h.sink.create_topic(cfg("t"))
        sent: list[D] = []
        for _ in range(300):
            sent.extend(h.submit([D("t") for _ in range(10)]))
        await h.sink.close(10)
        assert len(h.done) == 300
        assert all(d.error is None for d in sent)
        assert h.sink.health()["status"] == "down"

        late = h.submit([D("t")])
        await asyncio.sleep(0)
        assert h.done[-1] is late and isinstance(late[0].error, ShuttingDown)
        await h.sink.close(1)  # idempotent
        return sent

    sent = run(first())
    assert sorted(d.offset for d in sent) == list(range(3000))

    async def second(h: Harness) -> None:
        info = await h.sink.describe_topic("t")
        assert (info.messages, info.partition_stats[0].high_offset) == (3000, 3000)
        assert [d.offset for d in await h.produce([D("t")])] == [3000]

    with_sink(tmp_path, second)


def test_fsync_mode(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        health = h.sink.health()
        assert health == {
            "status": "up",
            "engine": "embedded",
            "path": str(tmp_path / "mqfast.db"),
            "fsync": True,
            "queued": 0,
        }
        await h.sink.create_topic(cfg("t"))
        assert [d.offset for d in await h.produce([D("t"), D("t")])] == [0, 1]
        conn = sqlite3.connect(tmp_path / "mqfast.db")
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            conn.close()

    with_sink(tmp_path, body, fsync=True)


def test_failed_transaction_reports_unavailable_then_recovers(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.sink.create_topic(cfg("t"))
        await h.produce([D("t")])

        blocker = sqlite3.connect(tmp_path / "mqfast.db", isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # holds the write lock past busy_timeout
            failed = await h.produce([D("t"), D("t")])
            assert all(isinstance(d.error, Unavailable) for d in failed)
            assert all(d.offset == -1 for d in failed)
            assert "embedded engine:" in str(failed[0].error)
            health = h.sink.health()
            assert health["status"] == "down" and "locked" in str(health["detail"])
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()

        ok = await h.produce([D("t"), D("t")])
        assert [d.offset for d in ok] == [1, 2]  # the failed batch consumed no offsets
        assert all(d.error is None for d in ok)
        assert h.sink.health()["status"] == "up"

    with_sink(tmp_path, body, busy_timeout_s=0.05)


def test_close_timeout_fails_what_is_left_exactly_once(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path, busy_timeout_s=0.5)
        await h.sink.start()
        await h.sink.create_topic(cfg("t"))
        blocker = sqlite3.connect(tmp_path / "mqfast.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            stuck = h.submit([D("t")])
            while h.sink.health()["queued"]:  # the writer has taken it and waits for the lock
                await asyncio.sleep(0.001)
            queued = [h.submit([D("t")]), h.submit([D("t")])]
            await h.sink.close(0.05)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        await asyncio.sleep(0.05)
        assert len(h.done) == 3 and {id(b) for b in h.done} == {id(stuck), *map(id, queued)}
        assert type(stuck[0].error) is Unavailable
        assert all(isinstance(b[0].error, ShuttingDown) for b in queued)

    run(main())


def test_start_fails_cleanly_when_data_dir_is_unusable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")

    async def main() -> None:
        h = Harness(tmp_path / "file")
        before = threading.active_count()
        with pytest.raises(OSError):
            await h.sink.start()
        assert h.sink.health()["status"] == "down"
        await asyncio.sleep(0.05)
        assert threading.active_count() <= before  # no admin or writer thread left behind
        await h.sink.close(1)

    run(main())


# -- retention ---------------------------------------------------------------------------------


def test_retention_by_age(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.sink.create_topic(cfg("t", partitions=2, retention=60_000 * NS_PER_MS))
        await h.sink.create_topic(cfg("forever"))
        old = time.time_ns() // NS_PER_MS - 120_000
        await h.produce([D("t", partition=i % 2, timestamp_ms=old) for i in range(10)])
        await h.produce([D("forever", timestamp_ms=old)])
        await h.produce([D("t", partition=i % 2) for i in range(4)])

        assert await h.sink.enforce_retention() == 10
        assert await h.sink.enforce_retention() == 0
        info = await h.sink.describe_topic("t")
        assert info.messages == 4 and info.bytes == 4 * len(b"hello")
        assert [(p.low_offset, p.high_offset) for p in info.partition_stats] == [(5, 7), (5, 7)]
        assert [m.offset for m in await h.sink.read("t", 0, 0, 100)] == [5, 6]
        assert (await h.sink.describe_topic("forever")).messages == 1

        # Offsets are never reused, even once a partition is emptied.
        await h.produce([D("t", timestamp_ms=old)])
        await h.sink.enforce_retention()
        assert [d.offset for d in await h.produce([D("t")])] == [8]

    with_sink(tmp_path, body)


def test_retention_by_size(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.sink.create_topic(cfg("t", partitions=2, max_size=1000))
        await h.produce([D("t", b"x" * 100, partition=i % 2) for i in range(30)])
        assert (await h.sink.describe_topic("t")).bytes == 3000

        assert await h.sink.enforce_retention() == 20
        info = await h.sink.describe_topic("t")
        assert info.bytes <= 1000 and info.messages == 10
        for p in info.partition_stats:  # the oldest went, evenly
            assert (p.low_offset, p.high_offset, p.messages) == (10, 15, 5)
            stored = await h.sink.read("t", p.partition, 0, 100)
            assert [m.offset for m in stored] == list(range(10, 15))
        assert await h.sink.enforce_retention() == 0

    with_sink(tmp_path, body)


def test_concurrent_size_retention_from_two_workers_does_not_overdelete(tmp_path: Path) -> None:
    async def main() -> None:
        async with Harness(tmp_path) as a, Harness(tmp_path) as b:
            await a.sink.create_topic(cfg("t", partitions=2, max_size=1000))
            await a.produce([D("t", b"x" * 100, partition=i % 2) for i in range(30)])
            n = await asyncio.gather(a.sink.enforce_retention(), b.sink.enforce_retention())
            assert sum(n) == 20
            assert (await b.sink.describe_topic("t")).bytes == 1000

    run(main())


def test_retention_chunks_large_backlog(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.sink.create_topic(cfg("t", retention=1 * NS_PER_MS))
        old = time.time_ns() // NS_PER_MS - 10_000
        for _ in range(3):
            h.submit([D("t", timestamp_ms=old) for _ in range(5000)])
        await h.wait_done(3)
        assert await h.sink.enforce_retention() == 15000
        info = await h.sink.describe_topic("t")
        assert (info.messages, info.bytes, info.partition_stats[0].low_offset) == (0, 0, 15000)

    with_sink(tmp_path, body)


def test_background_retention_task(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.sink.create_topic(cfg("t", retention=1 * NS_PER_MS))
        await h.produce([D("t", timestamp_ms=1)])
        for _ in range(200):
            if (await h.sink.describe_topic("t")).messages == 0:
                return
            await asyncio.sleep(0.01)
        pytest.fail("retention task did not run")

    with_sink(tmp_path, body, retention_interval_s=0.02)
