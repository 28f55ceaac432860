"""SqliteMeta against a real SQLite file in ``tmp_path``; two instances stand in for two workers."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from mqfast.errors import ConfigError, Unavailable
from mqfast.messages import MetricPoint, RegisterConsumerRequest
from mqfast.meta import MetaStore
from mqfast.meta.history import format_rfc3339, parse_rfc3339
from mqfast.meta.sqlite import SqliteMeta
from mqfast.sinks import Delivery
from mqfast.sinks.embedded import EmbeddedSink

T = TypeVar("T")
HOUR_MS = 3_600_000
T0 = parse_rfc3339("2024-01-01T00:00:00Z")
# Metric tests record points in 2024; a retention this long keeps them from being pruned.
KEEP: dict[str, Any] = {"history_retention_s": 200 * 365 * 86400.0}


def run(coro: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(asyncio.wait_for(coro, 30))


@asynccontextmanager
async def opened(data_dir: Path, **kw: Any) -> AsyncIterator[SqliteMeta]:
    store = SqliteMeta(str(data_dir), **kw)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


def req(cid: str, group: str = "g1", topics: list[str] | None = None, **kw: Any) -> Any:
    return RegisterConsumerRequest(
        consumer_id=cid, group_id=group, topics=topics or ["user-events"], **kw
    )


def test_sqlite_meta_is_a_meta_store(tmp_path: Path) -> None:
    store: MetaStore = SqliteMeta(str(tmp_path))
    assert isinstance(store, SqliteMeta)


# -- schema ------------------------------------------------------------------------------


def test_shares_the_engine_file_with_its_own_schema_version(tmp_path: Path) -> None:
    async def main() -> None:
        sink = EmbeddedSink(str(tmp_path), retention_interval_s=0)

        def on_done(batch: list[Delivery]) -> None:
            pass

        sink.bind(asyncio.get_running_loop(), on_done)
        await sink.start()
        try:
            # Two workers starting together: migrations are applied once, under the write lock.
            a, b = SqliteMeta(str(tmp_path)), SqliteMeta(str(tmp_path))
            await asyncio.gather(a.start(), b.start())
            await a.close()
            await b.close()
        finally:
            await sink.close(5)

    run(main())
    with sqlite3.connect(tmp_path / "mqfast.db") as conn:
        versions = dict(conn.execute("SELECT component, version FROM schema_version"))
        assert versions["meta"] == 1
        assert versions["embedded"] >= 1
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    run(_start_close(tmp_path))
    with sqlite3.connect(tmp_path / "mqfast.db") as conn:
        conn.execute("UPDATE schema_version SET version = 99 WHERE component = 'meta'")

    async def main() -> None:
        store = SqliteMeta(str(tmp_path))
        with pytest.raises(ConfigError, match="newer"):
            await store.start()
        with pytest.raises(Unavailable):
            await store.get_consumer("c1")
        await store.close()

    run(main())


async def _start_close(data_dir: Path) -> None:
    async with opened(data_dir):
        pass


def test_calls_before_start_and_after_close_are_unavailable(tmp_path: Path) -> None:
    async def main() -> None:
        store = SqliteMeta(str(tmp_path))
        with pytest.raises(Unavailable):
            await store.list_consumers()
        await store.start()
        await store.close()
        await store.close()  # idempotent
        with pytest.raises(Unavailable):
            await store.register(req("c1"), T0)
        store.touch("c1", T0)  # a no-op, never raises

    run(main())


# -- consumers ---------------------------------------------------------------------------


def test_register_update_get_list_delete(tmp_path: Path) -> None:
    async def main() -> None:
        async with opened(tmp_path) as a, opened(tmp_path) as b:
            info, created = await a.register(
                req(
                    "c1", topics=["user-events", "order-events"], max_concurrency=5, rate_limit=100
                ),
                T0,
            )
            assert created
            assert info.consumer_id == "c1"
            assert info.group_id == "g1"
            assert info.topics == ["user-events", "order-events"]
            assert (info.max_concurrency, info.rate_limit) == (5, 100.0)
            assert (info.registered_at, info.last_seen, info.active) == (T0, T0, True)
            assert await b.get_consumer("c1") == info

            # Registering again (from another worker) updates the settings, keeps registered_at.
            info2, created2 = await b.register(req("c1", group="g2", topics=["x"]), T0 + 500)
            assert not created2
            assert info2.group_id == "g2"
            assert info2.topics == ["x"]
            assert (info2.max_concurrency, info2.rate_limit) == (None, None)
            assert (info2.registered_at, info2.last_seen) == (T0, T0 + 500)
            assert await a.get_consumer("c1") == info2

            await a.register(req("c3", group="g1"), T0)
            await a.register(req("c2", group="g2"), T0)
            assert [c.consumer_id for c in await b.list_consumers()] == ["c1", "c2", "c3"]
            assert [c.consumer_id for c in await b.list_consumers("g2")] == ["c1", "c2"]
            assert [c.consumer_id for c in await b.list_consumers("g1")] == ["c3"]
            assert await b.list_consumers("nope") == []
            assert await b.consumer_counts() == (3, 3)

            assert await a.delete_consumer("c1")
            assert not await b.delete_consumer("c1")
            assert await b.get_consumer("c1") is None
            assert await a.consumer_counts() == (2, 2)

    run(main())


def test_registration_survives_a_restart(tmp_path: Path) -> None:
    async def main() -> None:
        async with opened(tmp_path) as a:
            await a.register(req("c1", rate_limit=2.5), T0)
        async with opened(tmp_path) as a:
            info = await a.get_consumer("c1")
            assert info is not None and info.rate_limit == 2.5

    run(main())


def test_touch_is_visible_locally_at_once_and_elsewhere_after_flush(tmp_path: Path) -> None:
    async def main() -> None:
        # A long flush interval: only an explicit flush writes, so the test controls timing.
        async with opened(tmp_path, flush_interval_s=3600) as a, opened(tmp_path) as b:
            await a.register(req("c1"), T0)
            a.touch("c1", T0 + 1000)
            a.touch("c1", T0 + 900)  # older than what is pending: ignored
            a.touch("ghost", T0 + 1000)  # not registered
            got = await a.get_consumer("c1")
            assert got is not None and got.last_seen == T0 + 1000
            [listed] = await a.list_consumers()
            assert listed.last_seen == T0 + 1000
            got = await b.get_consumer("c1")
            assert got is not None and got.last_seen == T0

            await a.flush()
            got = await b.get_consumer("c1")
            assert got is not None and got.last_seen == T0 + 1000
            assert await b.get_consumer("ghost") is None
            assert await b.consumer_counts() == (1, 1)

            # A touch older than the stored value never moves last_seen back.
            a.touch("c1", T0 + 10)
            await a.flush()
            got = await b.get_consumer("c1")
            assert got is not None and got.last_seen == T0 + 1000

    run(main())


def test_touch_is_flushed_in_the_background(tmp_path: Path) -> None:
    async def main() -> None:
        async with opened(tmp_path, flush_interval_s=0.05) as a, opened(tmp_path) as b:
            await a.register(req("c1"), T0)
            for i in range(1, 50):  # many touches, few writes
                a.touch("c1", T0 + i)
            while True:
                got = await b.get_consumer("c1")
                assert got is not None
                if got.last_seen == T0 + 49:
                    break
                await asyncio.sleep(0.01)
            # And again after the first flush: touches keep being scheduled.
            a.touch("c1", T0 + 100)
            while True:
                got = await b.get_consumer("c1")
                assert got is not None
                if got.last_seen == T0 + 100:
                    break
                await asyncio.sleep(0.01)

    run(main())


def test_close_flushes_pending_touches(tmp_path: Path) -> None:
    async def main() -> None:
        async with opened(tmp_path) as b:
            a = SqliteMeta(str(tmp_path), flush_interval_s=3600)
            await a.start()
            await a.register(req("c1"), T0)
            a.touch("c1", T0 + 5)
            await a.close()
            got = await b.get_consumer("c1")
            assert got is not None and got.last_seen == T0 + 5

    run(main())


def test_sweep_inactive(tmp_path: Path) -> None:
    async def main() -> None:
        async with (
            opened(tmp_path, flush_interval_s=3600) as a,
            opened(tmp_path, flush_interval_s=3600) as b,
        ):
            for cid in ("c1", "c2", "c3"):
                await a.register(req(cid), T0)
            await a.register(req("c4"), T0 + 9000)
            # c2 was seen by worker a and not flushed yet: the sweep writes it first.
            a.touch("c2", T0 + 8000)
            assert await a.sweep_inactive(T0 + 10_000, 3000) == ["c1", "c3"]
            assert await b.sweep_inactive(T0 + 10_000, 3000) == []  # already inactive
            assert await b.consumer_counts() == (2, 4)
            c1 = await b.get_consumer("c1")
            assert c1 is not None and not c1.active
            assert [c.active for c in await b.list_consumers()] == [False, True, False, True]

            # Exactly at the cutoff is not yet inactive.
            assert await b.sweep_inactive(T0 + 11_000, 3000) == []  # c2 seen at T0 + 8000

            # A touched inactive consumer is active again: locally at once, elsewhere on flush.
            a.touch("c1", T0 + 11_000)
            assert await a.consumer_counts() == (3, 4)
            assert await b.consumer_counts() == (2, 4)
            c1 = await a.get_consumer("c1")
            assert c1 is not None and c1.active
            await a.flush()
            c1 = await b.get_consumer("c1")
            assert c1 is not None and c1.active and c1.last_seen == T0 + 11_000
            assert await b.consumer_counts() == (3, 4)

            # Re-registering also reactivates.
            await b.register(req("c3"), T0 + 11_000)
            assert await a.consumer_counts() == (4, 4)

            # Concurrent sweeps by two workers: each id is reported by exactly one of them.
            ra, rb = await asyncio.gather(
                a.sweep_inactive(T0 + HOUR_MS, 1000), b.sweep_inactive(T0 + HOUR_MS, 1000)
            )
            assert sorted(ra + rb) == ["c1", "c2", "c3", "c4"]
            assert not set(ra) & set(rb)
            assert await a.consumer_counts() == (0, 4)

            # A touch of a deleted consumer writes nothing.
            assert await a.delete_consumer("c4")
            a.touch("c4", T0 + HOUR_MS)
            await a.flush()
            assert await b.get_consumer("c4") is None

    run(main())


# -- metric history ----------------------------------------------------------------------


def point(t_ms: int, topic: str, **kw: Any) -> MetricPoint:
    return MetricPoint(time=format_rfc3339(t_ms), topic=topic, interval_s=10.0, **kw)


def test_points_of_several_workers_are_aggregated(tmp_path: Path) -> None:
    async def main() -> None:
        async with opened(tmp_path, **KEEP) as a, opened(tmp_path, **KEEP) as b:
            await a.record_points(
                [
                    point(
                        T0,
                        "orders",
                        produced=10,
                        consumed=8,
                        expired=1,
                        failed=2,
                        retried=1,
                        queue_size=5,
                        dead_letter_size=1,
                        processing_avg_ms=10.0,
                        processing_p95_ms=20.0,
                        processing_p99_ms=30.0,
                        active_consumers=2,
                        total_consumers=3,
                    ),
                    point(T0, "alpha", produced=1),
                    point(T0 + 10_000, "orders", produced=7),
                ],
                "w1",
            )
            await b.record_points(
                [
                    point(
                        T0,
                        "orders",
                        produced=5,
                        consumed=2,
                        expired=0,
                        failed=0,
                        retried=3,
                        queue_size=7,
                        dead_letter_size=0,
                        processing_avg_ms=20.0,
                        processing_p95_ms=25.0,
                        processing_p99_ms=26.0,
                        active_consumers=1,
                        total_consumers=3,
                    )
                ],
                "w2",
            )
            got = await a.query_points(T0, T0 + HOUR_MS, None)
            assert [(p.time, p.topic) for p in got] == [
                ("2024-01-01T00:00:00.000Z", "alpha"),
                ("2024-01-01T00:00:00.000Z", "orders"),
                ("2024-01-01T00:00:10.000Z", "orders"),
            ]
            orders = got[1]
            assert orders == MetricPoint(
                time="2024-01-01T00:00:00.000Z",
                topic="orders",
                interval_s=10.0,
                produced=15,
                consumed=10,
                expired=1,
                failed=2,
                retried=4,
                queue_size=7,
                dead_letter_size=1,
                processing_avg_ms=12.0,  # (10*8 + 20*2) / 10, exact in binary
                processing_p95_ms=25.0,
                processing_p99_ms=30.0,
                active_consumers=2,
                total_consumers=3,
                error_rate=2 / 10,
                retry_rate=4 / 10,
            )
            assert got[0].error_rate == 0.0 and got[0].retry_rate == 0.0  # nothing consumed

            only = await b.query_points(T0, T0 + HOUR_MS, "orders")
            assert [(p.time, p.produced) for p in only] == [
                ("2024-01-01T00:00:00.000Z", 15),
                ("2024-01-01T00:00:10.000Z", 7),
            ]
            assert await b.query_points(T0, T0 + HOUR_MS, "missing") == []

    run(main())


def test_query_bounds_are_half_open(tmp_path: Path) -> None:
    async def main() -> None:
        async with opened(tmp_path, **KEEP) as a:
            await a.record_points(
                [point(T0 + i * 10_000, "t", produced=i + 1) for i in range(6)], "w1"
            )
            got = await a.query_points(T0 + 10_000, T0 + 40_000, None)
            assert [p.produced for p in got] == [2, 3, 4]
            assert await a.query_points(T0 + 10_000, T0 + 10_000, None) == []
            assert await a.query_points(T0 + 40_000, T0 + 10_000, None) == []
            assert await a.query_points(T0 - HOUR_MS, T0, None) == []
            got = await a.query_points(T0 + 50_000, T0 + 50_001, "t")
            assert [p.produced for p in got] == [6]

    run(main())


def test_recording_the_same_interval_again_merges(tmp_path: Path) -> None:
    async def main() -> None:
        async with opened(tmp_path, **KEEP) as a:
            await a.record_points(
                [
                    point(
                        T0,
                        "t",
                        produced=3,
                        consumed=4,
                        failed=1,
                        queue_size=9,
                        processing_avg_ms=10.0,
                        processing_p99_ms=50.0,
                        total_consumers=1,
                    )
                ],
                "w1",
            )
            await a.record_points(
                [
                    point(
                        T0,
                        "t",
                        produced=2,
                        consumed=4,
                        retried=2,
                        queue_size=4,
                        processing_avg_ms=20.0,
                        processing_p99_ms=40.0,
                        total_consumers=2,
                    )
                ],
                "w1",
            )
            [p] = await a.query_points(T0, T0 + 1, None)
            assert (p.produced, p.consumed, p.failed, p.retried) == (5, 8, 1, 2)
            assert p.queue_size == 4  # a gauge: the latest value
            assert p.total_consumers == 2
            assert p.processing_avg_ms == pytest.approx(15.0)
            assert p.processing_p99_ms == 50.0
            assert p.error_rate == pytest.approx(1 / 8)
            assert p.retry_rate == pytest.approx(2 / 8)
            with sqlite3.connect(tmp_path / "mqfast.db") as conn:
                assert conn.execute("SELECT COUNT(*) FROM meta_metric_points").fetchone()[0] == 1

    run(main())


def test_processing_average_without_consumed_weights(tmp_path: Path) -> None:
    async def main() -> None:
        async with opened(tmp_path, **KEEP) as a:
            await a.record_points([point(T0, "t", processing_avg_ms=4.0)], "w1")
            await a.record_points([point(T0, "t", processing_avg_ms=8.0)], "w2")
            await a.record_points([point(T0, "t")], "w3")  # timed nothing: not in the mean
            [p] = await a.query_points(T0, T0 + 1, None)
            assert p.processing_avg_ms == pytest.approx(6.0)

    run(main())


def test_times_with_milliseconds_round_trip(tmp_path: Path) -> None:
    async def main() -> None:
        async with opened(tmp_path, **KEEP) as a:
            await a.record_points([point(T0 + 1_250, "t", produced=1)], "w1")
            [p] = await a.query_points(T0, T0 + 10_000, None)
            assert p.time == "2024-01-01T00:00:01.250Z"
            with pytest.raises(ValueError):
                await a.record_points([MetricPoint(time="yesterday", topic="t", interval_s=1)], "w")

    run(main())


def test_history_is_pruned(tmp_path: Path) -> None:
    async def main() -> None:
        async with opened(tmp_path, history_retention_s=3600) as a, opened(tmp_path) as b:
            now_ms = time.time_ns() // 1_000_000
            # b's first record prunes with b's 7-day retention: the 8-day-old point goes at once.
            await b.record_points([point(now_ms - 8 * 86_400_000, "t", produced=1)], "w2")
            await b.record_points(
                [
                    point(now_ms - 2 * HOUR_MS, "t", produced=2),
                    point(now_ms - 60_000, "t", produced=3),
                ],
                "w2",
            )
            everything = (now_ms - 30 * 86_400_000, now_ms + HOUR_MS)
            assert len(await a.query_points(*everything, None)) == 2

            # a's first record_points prunes with its 1 h retention.
            await a.record_points([point(now_ms, "t", produced=4)], "w1")
            got = await b.query_points(*everything, None)
            assert [p.produced for p in got] == [3, 4]

            # Explicit pruning with a given "now".
            assert await a.prune(now_ms + HOUR_MS - 30_000) == 1
            assert [p.produced for p in await b.query_points(*everything, None)] == [4]
            assert await a.prune(now_ms) == 0

    run(main())
