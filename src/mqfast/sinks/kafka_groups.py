"""Consumer groups on the Kafka engine: messages read from Kafka, leases kept in Redis.

Any replica serves any consume or acknowledgement of any group, so the state of a group can
live in no single replica: every lease, retry, dead-letter hand-off and committed position is in
Redis (``kafka_groups.lua``: one atomic script per step), and each replica reads the messages
from Kafka itself. An acknowledgement that reaches replica B for a message leased through
replica A is applied to the shared state directly: there is nothing to relay. ``kill -9`` of a
replica loses nothing: its leases expire in Redis and the messages are delivered again through
the others.

Each replica keeps, per group and topic it serves, a read-ahead *window* of each partition from
the group's committed position on: it reads on until ``WINDOW`` messages per partition are
ready (never leased), and a partition cannot run further than ``HOLD`` messages ahead of its
oldest incomplete message. Priority and TTL are decided inside that window. The committed
position is also committed to Kafka for the consumer group ``mqfast.<group>`` (so Kafka's tools
show the lag, and a group whose Redis state is lost resumes from there: at-least-once, never
lost).

Where a lease expires: ``prepare`` in the Lua file, at the start of every lease call.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import logging
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, cast

import msgspec
from confluent_kafka import Consumer, KafkaException, TopicPartition
from redis.exceptions import RedisError, ResponseError

from mqfast import errors
from mqfast._core import message_id_at, partition_for_key
from mqfast.config import Settings
from mqfast.crypto import (
    DLQ_ENCODING_HEADER,
    ENC_ID_HEADER,
    ENC_TOPIC_HEADER,
    DecryptError,
    bound_to,
)
from mqfast.groups import (
    DLQ_HEADER_PREFIX,
    PRIORITY_LEVELS,
    Authorize,
    LeaseOutcome,
    Policy,
    PriorityPicker,
    RateLimits,
    SettleItem,
    SettleResult,
    Unacked,
    dlq_headers,
    dlq_name,
)
from mqfast.messages import GroupLag, LeasedMessage, StoredMessage, TopicConfig
from mqfast.quota import connect as redis_client
from mqfast.sinks.kafka import (
    H_ID,
    H_PRIORITY,
    KafkaSink,
    SealedMessage,
    consumer_config,
    parse_record,
    watermarks,
)

log = logging.getLogger("mqfast.kafka.groups")

WINDOW = 2000  # never-leased messages read ahead per partition, per group and topic
HOLD = 4 * WINDOW  # messages kept per partition from its oldest incomplete one on, at most
IDLE_WINDOW_S = 300.0  # a window nobody consumed through for this long is closed
LOW_REFRESH_S = 5.0
COMMIT_EVERY_S = 1.0
# How long a lease that found nothing ready waits for messages known to be on the way (it
# returns with the first): a fetch answered by the broker comes well within it.
CATCH_UP_S = 0.5

_json = msgspec.json.Decoder()


def _load_scripts() -> dict[str, str]:
    text = resources.files("mqfast.sinks").joinpath("kafka_groups.lua").read_text()
    common, *parts = text.split("--@")
    out = {}
    for part in parts:
        name, _, body = part.partition("\n")
        out[name.strip()] = common + "\n" + body
    return out


# Deliveries of one group and topic that ``unacked`` reads (those due first): one script call
# must stay short, since Redis runs nothing else meanwhile.
UNACKED_SCAN = 1000


def _list(value: Any) -> list[Any]:
    # Lua's cjson encodes an empty table as {}.
    return value if isinstance(value, list) else []


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def pack_id(message_id: str) -> bytes:
    """A message id in 16 bytes, as run records keep them: a UUID's own bytes (mqfast's ids),
    a 128-bit hash of any other id (one written by another Kafka client)."""
    if len(message_id) == 36 and message_id == message_id.lower():
        try:
            raw = bytes.fromhex(message_id.replace("-", ""))
        except ValueError:
            raw = b""
        dashes = message_id[8] + message_id[13] + message_id[18] + message_id[23]
        if len(raw) == 16 and dashes == "----":
            return raw
    return hashlib.blake2b(message_id.encode(), digest_size=16).digest()


def _cursors(prepared: dict[str, Any]) -> dict[str, int]:
    """The prepare script's cursors: ``"partition:priority"`` -> next never-leased offset."""
    flat = _list(prepared["cur"])
    return {str(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}


def _segments(
    chosen: list[tuple[int, StoredMessage, int, str]],
) -> list[tuple[int, int, str, list[StoredMessage]]]:
    """The picks as runs: consecutive offsets of one partition, one priority, one origin (the
    same retry run, or never leased) and one outcome (leased, expired, undeliverable)."""
    out: list[tuple[int, int, str, list[StoredMessage]]] = []
    for first, rec, expired, reason in sorted(chosen, key=lambda c: (c[1].partition, c[1].offset)):
        if out:
            f, e, why, recs = out[-1]
            prev = recs[-1]
            if (
                f == first
                and e == expired
                and why == reason
                and prev.partition == rec.partition
                and prev.offset + 1 == rec.offset
                and prev.priority == rec.priority
            ):
                recs.append(rec)
                continue
        out.append((first, expired, reason, [rec]))
    return out


# The settle script's per-item answer: code, topic index (1-based, 0: none), deliveries, value.
_RESULT = struct.Struct("<bBHq")
# Per nack or extension: delay (-1: the backoff), visibility (0: the default), error length.
_EXTRA = struct.Struct("<qqH")
_ACTIONS = {"ack": "a", "nack": "n", "extend": "e"}
MAX_ERROR_BYTES = 8192
_VERBS = {"ack": "acknowledge", "nack": "negatively acknowledge", "extend": "extend"}


def _when(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds")


def _result(
    group: str,
    topic: str | None,
    item: SettleItem,
    names: list[str],
    r: tuple[int, int, int, int],
) -> SettleResult:
    """One item's answer of the settle script as a ``SettleResult`` (codes: the Lua file)."""
    code, ti, count, value = r
    res = SettleResult(
        message_id=item.message_id,
        status=_STATUSES.get(code, ""),
        topic=names[ti - 1] if ti else "",
        delivery_count=count,
    )
    mid = item.message_id
    if code == 1:
        res.processing_ms = float(value)
    elif code == 3:
        res.redeliver_at = value
    elif code == 5:
        res.lease_deadline = value
    elif code == -1:
        where = f" in topic {topic!r}" if topic is not None else ""
        res.error = errors.NotFound(
            f"message {mid!r}{where} has no delivery to group {group!r}"
            " (never delivered to it, or completed long ago)",
            field="message_id",
        )
    elif code in (-2, -3):
        detail = "dead-lettered" if code == -2 else "expired"
        res.error = errors.Conflict(
            f"message {mid!r} is no longer deliverable in group {group!r} ({detail})",
            field="message_id",
        )
    elif code == -4:
        res.error = errors.Conflict(
            f"message {mid!r} is already acknowledged in group {group!r}", field="message_id"
        )
    elif code in (-5, -6):
        then = (
            f"it reached the delivery limit and went to {dlq_name(res.topic)!r}"
            if code == -6
            else "it will be delivered again"
        )
        res.error = errors.Conflict(
            f"the lease of message {mid!r} expired; {then}", field="message_id"
        )
    elif code == -7:
        res.error = errors.Conflict(
            f"message {mid!r} is leased to another consumer of group {group!r}",
            field="consumer_id",
        )
    elif code == -8:
        res.error = errors.Conflict(
            f"message {mid!r} was negatively acknowledged and waits for redelivery at "
            f"{_when(value)}; it has no lease to {_VERBS.get(item.action, item.action)}",
            field="message_id",
        )
    return res


_STATUSES = {
    1: "acknowledged",
    2: "already_acknowledged",
    3: "requeued",
    4: "dead_lettered",
    5: "extended",
}


@dataclass(slots=True, eq=False)
class _Ask:
    """One consume waiting for its window's next lease (``KafkaGroups.lease``)."""

    consumer: str
    want: int
    visibility_ms: int
    now: int
    max_leased: int | None
    done: asyncio.Future[LeaseOutcome]
    out: LeaseOutcome = field(default_factory=lambda: LeaseOutcome([]))

    def short(self) -> int:
        return self.want - len(self.out.messages)


class _Window:
    """Read-ahead of one group's partitions of one topic, on the reader thread only."""

    def __init__(
        self,
        settings: Settings,
        group: str,
        topic: str,
        partitions: int,
        sealed: bool,
        written: Callable[[str, int], int] | None = None,
    ) -> None:
        self.settings = settings
        # The offset this process last wrote per partition: fresher than a cached watermark.
        self.written = written
        self.group = group
        self.topic = topic
        self.partitions = partitions
        self.sealed = sealed  # an encrypted topic: records kept as stored until leased
        self.consumer: Any = None
        self.records: list[dict[int, StoredMessage]] = [{} for _ in range(partitions)]
        self.next = [0] * partitions  # next offset expected from the fetcher
        self.start = [0] * partitions  # no record below this one is kept
        self.fresh = [0] * partitions  # no record below this one is never leased
        self.mixed = [False] * partitions  # records of more than priority 0 were read
        self.paused: set[int] = set()
        self.lows: list[int] = []
        self.lows_at = 0.0
        self.committed: list[int] = []  # last positions seen in Redis
        self.kafka_committed: list[int] = []  # last positions committed to Kafka
        self.used = time.monotonic()
        # Consumes waiting for this window's next lease, and the task leasing for them (one
        # at a time per group and topic in this replica: concurrent leases would pick the same
        # candidates, and all but one would come back empty-handed).
        self.asks: list[_Ask] = []
        self.serving: asyncio.Task[None] | None = None

    def _open(self, positions: list[int]) -> None:
        self.consumer = Consumer(consumer_config(self.settings, f"mqfast.{self.group}"))
        self.consumer.assign(
            [TopicPartition(self.topic, p, positions[p]) for p in range(self.partitions)]
        )
        self.next = list(positions)
        self.start = list(positions)

    def initial_positions(self) -> list[int]:
        """Where a group without state starts: Kafka's committed offset, else the log start."""
        c = Consumer(consumer_config(self.settings, f"mqfast.{self.group}"))
        try:
            tps = [TopicPartition(self.topic, p) for p in range(self.partitions)]
            committed = c.committed(tps, timeout=10.0)
            out = []
            for p, tp in enumerate(committed):
                if tp.offset >= 0:
                    out.append(int(tp.offset))
                else:
                    out.append(watermarks(c, self.topic, p)[0])
            return out
        finally:
            c.close()

    def refresh_lows(self) -> list[int]:
        if time.monotonic() - self.lows_at > LOW_REFRESH_S or not self.lows:
            util = self.consumer or Consumer(consumer_config(self.settings, None))
            lows = [watermarks(util, self.topic, p)[0] for p in range(self.partitions)]
            if util is not self.consumer:
                util.close()
            self.lows = lows
            self.lows_at = time.monotonic()
        return self.lows

    def sync(self, positions: list[int], cursors: dict[str, int], wait_s: float) -> None:
        """Drop what the group completed, reposition if needed, read what is new.

        ``cursors``: the next never-leased offset per ``"partition:priority"``.
        """
        self.used = time.monotonic()
        self.committed = positions
        # Where the never-leased messages start (with several priorities read: from the
        # position on, as an estimate that reads no further than needed).
        self.fresh = [
            pos if self.mixed[p] else max(pos, cursors.get(f"{p}:0", 0))
            for p, pos in enumerate(positions)
        ]
        if self.consumer is None:
            self._open(positions)
        for p in range(self.partitions):
            recs = self.records[p]
            pos = positions[p]
            if pos > self.next[p] or (pos < self.start[p] and pos < self.next[p]):
                # The position moved outside what was read (retention, lost state): re-read.
                self.consumer.seek(TopicPartition(self.topic, p, pos))
                recs.clear()
                self.next[p] = self.start[p] = pos
                self.mixed[p] = False
            elif pos > self.start[p]:
                # Offsets are read in order: what is complete is the range below the position.
                for off in range(self.start[p], pos):
                    recs.pop(off, None)
                self.start[p] = pos
        self._fetch(wait_s)

    def catch_up(self) -> bool:
        """Wait (briefly) for what the broker has and this window has not received yet: a
        fetch in flight, a partition just resumed. Returns whether anything came."""
        if not self._behind():
            return False
        before = sum(self.next)
        self._fetch(CATCH_UP_S)
        return sum(self.next) > before

    def _behind(self) -> bool:
        for p in range(self.partitions):
            if p in self.paused:
                continue
            try:
                _, hi = self.consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p), cached=True
                )
            except KafkaException:
                continue
            if hi > self.next[p]:
                return True
            if self.written is not None and self.written(self.topic, p) >= self.next[p]:
                return True  # produced here and acknowledged by Kafka: a fetch brings it
        return False

    def _fetch(self, wait_s: float) -> None:
        if wait_s > 0:
            # poll() returns with the first message; consume() would wait for a full batch.
            first = self.consumer.poll(wait_s)
            if first is not None:
                self._keep([first])
        # Read on while fewer than WINDOW per partition are ready: what is not read yet waits
        # in librdkafka's queue, fetched ahead in the background. (Pausing partitions instead
        # would stall: a resumed partition's first fetch takes a second.)
        target = WINDOW * self.partitions
        while self._ready() < target:
            msgs = self.consumer.consume(1000, 0)
            self._keep(msgs)
            self._flow()
            if len(msgs) < 1000:
                return

    def _ready(self) -> int:
        return sum(max(0, n - f) for n, f in zip(self.next, self.fresh, strict=True))

    def _keep(self, msgs: list[Any]) -> None:
        for msg in msgs:
            if msg.error() is not None:
                continue
            p = msg.partition()
            off = msg.offset()
            if p >= self.partitions or off < self.next[p]:
                continue  # from before a seek
            rec = self.records[p][off] = parse_record(msg, self.sealed)
            if rec.priority:
                self.mixed[p] = True
            self.next[p] = off + 1

    def _flow(self) -> None:
        for p in range(self.partitions):
            tp = [TopicPartition(self.topic, p)]
            n = len(self.records[p])
            if n >= HOLD and p not in self.paused:
                self.consumer.pause(tp)
                self.paused.add(p)
            elif n < HOLD // 2 and p in self.paused:
                self.consumer.resume(tp)
                self.paused.discard(p)

    def commit(self) -> None:
        """Commit the group's positions to Kafka (asynchronously) when they moved."""
        if self.consumer is None or self.committed == self.kafka_committed:
            return
        self.consumer.commit(
            offsets=[
                TopicPartition(self.topic, p, c) for p, c in enumerate(self.committed) if c >= 0
            ],
            asynchronous=True,
        )
        self.kafka_committed = list(self.committed)

    def close(self) -> None:
        if self.consumer is not None:
            self.commit()
            self.consumer.close()
            self.consumer = None


class KafkaGroups:
    """``groups.GroupStore`` on Kafka (messages) and Redis (leases and positions)."""

    # Replicas produce without waking each other's long-polls: re-check this often.
    recheck_s = 0.2

    def __init__(self, settings: Settings, sink: KafkaSink, policy: Policy) -> None:
        self.settings = settings
        self.sink = sink
        self.policy = policy
        # Scripts over a group's state may take longer than a quota grant: a wider timeout.
        self.redis = redis_client(settings, timeout_s=2.0)
        self.rate_limits: RateLimits = self  # take_tokens/return_tokens below, in Redis
        self._scripts = {n: self.redis.register_script(s) for n, s in _load_scripts().items()}
        self._windows: dict[tuple[str, str], _Window] = {}
        self._reader = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="mqfast-kafka-reader"
        )
        self._redis_down_since = 0.0
        self._last_error = ""
        self._tasks: list[asyncio.Task[None]] = []
        sink.group_lags = self.lags
        sink.topic_deleted = self.forget_topic

    @property
    def where(self) -> str:
        return f"{self.settings.redis_host}:{self.settings.redis_port}"

    async def start(self) -> None:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as e:
            # Produce does not need Redis: start, answer consume with 503 until it is back.
            self._down(e)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._background()))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        loop = asyncio.get_running_loop()
        windows = list(self._windows.values())
        self._windows.clear()
        for w in windows:
            if w.serving is not None:  # its waiting consumes are answered 503
                w.serving.cancel()

        def close_all() -> None:
            for w in windows:
                w.close()

        # Bounded, and never a blocking join on the loop: the reader thread may be inside a
        # Kafka call waiting for a broker that is gone.
        try:
            await asyncio.wait_for(loop.run_in_executor(self._reader, close_all), 5.0)
        except TimeoutError:
            log.warning("kafka readers did not close in time", extra={"windows": len(windows)})
        self._reader.shutdown(wait=False, cancel_futures=True)
        await self.redis.aclose()

    def health(self) -> dict[str, object]:
        if self._redis_down_since:
            return {"status": "down", "addr": self.where, "detail": self._last_error}
        return {"status": "up", "addr": self.where}

    def _down(self, e: BaseException) -> errors.Unavailable:
        if not self._redis_down_since:
            log.error(
                "redis unreachable: consume and acknowledge answer 503 until it is back; "
                "produce is not affected",
                extra={"redis": self.where, "error": str(e)},
            )
            self._redis_down_since = time.monotonic()
        self._last_error = str(e) or type(e).__name__
        return errors.Unavailable(
            f"redis at {self.where} is unreachable ({self._last_error}); consumer groups are "
            "unavailable until it is back, produce still works"
        )

    def _up(self) -> None:
        if self._redis_down_since:
            log.info("redis reachable again", extra={"redis": self.where})
            self._redis_down_since = 0.0

    async def _call(self, name: str, *args: Any) -> Any:
        try:
            raw = await self._scripts[name](keys=[], args=list(args))
        except ResponseError as e:
            if str(e).startswith(("BUSY", "LOADING", "MASTERDOWN", "READONLY")):
                raise self._down(e) from None
            # A script error is a bug of ours, not an outage: say so, loudly.
            log.error("redis script failed", extra={"script": name, "error": str(e)})
            raise errors.MqfastError(f"internal error in the group store ({name})") from e
        except (TimeoutError, RedisError, OSError) as e:
            raise self._down(e) from None
        self._up()
        return _json.decode(raw) if isinstance(raw, bytes) else raw

    async def _background(self) -> None:
        """Commit positions to Kafka; ping Redis while it is down so health recovers."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(COMMIT_EVERY_S)
            for w in list(self._windows.values()):
                try:
                    await loop.run_in_executor(self._reader, w.commit)
                except Exception as e:
                    log.warning("kafka commit failed", extra={"group": w.group, "error": str(e)})
            if self._redis_down_since:
                try:
                    await self.redis.ping()
                    self._up()
                except (RedisError, OSError) as e:
                    self._last_error = str(e)

    async def _reading(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._reader, fn, *args)
        except errors.MqfastError:
            raise
        except Exception as e:
            raise errors.Unavailable(f"kafka: {e}") from None

    async def _window(self, group: str, cfg: TopicConfig) -> _Window:
        key = (group, cfg.name)
        w = self._windows.get(key)
        if w is not None and (w.partitions != cfg.partitions or w.sealed != cfg.encrypted):
            await self._reading(w.close)
            w = None
        if w is None:
            w = _Window(
                self.settings, group, cfg.name, cfg.partitions, cfg.encrypted, self.sink.written
            )
            self._windows[key] = w
        return w

    def _policy_args(self) -> list[Any]:
        p = self.policy
        return [p.delivery_limit, p.backoff_base_ms, p.backoff_max_ms, p.jitter]

    # ---- lease ----------------------------------------------------------------------------

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
        cfg = await self.sink.get_topic(topic)
        if cfg is None:
            raise errors.UnknownTopic(f"unknown topic {topic!r}", field="topic")
        w = await self._window(group, cfg)
        ask = _Ask(
            consumer, max_messages, visibility_ms, now, max_leased,
            asyncio.get_running_loop().create_future(),
        )  # fmt: skip
        w.asks.append(ask)
        if w.serving is None:
            w.serving = asyncio.create_task(self._serve(w, cfg, picker))
        return await ask.done

    async def _serve(self, w: _Window, cfg: TopicConfig, picker: PriorityPicker) -> None:
        """Lease for the consumes waiting on ``w`` until none is left. Those that arrived
        while a lease was under way are leased together: one prepare and one claim for all
        of them (the common case with several consumers of a group), not one each. A
        consumer with a ``max_concurrency`` is leased for alone (its own lease count decides
        how many it may take)."""
        asks: list[_Ask] = []
        try:
            while w.asks:
                asks = [a for a in w.asks if not a.done.done()]  # a cancelled consume is gone
                w.asks = []
                together = [a for a in asks if a.max_leased is None]
                turns = ([together] if together else []) + [
                    [a] for a in asks if a.max_leased is not None
                ]
                for turn in turns:
                    try:
                        await self._lease_for(w, cfg, turn, picker)
                    except Exception as e:
                        for a in turn:
                            if not a.done.done():
                                a.done.set_exception(e)
                        continue
                    for a in turn:
                        if not a.done.done():
                            a.out.messages.sort(key=lambda m: -m.priority)
                            a.done.set_result(a.out)
        finally:
            w.serving = None
            for a in asks + w.asks:  # left only when this task was cancelled (shutdown)
                if not a.done.done():
                    a.done.set_exception(errors.Unavailable("kafka engine: shutting down"))
            w.asks = []

    async def _lease_for(
        self, w: _Window, cfg: TopicConfig, asks: list[_Ask], picker: PriorityPicker
    ) -> None:
        first = asks[0]
        now = max(a.now for a in asks)
        caught_up = False
        for attempt in range(4):
            want = sum(a.short() for a in asks)
            res = await self._prepare(w, cfg, first.consumer, want, first.max_leased, now)
            if attempt == 0:
                first.out.reclaimed = int(res["reclaimed"])
                if first.max_leased is not None:  # leased alone (see _serve)
                    first.want = min(first.want, first.max_leased - int(res["held"]))
            dead = _list(res["dead"])
            if dead:
                first.out.dead_lettered += await self._dead_letter(w.group, cfg, w, dead, now)
            for a in asks:
                a.out.next_due_ms = int(res["next_due"] or 0)
            short = [a for a in asks if a.short() > 0]
            if not short:
                break
            positions = [int(x) for x in res["pos"]]
            cursors = _cursors(res)
            await self._reading(w.sync, positions, cursors, 0.5 if w.consumer is None else 0)
            lost = await self._pick(w.group, cfg, w, res, short, now, picker)
            if lost:  # another replica took some of the candidates: look again
                continue
            if any(a.out.messages for a in asks) or caught_up:
                break
            # Nothing to lease in the window, but the broker may have more than the window
            # received so far (a fetch in flight, a partition just resumed): a consume must
            # not answer empty while messages are ready.
            caught_up = True
            if not await self._reading(w.catch_up):
                break

    async def _prepare(
        self,
        w: _Window,
        cfg: TopicConfig,
        consumer: str,
        want: int,
        max_leased: int | None,
        now: int,
    ) -> dict[str, Any]:
        lows = w.lows
        if not lows or time.monotonic() - w.lows_at > LOW_REFRESH_S:
            lows = await self._reading(w.refresh_lows)  # a hop to the reader thread, not always
        args = [w.group, cfg.name, now, cfg.partitions, "[]", msgspec.json.encode(lows).decode()]
        tail = [consumer, want, "1" if max_leased is not None else "0"]
        res: dict[str, Any] = await self._call("prepare", *args, *tail, *self._policy_args())
        if res.get("missing"):
            init = await self._reading(w.initial_positions)
            args[4] = msgspec.json.encode(init).decode()
            res = await self._call("prepare", *args, *tail, *self._policy_args())
        return res

    @staticmethod
    def _fresh(
        w: _Window, positions: list[int], cursors: dict[str, int], want: int
    ) -> list[list[tuple[int, StoredMessage]]]:
        """Up to ``want`` never-leased candidates per priority level and partition."""
        fresh: list[list[tuple[int, StoredMessage]]] = [[] for _ in range(PRIORITY_LEVELS)]
        for p in range(w.partitions):
            recs = w.records[p]
            if not w.mixed[p]:
                # Only priority 0 was read: the candidates are the offsets from its cursor on.
                level = fresh[0]
                n = 0
                for off in range(max(cursors.get(f"{p}:0", 0), positions[p]), w.next[p]):
                    rec = recs.get(off)
                    if rec is not None:
                        level.append((-1, rec))
                        n += 1
                        if n >= want:
                            break
                continue
            starts = [max(cursors.get(f"{p}:{pri}", 0), positions[p]) for pri in range(10)]
            counts = [0] * PRIORITY_LEVELS
            for off, rec in recs.items():
                pri = rec.priority
                if off >= starts[pri] and counts[pri] < want:
                    fresh[pri].append((-1, rec))
                    counts[pri] += 1
        if w.partitions > 1:
            for candidates in fresh:
                candidates.sort(key=lambda c: (c[1].offset, c[1].partition))
        return fresh

    async def _pick(
        self,
        group: str,
        cfg: TopicConfig,
        w: _Window,
        res: dict[str, Any],
        asks: list[_Ask],
        now: int,
        picker: PriorityPicker,
    ) -> int:
        """Lease what ``asks`` are short of, in their order; returns how many runs another
        replica took."""
        want = sum(a.short() for a in asks)
        positions = [int(x) for x in res["pos"]]
        cursors = _cursors(res)
        # (first offset of the retry run it is part of, or -1 for a fresh one; the record)
        retries: list[list[tuple[int, StoredMessage]]] = [[] for _ in range(PRIORITY_LEVELS)]
        for p, first, last, _n, _pri in _list(res["retries"]):
            if p >= w.partitions:
                continue
            recs = w.records[p]
            for off in range(first, last + 1):
                rec = recs.get(off)
                if rec is not None:
                    retries[rec.priority].append((first, rec))
        fresh = self._fresh(w, positions, cursors, want)
        ready = [len(retries[i]) + len(fresh[i]) for i in range(PRIORITY_LEVELS)]
        ri = [0] * PRIORITY_LEVELS
        fi = [0] * PRIORITY_LEVELS
        # per ask: (run first or -1, record, expired: 0, 1 TTL passed, 2 undeliverable; reason)
        chosen: list[list[tuple[int, StoredMessage, int, str]]] = [[] for _ in asks]
        k = 0  # the ask being served
        need = asks[0].short()
        while k < len(asks):
            level = picker.pick(ready)
            if level < 0:
                break
            ready[level] -= 1
            if ri[level] < len(retries[level]):
                first, rec = retries[level][ri[level]]
                ri[level] += 1
            else:
                first, rec = fresh[level][fi[level]]
                fi[level] += 1
            expired = 1 if rec.expires_at and rec.expires_at <= now else 0
            reason = ""
            if not expired and isinstance(rec, SealedMessage):
                try:
                    rec = w.records[rec.partition][rec.offset] = await self.sink.open(rec)
                except DecryptError as e:
                    # Never delivered: dead-lettered as stored, for an operator with the key.
                    expired, reason = 2, str(e)
                    log.warning(
                        "message not delivered: %s", e,
                        extra={"topic": cfg.name, "partition": rec.partition,
                               "offset": rec.offset, "reason": e.reason, "detail": e.detail},
                    )  # fmt: skip
            chosen[k].append((first, rec, expired, reason))
            if not expired:
                need -= 1
                if need == 0:
                    k += 1
                    need = asks[k].short() if k < len(asks) else 0
        # segments of each ask, in the claim's order: (ask, first, expired, reason, records)
        segments = [
            (a, *seg) for a, picks in zip(asks, chosen, strict=True) for seg in _segments(picks)
        ]
        if not segments:
            return 0
        args: list[Any] = [
            group, cfg.name, now, 1 if cfg.dead_letter_expired else 0, len(segments),
        ]  # fmt: skip
        for a, first, expired, reason, recs in segments:
            args += [
                "r" if first >= 0 else "f", recs[0].partition, recs[0].offset, recs[-1].offset,
                recs[0].priority, first, expired, reason,
                b"" if first >= 0 else b"".join([pack_id(r.message_id) for r in recs]),
                a.consumer, now + a.visibility_ms,
            ]  # fmt: skip
        codes, _positions = await self._call("claim", *args)
        dead: list[list[Any]] = []
        lost = 0
        outcome: dict[tuple[int, int], int] = {}
        for (a, _first, expired, reason, recs), n in zip(segments, codes, strict=True):
            if n == 0:
                lost += 1
            elif n == -1:
                r0 = recs[0]
                why = ("ttl", "expired") if expired == 1 else (reason, reason)
                dead.append([cfg.name, r0.partition, r0.offset, recs[-1].offset, 0, *why])
                a.out.expired += len(recs) if expired == 1 else 0
            elif n == -2:
                a.out.expired += len(recs)
            for rec in recs:
                outcome[rec.partition, rec.offset] = n
        for a, picks in zip(asks, chosen, strict=True):
            deadline = now + a.visibility_ms
            messages = a.out.messages
            for _first, rec, _expired, _reason in picks:  # in the order picked
                n = outcome[rec.partition, rec.offset]
                if n > 0:
                    messages.append(
                        LeasedMessage(
                            rec.message_id, rec.topic, rec.partition, rec.offset, rec.key,
                            rec.content, rec.headers, rec.priority, rec.timestamp, n, deadline,
                            rec.expires_at,
                        )
                    )  # fmt: skip
        if dead:
            asks[0].out.dead_lettered += await self._dead_letter(group, cfg, w, dead, now)
        return lost

    # ---- dead letters ---------------------------------------------------------------------

    async def _dead_letter(
        self, group: str, cfg: TopicConfig, w: _Window | None, dead: list[list[Any]], now: int
    ) -> int:
        """Write dead letters (runs ``[topic, partition, first, last, deliveries, error,
        reason]``) to ``<topic>.dlq``, then mark them complete; returns how many."""
        dlq = dlq_name(cfg.name)
        if await self.sink.get_topic(dlq) is None:
            await self.sink.create_topic(
                TopicConfig(
                    name=dlq,
                    partitions=1,
                    replication=cfg.replication,
                    retention=cfg.retention,
                    max_size=cfg.max_size,
                    created_at=now,
                    encrypted=cfg.encrypted,  # a copy is as protected as its origin
                )
            )
        written: list[str] = []
        n = 0
        for _t, part, first, last, count, error, reason in dead:
            error, reason = _text(error), _text(reason)
            for off in range(int(first), int(last) + 1):
                rec = w.records[part].get(off) if w is not None and part < w.partitions else None
                if rec is None:
                    got = await self.sink.read(cfg.name, part, off, 1)
                    rec = got[0] if got and got[0].offset == off else None
                n += 1
                if rec is None:
                    continue  # removed by retention meanwhile: nothing to copy
                stored = False  # copied as stored: it does not decrypt
                if isinstance(rec, SealedMessage):
                    try:
                        rec = await self.sink.open(rec)
                    except DecryptError:
                        stored = True
                headers = [(k, v.encode()) for k, v in rec.headers.items()]
                headers.append((H_PRIORITY, str(rec.priority).encode()))
                why = dlq_headers(
                    cfg.name, part, off, rec.message_id, group, int(count), error, reason, now
                )
                headers += [(k, v.encode()) for k, v in why.items()]
                headers.insert(0, (H_ID, message_id_at(now).encode()))
                if isinstance(rec, SealedMessage):
                    key, value = rec.raw_key, rec.raw_value
                else:
                    key = rec.key.encode() if rec.key is not None else None
                    value = rec.content.encode()
                await self.sink.produce_one(dlq, 0, key, value, headers, as_stored=stored)
            written.append(f"{part}:{first}")
        positions = await self._call("finish", group, cfg.name, now, *written)
        if w is not None:
            for p, c in _list(positions):
                if c is not None and p < len(w.committed):
                    w.committed[p] = int(c)
        return n

    async def redrive(self, topic: str, max_messages: int, now: int) -> int:
        cfg = await self.sink.get_topic(topic)
        if cfg is None:
            raise errors.UnknownTopic(f"unknown topic {topic!r}")
        dlq = await self.sink.get_topic(dlq_name(topic))
        if dlq is None:
            return 0
        async with self._redrive_lock(topic):
            [(lo, hi)] = await self.sink.watermarks(dlq.name, 1)
            done = await self.redriven(topic, lo, hi - 1)
            n = 0
            while n < max_messages and lo < hi:
                batch = await self.sink.read(dlq.name, 0, lo, min(500, max_messages - n))
                if not batch:
                    break
                for m in batch:
                    if m.offset not in done:
                        await self._move_back(cfg, dlq.name, m, now)
                        n += 1
                lo = batch[-1].offset + 1
                # Everything below lo is back in the topic: remove it from the DLQ.
                await self.sink.delete_before(dlq.name, 0, lo)
            await self._forget_redriven(dlq, lo)
            return n

    async def redrive_message(self, topic: str, message_id: str, now: int) -> bool:
        cfg = await self.sink.get_topic(topic)
        if cfg is None:
            raise errors.UnknownTopic(f"unknown topic {topic!r}")
        dlq = await self.sink.get_topic(dlq_name(topic))
        if dlq is None:
            return False
        # Under the topic's redrive lock, so that two calls cannot both copy it; copied before
        # it is noted, so that a crash between the two may copy it again but never loses it.
        # A log cannot drop one record: the copied one's offset is noted as redriven (left out
        # of reads and of later redrives), and the DLQ is cut below the first one not redriven.
        async with self._redrive_lock(topic):
            [(lo, hi)] = await self.sink.watermarks(dlq.name, 1)
            done = await self.redriven(topic, lo, hi - 1)
            at = lo
            while at < hi:
                batch = await self.sink.read(dlq.name, 0, at, 500)
                if not batch:
                    return False
                for m in batch:
                    if m.message_id == message_id and m.offset not in done:
                        await self._move_back(cfg, dlq.name, m, now)
                        await self._note_redriven(dlq, m.offset)
                        done.add(m.offset)
                        cut = lo
                        while cut in done:
                            cut += 1
                        if cut > lo:
                            await self.sink.delete_before(dlq.name, 0, cut)
                            await self._forget_redriven(dlq, cut)
                        return True
                at = batch[-1].offset + 1
            return False

    async def redriven(self, topic: str, first: int, last: int) -> set[int]:
        dlq = await self.sink.get_topic(dlq_name(topic))
        if dlq is None or last < first:
            return set()
        try:
            got = await self.redis.zrangebyscore(_redriven_key(dlq), first, last)
        except (RedisError, OSError) as e:
            raise self._down(e) from None
        return {int(cast("bytes | str", x)) for x in got}

    async def _note_redriven(self, dlq: TopicConfig, offset: int) -> None:
        try:
            await self.redis.zadd(_redriven_key(dlq), {str(offset): offset})
        except (RedisError, OSError) as e:
            raise self._down(e) from None

    async def _forget_redriven(self, dlq: TopicConfig, below: int) -> None:
        try:
            await self.redis.zremrangebyscore(_redriven_key(dlq), "-inf", f"({below}")
        except (RedisError, OSError) as e:
            raise self._down(e) from None

    @contextlib.asynccontextmanager
    async def _redrive_lock(self, topic: str) -> AsyncIterator[None]:
        lock = f"mq:redrive:{topic}"
        try:
            if not await self.redis.set(lock, "1", nx=True, ex=60):
                raise errors.Conflict(f"a redrive of {topic!r} is already running")
        except (RedisError, OSError) as e:
            raise self._down(e) from None
        try:
            yield
        finally:
            try:
                await self.redis.delete(lock)
            except (RedisError, OSError):
                pass

    async def _move_back(self, cfg: TopicConfig, dlq: str, m: StoredMessage, now: int) -> None:
        """Produce the dead letter ``m`` to the topic ``cfg`` as a new message."""
        headers = [
            (k, v.encode()) for k, v in m.headers.items() if not k.startswith(DLQ_HEADER_PREFIX)
        ]
        headers.append(("x-mqfast-redriven-from", dlq.encode()))
        headers.insert(0, (H_ID, message_id_at(now).encode()))
        if m.priority:
            headers.append((H_PRIORITY, str(m.priority).encode()))
        key = m.key.encode() if m.key is not None else None
        value = m.content.encode()
        stored = m.headers.get(DLQ_ENCODING_HEADER) == "base64"
        if stored:
            # A copy that does not decrypt goes back as it was, still bound to
            # where it was written first (it fails there again, as it should).
            value = base64.b64decode(m.content)
            origin = bound_to(dlq, "", m.headers)
            headers += [(ENC_TOPIC_HEADER, origin[0].encode()),
                        (ENC_ID_HEADER, origin[1].encode())]  # fmt: skip
        target = (
            partition_for_key(key, cfg.partitions) if key is not None else m.offset % cfg.partitions
        )
        await self.sink.produce_one(cfg.name, target, key, value, headers, as_stored=stored)

    # ---- settle ---------------------------------------------------------------------------

    async def settle(
        self,
        group: str,
        topic: str | None,
        consumer: str | None,
        items: list[SettleItem],
        now: int,
        authorize: Authorize | None = None,
    ) -> list[SettleResult]:
        denied: dict[int, SettleResult] = {}
        todo = items
        if authorize is not None and items and (topic is None or authorize(topic) is not None):
            # Where each message lives first (nothing changes), so that one the caller may not
            # settle in its topic is refused before anything happens to it. A topic named and
            # allowed needs no such pass: the script only finds messages of the topic named.
            blob, names, _, _ = await self._settle_call(group, topic, consumer, items, now, "1")
            verdicts: dict[str, errors.MqfastError | None] = {}
            for i, (_code, ti, _n, _v) in enumerate(_RESULT.iter_unpack(blob)):
                if ti:
                    t = names[ti - 1]
                    if t not in verdicts:
                        verdicts[t] = authorize(t)
                    err = verdicts[t]
                    if err is not None:
                        mid = items[i].message_id
                        # the topic is not told: the caller may not see it
                        denied[i] = SettleResult(mid, "", error=err)
            todo = [it for i, it in enumerate(items) if i not in denied]
        results: list[SettleResult] = []
        if todo:
            blob, names, dead, positions = await self._settle_call(
                group, topic, consumer, todo, now, "0"
            )
            for t, p, c in positions:
                w = self._windows.get((group, t))
                if w is not None and p < len(w.committed):
                    w.committed[p] = int(c)
            by_topic: dict[str, list[list[Any]]] = {}
            for d in dead:
                by_topic.setdefault(_text(d[0]), []).append(d)
            for t, entries in by_topic.items():
                cfg = await self.sink.get_topic(t)
                if cfg is not None:
                    await self._dead_letter(group, cfg, self._windows.get((group, t)), entries, now)
            results = [
                _result(group, topic, it, names, r)
                for it, r in zip(todo, _RESULT.iter_unpack(blob), strict=True)
            ]
        if not denied:
            return results
        merged = iter(results)
        return [denied[i] if i in denied else next(merged) for i in range(len(items))]

    async def _settle_call(
        self,
        group: str,
        topic: str | None,
        consumer: str | None,
        items: list[SettleItem],
        now: int,
        dry: str,
    ) -> tuple[bytes, list[str], list[list[Any]], list[list[Any]]]:
        extras = bytearray()
        for it in items:
            if it.action != "ack":
                err = (it.error or "").encode()[:MAX_ERROR_BYTES]
                delay = -1 if it.delay_ms is None else it.delay_ms
                extras += _EXTRA.pack(delay, it.visibility_ms or 0, len(err)) + err
        blob, names, dead, positions = await self._call(
            "settle",
            group,
            topic or "",
            now,
            consumer or "",
            *self._policy_args(),
            self.policy.visibility_ms,
            b"".join([pack_id(it.message_id) for it in items]),
            "".join([_ACTIONS[it.action] for it in items]),
            bytes(extras),
            dry,
        )
        return blob, [_text(t) for t in names], dead, [[_text(t), p, c] for t, p, c in positions]

    # ---- consumer rate limits -------------------------------------------------------------

    async def take_tokens(self, consumer: str, rate: float, want: int) -> tuple[int, float]:
        """Deliveries ``consumer`` may take now under its ``rate_limit``, across all replicas;
        with none, the seconds until the next one."""
        got, wait = await self._call("take", "", "", consumer, rate, want)
        return int(got), float(wait)

    async def return_tokens(self, consumer: str, n: int) -> None:
        await self._call("give", "", "", consumer, n)

    def forget_consumer(self, consumer: str) -> None:
        """Nothing to drop here: the bucket is in Redis, shared by every replica."""

    # ---- housekeeping ---------------------------------------------------------------------

    async def release_consumer(self, consumer: str, now: int) -> int:
        n = await self._call("release", "", "", consumer, now)
        return int(n)

    async def prune(self, now: int) -> int:
        try:
            pairs = await self.redis.smembers("mq:pairs")
        except (RedisError, OSError) as e:
            raise self._down(e) from None
        n = 0
        for pair in pairs:
            text = pair.decode() if isinstance(pair, bytes) else pair
            g, _, t = text.partition("\n")
            n += int(await self._call("prune", g, t, now, self.policy.done_grace_ms))
        idle = [k for k, w in self._windows.items() if time.monotonic() - w.used > IDLE_WINDOW_S]
        for k in idle:
            await self._reading(self._windows.pop(k).close)
        return n

    async def unacked(self, now: int, limit: int) -> list[Unacked]:
        rows = await self._call("unacked", "", "", now, limit, UNACKED_SCAN)
        return [Unacked(g, t, int(oldest), int(n)) for g, t, oldest, n in _list(rows)]

    async def lags(self, topic: str, highs: list[int]) -> list[GroupLag]:
        try:
            rows = await self._call("lags", "", topic, msgspec.json.encode(highs).decode())
        except errors.Unavailable:
            return []  # describe still answers while Redis is down, without group lags
        return sorted(
            (GroupLag(group_id=g, lag=int(lag)) for g, lag in _list(rows)),
            key=lambda x: x.group_id,
        )

    async def forget_topic(self, topic: str) -> None:
        """The topic was deleted: drop every group's state of it and close its windows."""
        for key in [k for k in self._windows if k[1] == topic]:
            await self._reading(self._windows.pop(key).close)
        try:
            await self._call("drop", "", topic)
        except errors.Unavailable:
            log.warning("group state of a deleted topic left in redis", extra={"topic": topic})


def _redriven_key(dlq: TopicConfig) -> str:
    # By creation time too: a DLQ deleted and made again starts its offsets over.
    return f"mq:redriven:{dlq.name}:{dlq.created_at}"
