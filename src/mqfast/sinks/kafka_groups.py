"""Consumer groups on the Kafka engine: messages read from Kafka, leases kept in Redis.

Any replica serves any consume or acknowledgement of any group, so the state of a group can
live in no single replica: every lease, retry, dead-letter hand-off and committed position is in
Redis (``kafka_groups.lua``: one atomic script per step), and each replica reads the messages
from Kafka itself. An acknowledgement that reaches replica B for a message leased through
replica A is applied to the shared state directly: there is nothing to relay. ``kill -9`` of a
replica loses nothing: its leases expire in Redis and the messages are delivered again through
the others.

Each replica keeps, per group and topic it serves, a read-ahead *window* of each partition from
the group's committed position on (at most ``WINDOW`` messages per partition): priority and TTL
are decided inside that window, and a partition cannot run further than ``WINDOW`` messages
ahead of its oldest incomplete message. The committed position is also committed to Kafka for
the consumer group ``mqfast.<group>`` (so Kafka's tools show the lag, and a group whose Redis
state is lost resumes from there: at-least-once, never lost).

Where a lease expires: ``prepare`` in the Lua file, at the start of every lease call.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import time
from importlib import resources
from typing import Any

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

WINDOW = 2000  # messages read ahead per partition, per group and topic
IDLE_WINDOW_S = 300.0  # a window nobody consumed through for this long is closed
LOW_REFRESH_S = 5.0
COMMIT_EVERY_S = 1.0

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


class _Window:
    """Read-ahead of one group's partitions of one topic, on the reader thread only."""

    def __init__(
        self, settings: Settings, group: str, topic: str, partitions: int, sealed: bool
    ) -> None:
        self.settings = settings
        self.group = group
        self.topic = topic
        self.partitions = partitions
        self.sealed = sealed  # an encrypted topic: records kept as stored until leased
        self.consumer: Any = None
        self.records: list[dict[int, StoredMessage]] = [{} for _ in range(partitions)]
        self.next = [0] * partitions  # next offset expected from the fetcher
        self.paused: set[int] = set()
        self.lows: list[int] = []
        self.lows_at = 0.0
        self.committed: list[int] = []  # last positions seen in Redis
        self.kafka_committed: list[int] = []  # last positions committed to Kafka
        self.used = time.monotonic()
        self.lock = asyncio.Lock()

    def _open(self, positions: list[int]) -> None:
        self.consumer = Consumer(consumer_config(self.settings, f"mqfast.{self.group}"))
        self.consumer.assign(
            [TopicPartition(self.topic, p, positions[p]) for p in range(self.partitions)]
        )
        self.next = list(positions)

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

    def sync(self, positions: list[int], wait_s: float) -> None:
        """Drop what the group completed, reposition if needed, read what is new."""
        self.used = time.monotonic()
        self.committed = positions
        if self.consumer is None:
            self._open(positions)
        for p in range(self.partitions):
            recs = self.records[p]
            if positions[p] > self.next[p] or (
                positions[p] < self.next[p] and positions[p] not in recs and recs
            ):
                # The position moved outside what was read (retention, lost state): re-read.
                self.consumer.seek(TopicPartition(self.topic, p, positions[p]))
                recs.clear()
                self.next[p] = positions[p]
            elif recs:
                for off in [o for o in recs if o < positions[p]]:
                    del recs[off]
            elif positions[p] < self.next[p]:
                self.consumer.seek(TopicPartition(self.topic, p, positions[p]))
                self.next[p] = positions[p]
        self._fetch(wait_s)
        if wait_s == 0 and self._behind():
            # The broker has messages this window has not received yet (just resumed, or a
            # fetch in flight): a consume without timeout must still see a backlog.
            self._fetch(0.2)

    def _behind(self) -> bool:
        for p in range(self.partitions):
            if p in self.paused or len(self.records[p]) >= 100:
                continue
            try:
                _, hi = self.consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p), cached=True
                )
            except KafkaException:
                continue
            if hi > self.next[p]:
                return True
        return False

    def _fetch(self, wait_s: float) -> None:
        if wait_s > 0:
            # poll() returns with the first message; consume() would wait for a full batch.
            first = self.consumer.poll(wait_s)
            if first is not None:
                self._keep([first])
        while True:
            msgs = self.consumer.consume(1000, 0)
            self._keep(msgs)
            self._flow()
            if len(msgs) < 1000:
                return

    def _keep(self, msgs: list[Any]) -> None:
        for msg in msgs:
            if msg.error() is not None:
                continue
            p = msg.partition()
            off = msg.offset()
            if p >= self.partitions or off < self.next[p]:
                continue  # from before a seek
            self.records[p][off] = parse_record(msg, self.sealed)
            self.next[p] = off + 1

    def _flow(self) -> None:
        for p in range(self.partitions):
            tp = [TopicPartition(self.topic, p)]
            n = len(self.records[p])
            if n >= WINDOW and p not in self.paused:
                self.consumer.pause(tp)
                self.paused.add(p)
            elif n < WINDOW // 2 and p in self.paused:
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
            w = _Window(self.settings, group, cfg.name, cfg.partitions, cfg.encrypted)
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
        # One lease at a time per group and topic in this replica: concurrent ones would pick
        # the same candidates and all but one would come back empty-handed.
        async with w.lock:
            out = LeaseOutcome([])
            want = max_messages
            for attempt in range(3):
                res = await self._prepare(w, cfg, consumer, want, max_leased, now)
                if attempt == 0:
                    out.reclaimed = int(res["reclaimed"])
                    if max_leased is not None:
                        want = min(want, max_leased - int(res["held"]))
                dead = _list(res["dead"])
                if dead:
                    out.dead_lettered += await self._dead_letter(group, cfg, w, dead, now)
                out.next_due_ms = int(res["next_due"] or 0)
                if want - len(out.messages) <= 0:
                    break
                positions = [int(x) for x in res["pos"]]
                await self._reading(w.sync, positions, 0.5 if w.consumer is None else 0.0)
                lost = await self._pick(
                    group, cfg, w, res, consumer, want - len(out.messages), visibility_ms, now,
                    picker, out,
                )  # fmt: skip
                if not lost:  # another replica took some of the candidates: look again
                    break
            out.messages.sort(key=lambda m: -m.priority)
            return out

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

    async def _pick(
        self,
        group: str,
        cfg: TopicConfig,
        w: _Window,
        res: dict[str, Any],
        consumer: str,
        want: int,
        visibility_ms: int,
        now: int,
        picker: PriorityPicker,
        out: LeaseOutcome,
    ) -> int:
        """Lease up to ``want`` into ``out``; returns how many picks another replica took."""
        positions = [int(x) for x in res["pos"]]
        flat = _list(res["cur"])
        cursors = {str(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}
        retries: list[list[tuple[str, StoredMessage]]] = [[] for _ in range(PRIORITY_LEVELS)]
        for p, off, _n, _pri in _list(res["retries"]):
            rec = w.records[p].get(off) if p < w.partitions else None
            if rec is not None:
                retries[rec.priority].append(("r", rec))
        fresh: list[list[tuple[str, StoredMessage]]] = [[] for _ in range(PRIORITY_LEVELS)]
        for p in range(w.partitions):
            starts = [max(cursors.get(f"{p}:{pri}", 0), positions[p]) for pri in range(10)]
            counts = [0] * PRIORITY_LEVELS
            for off, rec in w.records[p].items():
                pri = rec.priority
                if off >= starts[pri] and counts[pri] < want:
                    fresh[pri].append(("f", rec))
                    counts[pri] += 1
        if w.partitions > 1:
            for candidates in fresh:
                candidates.sort(key=lambda c: (c[1].offset, c[1].partition))
        ready = [len(retries[i]) + len(fresh[i]) for i in range(PRIORITY_LEVELS)]
        ri = [0] * PRIORITY_LEVELS
        fi = [0] * PRIORITY_LEVELS
        picks: list[list[Any]] = []
        chosen: list[StoredMessage] = []
        leases = 0
        while leases < want:
            level = picker.pick(ready)
            if level < 0:
                break
            ready[level] -= 1
            if ri[level] < len(retries[level]):
                kind, rec = retries[level][ri[level]]
                ri[level] += 1
            else:
                kind, rec = fresh[level][fi[level]]
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
            if not expired:
                leases += 1
            picks.append(
                [kind, rec.partition, rec.offset, rec.priority, rec.message_id, expired,
                 1 if cfg.dead_letter_expired else 0, reason]
            )  # fmt: skip
            chosen.append(rec)
        if not picks:
            return 0
        deadline = now + visibility_ms
        claimed = await self._call(
            "claim", group, cfg.name, now, deadline, consumer, msgspec.json.encode(picks).decode()
        )
        dead: list[list[Any]] = []
        lost = 0
        for rec, pick, n in zip(chosen, picks, _list(claimed["out"]), strict=True):
            if n == 0:
                lost += 1
            elif n > 0:
                out.messages.append(
                    LeasedMessage(
                        message_id=rec.message_id,
                        topic=rec.topic,
                        partition=rec.partition,
                        offset=rec.offset,
                        key=rec.key,
                        content=rec.content,
                        headers=rec.headers,
                        priority=rec.priority,
                        timestamp=rec.timestamp,
                        delivery_count=int(n),
                        lease_deadline=deadline,
                        expires_at=rec.expires_at,
                    )
                )
            elif n == -2:
                out.expired += 1
            elif n == -1 and pick[5] == 2:
                reason = pick[7]
                dead.append([f"{rec.partition}:{rec.offset}", 0, rec.message_id, reason, reason])
            elif n == -1:
                out.expired += 1
                f = f"{rec.partition}:{rec.offset}"
                dead.append([f, 0, rec.message_id, "ttl", "expired"])
        if dead:
            out.dead_lettered += await self._dead_letter(group, cfg, w, dead, now)
        return lost

    # ---- dead letters ---------------------------------------------------------------------

    async def _dead_letter(
        self, group: str, cfg: TopicConfig, w: _Window | None, dead: list[list[Any]], now: int
    ) -> int:
        """Write dead letters to ``<topic>.dlq``, then mark them complete; returns how many."""
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
        for f, count, mid, error, reason in (d[:5] for d in dead):
            p, _, off_s = str(f).partition(":")
            part, off = int(p), int(off_s)
            rec = w.records[part].get(off) if w is not None and part < w.partitions else None
            if rec is None:
                got = await self.sink.read(cfg.name, part, off, 1)
                rec = got[0] if got and got[0].offset == off else None
            stored = False  # copied as stored: it does not decrypt
            if isinstance(rec, SealedMessage):
                try:
                    rec = await self.sink.open(rec)
                except DecryptError:
                    stored = True
            if rec is not None:
                headers = [(k, v.encode()) for k, v in rec.headers.items()]
                headers += [
                    (H_PRIORITY, str(rec.priority).encode()),
                ]
                why = dlq_headers(
                    cfg.name, part, off, str(mid), group, count, str(error), str(reason), now
                )
                headers += [(k, v.encode()) for k, v in why.items()]
                headers.insert(0, (H_ID, message_id_at(now).encode()))
                if isinstance(rec, SealedMessage):
                    key, value = rec.raw_key, rec.raw_value
                else:
                    key = rec.key.encode() if rec.key is not None else None
                    value = rec.content.encode()
                await self.sink.produce_one(dlq, 0, key, value, headers, as_stored=stored)
            written.append(str(f))
        positions = await self._call(
            "finish", group, cfg.name, now, msgspec.json.encode(written).decode()
        )
        if w is not None:
            for p, c in _list(positions):
                if c is not None and p < len(w.committed):
                    w.committed[p] = int(c)
        return len(written)

    async def redrive(self, topic: str, max_messages: int, now: int) -> int:
        cfg = await self.sink.get_topic(topic)
        if cfg is None:
            raise errors.UnknownTopic(f"unknown topic {topic!r}")
        dlq = dlq_name(topic)
        if await self.sink.get_topic(dlq) is None:
            return 0
        lock = f"mq:redrive:{topic}"
        try:
            if not await self.redis.set(lock, "1", nx=True, ex=60):
                raise errors.Conflict(f"a redrive of {topic!r} is already running")
        except (RedisError, OSError) as e:
            raise self._down(e) from None
        try:
            [(lo, hi)] = await self.sink.watermarks(dlq, 1)
            n = 0
            while n < max_messages and lo < hi:
                batch = await self.sink.read(dlq, 0, lo, min(500, max_messages - n))
                if not batch:
                    break
                for m in batch:
                    headers = [
                        (k, v.encode())
                        for k, v in m.headers.items()
                        if not k.startswith(DLQ_HEADER_PREFIX)
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
                        partition_for_key(key, cfg.partitions)
                        if key is not None
                        else m.offset % cfg.partitions
                    )
                    await self.sink.produce_one(
                        topic, target, key, value, headers, as_stored=stored
                    )
                    n += 1
                lo = batch[-1].offset + 1
                # Everything below lo is back in the topic: remove it from the DLQ.
                await self.sink.delete_before(dlq, 0, lo)
            return n
        finally:
            try:
                await self.redis.delete(lock)
            except (RedisError, OSError):
                pass

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
        # The topic each item must be on for the script to apply it ("" any; a topic is never
        # "\n", so that finds nothing), and the items refused before the script ran.
        on: list[str] = [topic or ""] * len(items)
        denied: dict[int, errors.MqfastError] = {}
        if authorize is not None and (topic is None or authorize(topic) is not None):
            # Only without a named topic (or a refused one): learn each message's topic first,
            # one more round trip, read-only; the script then applies an item only if the
            # message is still on the topic that was authorised.
            verdicts: dict[str, errors.MqfastError | None] = {}
            for i, t in enumerate(await self._topics_of(group, items)):
                on[i] = "\n" if t is None else t
                if t is not None and topic in (None, t):
                    if t not in verdicts:
                        verdicts[t] = authorize(t)
                    refusal = verdicts[t]
                    if refusal is not None:
                        denied[i] = refusal
                        on[i] = "\n"
        payload = [
            [
                it.message_id,
                it.action,
                it.error or "",
                -1 if it.delay_ms is None else it.delay_ms,
                it.visibility_ms or 0,
                on[i],
            ]
            for i, it in enumerate(items)
        ]
        res = await self._call(
            "settle",
            group,
            topic or "",
            now,
            consumer or "",
            msgspec.json.encode(payload).decode(),
            *self._policy_args(),
            self.policy.visibility_ms,
        )
        for t, p, c in _list(res["pos"]):
            w = self._windows.get((group, t))
            if w is not None and c is not None and p < len(w.committed):
                w.committed[p] = int(c)
        dead = _list(res["dead"])
        by_topic: dict[str, list[list[Any]]] = {}
        for d in dead:
            by_topic.setdefault(d[5], []).append(d)
        for t, entries in by_topic.items():
            cfg = await self.sink.get_topic(t)
            if cfg is not None:
                await self._dead_letter(group, cfg, self._windows.get((group, t)), entries, now)
        results = []
        for i, (item, r) in enumerate(zip(items, _list(res["results"]), strict=True)):
            if i in denied:
                results.append(SettleResult(item.message_id, "", error=denied[i]))
            else:
                results.append(self._result(group, topic, item, r))
        return results

    async def _topics_of(self, group: str, items: list[SettleItem]) -> list[str | None]:
        """The topic of each item's message in ``group`` (None: never delivered to it)."""
        try:
            locs = await self.redis.hmget(f"mq:{{{group}}}:ids", [it.message_id for it in items])
        except (RedisError, OSError) as e:
            raise self._down(e) from None
        self._up()
        out: list[str | None] = []
        for loc in locs:
            text = loc.decode() if isinstance(loc, bytes) else loc
            out.append(None if text is None else text.partition("\n")[0])
        return out

    @staticmethod
    def _result(group: str, topic: str | None, item: SettleItem, r: dict[str, Any]) -> SettleResult:
        res = SettleResult(
            message_id=item.message_id,
            status=r.get("status", ""),
            topic=r.get("topic", ""),
            delivery_count=int(r.get("count", 0)),
        )
        mid = item.message_id
        err = r.get("err")
        if err == "not_found":
            where = f" in topic {topic!r}" if topic is not None else ""
            res.error = errors.NotFound(
                f"message {mid!r}{where} has no delivery to group {group!r}"
                " (never delivered to it, or completed long ago)",
                field="message_id",
            )
        elif err == "gone":
            res.error = errors.Conflict(
                f"message {mid!r} is no longer deliverable in group {group!r} ({r.get('detail')})",
                field="message_id",
            )
        elif err == "acked":
            res.error = errors.Conflict(
                f"message {mid!r} is already acknowledged in group {group!r}", field="message_id"
            )
        elif err == "expired":
            then = (
                f"it reached the delivery limit and went to {dlq_name(res.topic)!r}"
                if r.get("detail") == "dead"
                else "it will be delivered again"
            )
            res.error = errors.Conflict(
                f"the lease of message {mid!r} expired; {then}", field="message_id"
            )
        elif err == "other_consumer":
            res.error = errors.Conflict(
                f"message {mid!r} is leased to another consumer of group {group!r}",
                field="consumer_id",
            )
        if "processing" in r:
            res.processing_ms = float(r["processing"])
        if "redeliver_at" in r:
            res.redeliver_at = int(r["redeliver_at"])
        if "deadline" in r:
            res.lease_deadline = int(r["deadline"])
        return res

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
