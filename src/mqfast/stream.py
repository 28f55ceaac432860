"""Streaming consume: ``GET /api/v1/messages/stream`` as Server-Sent Events.

An open stream leases messages to its consumer and sends each as one event (``data:`` the JSON of
a message of a consume answer) while the consumer holds fewer than ``max_inflight`` leases: the
store's cap on the consumer's leases (``Groups.lease_round``'s ``max_leased``) is the credit, so
an acknowledgement or nack over the usual routes, on any replica, frees one. Heartbeats are SSE
comments. When the stream closes (the client goes away, the server shuts down) its consumer's
leases are released at once (``GroupStore.release_consumer``), not after their timeout.

The compiled core keeps the connection (``HttpProtocol.stream_send``/``stream_end``) and tells
the stream when the transport pauses or resumes writing and when the connection is lost: a slow
reader makes the stream stop leasing, so what is buffered stays within one lease of
``max_inflight`` messages above the transport's high-water mark.

Idle streams cost nothing: each waits for the wake-ups the long-poll has (``Groups.wait``: a
produce, a settle, a retry coming due) with no timer but its heartbeat. Where the engine cannot
wake a stream for what another replica or process did (``Groups.recheck_s`` is finite), one idle
stream per group and topic re-checks at that pace and wakes the others when it finds messages;
a stream still holding leases re-checks itself, since only the store knows of an
acknowledgement made elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Protocol

import msgspec

from mqfast import errors
from mqfast.groups import Groups, SettleResult, duration_ms, now_ms
from mqfast.messages import ConsumerInfo
from mqfast.meta import MetaStore

log = logging.getLogger("mqfast.stream")

_json = msgspec.json.Encoder()
HEARTBEAT = b": heartbeat\n\n"
END = b'event: end\ndata: {"reason":"the server is shutting down"}\n\n'
# Messages leased at a time: what a stream holds unsent while a slow client's transport is
# paused is at most this many above the transport's high-water mark.
LEASE_BATCH = 100
# Settle results that end a delivery's lease (an extension keeps it).
_ENDS_LEASE = frozenset(("acknowledged", "already_acknowledged", "requeued", "dead_lettered"))


class StreamConnection(Protocol):
    """What the core's connection offers an open stream."""

    def stream_send(self, data: bytes) -> None:
        """Send ``data`` (whole events) to the client."""

    def stream_end(self) -> None:
        """End the answer cleanly and close the connection."""


class Streams:
    """The open streams of one worker."""

    def __init__(self, groups: Groups, meta: MetaStore | None) -> None:
        self.groups = groups
        self.meta = meta
        self.open: set[EventStream] = set()
        # Which stream delivered a message still leased, to count its credit (local settles).
        self.leased_by: dict[str, EventStream] = {}
        # Per (group, topic): the idle stream that re-checks for the others (see the docstring).
        self.probers: dict[tuple[str, str], EventStream] = {}
        groups.on_settled = self._settled

    def _settled(self, results: list[SettleResult]) -> None:
        if not self.leased_by:
            return
        for r in results:
            if r.error is None and r.status in _ENDS_LEASE:
                s = self.leased_by.pop(r.message_id, None)
                if s is not None:
                    s.leased.pop(r.message_id, None)

    def shutdown(self) -> None:
        """End every stream (each releases its leases first)."""
        for s in list(self.open):
            s.shutdown()


class EventStream:
    """One open stream; the core calls ``start`` once the head is written."""

    def __init__(
        self,
        streams: Streams,
        topic: str,
        group: str,
        consumer: str,
        max_inflight: int,
        visibility_ms: int,
        heartbeat_s: float,
        info: ConsumerInfo | None,
    ) -> None:
        self.streams = streams
        self.topic = topic
        self.group = group
        self.consumer = consumer
        self.max_inflight = max_inflight
        self.visibility_ms = visibility_ms
        self.heartbeat_s = heartbeat_s
        self.info = info
        self.leased: dict[str, int] = {}  # message id -> lease deadline, of this stream's events
        self._conn: StreamConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._paused = False
        self._lost = False
        self._ending = False
        self._error: errors.MqfastError | None = None

    # ---- called by the core --------------------------------------------------------------

    def start(self, conn: StreamConnection) -> None:
        self._conn = conn
        self.streams.open.add(self)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_up()

    def connection_lost(self) -> None:
        self._lost = True
        self._wake_up()

    def shutdown(self) -> None:
        self._ending = True
        self._wake_up()

    # ---- the stream ----------------------------------------------------------------------

    def _wake_up(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _idle(self) -> bool:
        """True when this stream holds no lease it delivered (as far as this worker knows)."""
        if self.leased:
            now = now_ms()
            for mid in [m for m, deadline in self.leased.items() if deadline <= now]:
                del self.leased[mid]  # expired: reclaimed by the store, maybe redelivered
                self.streams.leased_by.pop(mid, None)
        return not self.leased

    async def _run(self) -> None:
        groups = self.streams.groups
        key = (self.group, self.topic)
        probers = self.streams.probers
        loop = asyncio.get_running_loop()
        next_beat = time.monotonic() + self.heartbeat_s
        # Without re-checks (one process: every produce and settle wakes the streams itself)
        # no stream probes for the others.
        recheck = math.isfinite(groups.recheck_s)
        try:
            while not (self._lost or self._ending):
                self._wake = loop.create_future()
                if self._paused:
                    # The client reads slowly: lease nothing until the transport drains.
                    self._unclaim()
                    await self._wake
                    continue
                msgs, pause = await groups.lease_round(
                    self.topic,
                    self.group,
                    self.consumer,
                    min(self.max_inflight, LEASE_BATCH),
                    self.visibility_ms,
                    self.info,
                    self.max_inflight,
                )
                if self._lost or self._ending:
                    break  # what was just leased is released below
                now = time.monotonic()
                if now >= next_beat:
                    # A heartbeat after a silence; a registered consumer is touched either way,
                    # so that it stays active while its stream is busy too.
                    if not msgs:
                        assert self._conn is not None
                        self._conn.stream_send(HEARTBEAT)
                    next_beat = now + self.heartbeat_s
                    if self.streams.meta is not None:
                        self.streams.meta.touch(self.consumer, now_ms())
                if msgs:
                    leased_by = self.streams.leased_by
                    for m in msgs:
                        self.leased[m.message_id] = m.lease_deadline
                        leased_by[m.message_id] = self
                    assert self._conn is not None
                    events = [b"data: %s\n\n" % _json.encode(m) for m in msgs]
                    self._conn.stream_send(b"".join(events))
                    self._unclaim()
                    continue
                if recheck and (not self._idle() or probers.setdefault(key, self) is self):
                    pause = min(pause, groups.recheck_s)
                # at its credit limit (or a registered cap) a stream waits for acknowledgements
                capped = len(self.leased) >= self.max_inflight or (
                    self.info is not None
                    and bool(self.info.max_concurrency or self.info.rate_limit)
                )
                await groups.wait(
                    self.topic, self.group, min(pause, next_beat - now), self._wake, capped
                )
        except Exception as e:
            if not isinstance(e, errors.MqfastError):
                log.exception("stream failed", extra={"consumer_id": self.consumer})
                e = errors.MqfastError("internal error")
            log.warning(
                "stream ended by an error",
                extra={"consumer_id": self.consumer, "topic": self.topic, "reason": e.message},
            )
            self._error = e
        finally:
            await self._close()

    def _unclaim(self) -> None:
        """Stop re-checking for the other idle streams of the group and topic; they look
        themselves now, one of them takes over."""
        key = (self.group, self.topic)
        if self.streams.probers.get(key) is self:
            del self.streams.probers[key]
            self.streams.groups.notify([self.topic])

    async def _close(self) -> None:
        streams = self.streams
        self._unclaim()
        for mid in self.leased:
            streams.leased_by.pop(mid, None)
        self.leased.clear()
        try:
            released = await streams.groups.store.release_consumer(self.consumer, now_ms())
        except Exception as e:  # the answer must end whatever the store does
            released = 0
            log.warning(
                "leases of a closed stream not released; they expire at their deadline",
                extra={"consumer_id": self.consumer, "reason": str(e)},
            )
        if released:
            streams.groups.notify([self.topic])
        log.info(
            "stream closed",
            extra={"consumer_id": self.consumer, "topic": self.topic, "released": released},
        )
        streams.open.discard(self)
        if not self._lost and self._conn is not None:
            if self._error is not None:
                self._conn.stream_send(b"event: error\ndata: %s\n\n" % self._error.to_body())
            elif self._ending:
                self._conn.stream_send(END)
            self._conn.stream_end()
        self._conn = None


def heartbeat_s(value: str | None, default_s: float) -> float:
    """The heartbeat period asked for in a query (1 s to 5 min), ``default_s`` when absent."""
    if value is None:
        return default_s
    ms = duration_ms(value, "heartbeat", 0, 300_000)
    if ms < 1000:
        raise errors.InvalidQuery("heartbeat must be at least 1s", field="heartbeat")
    return ms / 1000
