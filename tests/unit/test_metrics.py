"""Prometheus exposition of a stats snapshot, and the side HTTP server that serves it."""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import uvloop
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from mqfast.api import App
from mqfast.config import Settings
from mqfast.debug import gc_stats, install_gc_monitor
from mqfast.groups import Unacked, now_ms
from mqfast.messages import GroupLag, TopicInfo
from mqfast.metrics import (
    Family,
    PodMetrics,
    build_registry,
    decode_families,
    encode_families,
    merge_families,
    start_metrics_server,
)
from mqfast.server import _ANSWER, _ASK, _Worker
from mqfast.side import Response, serve_side

BOUNDS = [5e-05, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
          0.5, 1.0, 2.5, 5.0, 10.0]  # fmt: skip
CONTRACT = [
    "message_queue_messages_produced",
    "message_queue_messages_failed",
    "message_queue_messages_consumed",
    "message_queue_produced_bytes",
    "message_queue_processing_latency_seconds",
    "message_queue_http_requests",
    "message_queue_http_connections",
    "message_queue_inflight_messages",
    "message_queue_engine_queue_depth",
    "message_queue_active_consumers",
]


def snapshot() -> dict[str, Any]:
    counts = [0] * 18
    counts[2], counts[4], counts[17] = 3, 5, 2  # two requests slower than 10 s
    return {
        "latency_buckets": BOUNDS,
        "routes": {
            "/api/v1/messages": {
                "method": "POST",
                "counts": counts,
                "sum_s": 21.5,
                "status": {"200": 9, "400": 1},
            },
            "/api/v1/topics/{name}": {
                "method": "GET",
                "counts": [0] * 18,
                "sum_s": 0.0,
                "status": {},
            },
        },
        "topics": {"user-events": {"produced": 9, "failed": 1, "bytes": 900}},
        "consumed": {("user-events", "group-a"): 4},
        "connections": 7,
        "inflight": 3,
        "engine_queue": 11,
    }


def families(text: str) -> dict[str, Metric]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fam: Metric, sample: str, **labels: str) -> float:
    for s in fam.samples:
        if s.name == sample and s.labels == labels:
            return float(s.value)
    raise AssertionError(f"no sample {sample}{labels} in {fam.samples}")


def test_exposition_of_full_snapshot() -> None:
    reg = build_registry(snapshot, lambda: {"active_consumers": 2, "retry-queue": 5})
    fams = families(generate_latest(reg).decode())
    for name in CONTRACT:
        assert name in fams, name

    t = {"topic": "user-events"}
    p = "message_queue_"
    assert value(fams[p + "messages_produced"], p + "messages_produced_total", **t) == 9
    assert value(fams[p + "messages_failed"], p + "messages_failed_total", **t) == 1
    assert value(fams[p + "produced_bytes"], p + "produced_bytes_total", **t) == 900
    consumed = fams[p + "messages_consumed"]
    assert value(consumed, p + "messages_consumed_total", topic="user-events", group="group-a") == 4
    reqs = fams[p + "http_requests"]
    r = {"route": "/api/v1/messages", "method": "POST"}
    assert value(reqs, p + "http_requests_total", code="200", **r) == 9
    assert value(reqs, p + "http_requests_total", code="400", **r) == 1
    assert value(fams[p + "http_connections"], p + "http_connections") == 7
    assert value(fams[p + "inflight_messages"], p + "inflight_messages") == 3
    assert value(fams[p + "engine_queue_depth"], p + "engine_queue_depth") == 11
    assert value(fams[p + "active_consumers"], p + "active_consumers") == 2
    assert value(fams[p + "retry_queue"], p + "retry_queue") == 5
    # The standard process/platform/GC collectors are registered too.
    assert "process_cpu_seconds" in fams
    assert "python_info" in fams
    assert "python_gc_objects_collected" in fams


def test_latency_histogram_is_cumulative() -> None:
    fams = families(generate_latest(build_registry(snapshot)).decode())
    hist = fams["message_queue_processing_latency_seconds"]
    assert hist.type == "histogram"
    name = "message_queue_processing_latency_seconds"
    r = {"route": "/api/v1/messages", "method": "POST"}
    buckets = [
        (float(s.labels["le"]), s.value)
        for s in hist.samples
        if s.name == name + "_bucket" and s.labels["route"] == r["route"]
    ]
    assert [b for b, _ in buckets] == [*BOUNDS, float("inf")]
    got = dict(buckets)
    assert got[0.0001] == 0
    assert got[0.00025] == 3
    assert got[0.001] == 8
    assert got[10.0] == 8
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    count = value(hist, name + "_count", **r)
    assert got[float("inf")] == count == 10
    assert value(hist, name + "_sum", **r) == 21.5
    empty = {"route": "/api/v1/topics/{name}", "method": "GET"}
    assert value(hist, name + "_count", **empty) == 0


def test_empty_snapshot_still_names_every_contract_metric() -> None:
    fams = families(generate_latest(build_registry(dict)).decode())
    for name in CONTRACT:
        assert name in fams, name
    assert value(fams["message_queue_active_consumers"], "message_queue_active_consumers") == 0
    assert value(fams["message_queue_http_connections"], "message_queue_http_connections") == 0


def test_levels_become_health_group_and_dead_letter_gauges() -> None:
    levels = {
        "status": "degraded",
        "checks": {"engine": True, "redis": False},
        "groups": [("slow", "orders", 7, 42.5), ("quick", "orders", 0, None)],
        "dead_letters": {"orders": 3},
    }
    fams = families(generate_latest(build_registry(snapshot, None, lambda: levels)).decode())
    p = "message_queue_"
    status = fams[p + "health_status"]
    assert {s.labels["status"]: s.value for s in status.samples} == {
        "ok": 0,
        "degraded": 1,
        "down": 0,
    }
    assert value(fams[p + "health_check_up"], p + "health_check_up", check="engine") == 1
    assert value(fams[p + "health_check_up"], p + "health_check_up", check="redis") == 0
    lag = fams[p + "consumer_group_lag"]
    assert value(lag, p + "consumer_group_lag", group="slow", topic="orders") == 7
    assert value(lag, p + "consumer_group_lag", group="quick", topic="orders") == 0
    age = fams[p + "oldest_unacked_age_seconds"]
    # A group with nothing unacknowledged has no age series (not a misleading 0).
    assert [s.labels for s in age.samples] == [{"group": "slow", "topic": "orders"}]
    assert value(age, p + "oldest_unacked_age_seconds", group="slow", topic="orders") == 42.5
    assert value(fams[p + "dead_letter_messages"], p + "dead_letter_messages", topic="orders") == 3


class DownSink:
    name = "embedded"

    def health(self) -> dict[str, object]:
        return {"status": "down", "engine": self.name, "detail": "disk full"}


def topic_info(name: str, messages: int, lags: dict[str, int]) -> TopicInfo:
    groups = [GroupLag(g, n) for g, n in lags.items()]
    return TopicInfo(name, 1, 1, 0, 0, 0, False, messages, 0, [], groups)


def test_app_levels_come_from_the_sampler_and_the_health_checks_at_scrape_time() -> None:
    app = App(Settings.from_env({}), DownSink())  # type: ignore[arg-type]
    app.dependencies["redis"] = lambda: {"status": "down"}
    now = now_ms()
    infos = {
        "orders": topic_info("orders", 9, {"slow": 7, "quick": 0}),
        "orders.dlq": topic_info("orders.dlq", 2, {}),
    }
    app.note_group_health(infos, [Unacked("slow", "orders", now - 5_000, 0)], now)
    fams = families(generate_latest(build_registry(dict, None, app.metric_levels)).decode())
    p = "message_queue_"
    assert value(fams[p + "health_status"], p + "health_status", status="down") == 1
    # The embedded engine's not_used postgres/redis/kafka entries are no checks.
    up = {s.labels["check"]: s.value for s in fams[p + "health_check_up"].samples}
    assert up == {"engine": 0, "redis": 0}
    lag = fams[p + "consumer_group_lag"]
    assert value(lag, p + "consumer_group_lag", group="slow", topic="orders") == 7
    assert value(lag, p + "consumer_group_lag", group="quick", topic="orders") == 0
    age = value(fams[p + "oldest_unacked_age_seconds"], p + "oldest_unacked_age_seconds",
                group="slow", topic="orders")  # fmt: skip
    assert age >= 5.0  # measured at the scrape, from the lease time, not frozen at the sample
    dead = fams[p + "dead_letter_messages"]
    assert [(s.labels, s.value) for s in dead.samples] == [({"topic": "orders"}, 2)]


def test_gc_pause_counters_only_grow_across_a_debug_reset() -> None:
    reg = build_registry(dict)
    p = "message_queue_"

    def pauses() -> tuple[float, float]:
        fams = families(generate_latest(reg).decode())
        return (
            value(fams[p + "gc_pauses"], p + "gc_pauses_total"),
            value(fams[p + "gc_pause_seconds"], p + "gc_pause_seconds_total"),
        )

    install_gc_monitor()
    gc.collect()
    count, seconds = pauses()
    assert count >= 1 and seconds > 0
    gc_stats(reset=True)  # what GET /debug/gc?reset=1 does, for a benchmark's window
    gc.collect()
    later, later_s = pauses()
    assert later >= count + 1 and later_s > seconds
    assert gc_stats()["pauses"] < later


async def request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split(" ")[1]), headers, body


def get(port: int, path: str, method: str = "GET") -> Awaitable[tuple[int, dict[str, str], bytes]]:
    return request(port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def port_of(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    uvloop.run(main())


def test_metrics_server_over_http() -> None:
    async def main() -> None:
        server = await start_metrics_server("127.0.0.1", 0, build_registry(snapshot))
        try:
            port = port_of(server)
            status, headers, body = await get(port, "/metrics")
            assert status == 200
            assert headers["content-type"].startswith("text/plain; version=0.0.4")
            assert int(headers["content-length"]) == len(body)
            fams = families(body.decode())
            assert "message_queue_messages_produced" in fams
            status, _, _ = await get(port, "/nope")
            assert status == 404
            status, headers, _ = await get(port, "/metrics", method="POST")
            assert status == 405
            assert headers["allow"] == "GET, HEAD"
        finally:
            server.close()
            await server.wait_closed()

    run(main)


def test_side_server_errors_and_query() -> None:
    seen: list[dict[str, str]] = []

    async def echo(query: dict[str, str]) -> Response:
        seen.append(query)
        return 200, "text/plain", b"ok"

    async def broken(query: dict[str, str]) -> Response:
        raise RuntimeError("handler bug")

    async def main() -> None:
        server = await serve_side("127.0.0.1", 0, {"/e": echo, "/b": broken}, name="test")
        try:
            port = port_of(server)
            status, _, body = await get(port, "/e?a=1&b=two&a=3")
            assert (status, body) == (200, b"ok")
            assert seen == [{"a": "3", "b": "two"}]
            status, _, body = await get(port, "/b")
            assert status == 500
            assert b'"code":"internal"' in body
            status, _, _ = await request(port, b"garbage\r\n\r\n")
            assert status == 400
            status, _, _ = await request(port, b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000)
            assert status == 431
        finally:
            server.close()
            await server.wait_closed()

    run(main)


# ---- one endpoint for several workers --------------------------------------------------------


def worker_families(produced: float, latency: list[int], status: str, up: bool) -> list[Family]:
    """What build_registry's collectors send for one worker (process collector included)."""
    snap = snapshot()
    snap["topics"] = {"orders": {"produced": produced, "failed": 0, "bytes": 10 * produced}}
    snap["routes"]["/api/v1/messages"]["counts"] = latency + [0] * (18 - len(latency))
    snap["routes"]["/api/v1/messages"]["sum_s"] = 0.001 * sum(latency)
    snap["connections"] = produced  # any per-worker figure
    levels = {"status": status, "checks": {"engine": up}, "groups": [("g", "orders", 7, 2.0)]}
    registry = build_registry(lambda: snap, lambda: {"quota_subjects": 3.0}, lambda: levels)
    return decode_families(encode_families(registry))


def by_name(families: list[Family]) -> dict[str, list[tuple[dict[str, str], float]]]:
    return {f[0]: [(labels, v) for _, labels, v in f[4]] for f in families}


def test_workers_counters_and_histograms_are_summed_and_gauges_follow_their_rule() -> None:
    a = worker_families(3, [1, 2], "ok", True)
    b = worker_families(4, [0, 5, 1], "degraded", False)
    got = by_name(merge_families([("0", a), ("1", b)]))
    p = "message_queue_"
    assert got[p + "messages_produced"] == [({"topic": "orders"}, 7.0)]
    assert got[p + "produced_bytes"] == [({"topic": "orders"}, 70.0)]
    buckets = {labels["le"]: v for labels, v in got[p + "processing_latency_seconds"]
               if labels.get("route") == "/api/v1/messages" and "le" in labels}  # fmt: skip
    assert (buckets["5e-05"], buckets["0.0001"], buckets["0.00025"], buckets["+Inf"]) == (
        1, 8, 9, 9)  # fmt: skip
    assert got[p + "http_connections"] == [({"worker": "0"}, 3.0), ({"worker": "1"}, 4.0)]
    assert got[p + "inflight_messages"] == [({}, 6.0)]
    assert got[p + "consumer_group_lag"] == [({"group": "g", "topic": "orders"}, 7.0)]
    assert dict((labels["status"], v) for labels, v in got[p + "health_status"]) == {
        "ok": 0.0, "degraded": 1.0, "down": 0.0}  # fmt: skip
    assert got[p + "health_check_up"] == [({"check": "engine"}, 0.0)]
    # A gauge the rules do not name is kept per worker: neither sum nor max is always right.
    assert got[p + "quota_subjects"] == [({"worker": "0"}, 3.0), ({"worker": "1"}, 3.0)]
    assert {labels["worker"] for labels, _ in got["process_cpu_seconds"]} == {"0", "1"}
    assert got[p + "oldest_unacked_age_seconds"] == [({"group": "g", "topic": "orders"}, 2.0)]
    # Every family of the contract is still there with one exposition.
    for name in CONTRACT:
        assert name in got, name


def test_pod_totals_keep_a_retired_workers_counts_and_drop_its_gauges() -> None:
    pod = PodMetrics()
    pod.add(100, 0)
    pod.add(101, 1)
    pod.update(100, worker_families(3, [1], "ok", True))
    pod.update(101, worker_families(4, [2], "ok", True))
    p = "message_queue_"
    produced, count = p + "messages_produced_total", p + "processing_latency_seconds_count"
    first = samples_of(pod)
    assert (first[produced], first[count]) == ([({"topic": "orders"}, 7.0)], [(ROUTE, 3.0)])
    assert [w["worker"] for w, _ in first[p + "http_connections"]] == ["0", "1"]

    pod.retire(101)  # worker 1 exited; pid 102 replaces it and has counted nothing yet
    pod.update(101, worker_families(9, [9], "ok", True))  # a late answer from the dead one
    pod.add(102, 1)
    pod.restarts += 1
    after = samples_of(pod)
    assert (after[produced], after[count]) == (first[produced], first[count])
    assert after[p + "http_connections"] == [({"worker": "0"}, 3.0)]
    assert after[p + "worker_restarts_total"] == [({}, 1.0)]
    assert {w["worker"] for w, _ in after["process_resident_memory_bytes"]} == {"0", "supervisor"}

    pod.update(102, worker_families(2, [1], "ok", True))
    again = samples_of(pod)
    assert (again[produced], again[count]) == ([({"topic": "orders"}, 9.0)], [(ROUTE, 4.0)])


ROUTE = {"route": "/api/v1/messages", "method": "POST"}


def samples_of(pod: PodMetrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    registry = CollectorRegistry()
    registry.register(pod)
    text = generate_latest(registry).decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if "route" in s.labels and s.labels["route"] != ROUTE["route"]:
                continue
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_a_late_worker_answer_is_not_taken_for_the_next_scrape() -> None:
    async def main() -> None:
        ours, theirs = socket.socketpair()
        worker = _Worker(0, 1, ours)
        reader, writer = await asyncio.open_connection(sock=theirs)
        first = asyncio.ensure_future(worker.scrape(0.2))
        (seq1,) = _ASK.unpack(await reader.readexactly(_ASK.size))
        assert await first is None  # unanswered in time: the pod reports its previous answer
        second = asyncio.ensure_future(worker.scrape(10.0))
        (seq2,) = _ASK.unpack(await reader.readexactly(_ASK.size))
        writer.write(_ANSWER.pack(seq1, 4) + b"late" + _ANSWER.pack(seq2, 3) + b"now")
        assert await second == b"now"
        writer.close()  # the worker exited: no scrape waits for it any more
        await asyncio.sleep(0.05)
        assert await worker.scrape(10.0) is None
        worker.close()

    uvloop.run(main())
