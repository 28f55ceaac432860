"""Consume and acknowledge semantics, written once for every engine.

The rules (ARCHITECTURE.md, "Delivery semantics"):

- A consume leases up to ``max_messages`` to one consumer of a group until a visibility deadline;
  within a group a message is leased to one consumer at a time, every group sees every message.
- ``success: true`` completes a message. ``success: false``, or a lease that expires, is a failed
  delivery: it is redelivered after an exponential backoff with jitter, and once its delivery
  count reaches the limit it goes to ``<topic>.dlq`` instead.
- A group's committed position only advances past complete messages, so a crash redelivers.
- Priority: levels 0-9 share deliveries by smooth weighted round robin with weight
  ``priority + 1`` among the levels that have messages ready: with a steady stream at 9 and a
  backlog at 0, nine gets 10 of every 11 deliveries and zero still gets one. Within a level,
  redeliveries that are due come first, then the oldest message.
- TTL: a message past its expiry is never delivered; it is counted and, when its topic has
  ``dead_letter_expired``, dead-lettered with reason ``expired``.

Engines implement the storage primitives (``GroupStore``); this module owns validation, the
policy numbers, long-poll waiting, per-consumer concurrency and rate limits, and the counters.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from mqfast import errors
from mqfast._core import POLL_END, topic_name_error
from mqfast.config import Settings, parse_duration
from mqfast.messages import ConsumerInfo, LeasedMessage
from mqfast.sinks import Delivery

log = logging.getLogger("mqfast.groups")

NS_PER_MS = 1_000_000
PRIORITY_LEVELS = 10
PRIORITY_WEIGHTS = tuple(p + 1 for p in range(PRIORITY_LEVELS))
# Group and consumer ids appear in SQL keys, metric labels and DLQ headers: keep them tame.
MAX_ID_LENGTH = 249
# What an id may not hold: control characters (C0, DEL, C1), as the OpenAPI document's pattern
# says, and lone surrogates, which UTF-8 cannot encode (Redis keys, PostgreSQL text).
NOT_IN_ID = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
DLQ_SUFFIX = ".dlq"
# With several workers sharing an embedded database, idle long-polls re-check the store this
# often, to notice messages produced by another process (in-process produce wakes them at once).
CROSS_PROCESS_RECHECK_S = 1.0


def now_ms() -> int:
    return time.time_ns() // NS_PER_MS


@dataclass(frozen=True, slots=True)
class Policy:
    """The numbers of the delivery contract, from the settings."""

    visibility_ms: int = 30_000
    delivery_limit: int = 5
    backoff_base_ms: int = 1_000
    backoff_max_ms: int = 300_000
    jitter: float = 0.2
    # A completed message's lease row is kept this long after the group moved past it, so
    # that acknowledging twice is answered "already acknowledged" rather than "unknown".
    done_grace_ms: int = 300_000

    @classmethod
    def from_settings(cls, s: Settings) -> Policy:
        return cls(
            visibility_ms=s.visibility_timeout_ns // NS_PER_MS,
            delivery_limit=s.delivery_limit,
            backoff_base_ms=s.retry_backoff_ns // NS_PER_MS,
            backoff_max_ms=s.retry_backoff_max_ns // NS_PER_MS,
        )

    def backoff_ms(self, delivery_count: int, rand: float | None = None) -> int:
        """Delay before redelivery after the ``delivery_count``-th failed delivery (±jitter)."""
        r = random.random() if rand is None else rand
        exp = min(max(delivery_count - 1, 0), 40)
        base = min(self.backoff_max_ms, self.backoff_base_ms * (1 << exp))
        return max(0, int(base * (1.0 - self.jitter + 2.0 * self.jitter * r)))


class PriorityPicker:
    """Smooth weighted round robin over priority levels (weights ``priority + 1``)."""

    __slots__ = ("current",)

    def __init__(self) -> None:
        self.current = [0] * PRIORITY_LEVELS

    def pick(self, ready: list[int]) -> int:
        """The level to deliver from next, given how many are ready per level; -1 if none."""
        total = 0
        best = -1
        for p in range(PRIORITY_LEVELS - 1, -1, -1):
            if ready[p] > 0:
                self.current[p] += PRIORITY_WEIGHTS[p]
                total += PRIORITY_WEIGHTS[p]
                if best < 0 or self.current[p] > self.current[best]:
                    best = p
        if best >= 0:
            self.current[best] -= total
        return best


@dataclass(slots=True)
class LeaseOutcome:
    """What one lease transaction did."""

    messages: list[LeasedMessage]
    expired: int = 0  # TTL-expired messages skipped
    dead_lettered: int = 0
    reclaimed: int = 0  # leases found expired: failed deliveries
    next_due_ms: int = 0  # earliest lease deadline or retry time of the group (0: none)


@dataclass(slots=True)
class SettleItem:
    """One acknowledgement (``ack``), negative acknowledgement (``nack``) or lease extension."""

    message_id: str
    action: str  # "ack" | "nack" | "extend"
    error: str | None = None
    delay_ms: int | None = None
    visibility_ms: int | None = None


@dataclass(slots=True)
class SettleResult:
    message_id: str
    status: str  # acknowledged | already_acknowledged | requeued | dead_lettered | extended
    topic: str = ""
    delivery_count: int = 0
    processing_ms: float | None = None
    redeliver_at: int | None = None
    lease_deadline: int | None = None
    error: errors.MqfastError | None = None


@dataclass(slots=True)
class Unacked:
    """Deliveries of one group and topic not acknowledged yet (``GroupStore.unacked``)."""

    group: str
    topic: str
    oldest_ms: int  # when the one delivered longest ago (of those not acknowledged) was leased
    expired_leases: int  # leases past their deadline, not reclaimed yet


class RateLimits(Protocol):
    """Registered consumers' ``rate_limit`` (deliveries per second) as token buckets."""

    async def take_tokens(self, consumer: str, rate: float, want: int) -> tuple[int, float]:
        """Up to ``want`` deliveries ``consumer`` may take now; with none, the seconds until
        the next one."""
        ...

    async def return_tokens(self, consumer: str, n: int) -> None:
        """Give back ``n`` taken but not delivered."""
        ...

    def forget_consumer(self, consumer: str) -> None:
        """``consumer`` was unregistered."""
        ...


# Whether the caller may settle messages of a topic: None if it may, else the error to answer.
# A store may call it on its own thread, inside its transaction: it must be quick and touch
# nothing but the principal (whose permission memo is a dict, safe under the GIL).
Authorize = Callable[[str], errors.MqfastError | None]


class GroupStore(Protocol):
    """Storage primitives of consumer groups; each call is one atomic transaction."""

    # Per process (embedded) or shared by every replica (Kafka: Redis, on Redis's clock).
    rate_limits: RateLimits

    async def lease(
        self,
        group: str,
        topic: str,
        consumer: str,
        max_messages: int,
        visibility_ms: int,
        now: int,
        picker: PriorityPicker,
        max_leased: int | None,
    ) -> LeaseOutcome:
        """Reclaim expired leases, skip expired messages, lease up to ``max_messages``.

        ``max_leased`` caps the consumer's leases across the store (``max_concurrency``).
        Raises ``errors.UnknownTopic`` when the topic does not exist.
        """

    async def settle(
        self,
        group: str,
        topic: str | None,
        consumer: str | None,
        items: list[SettleItem],
        now: int,
        authorize: Authorize | None = None,
    ) -> list[SettleResult]:
        """Apply acks, nacks and extensions; per-item errors are in the results.

        ``authorize`` is asked about each item's real topic once the store has found it and
        before anything of that item changes: an error it returns is that item's error and the
        item is left as it was (a caller may not settle what it may not consume).
        """

    async def release_consumer(self, consumer: str, now: int) -> int:
        """Make every lease held by ``consumer`` available again now; returns how many."""

    async def redrive(self, topic: str, max_messages: int, now: int) -> int:
        """Move up to ``max_messages`` from ``<topic>.dlq`` back to ``topic``; returns how many."""

    async def redrive_message(self, topic: str, message_id: str, now: int) -> bool:
        """Move the dead letter ``message_id`` of ``<topic>.dlq`` back to ``topic`` (as a new
        message), once: False when the DLQ does not hold it (any more)."""

    async def redriven(self, topic: str, first: int, last: int) -> set[int]:
        """The offsets of ``<topic>.dlq`` from ``first`` to ``last`` that are still stored
        but were redriven one at a time (a Kafka log cannot drop one record): readers of the
        DLQ leave them out."""

    async def prune(self, now: int) -> int:
        """Forget complete messages older than the grace period; returns how many."""

    async def unacked(self, now: int, limit: int) -> list[Unacked]:
        """Per group and topic with deliveries not acknowledged (leased, or waiting for a
        retry): when the oldest of them was leased, and how many leases are past their
        deadline at ``now``. At most ``limit`` pairs; for ``/health``, so it reads only the
        state of deliveries in flight (Kafka: the 1,000 due first of each pair)."""


def check_id(value: str, field: str) -> None:
    """Group and consumer ids: 1-249 characters, none of them a control character."""
    if not value or len(value) > MAX_ID_LENGTH or NOT_IN_ID.search(value):
        raise errors.BadRequest(
            f"{field} must be 1 to {MAX_ID_LENGTH} characters, none of them a control character",
            field=field,
        )


def check_topic(name: str, field: str = "topic") -> None:
    reason = topic_name_error(name)
    if reason is not None:
        raise errors.BadRequest(f"{reason} (got {name!r})", field=field)


def duration_ms(value: int | str | None, field: str, default_ms: int, max_ms: int) -> int:
    """A request duration in milliseconds, ``default_ms`` when absent, at most ``max_ms``."""
    if value is None:
        return default_ms
    try:
        ns = parse_duration(value, field)
    except ValueError as e:
        raise errors.BadRequest(str(e), field=field) from None
    ms = ns // NS_PER_MS
    if ms > max_ms:
        raise errors.BadRequest(
            f"{field}: {ms} ms is more than the maximum of {max_ms} ms", field=field
        )
    return ms


@dataclass(slots=True)
class _Bucket:
    """Token bucket of a consumer's ``rate_limit`` (deliveries per second)."""

    rate: float
    tokens: float
    stamp: float

    def take(self, want: int, now: float) -> int:
        self.tokens = min(max(self.rate, 1.0), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        got = min(want, int(self.tokens))
        self.tokens -= got
        return got

    def wait_s(self) -> float:
        return max(0.0, (1.0 - self.tokens) / self.rate)


class LocalRateLimits:
    """``RateLimits`` of one process: a token bucket per consumer, burst of one second."""

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}

    async def take_tokens(self, consumer: str, rate: float, want: int) -> tuple[int, float]:
        bucket = self._buckets.get(consumer)
        now = time.monotonic()
        if bucket is None or bucket.rate != rate:
            bucket = self._buckets[consumer] = _Bucket(rate, max(rate, 1.0), now)
        got = bucket.take(want, now)
        return got, bucket.wait_s() if got == 0 else 0.0

    async def return_tokens(self, consumer: str, n: int) -> None:
        bucket = self._buckets.get(consumer)
        if bucket is not None:
            bucket.tokens += n

    def forget_consumer(self, consumer: str) -> None:
        self._buckets.pop(consumer, None)


@dataclass(slots=True)
class TopicCounters:
    """Cumulative per-topic counters of this worker (metrics and history)."""

    consumed: int = 0
    acknowledged: int = 0
    failed: int = 0
    retried: int = 0
    expired: int = 0
    dead_lettered: int = 0
    processing_ms: list[float] = field(default_factory=list)


class Groups:
    """Consume/acknowledge coordinator of one worker."""

    def __init__(self, settings: Settings, store: GroupStore) -> None:
        self.policy = Policy.from_settings(settings)
        self.store = store
        self.max_poll_ms = settings.max_poll_ns // NS_PER_MS
        self.recheck_s = CROSS_PROCESS_RECHECK_S if settings.workers > 1 else float("inf")
        self.max_visibility_ms = 12 * 3600 * 1000
        self._pickers: dict[tuple[str, str], PriorityPicker] = {}
        # topic -> group -> the long-polls waiting there, oldest first: (wake-up, capped)
        self._waiters: dict[str, dict[str, list[tuple[asyncio.Future[None], bool]]]] = {}
        self._consumers: dict[str, tuple[float, ConsumerInfo | None]] = {}
        self.lookup_consumer: ConsumerLookup | None = None
        self.topics: dict[str, TopicCounters] = {}
        self.consumed_by_group: dict[tuple[str, str], int] = {}
        # Told the results of every settle (open streams count their leases settled here).
        self.on_settled: Callable[[list[SettleResult]], None] | None = None
        self._closing = False

    # ---- wake-ups -------------------------------------------------------------------------

    def waiting_topics(self) -> set[str]:
        return {t for t, w in self._waiters.items() if w}

    def notify(self, topics: Iterable[str], capped_only: bool = False) -> None:
        """New messages (or freed capacity) on ``topics``: wake the long-polls waiting there.

        Per group, the long-poll waiting longest is woken, not every one: it leases up to its
        ``max_messages`` and wakes the next when it took a full batch (``lease_round``).
        Waking all of them made each message cost an empty lease per idle consumer. Consumers
        capped by ``max_concurrency``, ``rate_limit`` or a stream's credit are always woken
        (they may take nothing where another could), and ``capped_only`` (capacity freed by
        acknowledgements) wakes only them: nothing new is ready for the others.
        """
        for t in topics:
            for waiters in self._waiters.get(t, {}).values():
                woke = capped_only
                for fut, capped in waiters:
                    if not fut.done() and (capped or not woke):
                        fut.set_result(None)
                        woke = woke or not capped

    def _wake_next(self, topic: str, group: str) -> None:
        for fut, capped in self._waiters.get(topic, {}).get(group, ()):
            if not fut.done() and not capped:
                fut.set_result(None)
                return

    def on_stored(self, batch: list[Delivery]) -> None:
        """The core's hook after each engine batch: wake long-polls on those topics."""
        if self._waiters:
            self.notify({d.topic for d in batch})

    def shutdown(self) -> None:
        """Wake every long-poll so it answers now (empty) and the server can drain."""
        self._closing = True
        for groups in self._waiters.values():
            for waiters in groups.values():
                for fut, _ in waiters:
                    if not fut.done():
                        fut.set_result(None)

    async def wait(
        self,
        topic: str,
        group: str,
        seconds: float,
        fut: asyncio.Future[None] | None = None,
        capped: bool = False,
        gone: asyncio.Future[None] | None = None,
    ) -> None:
        """Until a wake-up on ``topic`` for ``group`` (``notify``, ``shutdown``), ``fut`` or
        ``gone`` is done, or ``seconds`` pass (``math.inf``: no timer at all, so that an idle
        waiter costs nothing). ``capped``: the waiter may be unable to take what is ready
        (``notify``). ``gone``: the waiter's client went; a wake-up it was given is passed on."""
        if seconds <= 0 or self._closing:
            return
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
        if gone is not None:
            if gone.done():
                return
            woken = fut

            def end(_: asyncio.Future[None]) -> None:
                if not woken.done():
                    woken.set_result(None)

            gone.add_done_callback(end)
        groups = self._waiters.setdefault(topic, {})
        waiters = groups.setdefault(group, [])
        entry = (fut, capped)
        waiters.append(entry)
        try:
            await asyncio.wait_for(fut, None if math.isinf(seconds) else seconds)
            if gone is not None and gone.done():
                self._wake_next(topic, group)  # the wake-up, if this was one, is not lost
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._wake_next(topic, group)  # woken, but gone: the wake-up is not lost
            raise
        finally:
            if gone is not None:
                gone.remove_done_callback(end)
            waiters.remove(entry)
            if not waiters:
                del groups[group]
                if not groups:
                    del self._waiters[topic]

    # ---- consumers ------------------------------------------------------------------------

    async def _consumer(self, consumer_id: str) -> ConsumerInfo | None:
        # Registered settings are read through a one-second cache: consume must not pay a
        # metadata round trip each time.
        hit = self._consumers.get(consumer_id)
        mono = time.monotonic()
        if hit is not None and mono - hit[0] < 1.0:
            return hit[1]
        try:
            info = await self.lookup_consumer(consumer_id) if self.lookup_consumer else None
        except errors.Unavailable:
            # Metadata store down: consume goes on with the last known settings (none for a
            # consumer never seen), checked again at the next lookup.
            return hit[1] if hit is not None else None
        self._consumers[consumer_id] = (mono, info)
        if len(self._consumers) > 100_000:  # bounded: forget the oldest half
            for k in list(self._consumers)[:50_000]:
                del self._consumers[k]
        return info

    async def registered(self, consumer_id: str) -> ConsumerInfo | None:
        """The registered settings of ``consumer_id`` (None: not registered), as consume sees
        them (read through the same one-second cache)."""
        return await self._consumer(consumer_id)

    def forget_consumer(self, consumer_id: str) -> None:
        self._consumers.pop(consumer_id, None)
        self.store.rate_limits.forget_consumer(consumer_id)

    def _counters(self, topic: str) -> TopicCounters:
        c = self.topics.get(topic)
        if c is None:
            c = self.topics[topic] = TopicCounters()
        return c

    # ---- consume --------------------------------------------------------------------------

    async def consume(
        self,
        topic: str,
        group: str,
        consumer: str,
        max_messages: int,
        timeout: int | str | None,
        visibility: int | str | None,
    ) -> list[LeasedMessage]:
        """Long-poll until at least one message is leased or ``timeout`` passes."""
        check_topic(topic)
        check_id(group, "group_id")
        check_id(consumer, "consumer_id")
        wait_ms = duration_ms(timeout, "timeout", 0, self.max_poll_ms)
        vis_ms = self.visibility_ms(visibility, "visibility_timeout")
        info = await self.consumer_settings(topic, group, consumer)
        deadline = time.monotonic() + wait_ms / 1000.0
        capped = info is not None and bool(info.max_concurrency or info.rate_limit)
        # Done when the client goes (the core's eof_received/connection_lost): nothing more is
        # leased to it, and the poll answers at once.
        gone: asyncio.Future[None] | None = POLL_END.get()
        while True:
            if gone is not None and gone.done():
                return []
            msgs, pause = await self.lease_round(topic, group, consumer, max_messages, vis_ms, info)
            if msgs:
                return msgs
            left = deadline - time.monotonic()
            if left <= 0 or self._closing:
                return []
            seconds = min(left, self.recheck_s, pause)
            await self.wait(topic, group, seconds, capped=capped, gone=gone)

    async def consumer_settings(self, topic: str, group: str, consumer: str) -> ConsumerInfo | None:
        """The registered settings of ``consumer`` (None: not registered), refused with 409
        when it is registered for another group or for topics without ``topic``."""
        info = await self._consumer(consumer)
        if info is not None and info.group_id != group:
            raise errors.Conflict(
                f"consumer {consumer!r} is registered in group {info.group_id!r}, not {group!r}",
                field="group_id",
            )
        if info is not None and topic not in info.topics:
            raise errors.Conflict(
                f"consumer {consumer!r} is registered for topics {info.topics}, not {topic!r}",
                field="topic",
            )
        return info

    async def lease_round(
        self,
        topic: str,
        group: str,
        consumer: str,
        max_messages: int,
        vis_ms: int,
        info: ConsumerInfo | None,
        max_leased: int | None = None,
    ) -> tuple[list[LeasedMessage], float]:
        """One lease of up to ``max_messages`` within the consumer's rate limit, its
        ``max_concurrency`` and ``max_leased`` (the fewer): the messages, and when there are
        none, the seconds after which trying again may find some without a wake-up (a rate
        limit's next token, a retry or lease deadline coming due; ``math.inf``: none)."""
        want = max_messages
        bucket_wait = 0.0
        rates = self.store.rate_limits
        if info is not None and info.rate_limit:
            want, bucket_wait = await rates.take_tokens(consumer, info.rate_limit, want)
        cap = info.max_concurrency if info is not None else None
        if max_leased is not None:
            cap = max_leased if cap is None else min(cap, max_leased)
        out = LeaseOutcome([])
        if want > 0:
            out = await self.store.lease(
                group,
                topic,
                consumer,
                want,
                vis_ms,
                now_ms(),
                self._pickers.setdefault((group, topic), PriorityPicker()),
                cap,
            )
            if info is not None and info.rate_limit and len(out.messages) < want:
                await rates.return_tokens(consumer, want - len(out.messages))
        counters = self._counters(topic)  # after the first lease: the topic exists
        counters.expired += out.expired
        counters.dead_lettered += out.dead_lettered
        counters.failed += out.reclaimed
        if out.messages:
            n = len(out.messages)
            counters.consumed += n
            counters.retried += sum(1 for m in out.messages if m.delivery_count > 1)
            key = (topic, group)
            self.consumed_by_group[key] = self.consumed_by_group.get(key, 0) + n
            if n >= want:  # a full batch: more may be ready for the next one waiting
                self._wake_next(topic, group)
            return out.messages, 0.0
        pause = math.inf
        if bucket_wait:
            pause = bucket_wait
        if out.next_due_ms:
            pause = min(pause, max(0.001, (out.next_due_ms - now_ms()) / 1000.0))
        return [], pause

    # ---- acknowledge ----------------------------------------------------------------------

    async def settle(
        self,
        group: str,
        topic: str | None,
        consumer: str | None,
        items: list[SettleItem],
        authorize: Authorize | None = None,
    ) -> list[SettleResult]:
        """Acks, nacks and extensions of one group; counters and wake-ups follow.

        ``authorize`` decides per item from the message's real topic (``GroupStore.settle``).
        """
        check_id(group, "group_id")
        if topic is not None:
            check_topic(topic)
        if consumer is not None:
            check_id(consumer, "consumer_id")
        results = await self.store.settle(
            group, topic, consumer, items, now_ms(), authorize=authorize
        )
        freed: set[str] = set()  # capacity freed: capped consumers may go on
        requeued: set[str] = set()  # messages to deliver again
        # The results of a batch are mostly of one topic: its counters are looked up once
        # per run of results of a topic, not once per message.
        topic_of = ""
        c = None
        for r in results:
            if r.error is not None:
                continue
            if c is None or r.topic != topic_of:
                topic_of = r.topic
                c = self._counters(topic_of)
            status = r.status
            if status == "acknowledged":
                c.acknowledged += 1
                if r.processing_ms is not None and len(c.processing_ms) < 100_000:
                    c.processing_ms.append(r.processing_ms)
                freed.add(topic_of)
            elif status == "requeued" or status == "dead_lettered":
                c.failed += 1
                if status == "dead_lettered":
                    c.dead_lettered += 1
                else:
                    requeued.add(topic_of)
                freed.add(topic_of)
        if requeued:
            self.notify(requeued)
        if freed - requeued:
            self.notify(freed - requeued, capped_only=True)
        if self.on_settled is not None:
            self.on_settled(results)
        return results

    def nack_delay_ms(self, value: int | str | None, field: str) -> int | None:
        if value is None:
            return None
        return duration_ms(value, field, 0, self.policy.backoff_max_ms * 100)

    def visibility_ms(self, value: int | str | None, field: str) -> int:
        ms = duration_ms(value, field, self.policy.visibility_ms, self.max_visibility_ms)
        if ms <= 0:
            # 855 (ns) is positive, but leases are kept in milliseconds
            raise errors.BadRequest(f"{field} must be at least 1ms", field=field)
        return ms

    def merge_stats(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Add this worker's consume counters to a core ``stats()`` snapshot (for /metrics)."""
        stats["consumed"] = dict(self.consumed_by_group)
        topics = stats.setdefault("topics", {})
        for name, c in self.topics.items():
            t = topics.setdefault(name, {"produced": 0, "failed": 0, "bytes": 0})
            t["failed"] = t.get("failed", 0) + c.failed
            t["expired"] = c.expired
            t["dead_lettered"] = c.dead_lettered
            t["retried"] = c.retried
        return stats


class ConsumerLookup(Protocol):
    async def __call__(self, consumer_id: str) -> ConsumerInfo | None: ...


def dlq_name(topic: str) -> str:
    return topic + DLQ_SUFFIX


DLQ_HEADER_PREFIX = "x-mqfast-dlq-"


def dlq_headers(
    topic: str,
    partition: int,
    offset: int,
    message_id: str,
    group: str,
    delivery_count: int,
    error: str,
    reason: str,
    now: int,
) -> dict[str, str]:
    """The headers a dead letter carries besides its own: where it came from and why."""
    p = DLQ_HEADER_PREFIX
    return {
        p + "topic": topic,
        p + "partition": str(partition),
        p + "offset": str(offset),
        p + "message-id": message_id,
        p + "group": group,
        p + "delivery-count": str(delivery_count),
        p + "error": error[:1024],
        p + "reason": reason,
        p + "time": str(now),
    }
