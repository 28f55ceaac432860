"""Client-side throughput of mqfast.client: the batching producer and the consume+ack loop.

What it measures, against any mqfast URL (start the server pinned, e.g. ``taskset -c 0``, and
this process on another core):

1. ``produce``: ``--messages`` messages of ``--size`` bytes sent one by one through
   ``AsyncProducer.send`` / ``Producer.send`` (batches of ``--produce-batch``, 5 ms linger,
   ``--in-flight`` batches outstanding), until every future has its result. Beside it
   ``raw``: the same messages as sequential batches of 1,000 over one connection by
   ``bench/consume.py``'s minimal client.
2. ``consume``: a pre-filled topic (not timed) drained by ``--consumers`` consumers of one
   group, each looping ``poll(--batch)`` and ``ack`` of every message (sent as one batch
   acknowledge before the next poll), asyncio (``AsyncConsumer``) and blocking (``Consumer``,
   one thread each); beside it ``raw``: ``bench/consume.py``'s consumer loop, the same load.

How to read it: msg/s are end to end and bounded by the server; compare each client row
with its ``raw`` row of the same round (rounds alternate the order). ``client_cpu_us_per_msg``
is this process's CPU time per message (the client's cost): as long as it is well below the
server's, the client is not the bottleneck.
Run: ``.venv/bin/python bench/client.py --url http://127.0.0.1:8087`` (``--json`` to save).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
import consume as raw  # bench/consume.py: the minimal client, the reference
from mqfast.client import AsyncClient, Client


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def figure(n: int, wall: float, cpu_s: float) -> dict[str, Any]:
    return {
        "messages": n,
        "msg_per_s": round(n / wall),
        "client_cpu_us_per_msg": round(1e6 * cpu_s / n, 2),
    }


def timed(n: int, work: Callable[[], None]) -> dict[str, Any]:
    c0, t0 = cpu(), time.perf_counter()
    work()
    return figure(n, time.perf_counter() - t0, cpu() - c0)


async def atimed(n: int, work: Callable[[], Awaitable[None]]) -> dict[str, Any]:
    c0, t0 = cpu(), time.perf_counter()
    await work()
    return figure(n, time.perf_counter() - t0, cpu() - c0)


def new_topic(url: str, partitions: int) -> str:
    name = f"client-bench-{uuid.uuid4().hex[:8]}"
    with Client(url) as c:
        c.create_topic(name, partitions=partitions)
    return name


def hostport(url: str) -> tuple[str, int]:
    u = urlsplit(url)
    return u.hostname or "127.0.0.1", u.port or 80


def producer_options(args: argparse.Namespace) -> dict[str, int]:
    return {"batch_size": args.produce_batch, "max_in_flight": args.in_flight}


async def produce_async(args: argparse.Namespace, topic: str) -> dict[str, Any]:
    payload = "x" * args.size

    async def work() -> None:
        async with AsyncClient(args.url) as client:
            async with client.producer(topic, **producer_options(args)) as p:
                futures = [await p.send(payload) for _ in range(args.messages)]
            # close() returns once every result is in
            assert not [f for f in futures if f.exception() is not None]

    return await atimed(args.messages, work)


def produce_sync(args: argparse.Namespace, topic: str) -> dict[str, Any]:
    payload = "x" * args.size

    def work() -> None:
        with Client(args.url) as client:
            with client.producer(topic, **producer_options(args)) as p:
                futures = [p.send(payload) for _ in range(args.messages)]
            assert not [f for f in futures if f.exception() is not None]

    return timed(args.messages, work)


async def produce_raw(args: argparse.Namespace, topic: str) -> dict[str, Any]:
    return await atimed(
        args.messages, lambda: raw.fill(hostport(args.url), topic, args.messages, args.size)
    )


async def consume_async(args: argparse.Namespace, topic: str) -> dict[str, Any]:
    counts = [0]

    async def one(client: AsyncClient, i: int) -> None:
        async with client.consumer(topic, "bench", consumer_id=f"c{i}") as c:
            while messages := await c.poll(args.batch, timeout=0):
                for m in messages:
                    c.ack(m)
                counts[0] += len(messages)

    async def work() -> None:
        async with AsyncClient(args.url) as client:
            await asyncio.gather(*(one(client, i) for i in range(args.consumers)))

    result = await atimed(args.messages, work)
    assert counts[0] == args.messages, counts
    return result


def consume_sync(args: argparse.Namespace, topic: str) -> dict[str, Any]:
    counts = [0] * args.consumers

    def one(client: Client, i: int) -> None:
        with client.consumer(topic, "bench", consumer_id=f"c{i}") as c:
            while messages := c.poll(args.batch, timeout=0):
                for m in messages:
                    c.ack(m)
                counts[i] += len(messages)

    def work() -> None:
        with Client(args.url) as client:
            threads = [
                threading.Thread(target=one, args=(client, i)) for i in range(args.consumers)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    result = timed(args.messages, work)
    assert sum(counts) == args.messages, counts
    return result


async def consume_raw(args: argparse.Namespace, topic: str) -> dict[str, Any]:
    counts = [0]
    stop = asyncio.Event()
    url = hostport(args.url)

    async def work() -> None:
        await asyncio.gather(
            *(
                raw.consumer(url, topic, "bench", f"c{i}", args.batch, stop, counts, None, "0s")
                for i in range(args.consumers)
            )
        )

    result = await atimed(args.messages, work)
    assert counts[0] == args.messages, counts
    return result


async def filled(args: argparse.Namespace) -> str:
    topic = new_topic(args.url, args.partitions)
    await raw.fill(hostport(args.url), topic, args.messages, args.size)
    return topic


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = ["raw", "async", "sync"] if r % 2 == 0 else ["sync", "async", "raw"]
        produce: dict[str, Any] = {}
        consume: dict[str, Any] = {}
        for kind in order:
            topic = new_topic(args.url, args.partitions)
            if kind == "raw":
                produce[kind] = await produce_raw(args, topic)
            elif kind == "async":
                produce[kind] = await produce_async(args, topic)
            else:
                produce[kind] = await asyncio.to_thread(produce_sync, args, topic)
        for kind in order:
            topic = await filled(args)
            if kind == "raw":
                consume[kind] = await consume_raw(args, topic)
            elif kind == "async":
                consume[kind] = await consume_async(args, topic)
            else:
                consume[kind] = await asyncio.to_thread(consume_sync, args, topic)
        rounds.append({"order": order, "produce": produce, "consume": consume})
    return {
        "messages": args.messages,
        "size": args.size,
        "consumers": args.consumers,
        "batch": args.batch,
        "produce_batch": args.produce_batch,
        "in_flight": args.in_flight,
        "partitions": args.partitions,
        "rounds": rounds,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8087")
    ap.add_argument("--messages", type=int, default=50_000)
    ap.add_argument("--consumers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=100, help="messages per consume")
    ap.add_argument("--produce-batch", type=int, default=1000, help="messages per batch produce")
    ap.add_argument("--in-flight", type=int, default=1, help="producer batches outstanding")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--size", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
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
