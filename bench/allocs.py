"""Python memory blocks and garbage-collector work per produce request, in process.

What it measures: N single-message produce requests are fed as raw bytes through the compiled
HttpProtocol (fake transports, no sockets) into the real embedded engine (SQLite in a temp
directory), C connections at a time, each answered only after the engine's commit, exactly as
in the server. Around the measured part it reads:

- ``blocks/request``: the change of ``sys.getallocatedblocks()`` divided by N. Near zero means
  nothing is retained per request (no leak); it is the net count, not every transient block.
- ``gc-tracked allocations/request``: objects the cyclic collector had to track, counted by a
  ``gc.callbacks`` hook as the young generation's count at each collection (threshold 700)
  plus what is pending at the end, divided by N. Pooled objects (``Pending``, ``Delivery``)
  and msgspec ``gc=False`` structs are not tracked; this is what makes young collections.
- ``young collections per 10k requests`` and the longest collection pause.

How to read it: lower is better; compare before and after a hot-path change, same N and C.
Run: ``.venv/bin/python bench/allocs.py [--requests 50000] [--connections 64] [--batch 100]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
import time
from typing import Any

import uvloop

from mqfast._core import Server
from mqfast.api import ROUTES, App
from mqfast.config import Settings
from mqfast.messages import TopicConfig
from mqfast.sinks.embedded import EmbeddedSink


class Transport(asyncio.Transport):
    """Counts answers; keeps nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.answers = 0
        self.waiter: asyncio.Future[None] | None = None

    def write(self, data: Any) -> None:
        self.answers += bytes(data).count(b"HTTP/1.1 200")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class GcWatch:
    def __init__(self) -> None:
        self.collections = 0
        self.tracked = 0
        self.max_pause = 0.0
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            if info["generation"] == 0:
                self.collections += 1
                self.tracked += gc.get_count()[0]
        else:
            self.max_pause = max(self.max_pause, time.perf_counter() - self._t0)


async def run(n: int, conns: int, batch: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as d:
        settings = Settings.from_env({})
        sink = EmbeddedSink(d, retention_interval_s=0)
        app = App(settings, sink)
        core = Server(loop, sink, app, ROUTES, settings)
        app.attach(core)
        await sink.start()
        await sink.create_topic(TopicConfig("bench", 1, 1, 0, 0))
        core.set_topic("bench", 1)
        if batch:
            path = b"/api/v1/messages/batch"
            msgs = [{"content": "x" * 200, "key": f"k{i}"} for i in range(batch)]
            body = json.dumps({"topic": "bench", "messages": msgs}).encode()
        else:
            path = b"/api/v1/messages"
            body = json.dumps({"topic": "bench", "content": "x" * 200, "key": "k1"}).encode()
        request = (
            b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (path, len(body), body)
        )
        clients = []
        for _ in range(conns):
            proto = core.protocol()
            tr = Transport()
            proto.connection_made(tr)
            clients.append((proto, tr))

        async def client(proto: Any, tr: Transport, count: int) -> None:
            for _ in range(count):
                tr.waiter = loop.create_future()
                proto.data_received(request)
                await tr.waiter

        async def phase(total: int) -> None:
            per = total // conns
            await asyncio.gather(*(client(p, t, per) for p, t in clients))

        await phase(conns * 50)  # warm-up: caches, freelists, SQLite pages
        gc.collect()
        watch = GcWatch()
        gc.callbacks.append(watch)
        blocks0 = sys.getallocatedblocks()
        t0 = time.perf_counter()
        await phase(n)
        elapsed = time.perf_counter() - t0
        pending = gc.get_count()[0]
        blocks1 = sys.getallocatedblocks()
        gc.callbacks.remove(watch)
        done = (n // conns) * conns
        await sink.close(5.0)
    return {
        "requests": done,
        "requests_per_s": done / elapsed,
        "messages_per_s": done * max(batch, 1) / elapsed,
        "blocks_per_request": (blocks1 - blocks0) / done,
        "gc_tracked_per_request": (watch.tracked + pending) / done,
        "young_collections_per_10k": watch.collections * 10_000 / done,
        "max_gc_pause_ms": watch.max_pause * 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=50_000)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--batch", type=int, default=0, help="messages per batch request (0: single)")
    args = ap.parse_args()
    result = uvloop.run(run(args.requests, args.connections, args.batch))
    for k, v in result.items():
        print(f"{k:28s} {v:,.3f}")


if __name__ == "__main__":
    main()
