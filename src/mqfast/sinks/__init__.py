"""The storage engines behind one narrow interface.

The hot path (``_core``) batches produce requests per event-loop tick and hands each batch to
``Sink.submit``; the engine makes the batch durable off the loop (a writer thread, librdkafka's
poll thread) and calls ``on_done(batch)`` back on the loop once, with every delivery's ``offset``
or ``error`` filled in. Everything else an engine does (topic admin, reading back) is async and off
the hot path. One conformance suite runs against every engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol, cast

from mqfast.errors import MqfastError
from mqfast.messages import IdemKey, StoredMessage, TopicConfig, TopicInfo


class Delivery(Protocol):
    """One message on its way to an engine (``_core.Delivery`` on the hot path).

    The engine reads the first block and writes exactly one of ``offset`` / ``error``. A
    delivery with ``idem`` that retries a message already stored gets that message's
    ``partition``, ``offset``, ``timestamp_ms`` and ``message_id`` and ``replayed`` True.
    """

    topic: str
    partition: int
    key: bytes | None
    value: bytes
    headers: bytes | None  # a JSON object, already encoded, or None
    priority: int
    timestamp_ms: int
    expires_ms: int  # unix milliseconds; 0 never expires
    message_id: str
    idem: IdemKey | None  # an idempotent produce (the Idempotency-Key)

    offset: int
    error: MqfastError | None
    replayed: bool


DoneCallback = Callable[[list[Delivery]], None]


class Sink(Protocol):
    """A storage engine. All methods are called on the event loop's thread."""

    name: str

    def bind(self, loop: asyncio.AbstractEventLoop, on_done: DoneCallback) -> None:
        """Set the loop and the completion callback; called once, before ``start``."""

    async def start(self) -> None:
        """Open storage, start background threads and tasks."""

    def submit(self, batch: list[Delivery]) -> None:
        """Take ownership of ``batch``; later call ``on_done(batch)`` on the loop, exactly once.

        Must not block. Every delivery of the batch ends with ``offset`` set (durable) or
        ``error`` set (not written). A batch is written atomically where the engine can.
        """

    def submit_keyed(self, batch: list[Delivery]) -> None:
        """``submit`` for a batch in which some deliveries carry ``idem``: each of those is
        stored only if its key is new within the idempotency window (the key kept with the
        message, atomically); a retry of a stored one is answered with the original
        (``replayed``), a key reused with another message fails with
        ``errors.IdempotencyKeyReused``.
        """

    async def close(self, timeout: float) -> None:
        """Finish what was submitted (within ``timeout`` seconds), then release everything."""

    async def create_topic(self, config: TopicConfig) -> tuple[TopicConfig, bool]:
        """Create ``config``; return the stored config and whether it was created now.

        An existing topic with the same settings returns ``(existing, False)``; with other
        settings raises ``errors.TopicExists``.
        """

    async def get_topic(self, name: str) -> TopicConfig | None:
        """The stored config of ``name`` or None."""

    async def list_topics(self) -> list[TopicConfig]:
        """Every topic, sorted by name."""

    async def delete_topic(self, name: str) -> None:
        """Delete the topic and its messages; ``errors.UnknownTopic`` if absent."""

    async def describe_topic(self, name: str) -> TopicInfo:
        """Settings plus per-partition counts; ``errors.UnknownTopic`` if absent."""

    async def read(
        self, topic: str, partition: int, offset: int, limit: int
    ) -> list[StoredMessage]:
        """Up to ``limit`` stored messages of one partition from ``offset`` on, in order."""

    def health(self) -> dict[str, object]:
        """``{"status": "up" | "down", ...detail}``; cheap, called by ``/health``."""


async def describe_all(sink: Sink, names: list[str]) -> dict[str, TopicInfo]:
    """Describe several topics, in one go where the engine can (``describe_topics``)."""
    many = getattr(sink, "describe_topics", None)
    if many is not None:
        return cast(dict[str, TopicInfo], await many(names))
    out = {}
    for name in names:
        try:
            out[name] = await sink.describe_topic(name)
        except MqfastError:
            continue  # deleted meanwhile
    return out
