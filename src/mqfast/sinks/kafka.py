"""The Kafka engine: messages in Apache Kafka through librdkafka (confluent-kafka).

Produce: the hot path hands each per-tick batch to ``submit``, which queues every message in
librdkafka's producer (acks=all, idempotence, lz4) without blocking; a poll thread receives the
delivery reports and hands each finished batch back to the loop, coalesced into one wake-up per
poll. A full local queue is a 503 with Retry-After (memory stays bounded), a delivery that timed
out is a 503 whose outcome is unknown (``X-Mqfast-Outcome: unknown``): the broker may have
written it.

Topics: created, described and deleted through ``AdminClient``. Kafka has no place for mqfast's
own topic settings (``dead_letter_expired``, ``created_at``), so those live in the metadata
store's topic registry; a topic created by other tools is served with settings derived from
Kafka's own configuration.

Encrypted topics (``crypto.py``): the content is encrypted in ``submit`` with the topic's data
key, which is stored (wrapped) in PostgreSQL before its first use; a batch that needs a new key
waits for that one write, later ones pay nothing. Records are read back sealed
(:class:`SealedMessage`) and decrypted when leased (``open``). The flag lives in the registry,
which is written before the topic exists in Kafka, so no replica can see the topic without it.

Consumer groups are in ``sinks.kafka_groups`` (Redis holds the leases, Kafka the messages).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import msgspec
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    NewTopic,
    OffsetSpec,
)

from mqfast import errors
from mqfast.config import Settings
from mqfast.crypto import HEADER as ENC_HEADER
from mqfast.crypto import (
    AsyncWrappedKeyStore,
    DecryptError,
    Encryptor,
    Keyring,
    PreparedOnly,
    open_message,
)
from mqfast.messages import (
    GroupLag,
    PartitionStats,
    StoredMessage,
    TopicConfig,
    TopicInfo,
)
from mqfast.sinks import Delivery, DoneCallback
from mqfast.sinks import kafka_idem as idem
from mqfast.sinks.embedded import reused_key

log = logging.getLogger("mqfast.kafka")

# Record headers mqfast writes beside the user's own (which keep their names).
H_ID = "mqfast-id"
H_PRIORITY = "mqfast-priority"
H_EXPIRES = "mqfast-expires"
OWN_HEADERS = frozenset((H_ID, H_PRIORITY, H_EXPIRES))
NS_PER_MS = 1_000_000
ADMIN_TIMEOUT_S = 15.0
METADATA_TTL_S = 2.0
# A topic created through another replica reaches each broker's metadata on its own time.
PROPAGATION_S = 5.0  # how long a lookup waits for a topic the registry knows (bounded)
PROPAGATION_AGE_MS = 60_000  # only for topics registered this recently (else: deleted)
# A retry of an idempotent produce still in flight waits this long for its outcome, then is a
# 409 with Retry-After.
IDEM_WAIT_S = 5.0
# After every broker is reported down, new produce requests are refused at once (their outcome
# is then certain: not written) until a metadata request succeeds again.
DOWN_RECHECK_S = 1.0

_headers_decoder = msgspec.json.Decoder(dict[str, str])


class OutcomeUnknown(errors.Unavailable):
    """The broker did not confirm in time: the message may or may not have been written."""

    extra_headers = errors.RETRY_AFTER_1S + b"x-mqfast-outcome: unknown\r\n"


class TopicRegistry(AsyncWrappedKeyStore, Protocol):
    """mqfast's own topic settings and the wrapped data keys of encrypted topics, kept by the
    metadata store (``meta.postgres``)."""

    async def save_topic(self, cfg: TopicConfig) -> None: ...

    async def remove_topic(self, name: str) -> None: ...

    def cached_topics(self) -> dict[str, TopicConfig]: ...

    async def load_topics(self) -> dict[str, TopicConfig]: ...


def client_config(settings: Settings) -> dict[str, Any]:
    """Settings shared by every Kafka client (each kind adds its own, then its share of
    ``settings.kafka_options``: security and ``KAFKA_OPT_*``)."""
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_brokers,
        "client.id": f"mqfast-{os.uname().nodename}-{os.getpid()}",
        "socket.keepalive.enable": True,
    }
    return conf


def producer_config(settings: Settings) -> dict[str, Any]:
    conf = client_config(settings)
    conf.update(
        {
            # The durability promise: a 2xx only after every in-sync replica has the message.
            "acks": "all",
            "enable.idempotence": True,
            "compression.type": "lz4",
            # Chosen with bench/kafka.py: a short linger fills batches under load and costs
            # well under a millisecond when idle.
            "linger.ms": 1,
            "batch.size": 1_000_000,
            # The local queue bounds memory; beyond it produce answers 503.
            "queue.buffering.max.messages": 200_000,
            "queue.buffering.max.kbytes": 262_144,
            # How long a message may wait for its delivery report: a broker outage turns into
            # 503s within this bound instead of requests hanging.
            "message.timeout.ms": 10_000,
            "message.max.bytes": max(1_048_576, settings.max_batch_bytes + 65_536),
        }
    )
    conf.update(_filtered(settings.kafka_options, skip=_CONSUMER_ONLY))
    return conf


def consumer_config(settings: Settings, group: str | None) -> dict[str, Any]:
    conf = client_config(settings)
    conf.update(
        {
            "group.id": group or "mqfast-admin",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            # A consume waits for new messages on the broker, not in a sleep loop here.
            "fetch.wait.max.ms": 50,
            "queued.max.messages.kbytes": 16_384,
            # With its queue full, a partition's next fetch waits this long (1 s by default):
            # the window reads from that queue and must not find it drained and idle.
            "fetch.queue.backoff.ms": 20,
        }
    )
    conf.update(_filtered(settings.kafka_options, skip=_PRODUCER_ONLY))
    return conf


_PRODUCER_ONLY = (
    "acks",
    "enable.idempotence",
    "compression.type",
    "linger.ms",
    "batch.size",
    "batch.num.messages",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "queue.buffering.max.ms",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "retries",
    "message.send.max.retries",
    "retry.backoff.ms",
    "request.required.acks",
    "compression.codec",
    "max.in.flight.requests.per.connection",
    "max.in.flight",
)
_CONSUMER_ONLY = (
    "fetch.wait.max.ms",
    "fetch.min.bytes",
    "fetch.max.bytes",
    "max.partition.fetch.bytes",
    "queued.max.messages.kbytes",
    "queued.min.messages",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "isolation.level",
    "auto.offset.reset",
)


def _filtered(options: Mapping[str, str], skip: tuple[str, ...]) -> dict[str, str]:
    """``KAFKA_OPT_*`` (and the security settings) without ``skip``: librdkafka warns about
    keys of another kind of client."""
    return {k: v for k, v in options.items() if k not in skip}


def _map_error(err: KafkaError) -> errors.MqfastError:
    code = err.code()
    if code == KafkaError._MSG_TIMED_OUT:
        return OutcomeUnknown(
            "kafka: no delivery report within message.timeout.ms; the message may or may not "
            "have been written"
        )
    if code in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
        return errors.UnknownTopic("unknown topic (deleted while the message was in flight)")
    if code == KafkaError.MSG_SIZE_TOO_LARGE or code == getattr(
        KafkaError, "_MSG_SIZE_TOO_LARGE", -1
    ):
        return errors.PayloadTooLarge("kafka refused the message: larger than the topic allows")
    return errors.Unavailable(f"kafka: {err.str()}")


class _PartitionQueue:
    """Messages of one partition waiting for their reports, and their batches (same order).

    ``values`` is set for an encrypted topic: the ciphertexts sent, which the reports carry.
    """

    __slots__ = ("deliveries", "trackers", "values", "written")

    def __init__(self, sealed: bool) -> None:
        self.deliveries: deque[Delivery] = deque()
        self.trackers: deque[_Batch] = deque()
        self.values: deque[bytes] | None = deque() if sealed else None
        self.written = -1  # the offset of the last message this process wrote there


class _Batch:
    """Counts the delivery reports of one submitted batch (called on the poll thread)."""

    __slots__ = ("deliveries", "remaining", "sink")

    def __init__(self, sink: KafkaSink, deliveries: list[Delivery]) -> None:
        self.sink = sink
        self.deliveries = deliveries
        # One more than the messages: submit() holds it until every message is queued, so the
        # batch cannot finish while it is still being submitted.
        self.remaining = len(deliveries) + 1

    def settled(self, n: int) -> None:
        with self.sink._done_lock:
            self.remaining -= n
            last = self.remaining == 0
        if last:
            self.sink._finished(self.deliveries)


class _Reported(_Batch):
    """A batch whose last report resolves ``future`` on the loop instead of answering: the
    keys of its messages are recorded before the answers go out."""

    __slots__ = ("future",)

    def __init__(self, sink: KafkaSink, deliveries: list[Delivery], future: Any) -> None:
        super().__init__(sink, deliveries)
        self.future = future

    def settled(self, n: int) -> None:
        with self.sink._done_lock:
            self.remaining -= n
            last = self.remaining == 0
        if last:
            loop = self.future.get_loop()
            loop.call_soon_threadsafe(_set_result, self.future, 0)


_PRIORITY_HEADERS = [(H_PRIORITY, b"%d" % p) for p in range(10)]


def record_headers(d: Delivery) -> list[tuple[str, bytes]]:
    """mqfast's own headers, then the user's (the hot path: no more than it takes)."""
    out: list[tuple[str, bytes]] = [(H_ID, d.message_id.encode())]
    if d.priority:
        out.append(_PRIORITY_HEADERS[d.priority])
    if d.expires_ms:
        out.append((H_EXPIRES, b"%d" % d.expires_ms))
    if d.headers:
        for k, v in _headers_decoder.decode(d.headers).items():
            if k not in OWN_HEADERS:
                out.append((k, v.encode()))
    return out


class SealedMessage(StoredMessage, gc=False):
    """A record of an encrypted topic as read, before :meth:`KafkaSink.open` (``content``
    empty): the raw key and ciphertext, with ``mqfast-enc`` among the headers."""

    raw_key: bytes | None = None
    raw_value: bytes = b""


def _own_headers(msg: Any) -> tuple[str, int, int, dict[str, str]]:
    """(message id, priority, expiry, the user's headers) of a Kafka record."""
    mid = ""
    priority = 0
    expires = 0
    user: dict[str, str] = {}
    for k, v in msg.headers() or ():
        if k == H_ID:
            mid = v.decode("ascii", "replace") if v else ""
        elif k == H_PRIORITY:
            priority = int(v or 0)
        elif k == H_EXPIRES:
            expires = int(v or 0)
        else:
            user[k] = v.decode("utf-8", "replace") if v is not None else ""
    if not mid:  # written by another Kafka client: a stable id from its position
        mid = f"kafka-{msg.topic()}-{msg.partition()}-{msg.offset()}"
    return mid, priority, expires, user


def parse_record(msg: Any, sealed: bool = False) -> StoredMessage:
    """A Kafka record as mqfast reads it back (its own headers split from the user's).

    ``sealed``: the record is of an encrypted topic; it is kept as stored (a
    :class:`SealedMessage`) until :meth:`KafkaSink.open` decrypts it.
    """
    mid, priority, expires, user = _own_headers(msg)
    key = msg.key()
    value = msg.value()
    common = {
        "message_id": mid,
        "topic": msg.topic(),
        "partition": msg.partition(),
        "offset": msg.offset(),
        "key": key.decode("utf-8", "replace") if key is not None else None,
        "headers": user,
        "priority": priority,
        "timestamp": msg.timestamp()[1],
        "expires_at": expires,
    }
    if sealed:
        return SealedMessage(content="", raw_key=key, raw_value=value or b"", **common)
    content = value.decode("utf-8", "replace") if value is not None else ""
    return StoredMessage(content=content, **common)


class KafkaSink:
    """``sinks.Sink`` on Apache Kafka."""

    name = "kafka"

    def __init__(
        self, settings: Settings, registry: TopicRegistry, keyring: Keyring | None = None
    ) -> None:
        self.settings = settings
        self.registry = registry
        # Encryption at rest: data keys are wrapped and kept in the registry (PostgreSQL), made
        # ready before the hot path needs them (prepare) and loaded before a record is opened.
        self.encryptor: Encryptor | None = (
            None if keyring is None else Encryptor(keyring, PreparedOnly())
        )
        self._preparing: dict[str, asyncio.Future[None]] = {}
        # Names of the topics whose content is encrypted: from the registry at each refresh (kept
        # as they were while it cannot be read) and kept when a name leaves the topic cache
        # (forget_topic), so a message already batched for it is never sent in clear.
        self._encrypted: set[str] = set()
        # Topics seen while the registry could not be read and unknown to its last copy: their
        # settings (encrypted or not) are unknown, so they are not served until it answers.
        self._unverified: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_done: DoneCallback | None = None
        conf = producer_config(settings)
        # librdkafka reports every message within this: a pending key older is undecided
        self._report_within_ms = int(
            conf.get("delivery.timeout.ms", conf.get("message.timeout.ms", 300_000))
        ) + int(conf.get("linger.ms", 5))
        self._redis: Any = None  # idempotency keys (kafka_idem), connected at start
        self._claim: Any = None
        self._swap: Any = None
        self._producer: Any = None
        self._admin: Any = None
        self._util: Any = None  # a consumer for watermarks and reads, used on the pool thread
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="mqfast-kafka-admin"
        )
        self._poller: threading.Thread | None = None
        self._running = False
        self._done: list[list[Delivery]] = []
        self._done_lock = threading.Lock()
        self._in_flight = 0
        # topic -> partition -> messages waiting for their delivery report, in produce order;
        # encrypted messages in their own queues (reports of the two kinds come to two callbacks)
        self._queues: dict[str, dict[int, _PartitionQueue]] = {}
        self._sealed_queues: dict[str, dict[int, _PartitionQueue]] = {}
        self._topics: dict[str, TopicConfig] = {}
        self._topics_at = 0.0
        self._down_since = 0.0  # monotonic time every broker was reported down; 0 when up
        self._last_error = ""
        # Engine-side hooks: group lags for describe, cleanup after a delete.
        self.group_lags: Callable[[str, list[int]], Any] | None = None
        self.topic_deleted: Callable[[str], Any] | None = None

    @property
    def can_encrypt(self) -> bool:
        """True when a master key is configured: encrypted topics can be created."""
        return self.encryptor is not None

    # ---- lifecycle ------------------------------------------------------------------------

    def bind(self, loop: asyncio.AbstractEventLoop, on_done: DoneCallback) -> None:
        self._loop = loop
        self._on_done = on_done

    async def start(self) -> None:
        conf = producer_config(self.settings)
        conf["error_cb"] = self._error_cb
        self._producer = Producer(conf)
        admin_conf = client_config(self.settings)
        admin_conf.update(
            _filtered(self.settings.kafka_options, skip=_PRODUCER_ONLY + _CONSUMER_ONLY)
        )
        self._admin = AdminClient(admin_conf)
        self._util = Consumer(consumer_config(self.settings, None))
        from mqfast.quota import connect as redis_client

        self._redis = redis_client(self.settings, timeout_s=2.0)
        self._claim = self._redis.register_script(idem.CLAIM)
        self._swap = self._redis.register_script(idem.SWAP)
        self._running = True
        self._poller = threading.Thread(target=self._poll, name="mqfast-kafka-poll", daemon=True)
        self._poller.start()
        try:
            await self._refresh_topics(force=True)
        except errors.Unavailable as e:
            raise errors.Unavailable(
                f"kafka: cannot reach the brokers at {self.settings.kafka_brokers}: {e.message}"
            ) from None
        log.info(
            "kafka engine started",
            extra={"brokers": self.settings.kafka_brokers, "topics": len(self._topics)},
        )

    async def close(self, timeout: float) -> None:
        if self._producer is not None:
            deadline = time.monotonic() + timeout
            left = await self._run(self._producer.flush, max(0.1, timeout))
            while self._in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if left:
                log.warning("kafka: messages left unconfirmed at shutdown", extra={"left": left})
        self._running = False
        if self._poller is not None:
            self._poller.join(timeout=2)
        if self._util is not None:
            await self._run(self._util.close)
            self._util = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        self._pool.shutdown(wait=False)

    def _poll(self) -> None:
        producer = self._producer
        last_check = 0.0
        while self._running:
            producer.poll(0.05)
            if self._down_since and time.monotonic() - last_check > DOWN_RECHECK_S:
                last_check = time.monotonic()
                try:
                    producer.list_topics(timeout=1.0)
                    log.info("kafka: brokers reachable again")
                    self._down_since = 0.0
                except KafkaException:
                    pass

    def _error_cb(self, err: KafkaError) -> None:
        self._last_error = err.str()
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            if not self._down_since:
                log.error("kafka: every broker is down", extra={"error": err.str()})
            self._down_since = time.monotonic()
        elif err.fatal():
            log.critical("kafka: fatal producer error", extra={"error": err.str()})
        else:
            log.warning("kafka client error", extra={"error": err.str()})

    # ---- produce (loop thread) ------------------------------------------------------------

    def submit(self, batch: list[Delivery]) -> None:
        if self._down_since:
            err = errors.Unavailable(
                "kafka: no broker reachable; nothing was written, retry later"
                f" (last error: {self._last_error})"
            )
            for d in batch:
                d.error = err
            self._finish_now(batch)
            return
        tracker = _Batch(self, batch)
        self._in_flight += 1
        later: list[Delivery] = []
        queued = self._send(batch, tracker, later)
        if later:
            # Messages to encrypted topics whose data key is not stored yet: sent once it is,
            # the batch held open meanwhile (the +1 of the tracker).
            tracker.settled(len(batch) - len(later) - queued)
            assert self._loop is not None
            self._loop.create_task(self._send_later(later, tracker))
        else:
            # Reports arrive only for queued messages: the refused ones are settled now.
            tracker.settled(len(batch) - queued + 1)

    def submit_keyed(self, batch: list[Delivery]) -> None:
        """``submit``, the deliveries with an idempotency key first claimed in Redis
        (``kafka_idem``); those without go on at once."""
        if self._down_since or self._redis is None:
            self.submit(batch)
            return
        plain = [d for d in batch if d.idem is None]
        if plain:
            self.submit(plain)
        assert self._loop is not None
        self._in_flight += 1
        self._loop.create_task(self._produce_keyed(idem.redis_names(batch)))

    async def _produce_keyed(self, keyed: list[tuple[Delivery, str]]) -> None:
        sending: list[asyncio.Task[None]] = []
        try:
            await self._claim_keys(keyed, sending)
            if sending:
                await asyncio.gather(*sending)
        finally:
            self._in_flight -= 1

    def _answer(self, deliveries: list[Delivery]) -> None:
        if deliveries:
            assert self._on_done is not None
            self._on_done(deliveries)

    async def _claim_keys(
        self, todo: list[tuple[Delivery, str]], sending: list[asyncio.Task[None]]
    ) -> None:
        """Claim each key; answer retries of stored messages, send the new ones, wait (bounded)
        for those in flight elsewhere, take over those whose producer is gone."""
        window = self.settings.idempotency_window_ns // NS_PER_MS
        give_up = time.monotonic() + IDEM_WAIT_S
        pause = 0.01
        while todo:
            names = [name for _, name in todo]
            deadline = idem.now_ms() + self._report_within_ms + idem.PENDING_GRACE_MS
            values = [idem.pending_value(d, deadline) for d, _ in todo]
            try:
                found = await self._claim(keys=names, args=[window, *values])
            except Exception as e:  # Redis down: nothing was written, certain
                err = idem.redis_unavailable(e)
                for d, _ in todo:
                    d.error = err
                self._answer([d for d, _ in todo])
                return
            answered: list[Delivery] = []
            send: list[tuple[Delivery, str, str]] = []
            waiting: list[tuple[Delivery, str]] = []
            for (d, name), value, raw in zip(todo, values, found, strict=True):
                text = idem.decode(raw)
                if not text:
                    send.append((d, name, value))
                    continue
                f = idem.Found(text)
                assert d.idem is not None
                if not f.matches(d.idem):
                    d.error = reused_key(d)
                    answered.append(d)
                elif f.done:
                    f.replay(d)
                    answered.append(d)
                elif f.deadline_ms > idem.now_ms():
                    waiting.append((d, name))
                else:
                    step = await self._take_over(d, name, text, value, f, window)
                    if step == "send":
                        send.append((d, name, value))
                    elif step == "answered":
                        answered.append(d)
                    else:
                        waiting.append((d, name))  # another retry took it over first
            self._answer(answered)
            if send:
                sending.append(asyncio.ensure_future(self._send_claimed(send, window)))
            todo = waiting
            if todo:
                if time.monotonic() >= give_up:
                    for d, _ in todo:
                        d.error = errors.IdempotencyKeyInFlight(
                            "a produce with this idempotency key is still in flight; retry "
                            "to get its outcome",
                            field=d.idem.field if d.idem is not None else None,
                        )
                    self._answer([d for d, _ in todo])
                    return
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.2)

    async def _take_over(
        self, d: Delivery, name: str, old: str, value: str, f: idem.Found, window: int
    ) -> str:
        """A pending key past its deadline: make it ours, then look in Kafka for the message it
        names. Returns "wait" (another retry changed the key first), "answered" (``d`` has the
        found message, or an error) or "send" (not in Kafka: produce it under the key)."""
        try:
            if not await self._swap(keys=[name], args=[old, value, window]):
                return "wait"
            offset = await self._run(self._find, d.topic, f.partition, f.message_id, f.timestamp_ms)
            if offset < 0:
                return "send"
            assert d.idem is not None
            done = idem.done_value(
                d.idem.fingerprint, f.partition, offset, f.message_id, f.timestamp_ms
            )
            await self._swap(keys=[name], args=[value, done, window])
        except errors.MqfastError as e:
            d.error = e  # the key stays ours until its deadline; the next retry looks again
            return "answered"
        except Exception as e:
            d.error = idem.redis_unavailable(e)
            return "answered"
        f.offset = offset
        f.replay(d)
        return "answered"

    def _find(self, topic: str, partition: int, mid: str, timestamp_ms: int) -> int:
        """The offset of the record with ``mqfast-id`` ``mid`` (written at ``timestamp_ms``
        or later) in one partition, or -1 (pool thread)."""
        want = mid.encode()
        c = Consumer(consumer_config(self.settings, None))
        try:
            [at] = c.offsets_for_times(
                [TopicPartition(topic, partition, timestamp_ms)], timeout=ADMIN_TIMEOUT_S
            )
            _, hi = watermarks(c, topic, partition)
            start = at.offset if at.offset >= 0 else hi
            if start >= hi:
                return -1
            c.assign([TopicPartition(topic, partition, start)])
            deadline = time.monotonic() + ADMIN_TIMEOUT_S
            while time.monotonic() < deadline:
                records: list[Any] = c.consume(500, 0.5)
                for msg in records:
                    if msg.error() is not None:
                        continue
                    at_offset: int = msg.offset()
                    for k, v in msg.headers() or ():
                        if k == H_ID and v == want:
                            return at_offset
                    if at_offset >= hi - 1:
                        return -1
            raise errors.Unavailable(
                f"kafka: could not read topic {topic!r} partition {partition} to settle an "
                "idempotency key in time; retry"
            )
        finally:
            c.close()

    async def _send_claimed(self, send: list[tuple[Delivery, str, str]], window: int) -> None:
        """Produce the messages whose keys this replica claimed, record each outcome under its
        key (done; pending briefly when unknown; gone when certainly not written), answer."""
        ds = [d for d, _, _ in send]
        for topic in dict.fromkeys(d.topic for d in ds if d.topic in self._encrypted):
            try:
                await self._prepare_key(topic)
            except errors.MqfastError:
                pass  # _send fails its messages (no data key)
        assert self._loop is not None
        fut: asyncio.Future[int] = self._loop.create_future()
        tracker = _Reported(self, ds, fut)
        queued = self._send(ds, tracker, None)
        tracker.settled(len(ds) - queued + 1)
        await fut
        pipe = self._redis.pipeline(transaction=False)
        for d, name, value in send:
            assert d.idem is not None
            if d.error is None:
                new = idem.done_value(
                    d.idem.fingerprint, d.partition, d.offset, d.message_id, d.timestamp_ms
                )
            elif isinstance(d.error, OutcomeUnknown):
                new = idem.pending_value(d, idem.now_ms() + idem.UNKNOWN_GRACE_MS)
            else:
                new = ""
            await self._swap(keys=[name], args=[value, new, window], client=pipe)
        try:
            await pipe.execute()
        except Exception as e:
            # the keys stay pending until their deadline, then a retry looks in Kafka
            log.warning("kafka: idempotency keys not recorded", extra={"error": str(e)})
        self._answer(ds)

    def _send(self, batch: list[Delivery], tracker: _Batch, later: list[Delivery] | None) -> int:
        """Queue ``batch`` in the producer; returns how many were queued.

        A message to an encrypted topic without a data key ready goes to ``later``, or fails
        when ``later`` is None (the key could not be stored).
        """
        produce = self._producer.produce
        report = self._report
        headers_of = record_headers
        encrypted = self._encrypted
        queued = 0
        last_topic = ""
        last_partition = -1
        sealed = False
        q: _PartitionQueue | None = None
        for d in batch:
            topic = d.topic
            partition = d.partition
            if q is None or partition != last_partition or topic != last_topic:
                if topic != last_topic:
                    sealed = topic in encrypted
                    report = self._report_sealed if sealed else self._report
                q = self._queue(topic, partition, sealed)  # a batch is mostly one partition
                last_topic, last_partition = topic, partition
            value = d.value
            if sealed:
                enc = self.encryptor
                if enc is None or not enc.ready(topic):
                    if enc is not None and later is not None:
                        later.append(d)
                    else:
                        what = "no master key is configured" if enc is None else "no data key"
                        d.error = errors.Unavailable(f"topic {topic!r} is encrypted and {what}")
                    continue
                value, hv = enc.encrypt(topic, d.key, d.message_id, value)
                headers = headers_of(d)
                headers.append((ENC_HEADER, hv.encode()))
            else:
                headers = headers_of(d)
            # Queued before produce(): the report may come before it returns.
            q.deliveries.append(d)
            q.trackers.append(tracker)
            if q.values is not None:
                q.values.append(value)
            try:
                produce(
                    topic,
                    value,
                    d.key,
                    partition=partition,
                    timestamp=d.timestamp_ms,
                    headers=headers,
                    on_delivery=report,
                )
                queued += 1
                continue
            except BufferError:
                d.error = errors.Unavailable("kafka: the local send queue is full; retry later")
            except KafkaException as e:
                d.error = _map_error(e.args[0])
            except Exception as e:  # a bad argument must fail this message, not the batch
                d.error = errors.BadRequest(f"kafka refused the message: {e}")
            q.deliveries.pop()
            q.trackers.pop()
            if q.values is not None:
                q.values.pop()
        return queued

    async def _send_later(self, later: list[Delivery], tracker: _Batch) -> None:
        failed: dict[str, errors.MqfastError] = {}
        for topic in dict.fromkeys(d.topic for d in later):
            try:
                await self._prepare_key(topic)
            except errors.MqfastError as e:
                log.error(
                    "encrypted topic: no data key could be stored; its messages fail",
                    extra={"topic": topic, "error": e.message},
                )
                failed[topic] = errors.Unavailable(
                    f"topic {topic!r} is encrypted and no data key could be stored: {e.message}"
                )
        ready = []
        for d in later:
            err = failed.get(d.topic)
            if err is None and self._down_since:
                err = errors.Unavailable("kafka: no broker reachable; nothing was written")
            if err is None:
                ready.append(d)
            else:
                d.error = err
        queued = self._send(ready, tracker, None)
        tracker.settled(len(later) - queued + 1)

    async def _prepare_key(self, topic: str) -> None:
        """Store a new data key for ``topic`` (one at a time per topic in this process)."""
        assert self.encryptor is not None
        fut = self._preparing.get(topic)
        if fut is None:
            fut = asyncio.ensure_future(self.encryptor.prepare(topic, self.registry))
            self._preparing[topic] = fut
            fut.add_done_callback(lambda _: self._preparing.pop(topic, None))
        await asyncio.shield(fut)

    def _queue(self, topic: str, partition: int, sealed: bool) -> _PartitionQueue:
        queues = self._sealed_queues if sealed else self._queues
        by_partition = queues.get(topic)
        if by_partition is None:
            by_partition = queues[topic] = {}
        q = by_partition.get(partition)
        if q is None:
            q = by_partition[partition] = _PartitionQueue(sealed)
        return q

    def _report(self, err: KafkaError | None, msg: Any) -> None:
        # Poll thread. One callable for every message: a closure per message would live until
        # its report and feed the garbage collector.
        self._settle(self._queues[msg.topic()][msg.partition()], err, msg)

    def _report_sealed(self, err: KafkaError | None, msg: Any) -> None:
        self._settle(self._sealed_queues[msg.topic()][msg.partition()], err, msg)

    def _settle(self, q: _PartitionQueue, err: KafkaError | None, msg: Any) -> None:
        # The idempotent producer reports each partition's messages in the order they were
        # produced, so the report belongs to the oldest message of its partition's queue; key
        # and value are checked all the same.
        d = q.deliveries.popleft()
        tracker = q.trackers.popleft()
        values = q.values
        expected = d.value if values is None else values.popleft()
        value, key = msg.value(), msg.key()
        if expected != value or d.key != key:
            q.deliveries.appendleft(d)
            q.trackers.appendleft(tracker)
            if values is not None:
                values.appendleft(expected)
            for i, other in enumerate(q.deliveries):
                sent = other.value if values is None else values[i]
                if sent == value and other.key == key:
                    d, tracker = other, q.trackers[i]
                    del q.deliveries[i], q.trackers[i]
                    if values is not None:
                        del values[i]
                    break
            else:
                log.error("kafka delivery report matches no message", extra={"topic": msg.topic()})
                return
        if err is None:
            d.offset = q.written = msg.offset()
        else:
            d.error = _map_error(err)
            self._last_error = err.str()
        tracker.settled(1)

    def written(self, topic: str, partition: int) -> int:
        """The offset of the last message this process wrote to a partition (-1: none): a
        reader of that partition that has not reached it knows more is on the way."""
        out = -1
        for queues in (self._queues, self._sealed_queues):
            q = queues.get(topic, {}).get(partition)
            if q is not None and q.written > out:
                out = q.written
        return out

    def _finish_now(self, batch: list[Delivery]) -> None:
        assert self._loop is not None and self._on_done is not None
        self._loop.call_soon(self._on_done, batch)

    def _finished(self, batch: list[Delivery]) -> None:
        # Poll thread: one loop wake-up for every batch finished during this poll.
        with self._done_lock:
            self._done.append(batch)
            first = len(self._done) == 1
        if first and self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver_done)

    def _deliver_done(self) -> None:
        with self._done_lock:
            done, self._done = self._done, []
            self._in_flight -= len(done)
        assert self._on_done is not None
        for batch in done:
            self._on_done(batch)

    async def produce_one(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes,
        headers: list[tuple[str, bytes]],
        *,
        as_stored: bool = False,
    ) -> int:
        """Write one message outside the hot path (dead letters, redrive); returns its offset.

        To an encrypted topic the value is encrypted, bound to the ``mqfast-id`` header of
        ``headers``, unless ``as_stored``: a record that does not decrypt is copied as it is.
        """
        headers = (
            [h for h in headers if not h[0].startswith(ENC_HEADER)] if not as_stored else headers
        )
        if topic in self._encrypted and not as_stored:
            enc = self.encryptor
            if enc is None:
                raise errors.Unavailable(f"topic {topic!r} is encrypted and no master key is set")
            await self._prepare_key(topic)
            mid = next((v.decode() for k, v in headers if k == H_ID), "")
            value, hv = enc.encrypt(topic, key, mid, value)
            headers.append((ENC_HEADER, hv.encode()))
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()

        def report(err: KafkaError | None, msg: Any) -> None:
            if err is None:
                loop.call_soon_threadsafe(_set_result, fut, msg.offset())
            else:
                loop.call_soon_threadsafe(_set_exception, fut, _map_error(err))

        for _ in range(50):
            try:
                self._producer.produce(
                    topic, value, key, partition=partition, headers=headers, on_delivery=report
                )
                break
            except BufferError:
                await asyncio.sleep(0.02)
        else:
            raise errors.Unavailable("kafka: the local send queue is full")
        return await fut

    # ---- helpers --------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn, *args)
        except KafkaException as e:
            raise self._admin_error(e) from None

    @staticmethod
    def _admin_error(e: KafkaException) -> errors.MqfastError:
        err = e.args[0] if e.args else None
        if isinstance(err, KafkaError):
            code = err.code()
            if code in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
                return errors.UnknownTopic(f"unknown topic: {err.str()}")
            if code == KafkaError.INVALID_REPLICATION_FACTOR:
                return errors.BadRequest(f"kafka: {err.str()}", field="replication")
            if code == KafkaError.INVALID_PARTITIONS:
                return errors.BadRequest(f"kafka: {err.str()}", field="partitions")
            if code == KafkaError.POLICY_VIOLATION or code == KafkaError.INVALID_CONFIG:
                return errors.BadRequest(f"kafka: {err.str()}")
            return errors.Unavailable(f"kafka: {err.str()}")
        return errors.Unavailable(f"kafka: {e}")

    async def _wait(self, fut: concurrent.futures.Future[Any]) -> Any:
        # asyncio.wait, not wait_for: on Python 3.11 wait_for can swallow the cancellation of
        # its caller when the future completes at the same moment (a task that then never
        # stops, e.g. at shutdown).
        wrapped = asyncio.wrap_future(fut)
        done, _ = await asyncio.wait({wrapped}, timeout=ADMIN_TIMEOUT_S)
        if not done:
            wrapped.cancel()
            raise errors.Unavailable(
                f"kafka: the brokers did not answer within {ADMIN_TIMEOUT_S:.0f}s"
            )
        try:
            return wrapped.result()
        except KafkaException as e:
            raise self._admin_error(e) from None

    async def _metadata(self) -> Any:
        return await self._run(self._admin.list_topics, None, 5.0)

    async def _refresh_topics(self, force: bool = False) -> dict[str, TopicConfig]:
        if not force and time.monotonic() - self._topics_at < METADATA_TTL_S:
            return self._topics
        md = await self._metadata()
        verified = True
        try:
            registry = await self.registry.load_topics()
        except errors.Unavailable:
            registry = self.registry.cached_topics()  # metadata store down: last known
            verified = False
        topics: dict[str, TopicConfig] = {}
        unverified: set[str] = set()
        for name, t in md.topics.items():
            if name.startswith("__") or t.error is not None:
                continue
            parts = len(t.partitions)
            reps = max((len(p.replicas) for p in t.partitions.values()), default=1)
            known = registry.get(name) or self._topics.get(name)
            if known is not None:
                topics[name] = msgspec.structs.replace(known, partitions=parts)
            else:
                if not verified:
                    unverified.add(name)
                topics[name] = TopicConfig(
                    name=name,
                    partitions=parts,
                    replication=reps,
                    retention=self.settings.default_retention_ns,
                    max_size=0,
                )
        encrypted = {n for n, c in registry.items() if c.encrypted}
        encrypted.update(n for n, c in topics.items() if c.encrypted)
        if not verified:
            encrypted |= self._encrypted  # what cannot be confirmed now stays encrypted
        self._encrypted = encrypted
        self._unverified = unverified
        self._topics = topics
        self._topics_at = time.monotonic()
        return topics

    # ---- topics ---------------------------------------------------------------------------

    async def create_topic(self, config: TopicConfig) -> tuple[TopicConfig, bool]:
        if config.encrypted and self.encryptor is None:
            raise errors.BadRequest(
                "encrypted topics need MESSAGE_QUEUE_MASTER_KEYS or MESSAGE_QUEUE_MASTER_KEY_FILE",
                field="encrypted",
            )
        existing = await self.get_topic(config.name)
        if existing is not None:
            if existing.same_settings(config):
                return existing, False
            raise errors.TopicExists(
                f"topic {config.name!r} exists with other settings", field="name"
            )
        kconf = {
            "retention.ms": str(config.retention // NS_PER_MS) if config.retention else "-1",
            "retention.bytes": (
                str(max(1, config.max_size // config.partitions)) if config.max_size else "-1"
            ),
            "max.message.bytes": str(max(1_048_588, self.settings.max_batch_bytes + 65_536)),
        }
        new = NewTopic(
            config.name,
            num_partitions=config.partitions,
            replication_factor=config.replication,
            config=kconf,
        )
        if config.encrypted:
            # Registered before the topic exists: no process may ever see it without the flag
            # and send a message in clear (503 when the metadata store is down).
            await self.registry.save_topic(config)
            self._encrypted.add(config.name)
        futs = self._admin.create_topics([new], request_timeout=ADMIN_TIMEOUT_S)
        created = True
        try:
            await self._wait(futs[config.name])
        except errors.MqfastError as e:
            if "TOPIC_ALREADY_EXISTS" not in e.message and "already exists" not in e.message:
                if config.encrypted:
                    await self._unregister(config.name)
                raise
            created = False  # another replica created it at the same moment
        if created:
            await self._await_leaders(config.name, config.partitions)
            try:
                if not config.encrypted:
                    await self.registry.save_topic(config)
            except errors.Unavailable:
                log.warning(
                    "topic created in kafka but its settings could not be saved in the metadata "
                    "store; derived settings will be shown until it is recreated",
                    extra={"topic": config.name},
                )
            self._topics[config.name] = config
            if not config.encrypted:
                self._encrypted.discard(config.name)
            return config, True
        stored = await self.get_topic(config.name, fresh=True)
        if stored is None:
            raise errors.Unavailable(f"kafka: topic {config.name!r} is being created; retry")
        if not stored.same_settings(config):
            raise errors.TopicExists(
                f"topic {config.name!r} exists with other settings", field="name"
            )
        return stored, False

    async def _unregister(self, name: str) -> None:
        try:
            await self.registry.remove_topic(name)
        except errors.Unavailable:
            log.warning("topic settings left in the metadata store", extra={"topic": name})

    async def _await_leaders(self, name: str, partitions: int) -> None:
        """Wait until every partition has a leader: a created topic is usable on return."""

        def ready() -> bool:
            # Asked through the admin client (describe) and the producer too: its view of the
            # topic is what produce() checks a partition against, and a topic deleted and
            # created again with more partitions would otherwise keep the old count there
            # ("Unknown partition") for minutes.
            for client in (self._admin, self._producer):
                t = client.list_topics(topic=name, timeout=2.0).topics.get(name)
                if not (
                    t is not None
                    and t.error is None
                    and len(t.partitions) == partitions
                    and all(p.leader >= 0 for p in t.partitions.values())
                ):
                    return False
            return True

        deadline = time.monotonic() + ADMIN_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if await self._run(ready):
                    return
            except errors.MqfastError:
                pass
            await asyncio.sleep(0.05)
        log.warning("created topic has partitions without a leader", extra={"topic": name})

    async def get_topic(self, name: str, fresh: bool = False) -> TopicConfig | None:
        cfg = self._topics.get(name)
        if cfg is None or fresh:
            cfg = (await self._refresh_topics(force=True)).get(name)
            if cfg is None:
                cfg = await self._await_propagation(name)
        if name in self._unverified:
            raise errors.Unavailable(
                f"topic {name!r}: its settings are in the metadata store, which is unreachable"
            )
        return cfg

    async def _await_propagation(self, name: str) -> TopicConfig | None:
        """A topic just registered by another replica, once the broker asked knows it too.

        The registry row is written only after Kafka gave every partition a leader, but the
        broker this replica asks may not have applied that yet: without waiting, a consume
        through B right after a create through A would be answered "unknown topic".
        """
        registered = self.registry.cached_topics().get(name)
        if registered is None or registered.created_at < time.time() * 1000 - PROPAGATION_AGE_MS:
            return None

        def known() -> bool:
            t = self._admin.list_topics(topic=name, timeout=2.0).topics.get(name)
            return t is not None and t.error is None and len(t.partitions) > 0

        deadline = time.monotonic() + PROPAGATION_S
        while time.monotonic() < deadline:
            try:
                if await self._run(known):
                    return (await self._refresh_topics(force=True)).get(name)
            except errors.MqfastError:
                pass
            await asyncio.sleep(0.05)
        return None

    def cached_topic(self, name: str) -> TopicConfig | None:
        return self._topics.get(name)

    def forget_topic(self, name: str) -> None:
        """Drop ``name`` from the cache (changed elsewhere): the next lookup asks Kafka."""
        self._topics.pop(name, None)
        self._topics_at = 0.0

    async def list_topics(self) -> list[TopicConfig]:
        topics = await self._refresh_topics()
        return [topics[n] for n in sorted(topics)]

    async def delete_topic(self, name: str) -> None:
        if await self.get_topic(name, fresh=True) is None:
            raise errors.UnknownTopic(f"unknown topic {name!r}")
        futs = self._admin.delete_topics([name], request_timeout=ADMIN_TIMEOUT_S)
        await self._wait(futs[name])
        await self._until_gone(name)
        self._topics.pop(name, None)
        if self.topic_deleted is not None:
            await self.topic_deleted(name)
        await self._unregister(name)
        self._encrypted.discard(name)

    async def _until_gone(self, name: str) -> None:
        """Kafka deletes a topic asynchronously: until the metadata stops listing it, a lookup
        would find it again (as a topic the registry does not know, with default settings).
        Answer the DELETE only once it is gone, within ADMIN_TIMEOUT_S."""
        deadline = time.monotonic() + ADMIN_TIMEOUT_S
        while name in (await self._metadata()).topics and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def watermarks(self, name: str, partitions: int) -> list[tuple[int, int]]:
        """(low, high) offsets of every partition."""

        def read() -> list[tuple[int, int]]:
            return [watermarks(self._util, name, p) for p in range(partitions)]

        result: list[tuple[int, int]] = await self._run(read)
        return result

    async def describe_topic(self, name: str) -> TopicInfo:
        if await self.get_topic(name) is None:
            raise errors.UnknownTopic(f"unknown topic {name!r}")
        infos = await self.describe_topics([name])
        if name not in infos:
            raise errors.UnknownTopic(f"unknown topic {name!r}")
        return infos[name]

    async def describe_topics(self, names: list[str]) -> dict[str, TopicInfo]:
        """Describe several topics with two offset requests in all (metric history samples
        every topic each interval: one request per partition would not scale)."""
        topics = await self._refresh_topics()
        cfgs = [topics[n] for n in names if n in topics]
        if not cfgs:
            return {}
        marks = await self._offsets(cfgs)
        out: dict[str, TopicInfo] = {}
        for cfg in cfgs:
            m = marks.get(cfg.name)
            if m is None:
                continue  # deleted meanwhile
            stats = [
                PartitionStats(
                    partition=p, messages=hi - lo, bytes=0, low_offset=lo, high_offset=hi
                )
                for p, (lo, hi) in enumerate(m)
            ]
            lags: list[GroupLag] = []
            if self.group_lags is not None:
                lags = await self.group_lags(cfg.name, [hi for _, hi in m])
            out[cfg.name] = TopicInfo(
                name=cfg.name,
                partitions=cfg.partitions,
                replication=cfg.replication,
                retention=cfg.retention,
                max_size=cfg.max_size,
                created_at=cfg.created_at,
                dead_letter_expired=cfg.dead_letter_expired,
                messages=sum(st.messages for st in stats),
                bytes=0,
                partition_stats=stats,
                consumer_groups=lags,
                encrypted=cfg.encrypted,
            )
        return out

    async def _offsets(self, cfgs: list[TopicConfig]) -> dict[str, list[tuple[int, int]]]:
        """(low, high) of every partition of ``cfgs``; topics that failed are left out."""
        tps = [TopicPartition(c.name, p) for c in cfgs for p in range(c.partitions)]
        earliest = OffsetSpec.earliest()  # type: ignore[no-untyped-call]
        latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]
        lows = self._admin.list_offsets(
            {tp: earliest for tp in tps}, request_timeout=ADMIN_TIMEOUT_S
        )
        highs = self._admin.list_offsets(
            {tp: latest for tp in tps}, request_timeout=ADMIN_TIMEOUT_S
        )
        found: dict[tuple[str, int], list[int]] = {}
        for which, futs in ((0, lows), (1, highs)):
            for tp, fut in futs.items():
                try:
                    res = await self._wait(fut)
                except errors.MqfastError:
                    continue
                found.setdefault((tp.topic, tp.partition), [0, 0])[which] = int(res.offset)
        out: dict[str, list[tuple[int, int]]] = {}
        for c in cfgs:
            parts = [found.get((c.name, p)) for p in range(c.partitions)]
            if all(x is not None for x in parts):
                out[c.name] = [(x[0], x[1]) for x in parts if x is not None]
        return out

    async def delete_before(self, name: str, partition: int, offset: int) -> None:
        """Delete the records of one partition below ``offset`` (redrive empties the DLQ)."""
        futs = self._admin.delete_records(
            [TopicPartition(name, partition, offset)], request_timeout=ADMIN_TIMEOUT_S
        )
        for fut in futs.values():
            await self._wait(fut)

    async def open(self, rec: StoredMessage) -> StoredMessage:
        """``rec`` with its content decrypted when it is a :class:`SealedMessage`.

        Raises :class:`DecryptError` when the record is at fault (it is dead-lettered) and
        ``Unavailable`` when it cannot be decided now (no master key, metadata store down).
        """
        if not isinstance(rec, SealedMessage):
            return rec
        enc = self.encryptor
        headers = dict(rec.headers)
        hv = headers.get(ENC_HEADER)
        key_error = None
        if enc is not None and hv is not None and not enc.knows(hv):
            try:
                await enc.load(hv, self.registry)
            except DecryptError as e:
                key_error = e
        plain = open_message(
            enc, rec.topic, rec.raw_key, rec.message_id, rec.raw_value, headers, key_error
        )
        return StoredMessage(
            message_id=rec.message_id,
            topic=rec.topic,
            partition=rec.partition,
            offset=rec.offset,
            key=rec.key,
            content=plain.decode("utf-8", "replace"),
            headers=headers,
            priority=rec.priority,
            timestamp=rec.timestamp,
            expires_at=rec.expires_at,
        )

    async def read(
        self, topic: str, partition: int, offset: int, limit: int
    ) -> list[StoredMessage]:
        """Records of one partition from ``offset`` on. Those of an encrypted topic come back
        decrypted, except a record that does not decrypt: a :class:`SealedMessage`."""
        if limit <= 0:
            return []
        sealed = topic in self._encrypted

        def fetch() -> list[StoredMessage]:
            c = Consumer(consumer_config(self.settings, None))
            try:
                lo, hi = c.get_watermark_offsets(TopicPartition(topic, partition), timeout=5.0)
                start = max(offset, lo)
                if start >= hi:
                    return []
                c.assign([TopicPartition(topic, partition, start)])
                out: list[StoredMessage] = []
                deadline = time.monotonic() + 10.0
                while len(out) < limit and time.monotonic() < deadline:
                    for msg in c.consume(min(500, limit - len(out)), 0.5):
                        if msg.error() is None:
                            out.append(parse_record(msg, sealed))
                    if out and out[-1].offset >= hi - 1:
                        break
                return out
            finally:
                c.close()

        result: list[StoredMessage] = await self._run(fetch)
        if sealed:
            for i, rec in enumerate(result):
                try:
                    result[i] = await self.open(rec)
                except DecryptError:
                    pass  # returned as stored: the caller dead-letters or copies it
        return result

    def health(self) -> dict[str, object]:
        if self._down_since:
            return {
                "status": "down",
                "engine": self.name,
                "brokers": self.settings.kafka_brokers,
                "detail": self._last_error,
            }
        return {
            "status": "up",
            "engine": self.name,
            "brokers": self.settings.kafka_brokers,
            "topics": len(self._topics),
        }


def watermarks(client: Any, topic: str, partition: int) -> tuple[int, int]:
    """(low, high) of one partition; retried through a leader election (new topic, failover)
    for at most ``ADMIN_TIMEOUT_S`` in all."""
    deadline = time.monotonic() + ADMIN_TIMEOUT_S
    while True:
        left = deadline - time.monotonic()
        try:
            lo, hi = client.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=max(0.1, min(5.0, left)), cached=False
            )
            return int(lo), int(hi)
        except KafkaException as e:
            err = e.args[0] if e.args else None
            transient = isinstance(err, KafkaError) and (
                err.retriable()
                or err.code()
                in (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE)
            )
            if not transient or time.monotonic() + 0.1 >= deadline:
                raise
        time.sleep(0.1)


def _set_result(fut: asyncio.Future[int], value: int) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[int], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
