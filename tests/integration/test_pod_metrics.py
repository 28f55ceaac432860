"""One metrics endpoint per pod: ``mqfast serve --workers 2`` answers one scrape of METRICS_ADDR
with every worker's counters and histograms summed (the supervisor asks each worker at scrape
time), keeps a killed worker's counts, and leaves ``--workers 1`` as it was."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.backends import services
from tests.conftest import MakeServer, MqfastProcess

PRODUCE = "/api/v1/messages"
CONSUME = "/api/v1/messages/consume"
ACK = "/api/v1/messages/acknowledge"
P = "message_queue_"
Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(srv: MqfastProcess) -> tuple[str, Samples, dict[str, str]]:
    """The exposition text, its samples by name, and each family's type (parsed by
    prometheus_client's parser, which raises on anything malformed)."""
    r = srv.request("GET", "/metrics", port=srv.metrics_port)
    assert r.status == 200, r.body
    text = r.body.decode()
    got: Samples = {}
    types: dict[str, str] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            got.setdefault(s.name, []).append((s.labels, s.value))
            types[s.name] = fam.type
    return text, got, types


def value(got: Samples, name: str, **labels: str) -> float:
    [v] = [v for have, v in got.get(name, []) if have == labels]
    return v


def per_worker(got: Samples, name: str) -> dict[str, float]:
    return {labels["worker"]: v for labels, v in got.get(name, [])}


def wait_for_workers(srv: MqfastProcess, n: int, timeout: float = 20.0) -> Samples:
    """A scrape once every one of the ``n`` workers answers in it."""
    deadline = time.monotonic() + timeout
    while True:
        _, got, _ = scrape(srv)
        started = per_worker(got, "process_start_time_seconds")
        if {str(i) for i in range(n)} <= set(started):
            return got
        assert time.monotonic() < deadline, f"workers never all answered: {started}"
        time.sleep(0.1)


def call(conn: http.client.HTTPConnection, method: str, path: str, body: Any) -> Any:
    conn.request(method, path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    assert r.status == 200, data
    return json.loads(data)


def connections(srv: MqfastProcess, n: int) -> list[http.client.HTTPConnection]:
    conns = [http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10) for _ in range(n)]
    for c in conns:
        c.connect()
    return conns


def produce(conns: list[http.client.HTTPConnection], topic: str, each: int) -> None:
    for i, c in enumerate(conns):
        for j in range(each):
            call(c, "POST", PRODUCE, {"topic": topic, "content": f"{i}-{j}"})


def worker_pids(srv: MqfastProcess) -> list[int]:
    assert srv.proc is not None
    children = Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read_text()
    return [int(p) for p in children.split()]


def test_one_scrape_sums_what_both_workers_counted(make_server: MakeServer) -> None:
    srv = make_server(MESSAGE_QUEUE_WORKERS="2")
    wait_for_workers(srv, 2)
    # Keep-alive connections stay with the worker that accepted them; the kernel spreads
    # them (SO_REUSEPORT). The open-connections gauge is per worker: it shows where they went.
    conns = connections(srv, 24)
    produce(conns, "pod", 5)
    _, got, _ = scrape(srv)
    open_by_worker = per_worker(got, P + "http_connections")
    assert set(open_by_worker) == {"0", "1"}, open_by_worker
    assert sum(open_by_worker.values()) == 24, open_by_worker
    assert all(n > 0 for n in open_by_worker.values()), f"one worker got none: {open_by_worker}"

    # Consume and acknowledge through every connection (at most 5 a call: 24 calls at least,
    # in turn), so both workers deliver and settle some.
    delivered: list[str] = []
    consumes = 0
    while len(delivered) < 120:
        c = conns[consumes % len(conns)]
        body = {"topic": "pod", "group_id": "g", "consumer_id": f"c{consumes % len(conns)}",
                "max_messages": 5, "timeout": "0s"}  # fmt: skip
        batch = call(c, "POST", CONSUME, body)["messages"]
        consumes += 1
        for m in batch:
            call(c, "POST", ACK, {"message_id": m["message_id"], "group_id": "g", "success": True})
            delivered.append(m["message_id"])
        assert consumes < 500, f"only {len(delivered)} of 120 delivered"
    assert len(set(delivered)) == 120
    for c in conns:
        c.close()

    text, got, _ = scrape(srv)
    assert value(got, P + "messages_produced_total", topic="pod") == 120
    assert value(got, P + "produced_bytes_total", topic="pod") == sum(
        len(f"{i}-{j}") for i in range(24) for j in range(5)
    )
    assert value(got, P + "messages_consumed_total", topic="pod", group="g") == 120
    route = {"route": PRODUCE, "method": "POST"}
    assert value(got, P + "processing_latency_seconds_count", **route) == 120
    assert value(got, P + "processing_latency_seconds_bucket", **route, le="+Inf") == 120
    assert value(got, P + "http_requests_total", **route, code="200") == 120
    consume_route = {"route": CONSUME, "method": "POST"}
    assert value(got, P + "processing_latency_seconds_count", **consume_route) == consumes
    assert value(got, P + "http_requests_total", **consume_route, code="200") == consumes
    ack_route = {"route": ACK, "method": "POST"}
    assert value(got, P + "http_requests_total", **ack_route, code="200") == 120
    # The buckets stay cumulative after the sum, and the sum of latencies is a sum too.
    buckets = [v for labels, v in got[P + "processing_latency_seconds_bucket"]
               if labels["route"] == PRODUCE]  # fmt: skip
    assert buckets == sorted(buckets)
    assert 0 < value(got, P + "processing_latency_seconds_sum", **route) < 120 * 10

    # One series where workers read the same thing or add up; per worker where they differ.
    assert [labels for labels, _ in got[P + "inflight_messages"]] == [{}]
    assert [labels for labels, _ in got[P + "active_consumers"]] == [{}]
    assert sum(v for _, v in got[P + "health_status"]) == 1
    assert set(per_worker(got, "process_resident_memory_bytes")) == {"0", "1", "supervisor"}
    assert value(got, P + "worker_restarts_total") == 0
    assert all("worker" not in labels for labels, _ in got[P + "messages_produced_total"])

    r = subprocess.run(
        [str(services.promtool()), "check", "metrics"],
        input=text, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r
    assert srv.stop() == 0, srv.logs()[-3000:]


def test_a_killed_worker_does_not_take_the_pods_counts_with_it(make_server: MakeServer) -> None:
    srv = make_server(MESSAGE_QUEUE_WORKERS="2")
    wait_for_workers(srv, 2)
    conns = connections(srv, 16)
    produce(conns, "restart", 5)
    for c in conns:
        c.close()
    _, before, types = scrape(srv)
    assert value(before, P + "messages_produced_total", topic="restart") == 80
    started = per_worker(before, "process_start_time_seconds")

    victim = worker_pids(srv)[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        after = wait_for_workers(srv, 2)
        if value(after, P + "worker_restarts_total") == 1 and victim not in worker_pids(srv):
            restarted = per_worker(after, "process_start_time_seconds")
            if restarted.keys() == started.keys() and restarted != started:
                break
        assert time.monotonic() < deadline, "the killed worker was not restarted"
        time.sleep(0.1)

    # Every pod-wide counter and histogram series is where it was, or further: what the
    # killed worker had counted (as of the last scrape) stays in the totals. Its own series
    # (worker="...") start again from zero, beside a new process_start_time_seconds: a
    # standard counter reset of that series.
    for name, series in before.items():
        if types[name] not in ("counter", "histogram"):
            continue
        now = {tuple(sorted(labels.items())): v for labels, v in after[name]}
        for labels, v in series:
            if "worker" in labels:
                continue
            key = tuple(sorted(labels.items()))
            assert now[key] >= v, f"{name}{labels} went from {v} back to {now[key]}"
    assert value(after, P + "messages_produced_total", topic="restart") == 80
    route = {"route": PRODUCE, "method": "POST"}
    assert value(after, P + "processing_latency_seconds_count", **route) == 80

    conns = connections(srv, 16)
    produce(conns, "restart", 5)
    _, got, _ = scrape(srv)
    assert all(n > 0 for n in per_worker(got, P + "http_connections").values()), got
    for c in conns:
        c.close()
    assert value(got, P + "messages_produced_total", topic="restart") == 160
    assert value(got, P + "processing_latency_seconds_count", **route) == 160
    assert srv.stop() == 0, srv.logs()[-3000:]


def test_one_worker_serves_its_own_metrics_as_before(make_server: MakeServer) -> None:
    srv = make_server()
    conns = connections(srv, 2)
    produce(conns, "single", 3)
    for c in conns:
        c.close()
    _, got, _ = scrape(srv)
    assert value(got, P + "messages_produced_total", topic="single") == 6
    assert all("worker" not in labels for series in got.values() for labels, _ in series)
    assert P + "worker_restarts_total" not in got
    assert [labels for labels, _ in got["process_start_time_seconds"]] == [{}]
