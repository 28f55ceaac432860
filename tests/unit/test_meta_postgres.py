"""PostgresMeta against a real PostgreSQL (the session's ``postgres`` server, from tests.backends).

The behaviour both metadata stores promise runs here against each of them (``backend`` is
``sqlite`` or ``postgres``), so a difference between the two shows up as one failing id; this is
the only place it is tested, and ``test_meta.py`` keeps what only SqliteMeta does. The
PostgreSQL-only parts follow: migrations under the advisory lock, the topic registry and its
NOTIFY invalidation, the audit log, start-up errors and outages. Every test gets a schema of its
own (``search_path`` in the DSN); two store instances on it stand in for two replicas.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped, unused-ignore]
import pytest
import uvloop

from mqfast.auth import Grant
from mqfast.errors import ConfigError, Conflict, Unavailable
from mqfast.grants import MAX_STORED_GRANTS, GrantCache
from mqfast.messages import MetricPoint, RegisterConsumerRequest, TopicConfig
from mqfast.meta import MetaStore
from mqfast.meta.history import format_rfc3339, parse_rfc3339
from mqfast.meta.postgres import MIGRATIONS, PostgresMeta, describe_dsn
from mqfast.meta.sqlite import SqliteMeta

T = TypeVar("T")
HOUR_MS = 3_600_000
T0 = parse_rfc3339("2024-01-01T00:00:00Z")
# Metric tests record points in 2024; a retention this long keeps them from being pruned.
KEEP: dict[str, Any] = {"history_retention_s": 200 * 365 * 86400.0}
Store = SqliteMeta | PostgresMeta


def run(coro: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(asyncio.wait_for(coro, 60))


def req(cid: str, group: str = "g1", topics: list[str] | None = None, **kw: Any) -> Any:
    return RegisterConsumerRequest(
        consumer_id=cid, group_id=group, topics=topics or ["user-events"], **kw
    )


def point(t_ms: int, topic: str, **kw: Any) -> MetricPoint:
    return MetricPoint(time=format_rfc3339(t_ms), topic=topic, interval_s=10.0, **kw)


def topic(name: str, **kw: Any) -> TopicConfig:
    fields: dict[str, Any] = {
        "partitions": 3,
        "replication": 1,
        "retention": 86400 * 10**9,
        "max_size": 0,
        "created_at": T0,
        "dead_letter_expired": True,
    }
    return TopicConfig(name=name, **(fields | kw))


async def last_seen(store: Store, consumer_id: str) -> int:
    """``last_seen`` of a consumer that must be registered, as ``store`` reads it."""
    got = await store.get_consumer(consumer_id)
    assert got is not None
    return got.last_seen


async def eventually(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# -- databases ---------------------------------------------------------------------------


def _with_search_path(dsn: str, schema: str) -> str:
    # asyncpg passes unknown DSN parameters to the server as settings
    return f"{dsn}{'&' if '?' in dsn else '?'}search_path={schema}"


@pytest.fixture
def pg_dsn(postgres: Any) -> Iterator[str]:
    """A DSN whose ``search_path`` is a fresh schema, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"

    async def sql(stmt: str) -> None:
        conn = await asyncpg.connect(postgres.dsn)
        try:
            await conn.execute(stmt)
        finally:
            await conn.close()

    run(sql(f"CREATE SCHEMA {schema}"))
    yield _with_search_path(postgres.dsn, schema)
    run(sql(f"DROP SCHEMA {schema} CASCADE"))


async def pg_fetch(dsn: str, query: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


class Backend:
    """Makes store instances sharing one database, and counts rows behind their backs."""

    def make(self, **kw: Any) -> Store:
        raise NotImplementedError

    async def count_points(self) -> int:
        raise NotImplementedError

    @asynccontextmanager
    async def opened(self, **kw: Any) -> AsyncIterator[Store]:
        store = self.make(**kw)
        await store.start()
        try:
            yield store
        finally:
            await store.close()


class SqliteBackend(Backend):
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def make(self, **kw: Any) -> Store:
        return SqliteMeta(str(self.data_dir), **kw)

    async def count_points(self) -> int:
        with closing(sqlite3.connect(self.data_dir / "mqfast.db")) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM meta_metric_points").fetchone()[0])


class PostgresBackend(Backend):
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def make(self, **kw: Any) -> Store:
        return PostgresMeta(self.dsn, **kw)

    async def count_points(self) -> int:
        [row] = await pg_fetch(self.dsn, "SELECT COUNT(*) FROM mqfast_metric_points")
        return int(row[0])


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return SqliteBackend(tmp_path)
    return PostgresBackend(request.getfixturevalue("pg_dsn"))


@asynccontextmanager
async def opened_pg(dsn: str, **kw: Any) -> AsyncIterator[PostgresMeta]:
    store = PostgresMeta(dsn, **kw)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


def test_postgres_meta_is_a_meta_store() -> None:
    store: MetaStore = PostgresMeta("postgresql://u@localhost/db")
    assert isinstance(store, PostgresMeta)


# -- shared behaviour (both stores) ------------------------------------------------------


def test_calls_before_start_and_after_close_are_unavailable(backend: Backend) -> None:
    async def main() -> None:
        store = backend.make()
        with pytest.raises(Unavailable):
            await store.list_consumers()
        await store.start()
        await store.close()
        await store.close()  # idempotent
        with pytest.raises(Unavailable):
            await store.register(req("c1"), T0)
        store.touch("c1", T0)  # a no-op, never raises

    run(main())


def test_register_update_get_list_delete(backend: Backend) -> None:
    async def main() -> None:
        async with backend.opened() as a, backend.opened() as b:
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
            # Sorted by code point, whatever the database's collation: "B" < "_" < "a".
            await a.register(req("B", group="g3"), T0)
            await a.register(req("_", group="g3"), T0)
            assert [c.consumer_id for c in await b.list_consumers()] == [
                "B",
                "_",
                "c1",
                "c2",
                "c3",
            ]
            assert [c.consumer_id for c in await b.list_consumers("g2")] == ["c1", "c2"]
            assert [c.consumer_id for c in await b.list_consumers("g1")] == ["c3"]
            assert await b.list_consumers("nope") == []
            assert await b.consumer_counts() == (5, 5)

            assert await a.delete_consumer("c1")
            assert not await b.delete_consumer("c1")
            assert await b.get_consumer("c1") is None
            assert await a.consumer_counts() == (4, 4)

    run(main())


def test_grants_create_list_delete(backend: Backend) -> None:
    orders = Grant("orders.*", frozenset({"consume", "produce"}), frozenset({"b", "a"}))
    anywhere = Grant("orders.*", frozenset({"consume", "produce"}))

    async def main() -> None:
        async with backend.opened() as a, backend.opened() as b:
            first, created = await a.create_grant("svc", orders, "ops", T0)
            assert created
            assert (first.subject, first.topics, first.created_at, first.created_by) == (
                "svc",
                "orders.*",
                T0,
                "ops",
            )
            assert (first.actions, first.groups) == (["produce", "consume"], ["a", "b"])
            # The same grant again, from another process: the one stored, not a second one.
            assert await b.create_grant("svc", orders, "other", T0 + 1) == (first, False)
            # Any group is another grant than groups a and b; so is another subject's.
            second, created = await b.create_grant("svc", anywhere, "ops", T0)
            assert created and second.groups is None and second.id > first.id
            third, _ = await a.create_grant("other", anywhere, "ops", T0)
            assert await b.list_grants("svc") == [first, second]
            assert await b.list_grants() == [first, second, third]
            assert await b.list_grants("nobody") == []

            assert await b.delete_grant(first.id) == first
            assert await a.delete_grant(first.id) is None
            # A deleted id is never handed out again.
            again, created = await a.create_grant("svc", orders, "ops", T0)
            assert created and again.id > third.id
        async with backend.opened() as a:
            assert await a.list_grants() == [second, third, again]

    run(main())


def test_a_subject_has_a_bounded_number_of_stored_grants(backend: Backend) -> None:
    async def main() -> None:
        async with backend.opened() as a:
            for i in range(MAX_STORED_GRANTS):
                await a.create_grant("svc", Grant(f"t{i}", frozenset({"produce"})), "ops", T0)
            with pytest.raises(Conflict) as e:
                await a.create_grant("svc", Grant("more", frozenset({"produce"})), "ops", T0)
            assert e.value.field == "subject"
            # an existing one is still answered; another subject is not affected
            assert not (await a.create_grant("svc", Grant("t0", frozenset({"produce"})), "", 0))[1]
            assert (await a.create_grant("x", Grant("more", frozenset({"produce"})), "", 0))[1]

    run(main())


def test_grant_changes_reach_the_cache_of_another_process(backend: Backend) -> None:
    grant = Grant("orders.*", frozenset({"produce"}))

    async def main() -> None:
        async with backend.opened() as a, backend.opened() as b:
            await a.create_grant("early", grant, "ops", T0)  # before b's cache loads
            cache = GrantCache(b)
            changed: list[str] = []
            cache.on_changed = changed.append
            await cache.start()
            try:
                assert cache.get("early") == (grant,)
                assert changed == ["early"]
                stored, _ = await a.create_grant("svc", grant, "ops", T0)
                await eventually(lambda: cache.get("svc") == (grant,))
                assert changed == ["early", "svc"]
                await a.delete_grant(stored.id)
                await eventually(lambda: cache.get("svc") == ())
                assert changed == ["early", "svc", "svc"]
                assert cache.get("early") == (grant,)
            finally:
                await cache.close()
            assert b.on_grants_changed is None

    run(main())


def test_registration_survives_a_restart(backend: Backend) -> None:
    async def main() -> None:
        async with backend.opened() as a:
            await a.register(req("c1", rate_limit=2.5), T0)
        async with backend.opened() as a:
            info = await a.get_consumer("c1")
            assert info is not None and info.rate_limit == 2.5

    run(main())


def test_touch_is_visible_locally_at_once_and_elsewhere_after_flush(backend: Backend) -> None:
    async def main() -> None:
        # A long flush interval: only an explicit flush writes, so the test controls timing.
        async with backend.opened(flush_interval_s=3600) as a, backend.opened() as b:
            await a.register(req("c1"), T0)
            a.touch("c1", T0 + 1000)
            a.touch("c1", T0 + 900)  # older than what is pending: ignored
            a.touch("ghost", T0 + 1000)  # not registered
            assert await last_seen(a, "c1") == T0 + 1000
            [listed] = await a.list_consumers()
            assert listed.last_seen == T0 + 1000
            assert await last_seen(b, "c1") == T0

            await a.flush()
            assert await last_seen(b, "c1") == T0 + 1000
            assert await b.get_consumer("ghost") is None
            assert await b.consumer_counts() == (1, 1)

            # A touch older than the stored value never moves last_seen back.
            a.touch("c1", T0 + 10)
            await a.flush()
            assert await last_seen(b, "c1") == T0 + 1000

    run(main())


def test_touch_is_flushed_in_the_background(backend: Backend) -> None:
    async def main() -> None:
        async with backend.opened(flush_interval_s=0.05) as a, backend.opened() as b:
            await a.register(req("c1"), T0)
            for i in range(1, 50):  # many touches, few writes
                a.touch("c1", T0 + i)
            while await last_seen(b, "c1") != T0 + 49:
                await asyncio.sleep(0.01)
            # And again after the first flush: touches keep being scheduled.
            a.touch("c1", T0 + 100)
            while await last_seen(b, "c1") != T0 + 100:
                await asyncio.sleep(0.01)

    run(main())


def test_close_flushes_pending_touches(backend: Backend) -> None:
    async def main() -> None:
        async with backend.opened() as b:
            a = backend.make(flush_interval_s=3600)
            await a.start()
            await a.register(req("c1"), T0)
            a.touch("c1", T0 + 5)
            await a.close()
            assert await last_seen(b, "c1") == T0 + 5

    run(main())


def test_sweep_inactive(backend: Backend) -> None:
    async def main() -> None:
        async with (
            backend.opened(flush_interval_s=3600) as a,
            backend.opened(flush_interval_s=3600) as b,
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


def test_points_of_several_workers_are_aggregated(backend: Backend) -> None:
    async def main() -> None:
        async with backend.opened(**KEEP) as a, backend.opened(**KEEP) as b:
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
                    point(T0, "Zulu", produced=1),  # code-point order: "Z" < "a" < "o"
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
                ("2024-01-01T00:00:00.000Z", "Zulu"),
                ("2024-01-01T00:00:00.000Z", "alpha"),
                ("2024-01-01T00:00:00.000Z", "orders"),
                ("2024-01-01T00:00:10.000Z", "orders"),
            ]
            orders = got[2]
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
            assert got[1].error_rate == 0.0 and got[1].retry_rate == 0.0  # nothing consumed
            assert all(type(v) is type(getattr(orders, k)) for k, v in fields_of(got[1]))

            only = await b.query_points(T0, T0 + HOUR_MS, "orders")
            assert [(p.time, p.produced) for p in only] == [
                ("2024-01-01T00:00:00.000Z", 15),
                ("2024-01-01T00:00:10.000Z", 7),
            ]
            assert await b.query_points(T0, T0 + HOUR_MS, "missing") == []

    run(main())


def fields_of(p: MetricPoint) -> list[tuple[str, Any]]:
    return [(k, getattr(p, k)) for k in p.__struct_fields__]


def test_query_bounds_are_half_open(backend: Backend) -> None:
    async def main() -> None:
        async with backend.opened(**KEEP) as a:
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


def test_recording_the_same_interval_again_merges(backend: Backend) -> None:
    async def main() -> None:
        async with backend.opened(**KEEP) as a:
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
            assert await backend.count_points() == 1

            # Two points of one key in one call merge as well.
            await a.record_points([point(T0, "u", produced=1), point(T0, "u", produced=2)], "w1")
            [u] = await a.query_points(T0, T0 + 1, "u")
            assert u.produced == 3
            assert await backend.count_points() == 2

    run(main())


def test_processing_average_without_consumed_weights(backend: Backend) -> None:
    async def main() -> None:
        async with backend.opened(**KEEP) as a:
            await a.record_points([point(T0, "t", processing_avg_ms=4.0)], "w1")
            await a.record_points([point(T0, "t", processing_avg_ms=8.0)], "w2")
            await a.record_points([point(T0, "t")], "w3")  # timed nothing: not in the mean
            [p] = await a.query_points(T0, T0 + 1, None)
            assert p.processing_avg_ms == pytest.approx(6.0)

    run(main())


def test_times_with_milliseconds_round_trip(backend: Backend) -> None:
    async def main() -> None:
        async with backend.opened(**KEEP) as a:
            await a.record_points([point(T0 + 1_250, "t", produced=1)], "w1")
            [p] = await a.query_points(T0, T0 + 10_000, None)
            assert p.time == "2024-01-01T00:00:01.250Z"
            with pytest.raises(ValueError):
                await a.record_points([MetricPoint(time="yesterday", topic="t", interval_s=1)], "w")

    run(main())


def test_history_is_pruned(backend: Backend) -> None:
    async def main() -> None:
        async with backend.opened(history_retention_s=3600) as a, backend.opened() as b:
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


# -- PostgreSQL: schema and start-up -----------------------------------------------------


def test_migrations_are_applied_once_by_concurrent_starts(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        stores = [PostgresMeta(pg_dsn) for _ in range(4)]
        with caplog.at_level(logging.INFO, logger="mqfast.meta"):
            await asyncio.gather(*(s.start() for s in stores))
        try:
            rows = await pg_fetch(pg_dsn, "SELECT component, version FROM mqfast_schema_version")
            assert [tuple(r) for r in rows] == [("meta", len(MIGRATIONS))]
            migrated = [r for r in caplog.records if "schema migrated" in r.getMessage()]
            assert len(migrated) == len(MIGRATIONS)
            # Every replica works on the one schema.
            await stores[0].register(req("c1"), T0)
            assert [c.consumer_id for c in await stores[3].list_consumers()] == ["c1"]
        finally:
            await asyncio.gather(*(s.close() for s in stores))

    run(main())


def test_refuses_a_newer_schema(pg_dsn: str) -> None:
    async def main() -> None:
        async with opened_pg(pg_dsn):
            pass
        conn = await asyncpg.connect(pg_dsn)
        await conn.execute("UPDATE mqfast_schema_version SET version = 99")
        await conn.close()
        store = PostgresMeta(pg_dsn)
        with pytest.raises(ConfigError, match="newer"):
            await store.start()
        with pytest.raises(Unavailable):
            await store.get_consumer("c1")
        assert store.health()["status"] == "down"
        await store.close()

    run(main())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_start_names_the_server_it_cannot_reach() -> None:
    async def main() -> None:
        port = _closed_port()
        store = PostgresMeta(f"postgresql://mq:s3cret@127.0.0.1:{port}/meta", connect_timeout_s=1)
        t = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            await store.start()
        assert time.monotonic() - t < 3
        assert f"127.0.0.1:{port}/meta" in caught.value.message
        assert "s3cret" not in caught.value.message
        await store.close()

    run(main())


def test_start_gives_up_on_a_server_that_never_answers() -> None:
    async def main() -> None:
        # Listening but never accepting: connections complete and then nothing comes back.
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(16)
            port = silent.getsockname()[1]
            store = PostgresMeta(
                f"postgresql://mq@127.0.0.1:{port}/meta", connect_timeout_s=0.5, op_timeout_s=0.5
            )
            t = time.monotonic()
            with pytest.raises(Unavailable, match=f"127.0.0.1:{port}/meta"):
                await store.start()
            assert time.monotonic() - t < 3
            await store.close()

    run(main())


def test_start_reports_a_missing_database(postgres: Any) -> None:
    async def main() -> None:
        dsn = (
            f"postgresql://{postgres.user}:{postgres.password}@{postgres.host}:{postgres.port}"
            "/mqfast_no_such_db"
        )
        with pytest.raises(ConfigError, match="mqfast_no_such_db"):
            await PostgresMeta(dsn).start()

    run(main())


def test_start_reports_a_refused_login(postgres: Any) -> None:
    async def main() -> None:
        dsn = (
            f"postgresql://{postgres.user}:wrong-pw@{postgres.host}:{postgres.port}"
            f"/{postgres.database}"
        )
        with pytest.raises(ConfigError, match="refused the login") as caught:
            await PostgresMeta(dsn).start()
        assert f"{postgres.host}:{postgres.port}" in caught.value.message
        assert "wrong-pw" not in caught.value.message

    run(main())


def test_describe_dsn_never_shows_the_password() -> None:
    assert describe_dsn("postgresql://mq:pw@db.example:6432/meta?sslmode=require") == (
        "mq",
        "db.example:6432/meta",
    )
    assert describe_dsn("postgres://mq:pw@h1,h2:5433/m") == ("mq", "h1:5432,h2:5433/m")
    assert describe_dsn("postgresql://u@[::1]/m")[1] == "[::1]:5432/m"
    assert describe_dsn("postgresql:///m?host=/run/pg&port=5999&user=x") == ("x", "/run/pg:5999/m")


# -- PostgreSQL: topic registry ----------------------------------------------------------


def test_topic_registry_is_shared_and_invalidated_by_notify(pg_dsn: str) -> None:
    async def main() -> None:
        # A long refresh period: only NOTIFY can carry the changes in time.
        async with (
            opened_pg(pg_dsn, topics_refresh_s=3600) as a,
            opened_pg(pg_dsn, topics_refresh_s=3600) as b,
        ):
            seen_by_b: list[str] = []
            b.on_topics_changed = seen_by_b.append
            assert a.cached_topics() == {} and await a.load_topics() == {}

            orders = topic("orders", partitions=6)
            await a.save_topic(orders)
            assert a.cached_topics() == {"orders": orders}  # at once in the writer
            await eventually(lambda: b.cached_topics().get("orders") == orders)
            assert seen_by_b == ["orders"]

            changed = topic("orders", partitions=12, dead_letter_expired=False)
            await a.save_topic(changed)
            await eventually(lambda: b.cached_topics().get("orders") == changed)
            await b.save_topic(topic("alpha"))
            await eventually(lambda: "alpha" in a.cached_topics())
            assert await a.load_topics() == {"orders": changed, "alpha": topic("alpha")}

            await b.remove_topic("orders")
            await b.remove_topic("never-existed")  # nothing to remove: no error
            await eventually(lambda: "orders" not in a.cached_topics())
            assert list(b.cached_topics()) == ["alpha"]
            assert seen_by_b[:2] == ["orders", "orders"]

            # The cache is a copy: changing it changes nothing in the store.
            a.cached_topics().clear()
            assert "alpha" in a.cached_topics()

    run(main())


def test_grant_notifications_and_a_lost_listener_reach_on_grants_changed(pg_dsn: str) -> None:
    async def main() -> None:
        async with opened_pg(pg_dsn) as a, opened_pg(pg_dsn) as b:
            calls: list[str | None] = []
            b.on_grants_changed = calls.append
            await a.create_grant("svc", Grant("t", frozenset({"produce"})), "ops", T0)
            await eventually(lambda: calls == ["svc"])
            await pg_fetch(pg_dsn, "NOTIFY mqfast_grants")  # bare, by hand: whose is unknown
            await eventually(lambda: calls == ["svc", None])
            # Notifications sent while the listener is gone are lost: a reconnection says so.
            await pg_fetch(pg_dsn, "SELECT pg_terminate_backend($1)", b._listener.get_server_pid())
            await eventually(lambda: calls == ["svc", None, None])
            assert b.health()["listener"] == "up"

    run(main())


def test_topics_are_reloaded_periodically_without_notify(pg_dsn: str) -> None:
    async def main() -> None:
        async with opened_pg(pg_dsn, topics_refresh_s=0.2) as a:
            changed: list[str] = []
            a.on_topics_changed = changed.append
            # Written behind mqfast's back: no NOTIFY, only the periodic reload finds it.
            conn = await asyncpg.connect(pg_dsn)
            await conn.execute(
                "INSERT INTO mqfast_topics VALUES ('quiet', 1, 1, 0, 0, $1, FALSE, $1)", T0
            )
            await conn.close()
            await eventually(lambda: "quiet" in a.cached_topics(), 5)
            assert a.cached_topics()["quiet"] == TopicConfig(
                name="quiet", partitions=1, replication=1, retention=0, max_size=0, created_at=T0
            )
            assert changed == ["quiet"]

    run(main())


def test_a_failing_on_topics_changed_does_not_stop_the_cache(pg_dsn: str) -> None:
    async def main() -> None:
        async with opened_pg(pg_dsn) as a, opened_pg(pg_dsn) as b:

            def broken(name: str) -> None:
                raise RuntimeError("engine bug")

            b.on_topics_changed = broken
            await a.save_topic(topic("one"))
            await a.save_topic(topic("two"))
            await eventually(lambda: b.cached_topics().keys() == {"one", "two"})

    run(main())


# -- PostgreSQL: audit log ---------------------------------------------------------------


def test_audit_round_trip(pg_dsn: str) -> None:
    async def main() -> None:
        async with opened_pg(pg_dsn) as a, opened_pg(pg_dsn) as b:
            await a.audit(
                {
                    "time_ms": T0 + 2,
                    "actor": "alice",
                    "action": "topic.delete",
                    "target": "orders",
                    "outcome": "denied",
                    "remote_addr": "10.0.0.7:51234",
                    "detail": {"role": "reader", "n": 1, "nested": {"ok": False}},
                }
            )
            await b.audit({"time_ms": T0 + 1, "action": "topic.create", "target": "orders"})
            await b.audit({"time_ms": T0 + 1, "action": "consumer.register"})
            before = time.time_ns() // 1_000_000
            await a.audit({"action": "now"})  # time defaults to now

            got = await b.query_audit(T0, T0 + 10)
            assert got == [
                {
                    "time_ms": T0 + 1,
                    "actor": "",
                    "action": "topic.create",
                    "target": "orders",
                    "outcome": "",
                    "remote_addr": "",
                    "detail": {},
                },
                {
                    "time_ms": T0 + 1,
                    "actor": "",
                    "action": "consumer.register",
                    "target": "",
                    "outcome": "",
                    "remote_addr": "",
                    "detail": {},
                },
                {
                    "time_ms": T0 + 2,
                    "actor": "alice",
                    "action": "topic.delete",
                    "target": "orders",
                    "outcome": "denied",
                    "remote_addr": "10.0.0.7:51234",
                    "detail": {"role": "reader", "n": 1, "nested": {"ok": False}},
                },
            ]
            assert [e["action"] for e in await a.query_audit(T0, T0 + 10, limit=1)] == [
                "topic.create"
            ]
            assert await a.query_audit(T0 + 2, T0 + 2) == []
            [now] = await a.query_audit(before, before + HOUR_MS)
            assert now["action"] == "now"

            with pytest.raises(ValueError, match="acter"):
                await a.audit({"acter": "typo"})
            with pytest.raises(ValueError):
                await a.audit({"detail": "not a dict"})

    run(main())


# -- PostgreSQL: many replicas, outages --------------------------------------------------


def test_sweeps_and_touch_flushes_of_many_replicas_never_overlap(pg_dsn: str) -> None:
    async def main() -> None:
        n = 200
        async with (
            opened_pg(pg_dsn, flush_interval_s=3600) as a,
            opened_pg(pg_dsn, flush_interval_s=3600) as b,
            opened_pg(pg_dsn, flush_interval_s=3600) as c,
            opened_pg(pg_dsn, flush_interval_s=3600) as d,
        ):
            replicas = [a, b, c, d]
            ids = [f"c{i:03d}" for i in range(n)]
            await asyncio.gather(*(a.register(req(cid), T0) for cid in ids[:100]))
            await asyncio.gather(*(b.register(req(cid), T0) for cid in ids[100:]))
            for rounds in range(3):
                # Every replica has seen every consumer (a load balancer spreads them), in
                # different orders: the flushes lock overlapping rows, which must not deadlock.
                for k, r in enumerate(replicas):
                    for cid in ids if k % 2 else list(reversed(ids)):
                        r.touch(cid, T0 + 1000 * (rounds + 1))
                await asyncio.gather(*(r.flush() for r in replicas))
                assert await a.consumer_counts() == (n, n)
            results = await asyncio.gather(
                *(r.sweep_inactive(T0 + HOUR_MS, 1000) for r in replicas)
            )
            swept = [cid for res in results for cid in res]
            assert sorted(swept) == ids  # each id exactly once over all replicas
            assert all(res == sorted(res) for res in results)
            got = await c.get_consumer("c007")
            assert got is not None and got.last_seen == T0 + 3000 and not got.active

    run(main())


class FreezableProxy:
    """TCP between the store and PostgreSQL; ``freeze()`` stops forwarding without closing
    anything, as a dead network link does."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.listen_port = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.listen_port = self._server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._flowing.wait()
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self._writers += [writer, up_writer]
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await self._flowing.wait()
                dst.write(data)
                await dst.drain()
        finally:
            dst.close()


def test_a_silent_network_never_hangs_a_caller(postgres: Any, pg_dsn: str) -> None:
    async def main() -> None:
        proxy = FreezableProxy(postgres.host, postgres.port)
        await proxy.start()
        dsn = pg_dsn.replace(f"{postgres.host}:{postgres.port}", f"127.0.0.1:{proxy.listen_port}")
        assert dsn != pg_dsn
        try:
            async with opened_pg(dsn, op_timeout_s=1.0, connect_timeout_s=1.0) as a:
                await a.register(req("c1"), T0)
                await a.save_topic(topic("orders"))
                proxy.freeze()
                calls: list[Callable[[], Awaitable[object]]] = [
                    lambda: a.get_consumer("c1"),
                    lambda: a.register(req("c2"), T0),
                    lambda: a.query_points(T0, T0 + 1, None),
                ]
                for call in calls:
                    t = time.monotonic()
                    with pytest.raises(Unavailable):
                        await call()
                    assert time.monotonic() - t < 2.5
                assert a.health()["status"] == "down"
                assert a.cached_topics() == {"orders": topic("orders")}
                proxy.thaw()
                await eventually(lambda: a.health()["status"] == "up", 20)

                async def works() -> bool:
                    try:
                        return await a.get_consumer("c1") is not None
                    except Unavailable:
                        return False

                deadline = time.monotonic() + 20
                while not await works():
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
        finally:
            await proxy.close()

    run(main())


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_outage_fails_fast_buffers_touches_and_recovers(
    postgres: Any, pg_dsn: str, how: str
) -> None:
    async def main() -> None:
        async with opened_pg(pg_dsn, flush_interval_s=0.05, op_timeout_s=2.0) as a:
            await a.register(req("c1"), T0)
            await a.save_topic(topic("orders"))
            changes: list[str] = []
            a.on_topics_changed = changes.append
            health = a.health()
            assert health["status"] == "up" and health["listener"] == "up"
            assert "error" not in health

            await asyncio.to_thread(postgres.stop if how == "stop" else postgres.kill)
            try:
                calls: list[Callable[[], Awaitable[object]]] = [
                    lambda: a.get_consumer("c1"),
                    lambda: a.list_consumers(),
                    lambda: a.register(req("c2"), T0),
                    lambda: a.delete_consumer("c1"),
                    lambda: a.consumer_counts(),
                    lambda: a.sweep_inactive(T0, 1),
                    lambda: a.record_points([point(T0, "t", produced=1)], "w1"),
                    lambda: a.query_points(T0, T0 + 1, None),
                    lambda: a.prune(),
                    lambda: a.save_topic(topic("payments")),
                    lambda: a.remove_topic("orders"),
                    lambda: a.load_topics(),
                    lambda: a.audit({"action": "x"}),
                    lambda: a.query_audit(T0, T0 + 1),
                ]
                a.touch("c1", T0 + 5_000)
                for call in calls:
                    t = time.monotonic()
                    with pytest.raises(Unavailable):
                        await call()
                    assert time.monotonic() - t < 3
                health = a.health()
                assert health["status"] == "down" and health["error"]
                # Touches pile up, one entry per consumer, through failed flushes and sweeps.
                a.touch("c1", T0 + 6_000)
                a.touch("c3", T0 + 6_000)
                await asyncio.sleep(0.3)
                assert a.health()["pending_touches"] == 2
                await eventually(lambda: a.health()["listener"] == "down", 5)
                assert a.cached_topics() == {"orders": topic("orders")}
            finally:
                await asyncio.to_thread(postgres.start)

            # Back by itself: touches written, listener reconnected, topics reloaded.
            await eventually(lambda: a.health()["pending_touches"] == 0, 20)
            await eventually(lambda: a.health()["listener"] == "up", 20)
            assert a.health()["status"] == "up"
            async with opened_pg(pg_dsn) as b:
                assert await last_seen(b, "c1") == T0 + 6_000
                assert await b.get_consumer("c3") is None
                await b.save_topic(topic("payments"))
                await eventually(lambda: "payments" in a.cached_topics())
                assert "payments" in changes

    run(main())


def test_health_before_start_and_after_close(pg_dsn: str) -> None:
    async def main() -> None:
        store = PostgresMeta(pg_dsn)
        assert store.health()["status"] == "down"
        store.touch("c1", T0)  # before start: kept, written once started
        await store.start()
        health = store.health()
        assert health["status"] == "up"
        assert health["backend"] == "postgresql"
        assert "@" not in str(health["target"])  # no user name or password in health
        await store.close()
        assert store.health()["status"] == "down"
        assert store.health()["error"] == "closed"

    run(main())
