"""Consume + acknowledge throughput, and the latency from produce to first delivery.

What it measures, against any mqfast URL (start the server pinned, e.g. ``taskset -c 0``):

1. ``throughput``: the topic is pre-filled with ``--messages`` messages (batch produce, not
   timed); then ``--consumers`` consumers of one group each loop: consume up to ``--batch``
   messages, acknowledge them all with one batch acknowledge. The figure is messages consumed
   *and* acknowledged per second, end to end over HTTP, until the backlog is empty.
2. ``latency``: a producer sends single messages at ``--rate`` per second while the consumers
   long-poll; for each message, the time from its produce timestamp (the gateway's clock, in
   the produce answer) to the moment a consumer received it. HDR histogram, p50/p99/max.

How to read it: throughput is bounded by the engine's lease/ack transactions; latency shows
how fast a long-poll is woken by a produce. Both should be read with the server's CPU pinned.
Run: ``.venv/bin/python bench/consume.py --url http://127.0.0.1:8087`` (``--json`` to save).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import msgspec
import uvloop
from hdrh.histogram import HdrHistogram

_decoder = msgspec.json.Decoder()


class Client:
    """A minimal keep-alive HTTP/1.1 JSON client (one request at a time)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def call(self, path: str, body: Any) -> tuple[int, Any]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        raw = msgspec.json.encode(body)
        self.writer.write(
            b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(raw), raw)
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        data = await self.reader.readexactly(length)
        return status, _decoder.decode(data)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def fill(url: tuple[str, int], topic: str, n: int, size: int) -> None:
    c = Client(*url)
    payload = "x" * size
    for start in range(0, n, 1000):
        msgs = [{"content": payload, "key": f"k{i}"} for i in range(start, min(n, start + 1000))]
        status, body = await c.call("/api/v1/messages/batch", {"topic": topic, "messages": msgs})
        if status != 200:
            raise SystemExit(f"fill failed: {status} {body}")
    c.close()


async def consumer(
    url: tuple[str, int],
    topic: str,
    group: str,
    name: str,
    batch: int,
    stop: asyncio.Event,
    counts: list[int],
    seen: dict[str, float] | None,
    timeout: str,
) -> None:
    c = Client(*url)
    ask = {
        "topic": topic,
        "group_id": group,
        "consumer_id": name,
        "max_messages": batch,
        "timeout": timeout,
    }
    while not stop.is_set():
        status, body = await c.call("/api/v1/messages/consume", ask)
        if status != 200:
            raise SystemExit(f"consume failed: {status} {body}")
        msgs = body["messages"]
        if not msgs:
            if seen is None:
                stop.set()  # backlog drained
            continue
        if seen is not None:
            now = time.time() * 1000
            for m in msgs:
                seen.setdefault(m["message_id"], now)
        acks = [{"message_id": m["message_id"]} for m in msgs]
        status, res = await c.call(
            "/api/v1/messages/acknowledge/batch", {"group_id": group, "acks": acks}
        )
        if status != 200 or res["failed"]:
            raise SystemExit(f"ack failed: {status} {res}")
        counts[0] += len(msgs)
    c.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    u = urlsplit(args.url)
    url = (u.hostname or "127.0.0.1", u.port or 80)
    topic = f"consume-bench-{uuid.uuid4().hex[:8]}"
    c = Client(*url)
    status, body = await c.call("/api/v1/topics", {"name": topic, "partitions": args.partitions})
    if status not in (200, 201):
        raise SystemExit(f"topic create failed: {status} {body}")
    await fill(url, topic, args.messages, args.size)

    counts = [0]
    stop = asyncio.Event()
    t0 = time.perf_counter()
    await asyncio.gather(
        *(
            consumer(url, topic, "bench", f"c{i}", args.batch, stop, counts, None, "0s")
            for i in range(args.consumers)
        )
    )
    elapsed = time.perf_counter() - t0
    result: dict[str, Any] = {
        "topic": topic,
        "messages": counts[0],
        "consumers": args.consumers,
        "batch": args.batch,
        "partitions": args.partitions,
        "seconds": round(elapsed, 3),
        "consumed_and_acked_per_s": round(counts[0] / elapsed),
    }

    # latency: produce at a fixed rate to a fresh topic while consumers long-poll
    topic = f"consume-latency-{uuid.uuid4().hex[:8]}"
    status, body = await c.call("/api/v1/topics", {"name": topic, "partitions": args.partitions})
    if status not in (200, 201):
        raise SystemExit(f"topic create failed: {status} {body}")
    seen: dict[str, float] = {}
    produced: dict[str, int] = {}
    stop = asyncio.Event()
    lat_counts = [0]
    tasks = [
        asyncio.ensure_future(
            consumer(url, topic, "latency", f"l{i}", args.batch, stop, lat_counts, seen, "1s")
        )
        for i in range(args.consumers)
    ]
    await asyncio.sleep(0.2)
    interval = 1.0 / args.rate
    n = int(args.rate * args.latency_seconds)
    start = time.perf_counter()
    for i in range(n):
        delay = start + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        status, body = await c.call(
            "/api/v1/messages", {"topic": topic, "content": "x" * args.size}
        )
        if status == 200:
            produced[body["message_id"]] = body["timestamp"]
    deadline = time.perf_counter() + 5
    while len([m for m in produced if m in seen]) < len(produced):
        if time.perf_counter() > deadline:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    c.close()
    hist = HdrHistogram(1, 60_000_000, 3)
    for mid, ts in produced.items():
        if mid in seen:
            hist.record_value(max(1, int((seen[mid] - ts) * 1000)))
    result["latency"] = {
        "rate": args.rate,
        "messages": len(produced),
        "delivered": sum(1 for m in produced if m in seen),
        "p50_ms": hist.get_value_at_percentile(50) / 1000,
        "p99_ms": hist.get_value_at_percentile(99) / 1000,
        "max_ms": hist.get_max_value() / 1000,
    }
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8087")
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--consumers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--size", type=int, default=200)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--latency-seconds", type=float, default=5.0)
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args()
    host = urlsplit(args.url).hostname or ""
    if not (host.startswith("127.") or host in ("localhost", "::1")):
        print("refusing a non-loopback target", file=sys.stderr)
        return 2
    result = uvloop.run(run(args))
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
