"""Durable storage for the plain baselines: mqfast's embedded engine, used the obvious way.

Not a benchmark by itself. ``fastapi_app.py`` and ``aiohttp_app.py`` store each produced message
through this module so that they pay for the same durability as mqfast (its embedded SQLite engine,
``EmbeddedSink``) and the comparison is about the HTTP layer only. It does what a user would: per
request one delivery object, one future, one single-delivery batch handed to ``sink.submit``, and
an ``await`` on the future. ``--store none`` answers as soon as the request is decoded (for
development while the engine is being written; figures taken that way say so).
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import Any

TOPIC = "bench"


class PlainDelivery:
    """What the engine reads (topic .. message_id) and fills in (offset or error)."""

    __slots__ = (
        "error",
        "expires_ms",
        "future",
        "headers",
        "key",
        "message_id",
        "offset",
        "partition",
        "priority",
        "timestamp_ms",
        "topic",
        "value",
    )

    def __init__(
        self, topic: str, key: bytes | None, value: bytes, future: asyncio.Future[None]
    ) -> None:
        self.topic = topic
        self.partition = 0
        self.key = key
        self.value = value
        self.headers: bytes | None = None
        self.priority = 0
        self.timestamp_ms = int(time.time() * 1000)
        self.expires_ms = 0
        self.message_id = str(uuid.uuid4())
        self.offset = -1
        self.error: Exception | None = None
        self.future = future


def _import_engine() -> tuple[Any, Any]:
    try:
        from mqfast.messages import TopicConfig
        from mqfast.sinks.embedded import EmbeddedSink
    except ImportError:
        # Running from a checkout without the package installed: use ../../src.
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
        from mqfast.messages import TopicConfig
        from mqfast.sinks.embedded import EmbeddedSink
    return EmbeddedSink, TopicConfig


class Store:
    """``await store.start()``, then ``await store.produce(topic, key, value)`` per request."""

    def __init__(self, kind: str, data_dir: str | None) -> None:
        if kind not in ("embedded", "none"):
            raise SystemExit(f"unknown --store {kind!r} (embedded | none)")
        if kind == "embedded" and not data_dir:
            raise SystemExit("--data-dir is required with --store embedded")
        self.kind = kind
        self.data_dir = data_dir
        self.sink: Any = None
        self.topics: set[str] = set()

    async def start(self) -> None:
        if self.kind == "none":
            self.topics.add(TOPIC)
            return
        embedded_sink, _ = _import_engine()
        assert self.data_dir is not None
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        self.sink = embedded_sink(self.data_dir, fsync=False)
        self.sink.bind(asyncio.get_running_loop(), self._on_done)
        await self.sink.start()
        await self.create_topic(TOPIC)

    async def close(self) -> None:
        if self.sink is not None:
            await self.sink.close(5.0)

    async def create_topic(self, name: str) -> bool:
        """Create ``name`` with one partition; True when it was created now."""
        if self.sink is None:
            created = name not in self.topics
            self.topics.add(name)
            return created
        _, topic_config = _import_engine()
        cfg = topic_config(name=name, partitions=1, replication=1, retention=0, max_size=0)
        _, created = await self.sink.create_topic(cfg)
        self.topics.add(name)
        return bool(created)

    @staticmethod
    def _on_done(batch: list[PlainDelivery]) -> None:
        for d in batch:
            if not d.future.done():
                d.future.set_result(None)

    async def produce(self, topic: str, key: bytes | None, value: bytes) -> PlainDelivery:
        """Store one message; the returned delivery has ``offset`` or ``error`` set."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        d = PlainDelivery(topic, key, value, fut)
        if self.sink is None:
            d.offset = 0
            return d
        self.sink.submit([d])
        await fut
        return d

    def response(self, d: PlainDelivery) -> dict[str, Any]:
        return {
            "message_id": d.message_id,
            "topic": d.topic,
            "partition": d.partition,
            "offset": d.offset,
            "timestamp": d.timestamp_ms,
        }
