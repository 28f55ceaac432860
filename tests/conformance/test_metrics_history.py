"""``GET /api/v1/metrics``: per-interval points recorded every MESSAGE_QUEUE_METRICS_INTERVAL."""

from __future__ import annotations

import datetime as dt
from typing import Any
from urllib.parse import quote

from tests.conformance.conftest import DELIVERY_LIMIT, Gateway, now_ms, wait_for

POINT_FIELDS = {
    "time",
    "topic",
    "interval_s",
    "produced",
    "consumed",
    "expired",
    "failed",
    "retried",
    "queue_size",
    "dead_letter_size",
    "processing_avg_ms",
    "processing_p95_ms",
    "processing_p99_ms",
    "active_consumers",
    "total_consumers",
    "error_rate",
    "retry_rate",
}


def rfc3339(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat().replace("+00:00", "Z")


def history(gw: Gateway, start_ms: int, end_ms: int, topic: str | None = None) -> Any:
    q = f"start_time={quote(rfc3339(start_ms))}&end_time={quote(rfc3339(end_ms))}"
    if topic is not None:
        q += f"&topic={topic}"
    return gw.ok("GET", f"/api/v1/metrics?{q}")


def totals(points: list[dict[str, Any]], field: str) -> float:
    return sum(p[field] for p in points)


def test_history_records_per_interval_points(engine_server: Gateway) -> None:
    gw = engine_server
    start = now_ms() - 2000
    t = gw.topic()
    brief = gw.produce(t, "brief", ttl="100ms")
    wait_for(lambda: now_ms() > brief["timestamp"] + 200, what="expiry")
    gw.produce_many(t, 4)
    msgs = gw.consume_until(t, "g", "c1", 4)
    for m in msgs[:3]:
        gw.ack(m["message_id"], "g")
    # the fourth fails until it is dead-lettered
    m = msgs[3]
    for _ in range(DELIVERY_LIMIT - 1):
        gw.nack(m["message_id"], "g", error="bad")
        [m] = gw.consume(t, "g", "c1", timeout="10s")
    assert gw.nack(m["message_id"], "g")["status"] == "dead_lettered"
    assert gw.consume(t, "g", "c1", timeout="300ms") == []

    def enough() -> list[dict[str, Any]] | None:
        pts: list[dict[str, Any]] = history(gw, start, now_ms() + 2000, t)["points"]
        ok = (
            totals(pts, "produced") >= 5
            and totals(pts, "consumed") >= 4 + DELIVERY_LIMIT - 1
            and totals(pts, "failed") >= DELIVERY_LIMIT
            and totals(pts, "expired") >= 1
            and totals(pts, "retried") >= DELIVERY_LIMIT - 1
            and any(p["dead_letter_size"] >= 1 for p in pts)
            and any(p["processing_avg_ms"] > 0 or p["consumed"] for p in pts)
        )
        return pts if ok else None

    pts = wait_for(enough, timeout=20, every=0.5, what="metric points")
    assert totals(pts, "produced") == 5
    assert totals(pts, "consumed") == 4 + DELIVERY_LIMIT - 1
    for p in pts:
        assert POINT_FIELDS <= set(p), set(p) ^ POINT_FIELDS
        assert p["topic"] == t
        assert p["interval_s"] == 1
        dt.datetime.fromisoformat(p["time"].replace("Z", "+00:00"))
        if p["consumed"]:
            assert p["error_rate"] == p["failed"] / p["consumed"]
            assert p["retry_rate"] == p["retried"] / p["consumed"]
        assert p["processing_p99_ms"] >= p["processing_p95_ms"] >= 0
    times = [p["time"] for p in pts]
    assert len(times) == len(set(times)), "one point per interval and topic"
    # the last point shows the backlog gone: queue size 0, one dead letter
    wait_for(
        lambda: (
            (q := history(gw, start, now_ms() + 2000, t)["points"])
            and q[-1]["queue_size"] == 0
            and q[-1]["dead_letter_size"] == 1
        ),
        timeout=15,
        every=0.5,
        what="queue_size 0 and dead_letter_size 1",
    )
    # without a topic filter the points of every topic come back
    every = history(gw, start, now_ms() + 2000)["points"]
    assert t in {p["topic"] for p in every}


def test_history_bounds_are_validated(engine_server: Gateway) -> None:
    gw = engine_server
    now = now_ms()
    cases = [
        f"start_time={quote(rfc3339(now))}&end_time={quote(rfc3339(now - 60_000))}",
        "start_time=yesterday",
        "end_time=2024-13-01T00:00:00Z",
        "step=60",  # 60 ns: below the recording interval
        "step=soon",
        "start_time=2024-01-01T00:00:00Z&start_time=2024-01-01T00:00:00Z",
        "bogus=1",
        "topic=bad%20name",
    ]
    for q in cases:
        r = gw.call("GET", f"/api/v1/metrics?{q}")
        assert r.status == 400, (q, r.status, r.body)
    out = gw.ok("GET", "/api/v1/metrics")
    assert isinstance(out["points"], list)


def test_history_counts_the_produces_of_a_topic_deleted_and_created_again(
    engine_server: Gateway,
) -> None:
    gw = engine_server
    start = now_ms() - 2000
    t = gw.topic()
    gw.produce_many(t, 5)

    def produced() -> float:
        return totals(history(gw, start, now_ms() + 2000, t)["points"], "produced")

    wait_for(lambda: produced() == 5, timeout=20, every=0.5, what="the first 5 in the history")
    gw.ok("DELETE", f"/api/v1/topics/{t}")
    gw.ok("POST", "/api/v1/topics", {"name": t, "partitions": 1}, status=201)
    # As many or more than before, within one interval: a counter that restarted from zero
    # without the history knowing it reads as "nothing new".
    gw.produce_many(t, 7)
    wait_for(lambda: produced() == 12, timeout=20, every=0.5, what="all 12 in the history")
    assert gw.metric("message_queue_messages_produced_total", topic=t) == 12


def test_history_answers_any_range_with_a_step(engine_server: Gateway) -> None:
    gw = engine_server
    start = now_ms() - 2000
    t = gw.topic()
    gw.produce_many(t, 2)

    def points() -> list[dict[str, Any]]:
        pts: list[dict[str, Any]] = history(gw, start, now_ms() + 2000, t)["points"]
        return pts

    def spread() -> list[dict[str, Any]] | None:
        pts = points()
        return pts if len(pts) >= 2 and totals(pts, "produced") == 5 else None

    wait_for(lambda: totals(points(), "produced") == 2, timeout=20, every=0.5, what="2")
    gw.produce_many(t, 3)
    raw = wait_for(spread, timeout=20, every=0.5, what="5 produced over two intervals or more")
    end = now_ms() + 2000
    q = f"start_time={quote(rfc3339(start))}&end_time={quote(rfc3339(end))}&topic={t}"
    hourly = gw.ok("GET", f"/api/v1/metrics?{q}&step=1h")
    assert hourly["step_s"] == 3600 and hourly["interval_s"] == 1
    assert 1 <= len(hourly["points"]) <= 2  # an hour boundary may fall inside the test
    assert totals(hourly["points"], "produced") == 5
    assert all(p["interval_s"] == 3600 for p in hourly["points"])
    assert max(p["queue_size"] for p in hourly["points"]) == max(p["queue_size"] for p in raw)
    assert hourly["aggregation"]["percentiles"].startswith("max")

    # 90 days at once: the step is chosen so that the answer holds at most 1,000 points.
    ninety = now_ms() - 90 * 86_400_000
    q = f"start_time={quote(rfc3339(ninety))}&end_time={quote(rfc3339(end))}&topic={t}"
    out = gw.ok("GET", f"/api/v1/metrics?{q}")
    assert out["step_s"] >= (end - ninety) / 1000 / 1000
    assert out["step_s"] % out["interval_s"] == 0
    assert totals(out["points"], "produced") == 5
