"""The ``GET /api/v1/metrics`` query parser and the history recorder (on a real SqliteMeta)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from mqfast.errors import InvalidQuery
from mqfast.messages import MetricPoint
from mqfast.meta.history import (
    HistoryRecorder,
    TopicSample,
    format_rfc3339,
    parse_audit_query,
    parse_metrics_query,
    parse_rfc3339,
)
from mqfast.meta.sqlite import SqliteMeta

T = TypeVar("T")
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
JAN1 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
NOW = JAN1 + 12 * HOUR_MS


def run(coro: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(asyncio.wait_for(coro, 30))


# -- timestamps --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("2024-01-01T00:00:00Z", JAN1),
        ("2024-01-01t00:00:00z", JAN1),
        ("2024-01-01 00:00:00Z", JAN1),
        ("2024-01-01T02:00:00+02:00", JAN1),
        ("2023-12-31T18:30:00-05:30", JAN1),
        ("2024-01-01T00:00:00-00:00", JAN1),
        ("2024-01-01T00:00:00.5Z", JAN1 + 500),
        ("2024-01-01T00:00:00.123456789Z", JAN1 + 123),
        ("2024-02-29T00:00:00Z", JAN1 + 59 * DAY_MS),
        ("2023-12-31T23:59:60Z", JAN1),  # a leap second
        ("1970-01-01T00:00:00Z", 0),
    ],
)
def test_parse_rfc3339(text: str, ms: int) -> None:
    assert parse_rfc3339(text) == ms


@pytest.mark.parametrize(
    "text",
    [
        "",
        "2024-01-01",
        "2024-01-01T00:00:00",  # no offset
        "2024-01-01T00:00Z",
        "2024-1-01T00:00:00Z",
        "2024-13-01T00:00:00Z",
        "2023-02-29T00:00:00Z",
        "2024-01-01T24:00:00Z",
        "2024-01-01T00:00:00+24:00",
        "2024-01-01T00:00:00+02",
        "2024-01-01T00:00:00.Z",
        "2024-01-01T00:00:00Z ",
        "0000-01-01T00:00:00Z",
        "1704067200000",
        "٢٠٢٤-01-01T00:00:00Z",  # non-ASCII digits
        # found by schemathesis: valid text, but the instant is in year 0 or 10000 in UTC
        "0001-01-01T00:00:00+23:59",
        "9999-12-31T23:59:59-00:01",
        "9999-12-31T23:59:60Z",
    ],
)
def test_parse_rfc3339_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rfc3339(text)


def test_format_rfc3339() -> None:
    assert format_rfc3339(JAN1) == "2024-01-01T00:00:00.000Z"
    assert format_rfc3339(JAN1 + 7) == "2024-01-01T00:00:00.007Z"
    assert format_rfc3339(0) == "1970-01-01T00:00:00.000Z"
    for ms in (JAN1, JAN1 + 1, JAN1 + 999, NOW + 123_456):
        assert parse_rfc3339(format_rfc3339(ms)) == ms


def test_format_rfc3339_pads_early_years() -> None:
    # found by schemathesis: years before 1000 were written with fewer than four digits
    for text in ("0385-02-24T14:52:22.605Z", "0071-05-04T17:34:13.000Z",
                 "0001-01-01T00:00:00.000Z", "9999-12-31T23:59:59.999Z"):  # fmt: skip
        assert format_rfc3339(parse_rfc3339(text)) == text


def test_default_start_never_falls_before_year_one() -> None:
    start, end, _ = parse_audit_query(b"end_time=0001-01-01T00:30:00Z", NOW)
    assert format_rfc3339(start) == "0001-01-01T00:00:00.000Z"
    assert format_rfc3339(end) == "0001-01-01T00:30:00.000Z"


# -- the query ---------------------------------------------------------------------------


INTERVAL_MS = 10_000


def parsed(query: bytes) -> tuple[int, int, str | None, int]:
    q = parse_metrics_query(query, NOW, INTERVAL_MS)
    return q.start_ms, q.end_ms, q.topic, q.step_ms


def test_contract_example() -> None:
    q = b"start_time=2024-01-01T00:00:00Z&end_time=2024-01-02T00:00:00Z&topic=user-events"
    # A day of 10 s intervals is 8,640 of them: the default step keeps it to 1,000 points.
    assert parsed(q) == (JAN1, JAN1 + DAY_MS, "user-events", 90_000)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", (NOW - HOUR_MS, NOW, None, INTERVAL_MS)),
        (b"topic=orders.v2_x", (NOW - HOUR_MS, NOW, "orders.v2_x", INTERVAL_MS)),
        (
            b"end_time=2024-01-01T06:00:00Z",
            (JAN1 + 5 * HOUR_MS, JAN1 + 6 * HOUR_MS, None, INTERVAL_MS),
        ),
        (b"start_time=2024-01-01T00:00:00Z", (JAN1, NOW, None, 50_000)),
        (b"start_time=2024-01-01T00%3A00%3A00Z", (JAN1, NOW, None, 50_000)),
        (b"start_time=2024-01-01T02:00:00%2B02:00", (JAN1, NOW, None, 50_000)),
        (b"start_time=2024-01-01T02:00:00+02:00", (JAN1, NOW, None, 50_000)),  # "+" unescaped
        (b"start_time=2024-01-01T11:00:00.250Z", (NOW - HOUR_MS + 250, NOW, None, INTERVAL_MS)),
        (b"%74opic=user-events", (NOW - HOUR_MS, NOW, "user-events", INTERVAL_MS)),
        (b"&&topic=a&", (NOW - HOUR_MS, NOW, "a", INTERVAL_MS)),
        # An empty range; and any long range, with a step that keeps it to 1,000 points.
        (
            b"start_time=2024-01-01T12:00:00Z&end_time=2024-01-01T12:00:00Z",
            (NOW, NOW, None, INTERVAL_MS),
        ),
        (
            b"start_time=2023-10-03T00:00:00Z&end_time=2024-01-01T00:00:00Z",  # 90 days
            (JAN1 - 90 * DAY_MS, JAN1, None, 7_780_000),
        ),
        (
            b"start_time=2014-01-01T00:00:00Z&end_time=2024-01-01T00:00:00Z",
            (parse_rfc3339("2014-01-01T00:00:00Z"), JAN1, None, 315_540_000),
        ),
        # An explicit step: any duration of at least the interval.
        (b"step=5m", (NOW - HOUR_MS, NOW, None, 300_000)),
        (b"step=10s", (NOW - HOUR_MS, NOW, None, INTERVAL_MS)),
        (b"step=3600000000000", (NOW - HOUR_MS, NOW, None, HOUR_MS)),
        # Times in the future are fine (end defaults to now only when absent).
        (
            b"end_time=2030-01-01T00:00:00Z",
            (
                parse_rfc3339("2029-12-31T23:00:00Z"),
                parse_rfc3339("2030-01-01T00:00:00Z"),
                None,
                INTERVAL_MS,
            ),
        ),
    ],
)
def test_good_queries(query: bytes, expected: tuple[int, int, str | None, int]) -> None:
    assert parsed(query) == expected


@pytest.mark.parametrize(
    ("query", "field"),
    [
        (b"start_time=yesterday", "start_time"),
        (b"start_time=", "start_time"),
        (b"start_time", "start_time"),
        (b"start_time=2024-01-01", "start_time"),
        (b"start_time=2024-13-01T00:00:00Z", "start_time"),
        (b"start_time=2024-01-01T00:00:00%20Z", "start_time"),
        (b"end_time=2024-01-01T00:00:00", "end_time"),
        (b"end_time=2024-02-30T00:00:00Z", "end_time"),
        (b"end_time=1704067200", "end_time"),
        # end before start; default start is end - 1h, default end is now
        (b"start_time=2024-01-02T00:00:00Z&end_time=2024-01-01T00:00:00Z", "end_time"),
        (b"start_time=2024-01-01T12:00:00.001Z", "end_time"),
        # a step that is no duration, or shorter than the recording interval
        (b"step=", "step"),
        (b"step=often", "step"),
        (b"step=-5m", "step"),
        (b"step=0", "step"),
        (b"step=60", "step"),  # 60 ns, not 60 s
        (b"step=9s", "step"),
        (b"step=5m&step=5m", "step"),
        # unknown and repeated parameters
        (b"start=2024-01-01T00:00:00Z", "start"),
        (b"topic=a&limit=10", "limit"),
        (b"Topic=a", "Topic"),
        (b"topic=a&topic=b", "topic"),
        (b"end_time=2024-01-01T00:00:00Z&end_time=2024-01-01T00:00:00Z", "end_time"),
        # invalid topic names
        (b"topic=", "topic"),
        (b"topic=a%20b", "topic"),
        (b"topic=a+b", "topic"),
        (b"topic=..", "topic"),
        (b"topic=" + b"x" * 250, "topic"),
        (b"topic=%C3%A9", "topic"),
        (b"topic=%ff", "topic"),
    ],
)
def test_bad_queries(query: bytes, field: str) -> None:
    with pytest.raises(InvalidQuery) as info:
        parse_metrics_query(query, NOW, INTERVAL_MS)
    assert info.value.field == field
    assert info.value.status == 400
    assert info.value.code == "invalid_query"
    assert info.value.message


def test_the_default_step_is_the_smallest_multiple_of_the_interval_within_the_points() -> None:
    for span_ms, points, step in [(10_000_000, 1000, 10_000), (10_000_001, 1000, 20_000),
                                  (3_600_000, 6, 600_000), (3_600_000, 7, 520_000)]:  # fmt: skip
        q = parse_metrics_query(f"end_time={format_rfc3339(NOW)}&start_time="
                                f"{format_rfc3339(NOW - span_ms)}".encode(), NOW, INTERVAL_MS,
                                max_points=points)  # fmt: skip
        assert q.step_ms == step, (span_ms, points)
        assert -(-span_ms // q.step_ms) <= points


# -- the recorder ------------------------------------------------------------------------


class Source:
    """A fake ``sample`` function over mutable per-topic samples."""

    def __init__(self) -> None:
        self.topics: dict[str, TopicSample] = {}
        self.fail: Exception | None = None
        self.calls = 0

    async def __call__(self) -> dict[str, TopicSample]:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        out = {name: TopicSample(**_fields(s)) for name, s in self.topics.items()}
        for s in self.topics.values():
            s.processing_ms = []  # handed out once, as the real source does
        return out


def _fields(s: TopicSample) -> dict[str, Any]:
    return {f: getattr(s, f) for f in s.__struct_fields__}


COUNTERS = ("produced", "consumed", "expired", "failed", "retried")


def totals(points: list[MetricPoint]) -> dict[str, dict[str, int]]:
    """Counter sums per topic over all points (robust to an interval boundary mid-test)."""
    out: dict[str, dict[str, int]] = {}
    for p in points:
        t = out.setdefault(p.topic, dict.fromkeys(COUNTERS, 0))
        for k in COUNTERS:
            t[k] += getattr(p, k)
    return out


def everything() -> tuple[int, int]:
    now = time.time_ns() // 1_000_000
    return now - DAY_MS, now + DAY_MS


def test_recorder_writes_deltas(tmp_path: Path) -> None:
    async def main() -> None:
        store = SqliteMeta(str(tmp_path))
        await store.start()
        src = Source()
        rec = HistoryRecorder(store, src, interval_s=3600, worker="w1")
        try:
            src.topics["a"] = TopicSample(produced=100, consumed=50, processing_ms=[1.0])
            await rec.record_now()  # baseline only
            assert await store.query_points(*everything(), None) == []

            a = src.topics["a"]
            a.produced, a.consumed, a.failed, a.retried, a.expired = 110, 60, 2, 3, 1
            a.queue_size, a.dead_letter_size = 40, 2
            a.active_consumers, a.total_consumers = 1, 2
            a.processing_ms = [float(v) for v in range(100, 0, -1)]
            src.topics["b"] = TopicSample(produced=5)  # new since the baseline: counts from 0
            await rec.record_now()

            got = await store.query_points(*everything(), None)
            assert totals(got) == {
                "a": {"produced": 10, "consumed": 10, "expired": 1, "failed": 2, "retried": 3},
                "b": {"produced": 5, "consumed": 0, "expired": 0, "failed": 0, "retried": 0},
            }
            [pa] = [p for p in got if p.topic == "a"]
            assert pa.interval_s == 3600
            assert parse_rfc3339(pa.time) % (3600 * 1000) == 0  # labelled with its interval
            assert (pa.queue_size, pa.dead_letter_size) == (40, 2)
            assert (pa.active_consumers, pa.total_consumers) == (1, 2)
            assert pa.processing_avg_ms == pytest.approx(50.5)
            assert (pa.processing_p95_ms, pa.processing_p99_ms) == (95.0, 99.0)
            assert pa.error_rate == pytest.approx(0.2)
            assert pa.retry_rate == pytest.approx(0.3)

            # A counter that went down is a restart: the new value is the delta.
            a.produced = 4
            a.consumed = 61
            src.topics["b"].produced = 5
            await rec.record_now()
            got = await store.query_points(*everything(), None)
            assert totals(got)["a"]["produced"] == 14
            assert totals(got)["a"]["consumed"] == 11
            assert totals(got)["b"]["produced"] == 5

            # A topic that is missing from one sample is remembered, not counted twice.
            del src.topics["b"]
            await rec.record_now()
            src.topics["b"] = TopicSample(produced=6)
            await rec.record_now()
            assert totals(await store.query_points(*everything(), None))["b"]["produced"] == 6
        finally:
            await rec.stop()
            await store.close()

    run(main())


def test_two_workers_are_aggregated(tmp_path: Path) -> None:
    async def main() -> None:
        s1, s2 = SqliteMeta(str(tmp_path)), SqliteMeta(str(tmp_path))
        await s1.start()
        await s2.start()
        src1, src2 = Source(), Source()
        r1 = HistoryRecorder(s1, src1, interval_s=3600, worker="w1")
        r2 = HistoryRecorder(s2, src2, interval_s=3600, worker="w2")
        try:
            src1.topics["t"] = TopicSample()
            src2.topics["t"] = TopicSample(produced=1000)  # a worker that has been up longer
            await r1.record_now()
            await r2.record_now()
            src1.topics["t"] = TopicSample(produced=3, queue_size=7)
            src2.topics["t"] = TopicSample(produced=1004, queue_size=9)
            await r1.record_now()
            await r2.record_now()
            got = await s1.query_points(*everything(), "t")
            assert sum(p.produced for p in got) == 7
            assert max(p.queue_size for p in got) == 9
        finally:
            await s1.close()
            await s2.close()

    run(main())


def test_recorder_loop_ticks_on_interval_boundaries(tmp_path: Path) -> None:
    async def main() -> None:
        store = SqliteMeta(str(tmp_path))
        await store.start()
        src = Source()
        src.topics["t"] = TopicSample()
        rec = HistoryRecorder(store, src, interval_s=0.05, worker="w1")
        rec.start()
        rec.start()  # idempotent
        try:
            while not await store.query_points(*everything(), None):
                src.topics["t"].produced += 1
                await asyncio.sleep(0.01)
            while src.calls < 4:
                await asyncio.sleep(0.01)
        finally:
            await rec.stop()
            await rec.stop()
        produced_so_far = src.topics["t"].produced
        got = await store.query_points(*everything(), None)
        assert got
        for p in got:
            assert parse_rfc3339(p.time) % 50 == 0
            assert p.interval_s == 0.05
        assert [p.time for p in got] == sorted({p.time for p in got})  # one point per interval
        assert sum(p.produced for p in got) <= produced_so_far
        await store.close()

    run(main())


class FlakyStore:
    """Records points like a store, failing while ``fail`` is set."""

    def __init__(self) -> None:
        self.fail = False
        self.recorded: list[tuple[list[MetricPoint], str]] = []

    async def record_points(self, points: list[MetricPoint], worker: str) -> None:
        if self.fail:
            raise OSError("disk on fire")
        self.recorded.append((points, worker))


def test_recorder_survives_failures_and_logs_once_per_streak(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        store = FlakyStore()
        src = Source()
        rec = HistoryRecorder(store, src, interval_s=60, worker="w9")  # type: ignore[arg-type]
        src.topics["t"] = TopicSample(produced=1)
        await rec.record_now()  # baseline

        src.fail = RuntimeError("sampling broke")
        src.topics["t"].produced = 3
        await rec.record_now()
        await rec.record_now()
        errors = [r for r in caplog.records if r.name == "mqfast.history"]
        assert [r.levelno for r in errors] == [logging.ERROR]
        assert errors[0].exc_info is not None

        # A failed sample leaves the baseline alone: the next delta covers both intervals.
        src.fail = None
        await rec.record_now()
        [(points, worker)] = store.recorded
        assert worker == "w9"
        assert [(p.topic, p.produced) for p in points] == [("t", 2)]
        assert [r.levelno for r in caplog.records if r.name == "mqfast.history"] == [
            logging.ERROR,
            logging.INFO,
        ]

        # A failed write is logged (once more: a new streak) and the recorder goes on.
        store.fail = True
        src.topics["t"].produced = 10
        await rec.record_now()
        await rec.record_now()
        store.fail = False
        src.topics["t"].produced = 11
        await rec.record_now()
        assert [p.produced for p in store.recorded[-1][0]] == [1]
        levels = [r.levelno for r in caplog.records if r.name == "mqfast.history"]
        assert levels == [logging.ERROR, logging.INFO, logging.ERROR, logging.INFO]

    with caplog.at_level(logging.INFO, logger="mqfast.history"):
        run(main())


def test_recorder_loop_keeps_going_after_a_failure(tmp_path: Path) -> None:
    async def main() -> None:
        store = SqliteMeta(str(tmp_path))
        await store.start()
        src = Source()
        src.topics["t"] = TopicSample()
        src.fail = RuntimeError("boom")
        rec = HistoryRecorder(store, src, interval_s=0.02, worker="w1")
        rec.start()
        try:
            while src.calls < 3:
                await asyncio.sleep(0.01)
            src.fail = None
            while not await store.query_points(*everything(), None):
                src.topics["t"].produced += 1
                await asyncio.sleep(0.01)
        finally:
            await rec.stop()
            await store.close()

    run(main())


def test_interval_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        HistoryRecorder(SqliteMeta(str(tmp_path)), Source(), interval_s=0, worker="w")


def test_points_of_a_step_are_aggregated_by_kind(tmp_path: Path) -> None:
    def point(ts: int, **values: Any) -> MetricPoint:
        return MetricPoint(time=format_rfc3339(ts), topic="t", interval_s=10.0, **values)

    async def main() -> None:
        store = SqliteMeta(str(tmp_path))
        await store.start()
        try:
            # Recent (older history is pruned on write), on a whole hour.
            hour = time.time_ns() // 1_000_000 // HOUR_MS * HOUR_MS - HOUR_MS
            minute = hour + 60_000
            w1 = [
                point(minute, produced=3, consumed=2, failed=1, queue_size=5,
                      processing_avg_ms=10.0, processing_p99_ms=40.0, active_consumers=1),
                point(minute + 10_000, produced=4, consumed=6, retried=3, queue_size=9,
                      processing_avg_ms=30.0, processing_p99_ms=90.0, active_consumers=2),
                point(minute + 60_000, produced=100),  # the next minute
            ]  # fmt: skip
            w2 = [point(minute + 50_000, produced=1, consumed=0, queue_size=7,
                        processing_p99_ms=20.0, dead_letter_size=4)]  # fmt: skip
            await store.record_points(w1, "w1")
            await store.record_points(w2, "w2")
            got = await store.query_points(hour, hour + HOUR_MS, "t", step_ms=60_000)
            assert [p.time for p in got] == [
                format_rfc3339(minute),
                format_rfc3339(minute + 60_000),
            ]
            p = got[0]
            assert p.interval_s == 60
            assert (p.produced, p.consumed, p.failed, p.retried) == (8, 8, 1, 3)  # sums
            assert (p.queue_size, p.dead_letter_size, p.active_consumers) == (9, 4, 2)  # max
            assert p.processing_avg_ms == pytest.approx((10.0 * 2 + 30.0 * 6) / 8)  # weighted
            assert p.processing_p99_ms == 90.0  # the max: an upper bound
            assert (p.error_rate, p.retry_rate) == (1 / 8, 3 / 8)
            assert got[1].produced == 100
            # Without a step, one point per recorded interval as before.
            assert len(await store.query_points(hour, hour + HOUR_MS, "t")) == 4
        finally:
            await store.close()

    run(main())
